import Foundation
import XCTest

/// The package's build products, found next to the running test bundle (.build/<config>).
enum Products {
    static let directory = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
    static func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
    static var module: String { path("libp11fork.so") }
    static var forkcheck: String { path("p11fork-forkcheck") }
    static var failingModule: String { path("libp11fork-test-failing.so") }
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()
    static func example(_ name: String) -> String { packageRoot.appendingPathComponent("examples/\(name)").path }
}

/// The real modules the tests put behind p11fork (TEST_PKCS11_MODULE overrides SoftHSM's path).
enum RealModules {
    static var softHSM: String { ProcessInfo.processInfo.environment["TEST_PKCS11_MODULE"] ?? "/usr/lib/softhsm/libsofthsm2.so" }
    static let p11KitProxy = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so"

    /// p11-kit ignores per-user configuration for root, so the proxy is made to load only
    /// SoftHSM by mounting, in a private mount namespace, a folder holding only SoftHSM's module
    /// file over the system's module folder (nothing outside the namespace changes).
    static func p11KitLauncher(in directory: URL) throws -> [String] {
        let modules = directory.appendingPathComponent("p11-kit-modules")
        try FileManager.default.createDirectory(at: modules, withIntermediateDirectories: true)
        try "module: \(softHSM)\n".write(to: modules.appendingPathComponent("softhsm2.module"), atomically: true, encoding: .utf8)
        return ["/usr/bin/unshare", "-m", "/bin/sh", "-c",
                "mount --bind \"$0\" /usr/share/p11-kit/modules && exec \"$@\"", modules.path]
    }
}

struct ProcessResult {
    /// The exit status, or the number of the signal that ended the program (see `signaled`).
    let status: Int32
    let stdout: String
    let stderr: String
    let timedOut: Bool
    var signaled = false
    var output: String { stdout + stderr }
    /// How the program ended, for messages: "exit status 0", "killed by signal 11", "timed out".
    var ending: String { timedOut ? "timed out" : signaled ? "killed by signal \(status)" : "exit status \(status)" }
}

/// Runs a program with a clean environment (no P11FORK_* or SOFTHSM2_CONF from the caller)
/// plus `environment`, and kills it after `timeout` seconds: a hang is a failure, not a stuck run.
func runProgram(_ executable: String, _ arguments: [String], environment: [String: String] = [:],
         timeout: TimeInterval = 120, input: String? = nil) throws -> ProcessResult {
    var env = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("P11FORK_") && $0.key != "SOFTHSM2_CONF" }
    // The test drivers SwiftPM builds carry the Swift runtime, whose crash handler starts
    // swift-backtrace; seen hanging for minutes on a driver that crashes on purpose (SoftHSM
    // alone racing C_Finalize). A crash is to be a crash here.
    env["SWIFT_BACKTRACE"] = "enable=no"
    for (key, value) in environment { env[key] = value }
    let program = try Spawned(executable, arguments, environment: env)
    if let input { program.write(input) }
    program.closeInput()
    let collected = program.collect(until: Date().addingTimeInterval(timeout))
    let ending = program.status ?? (SIGKILL, true)
    return ProcessResult(status: ending.status, stdout: String(decoding: collected.stdout, as: UTF8.self),
                         stderr: String(decoding: collected.stderr, as: UTF8.self), timedOut: collected.timedOut,
                         signaled: ending.signaled)
}

/// A throw-away token a test makes for itself.
protocol TestToken: AnyObject {
    var directory: URL { get }
    var label: String { get }
    var pin: String { get }
    /// The environment a process needs to see this token.
    var environment: [String: String] { get }
}

/// Letters no hex number, time or length in a trace can contain: a test that finds the PIN in a
/// trace has found the PIN, not a coincidence.
func makeSecret() -> String { "PIN-" + String((0..<8).map { _ in "ghjkmnpqrstuvwxyz".randomElement()! }) }

/// A throw-away SoftHSM token in a temporary directory (never the system token directory).
final class SoftHSMToken: TestToken {
    let directory: URL
    let label: String
    let pin: String
    let soPin: String
    let strict: Bool
    /// The token's slot ID as SoftHSM itself reports it (softhsm2-util --init-token).
    private(set) var slot: UInt = 0
    var configPath: String { directory.appendingPathComponent("softhsm2.conf").path }
    /// The environment a process needs to see this token.
    var environment: [String: String] { ["SOFTHSM2_CONF": configPath] }

    /// `strict`: `library.reset_on_fork = true`, SoftHSM then refuses inherited state in a child.
    init(label: String = "p11fork-test", strict: Bool = false) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("p11fork-token-\(UUID().uuidString)")
        let tokens = directory.appendingPathComponent("tokens")
        try FileManager.default.createDirectory(at: tokens, withIntermediateDirectories: true)
        self.label = label
        self.strict = strict
        pin = makeSecret()
        soPin = makeSecret()
        var config = "directories.tokendir = \(tokens.path)\nobjectstore.backend = file\nlog.level = ERROR\n"
        if strict { config += "library.reset_on_fork = true\n" }
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
        let result = try runProgram("/usr/bin/softhsm2-util", ["--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", soPin],
                             environment: environment)
        guard result.status == 0, let said = result.stdout.range(of: "reassigned to slot "),
              let slot = UInt(result.stdout[said.upperBound...].prefix { $0.isNumber }) else {
            throw TestFailure("softhsm2-util --init-token failed: \(result.output)")
        }
        self.slot = slot
    }

    deinit { try? FileManager.default.removeItem(at: directory) }

    /// Initialises a second token in the same SoftHSM configuration, with the same PINs; returns
    /// its slot ID as SoftHSM reports it.
    func addToken(label otherLabel: String) throws -> UInt {
        let result = try runProgram("/usr/bin/softhsm2-util", ["--init-token", "--free", "--label", otherLabel, "--pin", pin, "--so-pin", soPin],
                                    environment: environment)
        guard result.status == 0, let said = result.stdout.range(of: "reassigned to slot "),
              let slot = UInt(result.stdout[said.upperBound...].prefix { $0.isNumber }) else {
            throw TestFailure("softhsm2-util --init-token failed: \(result.output)")
        }
        return slot
    }

    /// Makes a key pair on the token (or on `tokenLabel`, another token of this configuration)
    /// with pkcs11-tool, directly on SoftHSM. `type`: rsa:2048, EC:prime256v1.
    func generateKeyPair(label keyLabel: String, type: String = "rsa:2048", id: String = "01", onToken tokenLabel: String? = nil) throws {
        let result = try runProgram("/usr/bin/pkcs11-tool", ["--module", RealModules.softHSM, "--token-label", tokenLabel ?? label, "--login",
                                                      "--pin", pin, "--keypairgen", "--key-type", type, "--label", keyLabel, "--id", id],
                             environment: environment)
        guard result.status == 0 else { throw TestFailure("key generation failed: \(result.output)") }
    }
}

extension SoftHSMToken {
    /// The token folder becomes root's alone (0700), as Debian's /var/lib/softhsm/tokens is;
    /// checked: www-data cannot list it.
    func makeTokenFolderRootOnly() throws {
        let tokens = directory.appendingPathComponent("tokens").path
        guard chmod(tokens, 0o700) == 0 else { throw TestFailure("chmod \(tokens) failed") }
        let probe = try runProgram("/usr/sbin/runuser", ["-u", "www-data", "--", "/bin/ls", tokens])
        guard probe.status != 0 else { throw TestFailure("www-data can read the token folder: \(probe.output)") }
    }
}

/// A throw-away token on the network-HSM-like test module (Tests/Modules/NetHSM): its
/// "server" state lives in a temporary directory shared by every process and module copy.
final class NetHSMToken: TestToken {
    let directory: URL
    let label = "nethsm-test"
    let pin = makeSecret()
    static var module: String { Products.path("libp11fork-test-nethsm.so") }
    var environment: [String: String] {
        ["NETHSM_DIR": directory.path, "NETHSM_LABEL": label, "NETHSM_PIN": pin,
         "NETHSM_LOG": directory.appendingPathComponent("nethsm.log").path]
    }
    var log: String { (try? String(contentsOf: directory.appendingPathComponent("nethsm.log"), encoding: .utf8)) ?? "" }

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("p11fork-nethsm-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(at: directory) }

    /// pkcs11-tool on the module directly, as the token's user.
    func tool(_ arguments: [String], login: Bool = true) throws -> ProcessResult {
        try runProgram("/usr/bin/pkcs11-tool", ["--module", Self.module, "--token-label", label]
                       + (login ? ["--login", "--pin", pin] : []) + arguments, environment: environment)
    }

    /// An HMAC key on the token.
    func generateSecretKey(label keyLabel: String) throws {
        let result = try tool(["--keygen", "--key-type", "GENERIC:32", "--label", keyLabel, "--id", "07"])
        guard result.status == 0 else { throw TestFailure("key generation failed: \(result.output)") }
    }
}

/// openCryptoki's soft token (slot 3), private to each run: scripts/with-opencryptoki.sh mounts
/// temporary folders over openCryptoki's state in a mount namespace of its own, starts
/// pkcsslotd, initialises the token and makes an RSA key, then runs the command.
final class OpenCryptokiToken: TestToken {
    let directory: URL
    let label = "ocktest"
    // The soft token takes PINs of at most 8 characters.
    let pin = String((0..<8).map { _ in "ghjkmnpqrstuvwxyz".randomElement()! })
    let soPin = String((0..<8).map { _ in "ghjkmnpqrstuvwxyz".randomElement()! })
    var environment: [String: String] { [:] }
    static let module = "/usr/lib/x86_64-linux-gnu/opencryptoki/libopencryptoki.so.0"

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("p11fork-ock-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(at: directory) }

    /// Runs the command under the private openCryptoki, with an RSA key labelled `keyLabel`.
    func launcher(keyLabel: String) -> [String] {
        [Products.packageRoot.appendingPathComponent("scripts/with-opencryptoki.sh").path, directory.path, label, soPin, pin, keyLabel, "--"]
    }
}

/// A tpm2-pkcs11 token on a software TPM (swtpm + tpm2-abrmd on a private D-Bus bus), private to
/// each test: scripts/with-tpm2.sh starts it all around the command and stops it afterwards.
final class TPM2Token: TestToken {
    let directory: URL
    let label = "tpmtest"
    let pin = makeSecret()
    let soPin = makeSecret()
    var environment: [String: String] { [:] }
    static let module = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
    static var available: Bool { FileManager.default.fileExists(atPath: module) && FileManager.default.fileExists(atPath: "/usr/bin/swtpm") }

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("p11fork-tpm2-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(at: directory) }

    /// `algorithm`: tpm2_ptool's name for the key's type (rsa2048 unless given; ecc256: P-256).
    func launcher(keyLabel: String, algorithm: String? = nil) -> [String] {
        (algorithm.map { ["/usr/bin/env", "TPM2_KEY_ALGORITHM=\($0)"] } ?? [])
            + [Products.packageRoot.appendingPathComponent("scripts/with-tpm2.sh").path, directory.path, label, soPin, pin, keyLabel, "--"]
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
