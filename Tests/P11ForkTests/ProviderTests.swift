import Foundation
import Testing
import XCTest

/// pkcs11-provider, OpenSSL 3's PKCS#11 provider, built by scripts/install-deps.sh from its
/// release tarball into .deps/pkcs11-provider (TEST_PKCS11_PROVIDER overrides).
enum PKCS11Provider {
    static var path: String {
        ProcessInfo.processInfo.environment["TEST_PKCS11_PROVIDER"]
            ?? Products.packageRoot.appendingPathComponent(".deps/pkcs11-provider/lib/ossl-modules/pkcs11.so").path
    }
    static var available: Bool { FileManager.default.fileExists(atPath: path) }
    static var missing: String {
        "pkcs11-provider is not built (no \(path)): run scripts/install-deps.sh, which builds it from the pkcs11-provider 1.2.0 release tarball it names"
    }
    static var configuration: String { Products.example("openssl-provider/openssl.cnf") }

    /// The example configuration plus the PIN file the provider logs in with (also in a forked
    /// child, where it logs in again by itself).
    static func configuration(withPINFile pinFile: String, in directory: URL) throws -> String {
        let text = try String(contentsOfFile: configuration, encoding: .utf8)
        XCTAssertTrue(text.contains("pkcs11-module-path = ${ENV::LIBP11FORK}"), "the example's module line changed")
        let file = directory.appendingPathComponent("openssl-provider-\(UUID().uuidString).cnf")
        try (text + "pkcs11-module-token-pin = file:\(pinFile)\n").write(to: file, atomically: true, encoding: .utf8)
        return file.path
    }

    /// A file holding the PIN (and a newline), readable by its owner only.
    static func pinFile(_ pin: String, in directory: URL) throws -> String {
        let file = directory.appendingPathComponent("pin-\(UUID().uuidString)")
        guard FileManager.default.createFile(atPath: file.path, contents: Data("\(pin)\n".utf8), attributes: [.posixPermissions: 0o600])
        else { throw TestFailure("cannot write \(file.path)") }
        return file.path
    }
}

/// The OpenSSL command line through pkcs11-provider over SoftHSM, each directly first, then with
/// libp11fork.so as the provider's module: RSA and EC signatures that openssl verifies with the
/// token's public key alone, a self-signed certificate made with the token key, the PIN from a
/// file (pin-source), the provider named by a configuration file or on the command line.
///
/// Directly, every openssl command that used the token crashes at exit (SIGSEGV) after its work
/// is done: OpenSSL's cleanup makes the provider close its sessions after SoftHSM's own exit
/// handlers ran. Through p11fork it exits 0 (docs/FORK.md, "A process that exits").
final class ProviderCommandLineTests: XCTestCase {
    private var token: SoftHSMToken!
    private var pinFile: String!
    private var work: URL { token.directory }

    override func setUpWithError() throws {
        guard PKCS11Provider.available else { throw XCTSkip(PKCS11Provider.missing) }
        token = try SoftHSMToken()
        try token.generateKeyPair(label: "provider-rsa", type: "rsa:2048", id: "01")
        try token.generateKeyPair(label: "provider-ec", type: "EC:prime256v1", id: "02")
        pinFile = try PKCS11Provider.pinFile(token.pin, in: work)
    }

    override func tearDown() { token = nil }

    private var trace: URL { work.appendingPathComponent("trace.log") }

    /// openssl with the provider from the example configuration, its module SoftHSM or p11fork.
    private func openssl(_ arguments: [String], through: Bool, configuration: String = PKCS11Provider.configuration,
                         extra: [String: String] = [:]) throws -> ProcessResult {
        var environment = token.environment
        environment["OPENSSL_CONF"] = configuration
        environment["PKCS11_PROVIDER"] = PKCS11Provider.path
        environment["LIBP11FORK"] = through ? Products.module : RealModules.softHSM
        if through {
            environment["P11FORK_MODULE"] = RealModules.softHSM
            environment["P11FORK_TRACE"] = trace.path
            environment["P11FORK_TRACE_LEVEL"] = "calls"
        }
        environment.merge(extra) { $1 }
        return try runProgram("/usr/bin/openssl", arguments, environment: environment, timeout: 30)
    }

    /// openssl without any provider but the default one.
    private func software(_ arguments: [String]) throws -> ProcessResult {
        try runProgram("/usr/bin/openssl", arguments, environment: ["OPENSSL_CONF": "/dev/null"], timeout: 30)
    }

    private func uri(_ key: String, _ type: String, pin: Bool = false) -> String {
        "pkcs11:token=\(token.label);object=\(key);type=\(type)" + (pin ? "?pin-source=file:\(pinFile!)" : "")
    }

    /// A public key as PEM with a named curve (pkcs11-provider writes an EC key's curve as
    /// explicit parameters into a certificate: the same key, another encoding).
    private func canonical(publicKey pem: String) throws -> String {
        let input = try file("public-\(UUID().uuidString).pem", pem)
        let result = try software(["pkey", "-pubin", "-in", input, "-ec_param_enc", "named_curve"])
        XCTAssertEqual(result.status, 0, result.output)
        return result.stdout
    }

    /// The token's (or `tokenLabel`'s) public key as PEM, read directly from SoftHSM (no provider involved).
    private func tokenPublicKey(_ key: String, onToken tokenLabel: String? = nil) throws -> String {
        let der = work.appendingPathComponent("\(key)-\(tokenLabel ?? token.label)-public.der").path
        let read = try runProgram("/usr/bin/pkcs11-tool", ["--module", RealModules.softHSM, "--token-label", tokenLabel ?? token.label,
                                                           "--read-object", "--type", "pubkey", "--label", key, "-o", der],
                                  environment: token.environment)
        XCTAssertEqual(read.status, 0, read.output)
        let pem = try software(["pkey", "-pubin", "-inform", "DER", "-in", der])
        XCTAssertEqual(pem.status, 0, pem.output)
        return pem.stdout
    }

    private func file(_ name: String, _ contents: String) throws -> String {
        let url = work.appendingPathComponent(name)
        try contents.write(to: url, atomically: true, encoding: .utf8)
        return url.path
    }

    /// Signs a digest with `key` through the provider; returns the run and whether the signature
    /// verifies with the token's public key in software.
    private func signDigest(_ key: String, through: Bool, arguments extra: [String] = [], configuration: String = PKCS11Provider.configuration,
                            environment: [String: String] = [:]) throws -> (ProcessResult, Bool) {
        let data = try file("data.txt", "signed through pkcs11-provider\n")
        let digest = work.appendingPathComponent("digest").path
        XCTAssertEqual(try software(["dgst", "-sha256", "-binary", "-out", digest, data]).status, 0)
        let signature = work.appendingPathComponent("signature-\(UUID().uuidString)").path
        let run = try openssl(["pkeyutl"] + extra + ["-sign", "-inkey", uri(key, "private", pin: true), "-in", digest, "-out", signature],
                              through: through, configuration: configuration, extra: environment)
        let publicKey = try file("\(key)-public.pem", try tokenPublicKey(key))
        let check = try software(["pkeyutl", "-verify", "-pubin", "-inkey", publicKey, "-in", digest, "-sigfile", signature])
        let verified = FileManager.default.fileExists(atPath: signature) && check.stdout.contains("Signature Verified Successfully")
        return (run, verified)
    }

    private func checkSignature(_ key: String) throws {
        let (direct, directVerified) = try signDigest(key, through: false)
        print("directly over SoftHSM, openssl pkeyutl -sign with \(key): \(direct.ending), signature verifies: \(directVerified)")
        // Directly openssl usually crashes at exit, after the signature was written: how often
        // depends on what SoftHSM's freed memory holds then (RSA crashed in every run here, EC in
        // most), so only the signature is asserted.
        XCTAssertTrue(directVerified, "directly the signature is made: \(direct.output)")

        let (through, throughVerified) = try signDigest(key, through: true)
        XCTAssertEqual(through.ending, "exit status 0", "through p11fork: \(through.output)")
        XCTAssertTrue(throughVerified, "through p11fork the signature verifies: \(through.output)")
        let text = try String(contentsOf: trace, encoding: .utf8)
        // At exit the provider's C_CloseSession and C_Finalize come after SoftHSM's exit handlers:
        // p11fork answers them without reaching SoftHSM.
        let exiting = try XCTUnwrap(text.range(of: "process exiting: the real module's exit handlers have run"), text)
        XCTAssertTrue(text[exiting.upperBound...].contains("C_Finalize() = CKR_CRYPTOKI_NOT_INITIALIZED"), text)
        XCTAssertFalse(text.contains(token.pin), "the PIN is in the trace")
    }

    func testRSASignatureVerifiesAndOpenSSLExitsCleanlyThroughP11Fork() throws { try checkSignature("provider-rsa") }
    func testECSignatureVerifiesAndOpenSSLExitsCleanlyThroughP11Fork() throws { try checkSignature("provider-ec") }

    /// `openssl req -x509` with the token key: the certificate verifies with its own key, which
    /// is the token's.
    func testSelfSignedCertificateWithTheTokenKey() throws {
        let expected = try canonical(publicKey: try tokenPublicKey("provider-ec"))
        for through in [false, true] {
            let certificate = work.appendingPathComponent("cert-\(through).pem").path
            let made = try openssl(["req", "-new", "-x509", "-key", uri("provider-ec", "private", pin: true),
                                    "-subj", "/CN=p11fork provider test", "-days", "1", "-out", certificate], through: through)
            let how = through ? "through p11fork" : "directly"
            print("\(how), openssl req -x509: \(made.ending)")
            XCTAssertTrue(FileManager.default.fileExists(atPath: certificate), "\(how): no certificate: \(made.output)")
            XCTAssertTrue(try software(["verify", "-CAfile", certificate, certificate]).stdout.contains(": OK"), how)
            let key = try canonical(publicKey: try software(["x509", "-in", certificate, "-noout", "-pubkey"]).stdout)
            XCTAssertEqual(key, expected, "\(how): the certificate holds the token's key")
            if through { XCTAssertEqual(made.ending, "exit status 0", made.output) }
        }
    }

    /// A `slot-id=` URI (RFC 7512) with the real module's slot ID, the decimal number
    /// `softhsm2-util --show-slots` prints. Two tokens in one SoftHSM configuration hold a key
    /// with the same label, and the URI names no token: only the slot ID picks the key.
    /// pkcs11-provider selects the slot by it (a signature made through one slot ID verifies
    /// with that token's public key and not with the other's), directly over SoftHSM and through
    /// p11fork alike. A slot ID no token has (the first one's + 1) finds no key either way.
    func testSlotIDURIPicksTheTokenDirectlyAndThroughP11Fork() throws {
        let other = "p11fork-other"
        let otherSlot = try token.addToken(label: other)
        try token.generateKeyPair(label: "provider-ec", type: "EC:prime256v1", id: "02", onToken: other)
        let listed = try runProgram("/usr/bin/softhsm2-util", ["--show-slots"], environment: token.environment)
        XCTAssertEqual(listed.status, 0, listed.output)
        let slots = listed.stdout.split(separator: "\n").compactMap { line -> UInt? in
            line.hasPrefix("Slot ") ? UInt(line.dropFirst(5).trimmingCharacters(in: .whitespaces)) : nil
        }
        XCTAssertTrue(slots.contains(token.slot) && slots.contains(otherSlot), "softhsm2-util --show-slots: \(listed.stdout)")
        XCTAssertGreaterThan(token.slot, 0xffff, "SoftHSM's slot IDs are large numbers, not indexes")
        XCTAssertNotEqual(token.slot, otherSlot)
        let wrongSlot = token.slot + 1
        XCTAssertFalse(slots.contains(wrongSlot), "\(wrongSlot) is a slot: \(listed.stdout)")

        let digest = work.appendingPathComponent("digest").path
        XCTAssertEqual(try software(["dgst", "-sha256", "-binary", "-out", digest, try file("data.txt", "signed by slot-id\n")]).status, 0)
        let publicKeys = [token.label: try file("first-public.pem", try tokenPublicKey("provider-ec")),
                          other: try file("other-public.pem", try tokenPublicKey("provider-ec", onToken: other))]
        func verifies(_ signature: String, _ tokenLabel: String) throws -> Bool {
            try software(["pkeyutl", "-verify", "-pubin", "-inkey", publicKeys[tokenLabel]!, "-in", digest, "-sigfile", signature])
                .stdout.contains("Signature Verified Successfully")
        }
        func sign(slot: UInt, through: Bool) throws -> (ProcessResult, signature: String?) {
            let signature = work.appendingPathComponent("signature-\(UUID().uuidString)").path
            let inkey = "pkcs11:slot-id=\(slot);object=provider-ec;type=private?pin-source=file:\(pinFile!)"
            let run = try openssl(["pkeyutl", "-sign", "-inkey", inkey, "-in", digest, "-out", signature], through: through)
            let made = (try? Data(contentsOf: URL(fileURLWithPath: signature)).isEmpty == false) ?? false
            return (run, made ? signature : nil)
        }

        for through in [false, true] {
            let how = through ? "through p11fork" : "directly"
            for (slot, label) in [(token.slot, token.label), (otherSlot, other)] {
                let (run, signature) = try sign(slot: slot, through: through)
                print("\(how), slot-id=\(slot) (\(label)): \(run.ending), signature made: \(signature != nil)")
                // Directly openssl crashes at exit after the signature is written (see above).
                if through { XCTAssertEqual(run.ending, "exit status 0", "\(how), slot-id=\(slot): \(run.output)") }
                let made = try XCTUnwrap(signature, "\(how), slot-id=\(slot): no signature: \(run.output)")
                XCTAssertTrue(try verifies(made, label), "\(how), slot-id=\(slot): the signature is \(label)'s key's")
                let otherLabel = label == other ? token.label : other
                XCTAssertFalse(try verifies(made, otherLabel), "\(how), slot-id=\(slot): the signature is not \(otherLabel)'s key's")
            }
        }

        // No token at the slot ID: no key, no signature, the same message both ways. Directly
        // openssl still crashes at exit (the provider's cleanup after SoftHSM's exit handlers);
        // through p11fork it exits with pkeyutl's own status, 1.
        let (direct, directSignature) = try sign(slot: wrongSlot, through: false)
        let (through, throughSignature) = try sign(slot: wrongSlot, through: true)
        print("slot-id=\(wrongSlot) (no token): directly \(direct.ending), through p11fork \(through.ending)")
        XCTAssertNil(directSignature, direct.output)
        XCTAssertNil(throughSignature, through.output)
        XCTAssertNotEqual(direct.status, 0, direct.output)
        XCTAssertEqual(through.ending, "exit status 1", through.output)
        for run in [direct, through] {
            XCTAssertTrue(run.stderr.contains("Could not read private key from pkcs11:slot-id=\(wrongSlot);object=provider-ec"), run.output)
        }
        // The sessions were opened on the real module's slot IDs, as the URIs name them.
        let trace = try String(contentsOf: trace, encoding: .utf8)
        for slot in [token.slot, otherSlot] {
            XCTAssertTrue(trace.contains("C_OpenSession(slot=0x\(String(slot, radix: 16)), "), "no session on \(slot): \(trace)")
        }
        XCTAssertFalse(trace.contains(token.pin), "the PIN is in the trace")
    }

    /// No configuration file: `-provider-path`, `-provider default -provider pkcs11`, the module
    /// from PKCS11_PROVIDER_MODULE. (Named the other way round, `-provider pkcs11` first, OpenSSL
    /// takes SHA-256 from the token as well, and SoftHSM then hangs in C_OpenSession, with or
    /// without p11fork: docs/FORK.md.)
    func testProviderNamedOnTheCommandLine() throws {
        let options = ["-provider-path", URL(fileURLWithPath: PKCS11Provider.path).deletingLastPathComponent().path,
                       "-provider", "default", "-provider", "pkcs11"]
        let (direct, directVerified) = try signDigest("provider-rsa", through: false, arguments: options, configuration: "/dev/null",
                                                      environment: ["PKCS11_PROVIDER_MODULE": RealModules.softHSM])
        print("directly, -provider pkcs11: \(direct.ending), signature verifies: \(directVerified)")
        XCTAssertTrue(directVerified, direct.output)
        let (through, throughVerified) = try signDigest("provider-rsa", through: true, arguments: options, configuration: "/dev/null",
                                                        environment: ["PKCS11_PROVIDER_MODULE": Products.module])
        XCTAssertEqual(through.ending, "exit status 0", through.output)
        XCTAssertTrue(throughVerified, through.output)
        XCTAssertTrue(try String(contentsOf: trace, encoding: .utf8).contains("C_SignInit"), "the signature went through p11fork")
    }

    /// examples/openssl-provider/sign-with-openssl-provider.sh: sign, certificate, checks.
    func testExampleScriptSignsThroughP11Fork() throws {
        let data = try file("example.txt", "signed by the example\n")
        for key in ["provider-rsa", "provider-ec"] {
            let result = try runProgram(Products.example("openssl-provider/sign-with-openssl-provider.sh"),
                                        [PKCS11Provider.path, Products.module, token.label, key, pinFile, data],
                                        environment: token.environment.merging(["P11FORK_MODULE": RealModules.softHSM]) { $1 }, timeout: 60)
            XCTAssertEqual(result.status, 0, "\(key): \(result.output)")
            XCTAssertTrue(result.stdout.contains("Signature Verified Successfully"), result.output)
            XCTAssertTrue(result.stdout.contains(": OK"), result.output)
            XCTAssertTrue(result.stdout.contains("certificate key: the token's"), result.output)
        }
        // Directly the script stops at its first provider command, which crashes at exit.
        let direct = try runProgram(Products.example("openssl-provider/sign-with-openssl-provider.sh"),
                                    [PKCS11Provider.path, RealModules.softHSM, token.label, "provider-rsa", pinFile, data],
                                    environment: token.environment, timeout: 60)
        print("the example directly over SoftHSM: \(direct.ending)")
        XCTAssertNotEqual(direct.status, 0, direct.output)
    }
}

/// The same command line over tpm2-pkcs11 (software TPM, scripts/with-tpm2.sh): the example
/// script (RSA signature, self-signed certificate, pin-source), directly and through p11fork.
@Suite(.serialized) struct ProviderOverTPM2Tests {
    @Test(.enabled(if: PKCS11Provider.available && TPM2Token.available, "needs pkcs11-provider (scripts/install-deps.sh) and swtpm"))
    func exampleScriptSignsDirectlyAndThroughP11Fork() throws {
        let token = try TPM2Token()
        let pinFile = try PKCS11Provider.pinFile(token.pin, in: token.directory)
        let data = token.directory.appendingPathComponent("data.txt")
        try "signed with a TPM key through pkcs11-provider\n".write(to: data, atomically: true, encoding: .utf8)
        let trace = token.directory.appendingPathComponent("trace.log").path
        for through in [false, true] {
            let module = through ? Products.module : TPM2Token.module
            let command = token.launcher(keyLabel: "tpm-key") + ["/usr/bin/env", "P11FORK_MODULE=\(TPM2Token.module)", "P11FORK_TRACE=\(trace)",
                Products.example("openssl-provider/sign-with-openssl-provider.sh"), PKCS11Provider.path, module, token.label, "tpm-key", pinFile, data.path]
            let result = try runProgram(command[0], Array(command.dropFirst()), timeout: 120)
            let how = through ? "through p11fork" : "directly"
            print("tpm2-pkcs11 \(how): \(result.ending)")
            #expect(result.status == 0, "\(how): \(result.output)")
            #expect(result.stdout.contains("Signature Verified Successfully"), "\(how): \(result.output)")
            #expect(result.stdout.contains("certificate key: the token's"), "\(how): \(result.output)")
        }
        let text = try String(contentsOfFile: trace, encoding: .utf8)
        #expect(text.contains("C_Sign"), "the signatures went through p11fork")
        #expect(!text.contains(token.pin), "the PIN is in the trace")
    }
}

/// Runs p11fork-providerfork (Sources/p11fork-cli/ProviderScenario): the parent loads the key through
/// OSSL_STORE, forks workers that sign with the inherited EVP_PKEY, and keeps signing; every
/// signature is verified in the parent.
struct ProviderFork {
    let token: any TestToken
    var keyLabel: String
    var realModule: String
    /// A command the driver runs under (the private p11-kit, openCryptoki or TPM set-ups).
    var launcher: [String] = []
    var extraEnvironment: [String: String] = [:]
    /// Milliseconds between forks (SoftHSM's file store, see the driver's header).
    var stagger = 200
    /// The workers get an environment of TZ alone, as nginx gives its workers.
    var scrub = false

    struct Outcome {
        let result: ProcessResult
        let trace: String
        var succeeded: Bool { result.stdout.contains("result: ok") }
        var report: String { "\(result.ending)\n\(result.output)\ntrace:\n\(trace.suffix(6000))" }
        /// How it ended, one line per worker and the result, for the test's log.
        var summary: String {
            result.stdout.split(separator: "\n").filter { $0.hasPrefix("worker") || $0.hasPrefix("parent") || $0.hasPrefix("result") }
                .joined(separator: "; ") + " (\(result.ending))"
        }
    }

    /// `seconds`: what each worker may take (its alarm); the parent's alarm is 30 s more.
    func run(through: Bool, workers: Int = 3, signatures: Int = 2, seconds: Int) throws -> Outcome {
        let pinFile = try PKCS11Provider.pinFile(token.pin, in: token.directory)
        let configuration = try PKCS11Provider.configuration(withPINFile: pinFile, in: token.directory)
        let trace = token.directory.appendingPathComponent("trace-\(UUID().uuidString).log")
        var environment = token.environment.merging(extraEnvironment) { $1 }
        environment["OPENSSL_CONF"] = configuration
        environment["PKCS11_PROVIDER"] = PKCS11Provider.path
        environment["LIBP11FORK"] = through ? Products.module : realModule
        if through {
            environment["P11FORK_MODULE"] = realModule
            environment["P11FORK_TRACE"] = trace.path
            environment["P11FORK_TRACE_LEVEL"] = "calls"
        }
        let command = launcher + [Products.path("p11fork-providerfork"), "pkcs11:token=\(token.label);object=\(keyLabel);type=private",
                                  String(workers), String(signatures), String(seconds), String(stagger)] + (scrub ? ["scrub"] : [])
        let result = try runProgram(command[0], Array(command.dropFirst()), environment: environment, timeout: TimeInterval(seconds + 90))
        return Outcome(result: result, trace: (try? String(contentsOf: trace, encoding: .utf8)) ?? "")
    }
}

/// A forking OpenSSL 3 program over each real module, directly (bounded: each worker has 8
/// seconds) and through p11fork. pkcs11-provider handles fork itself: in a worker it finalizes and
/// initialises the module again, logs in again with the configured PIN, finds its keys again,
/// and gives up when C_GetInfo differs from what it saw in the parent.
@Suite(.serialized) struct ProviderForkTests {
    static let enabled = PKCS11Provider.available

    /// The direct half, bounded (each worker 8 seconds), printed as it ended.
    private func runDirectly(_ fork: ProviderFork, _ name: String, workers: Int = 3) throws -> ProviderFork.Outcome {
        let outcome = try fork.run(through: false, workers: workers, seconds: 8)
        print("\(name) directly: \(outcome.summary)")
        return outcome
    }

    /// The checks every run through p11fork must pass.
    private func expectAllSigned(_ outcome: ProviderFork.Outcome, workers: Int = 3, pin: String) {
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        #expect(outcome.result.stdout.contains("result: ok \(workers) worker(s)"), "\(outcome.report)")
        #expect(outcome.result.ending == "exit status 0", "through p11fork the program exits cleanly: \(outcome.report)")
        #expect(!outcome.trace.contains(pin), "the PIN is in the trace")
    }

    @Test(.enabled(if: enabled, "needs pkcs11-provider: run scripts/install-deps.sh"), arguments: [false, true])
    func softHSM(strict: Bool) throws {
        let token = try SoftHSMToken(strict: strict)
        try token.generateKeyPair(label: "provider-key")
        let fork = ProviderFork(token: token, keyLabel: "provider-key", realModule: RealModules.softHSM)
        let direct = try runDirectly(fork, "SoftHSM (\(strict ? "reset_on_fork" : "default mode"))")
        // The provider starts over in each worker by itself; directly only the exit may crash.
        #expect(direct.succeeded, "directly: \(direct.report)")
        let through = try fork.run(through: true, seconds: 20)
        expectAllSigned(through, pin: token.pin)
        // The worker's C_Finalize makes p11fork forget what it inherited: no login replay, no
        // object re-found by p11fork; the provider's own C_Initialize finds a module ready.
        #expect(!through.trace.contains("login replayed"), "\(through.report)")
        #expect(through.trace.components(separatedBy: "C_Initialize in the child: the module was already made ready for this process").count - 1 == 3,
                "\(through.report)")
    }

    /// The driver holds `environ` itself, as nginx and haproxy do, and gives its workers an
    /// environment of TZ alone. Directly, SoftHSM initialised again by the provider in a worker
    /// finds no SOFTHSM2_CONF and no token. Through p11fork the worker's module gets the
    /// environment p11fork was loaded with; under the provider's RTLD_DEEPBIND that needed
    /// p11fork to set the program's `environ`, not the one its own symbol named (libc's, unused).
    @Test(.enabled(if: enabled, "needs pkcs11-provider: run scripts/install-deps.sh"))
    func workersWithAScrubbedEnvironment() throws {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "provider-key")
        var fork = ProviderFork(token: token, keyLabel: "provider-key", realModule: RealModules.softHSM)
        fork.scrub = true
        let direct = try runDirectly(fork, "SoftHSM (reset_on_fork), workers without SOFTHSM2_CONF,", workers: 2)
        #expect(!direct.succeeded && direct.result.stderr.contains("Provided key has invalid handle"), "directly: \(direct.report)")
        let through = try fork.run(through: true, workers: 2, seconds: 20)
        expectAllSigned(through, workers: 2, pin: token.pin)
    }

    @Test(.enabled(if: enabled && getuid() == 0, "needs pkcs11-provider (scripts/install-deps.sh) and root (unshare -m)"))
    func p11KitProxy() throws {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "provider-key")
        var fork = ProviderFork(token: token, keyLabel: "provider-key", realModule: RealModules.p11KitProxy)
        fork.launcher = try RealModules.p11KitLauncher(in: token.directory)
        let direct = try runDirectly(fork, "p11-kit's proxy")
        #expect(direct.result.stdout.contains("result:"), "directly the driver ran to its end: \(direct.report)")
        let through = try fork.run(through: true, seconds: 20)
        expectAllSigned(through, pin: token.pin)
    }

    @Test(.enabled(if: enabled && OpenCryptokiForkTests.available, "needs pkcs11-provider (scripts/install-deps.sh) and pkcsslotd"))
    func openCryptoki() throws {
        let token = try OpenCryptokiToken()
        var fork = ProviderFork(token: token, keyLabel: "ock-key", realModule: OpenCryptokiToken.module)
        fork.launcher = token.launcher(keyLabel: "ock-key")
        let direct = try runDirectly(fork, "openCryptoki")
        #expect(direct.result.stdout.contains("result:"), "directly the driver ran to its end: \(direct.report)")
        let through = try fork.run(through: true, seconds: 20)
        print("openCryptoki through p11fork: \(through.summary)")
        #expect(through.result.stdout.contains("parent signs after the workers: yes"), "the parent keeps signing: \(through.report)")
        try expectWorkersSignThroughTheHelper(through, pin: token.pin)
        // Re-initialised in place too (docs/FORK.md says when this strategy is safe: no parent
        // thread inside the module at the fork; this program has none).
        fork.extraEnvironment = ["P11FORK_STRATEGY": "reinitialize"]
        let reinitialized = try fork.run(through: true, seconds: 20)
        print("openCryptoki through p11fork, P11FORK_STRATEGY=reinitialize: \(reinitialized.summary)")
        expectAllSigned(reinitialized, pin: token.pin)
    }

    @Test(.enabled(if: enabled && TPM2Token.available, "needs pkcs11-provider (scripts/install-deps.sh) and swtpm"))
    func tpm2() throws {
        let token = try TPM2Token()
        var fork = ProviderFork(token: token, keyLabel: "tpm-key", realModule: TPM2Token.module)
        fork.launcher = token.launcher(keyLabel: "tpm-key")
        let direct = try runDirectly(fork, "tpm2-pkcs11")
        // Directly the workers wait for a D-Bus proxy until their alarm, and the parent, whose TPM
        // session the workers' re-initialisation flushed, can no longer sign.
        #expect(!direct.succeeded, "directly: \(direct.report)")
        #expect(direct.result.stdout.contains("parent signs after the workers: no"), "directly the parent is harmed: \(direct.report)")
        let through = try fork.run(through: true, seconds: 20)
        print("tpm2-pkcs11 through p11fork: \(through.summary)")
        #expect(through.result.stdout.contains("parent signs while the workers run: yes"), "\(through.report)")
        #expect(through.result.stdout.contains("parent signs after the workers: yes"), "the parent is never harmed: \(through.report)")
        try expectWorkersSignThroughTheHelper(through, pin: token.pin)
    }

    /// Over a module p11fork runs in another process for the workers (the broker: tpm2-pkcs11 and
    /// openCryptoki by default), the module answering in the worker is p11-kit's RPC
    /// client; pkcs11-provider gives up on a module whose C_GetInfo changed ("Module
    /// re-initialization failed!"), and every worker signs only because p11fork tells it the real
    /// module's (docs/FORK.md "What else a child sees").
    private func expectWorkersSignThroughTheHelper(_ through: ProviderFork.Outcome, pin: String) throws {
        #expect(!through.trace.contains(pin), "the PIN is in the trace")
        #expect(through.trace.contains("module served by the broker") || through.trace.contains("module running in a helper process"),
                "the workers' module runs in the broker or a helper: \(through.report)")
        #expect(through.succeeded, "through p11fork: \(through.report)")
        #expect(!through.result.stderr.contains("Module re-initialization failed!"), "\(through.report)")
    }
}

/// Servers that fork, with a token key through pkcs11-provider and no engine (driven by
/// scripts/provider-server-check.sh): haproxy 2.6 in master-worker mode (examples/haproxy), and
/// Apache 2.4 prefork with children as www-data (examples/apache/p11fork-ssl-provider.conf).
/// Neither takes a key URI here: the key is the provider's URI PEM block, read as a key file. The
/// parent loads the key, the forked processes sign every handshake; the provider starts over in
/// each of them by itself. Through p11fork under haproxy this needs p11fork to load under
/// pkcs11-provider's RTLD_DEEPBIND in a program with its own copy of `environ`: before that was
/// fixed, haproxy crashed loading p11fork.
@Suite(.serialized) struct ProviderServerTests {
    static func installed(_ path: String) -> Bool { FileManager.default.isExecutableFile(atPath: path) }
    static let available = PKCS11Provider.available && installed("/usr/bin/curl") && getuid() == 0

    /// One run of scripts/provider-server-check.sh: `requests` handshakes, each given
    /// `requestTimeout` seconds; the traces (one file per process) go to `traces`, which every
    /// process of the server may write.
    private func serve(_ server: String, _ token: any TestToken, keyLabel: String = "server-key", realModule: String = RealModules.softHSM,
                       launcher: [String] = [], through: Bool, requests: Int = 40, requestTimeout: Int = 5,
                       traces: URL? = nil) throws -> ProcessResult {
        let pinFile = try PKCS11Provider.pinFile(token.pin, in: token.directory)
        var environment = token.environment
        environment["PKCS11_PROVIDER"] = PKCS11Provider.path
        environment["LIBP11FORK"] = through ? Products.module : realModule
        environment["REQUEST_TIMEOUT"] = String(requestTimeout)
        if through {
            environment["P11FORK_MODULE"] = realModule
            environment["P11FORK_TRACE"] = (traces ?? token.directory).appendingPathComponent("trace-%p.log").path
        }
        let command = launcher + [Products.packageRoot.appendingPathComponent("scripts/provider-server-check.sh").path,
                                  server, token.directory.appendingPathComponent(through ? "through" : "direct").path,
                                  token.label, keyLabel, pinFile, String(requests)]
        return try runProgram(command[0], Array(command.dropFirst()), environment: environment, timeout: 240)
    }

    /// From the script's output: (handshakes served, Apache children that served).
    private func counts(_ run: ProcessResult) -> (served: Int, children: Int) {
        func number(after prefix: String) -> Int {
            guard let line = run.stdout.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }) else { return -1 }
            return Int(line.dropFirst(prefix.count).prefix { $0.isNumber }) ?? -1
        }
        return (number(after: "result: "), number(after: "serving processes: "))
    }

    /// Every process's trace in `directory`, one text.
    private func traces(in directory: URL) throws -> String {
        try FileManager.default.contentsOfDirectory(atPath: directory.path).filter { $0.hasPrefix("trace-") }
            .map { try String(contentsOfFile: directory.appendingPathComponent($0).path, encoding: .utf8) }.joined()
    }

    @Test(.enabled(if: available && installed("/usr/sbin/haproxy") && installed("/usr/sbin/apache2"),
                   "needs pkcs11-provider (scripts/install-deps.sh), haproxy, apache2, curl and root"),
          arguments: ["haproxy", "apache"], [false, true])
    func forkedProcessesServeWithATokenKey(server: String, strict: Bool) throws {
        let token = try SoftHSMToken(strict: strict)
        try token.generateKeyPair(label: "server-key")
        // Apache's children (www-data) reach the token and the traces as the parent does.
        _ = try runProgram("/bin/chmod", ["-R", "a+rwX", token.directory.path])
        let direct = try serve(server, token, through: false)
        let mode = strict ? "reset_on_fork" : "default mode"
        print("\(server) over SoftHSM (\(mode)) directly: \(direct.stdout.split(separator: "\n").filter { $0.hasPrefix("result") || $0.hasPrefix("serving") }.joined(separator: "; "))")
        #expect(direct.stdout.contains("result: 40 of 40 served"), "directly (the provider starts over in each child): \(direct.output)")
        let through = try serve(server, token, through: true)
        #expect(through.stdout.contains("result: 40 of 40 served"), "through p11fork: \(through.output)")
        if server == "apache" {
            #expect(!through.stdout.contains("serving processes: 0") && !through.stdout.contains("serving processes: 1 "),
                    "more than one child served: \(through.output)")
        }
        let traces = try traces(in: token.directory)
        #expect(traces.contains("fork detected"), "the children went through p11fork: \(traces.suffix(3000))")
        #expect(traces.contains("C_Sign"), "\(traces.suffix(3000))")
        #expect(!traces.contains(token.pin), "the PIN is in a trace")
    }

    /// Apache prefork, children as www-data, over a token only the parent may reach, with a P-256
    /// key (examples/apache/p11fork-ssl-provider.conf): SoftHSM whose token folder is root's alone
    /// (Debian's /var/lib/softhsm/tokens), and tpm2-pkcs11 (its store and abrmd's D-Bus bus are
    /// the parent's). Directly each child's provider starts over as www-data, finds no usable
    /// module or token, and every handshake fails at once (`no suitable signature algorithm`);
    /// through p11fork the broker, started by the parent as root, runs the module for the
    /// children. Over tpm2-pkcs11 the provider signs with CKM_ECDSA_SHA256, and with an RSA key
    /// TLS 1.3 signs with CKM_SHA256_RSA_PKCS_PSS: p11-kit 0.24's RPC client refuses both, the
    /// broker's lane carries them to the module (docs/FORK.md "The lane").
    @Test(.enabled(if: available && installed("/usr/sbin/apache2"), "needs pkcs11-provider (scripts/install-deps.sh), apache2, curl and root"),
          arguments: ["SoftHSM, root-only token folder", "SoftHSM, root-only token folder, RSA key", "tpm2-pkcs11"])
    func apacheChildrenAsWwwDataSignThroughTheBroker(module: String) throws {
        let tpm2 = module == "tpm2-pkcs11"
        let rsa = module.hasSuffix("RSA key")
        let key = rsa ? "RSA key" : "P-256 key"
        guard !tpm2 || TPM2Token.available else { print("tpm2-pkcs11 or swtpm is not installed: the tpm2-pkcs11 case is not run"); return }
        // A token of its own for each run: the direct children's failed start over tpm2-pkcs11
        // flushes TPM contexts (measured: a later `openssl req` in the same TPM failed, `Esys_Load
        // … session that is not loaded`).
        func makeToken() throws -> any TestToken {
            if tpm2 { return try TPM2Token() }
            let token = try SoftHSMToken(strict: true)
            try token.generateKeyPair(label: "server-key", type: rsa ? "rsa:2048" : "EC:prime256v1")
            try token.makeTokenFolderRootOnly()
            return token
        }
        func run(through: Bool) throws -> (ProcessResult, traces: String, pin: String) {
            let token = try makeToken()
            let traces = token.directory.appendingPathComponent("traces")
            try FileManager.default.createDirectory(at: traces, withIntermediateDirectories: true)
            #expect(chmod(traces.path, 0o1777) == 0)
            let result = tpm2
                ? try serve("apache", token, keyLabel: "tpm-key", realModule: TPM2Token.module,
                            launcher: (token as! TPM2Token).launcher(keyLabel: "tpm-key", algorithm: "ecc256"),
                            through: through, requests: through ? 40 : 4, requestTimeout: through ? 5 : 3, traces: traces)
                : try serve("apache", token, through: through, requests: through ? 40 : 4, requestTimeout: through ? 5 : 3, traces: traces)
            return (result, try self.traces(in: traces), token.pin)
        }

        let (direct, _, directPIN) = try run(through: false)
        let directCounts = counts(direct)
        print("Apache, children as www-data, \(module), \(key), directly: \(directCounts.served) of 4 served, \(directCounts.children) children served")
        #expect(directCounts.served == 0, "directly the children cannot reach the token: \(direct.output)")
        #expect(direct.stdout.contains("no suitable signature algorithm"), "\(direct.output)")
        #expect(!direct.output.contains(directPIN), "the PIN is in the output")

        let (through, traces, pin) = try run(through: true)
        let throughCounts = counts(through)
        print("Apache, children as www-data, \(module), \(key), through p11fork: \(throughCounts.served) of 40 served, \(throughCounts.children) children served")
        #expect(throughCounts.served == 40, "through p11fork: \(through.output)")
        #expect(throughCounts.children >= 2, "more than one child served: \(through.output)")
        #expect(traces.contains("(the child runs as uid 33, the parent as 0)"), "\(traces.suffix(3000))")
        // Every child that took up the module (the broker served it) served its requests.
        let served = Set(traces.split(separator: "\n").filter { $0.contains("module served by the broker") }.compactMap { line in
            line.range(of: "p11fork[").map { line[$0.upperBound...].prefix { $0 != "/" } }
        })
        #expect(served.count == throughCounts.children, "children the broker served: \(served.sorted()); \(through.output)")
        #expect(traces.contains("broker: serving pid"), "\(traces.suffix(3000))")
        // The provider signs with CKM_ECDSA_SHA256 over tpm2-pkcs11 (the parent's mechanism list):
        // the lane carries it to the module, where p11-kit's client alone refuses it.
        #expect(traces.contains(", with a lane"), "\(traces.suffix(3000))")
        if tpm2 {
            #expect(!traces.contains("CKM_ECDSA_SHA256 is not carried by p11-kit's RPC client"), "\(traces.suffix(3000))")
        }
        #expect(!traces.contains(pin) && !through.output.contains(pin), "the PIN is in a trace or the output")
    }
}

/// libp11fork.so loads when the process has no environment array (`environ` NULL): after
/// clearenv(), and, in a program with its own copy of `environ`, under RTLD_DEEPBIND, as
/// pkcs11-provider opens its module (then the library sees libc's own `environ`, never set).
/// Both crashed in the Swift runtime's start-up before p11fork made it an empty environment.
final class ModuleLoadWithoutEnvironmentTests: XCTestCase {
    func testLoadsAfterClearenv() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") else { throw XCTSkip("python3 is not installed") }
        let program = """
        import ctypes, os, sys
        ctypes.CDLL(None).clearenv()
        library = ctypes.CDLL(sys.argv[1], os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
        functions = ctypes.c_void_p()
        print("C_GetFunctionList rv=%d" % library.C_GetFunctionList(ctypes.byref(functions)))
        # CK_FUNCTION_LIST: the version (padded to a pointer), then C_Initialize.
        initialize = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)(ctypes.cast(functions, ctypes.POINTER(ctypes.c_void_p * 2))[0][1])
        print("C_Initialize rv=0x%x" % initialize(None))
        """
        let result = try runProgram("/usr/bin/python3", ["-c", program, Products.module], timeout: 30)
        XCTAssertEqual(result.ending, "exit status 0", result.output)
        XCTAssertTrue(result.stdout.contains("C_GetFunctionList rv=0"), result.output)
        // No environment, so no P11FORK_MODULE: C_Initialize says what is missing, as it would with an empty environment.
        XCTAssertTrue(result.stdout.contains("C_Initialize rv=0x5"), result.output)
        XCTAssertTrue(result.stderr.contains("p11fork: P11FORK_MODULE is not set"), result.output)
    }
}

/// `p11fork doctor --consumer provider`: the fork scenarios, plus the forking OpenSSL 3 program
/// through pkcs11-provider, directly and through p11fork.
@Suite(.serialized) struct DoctorProviderTests {
    private func row(_ output: String, _ scenario: String) -> [String]? {
        output.split(separator: "\n").first { $0.hasPrefix(scenario + " ") }
            .map { $0.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) } }
    }

    @Test(.enabled(if: PKCS11Provider.available, "needs pkcs11-provider: run scripts/install-deps.sh"))
    func doctorRunsTheProviderScenarioDirectlyAndThroughP11Fork() throws {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "doctor-key")
        let result = try runProgram(Products.path("p11fork-cli"),
                                    ["doctor", "--module", RealModules.softHSM, "--p11fork", Products.module, "--pin-env", "DOCTOR_PIN",
                                     "--uri", "pkcs11:token=\(token.label);object=doctor-key", "--consumer", "provider",
                                     "--provider", PKCS11Provider.path, "--workers", "3"],
                                    environment: token.environment.merging(["DOCTOR_PIN": token.pin]) { $1 }, timeout: 300)
        #expect(result.status == 0, "\(result.output)")
        #expect(!result.output.contains(token.pin), "the PIN is in the doctor's output")
        // Strict SoftHSM: the provider starts over in each worker by itself, directly too.
        #expect(row(result.stdout, "pkcs11-provider, 3 forked workers") == ["pkcs11-provider, 3 forked workers", "ok", "ok"], "\(result.output)")
        #expect(row(result.stdout, "inherited session") == ["inherited session", "FAIL CKR_CRYPTOKI_NOT_INITIALIZED", "ok"], "\(result.output)")
    }

    /// openCryptoki behind the provider: `auto` picks the broker for it (a copy of openCryptoki
    /// cannot run in a child), which passes every scenario, the provider's workers too (their
    /// C_GetInfo is the real module's, not p11-kit's client's); the doctor says why from the trace.
    @Test(.enabled(if: PKCS11Provider.available && OpenCryptokiForkTests.available, "needs pkcs11-provider (scripts/install-deps.sh) and pkcsslotd"))
    func doctorFindsTheStrategyForOpenCryptokiBehindTheProvider() throws {
        let token = try OpenCryptokiToken()
        let command = token.launcher(keyLabel: "ock-key") + [
            Products.path("p11fork-cli"), "doctor", "--module", OpenCryptokiToken.module, "--p11fork", Products.module,
            "--pin-env", "DOCTOR_PIN", "--token", token.label, "--key", "ock-key", "--consumer", "provider",
            "--provider", PKCS11Provider.path, "--workers", "3", "--trace-dir", token.directory.appendingPathComponent("traces").path]
        let result = try runProgram(command[0], Array(command.dropFirst()), environment: ["DOCTOR_PIN": token.pin], timeout: 300)
        let traces = (try? FileManager.default.contentsOfDirectory(atPath: token.directory.appendingPathComponent("traces").path)) ?? []
        let errors = traces.sorted().compactMap { name -> String? in
            let text = (try? String(contentsOf: token.directory.appendingPathComponent("traces/\(name)"), encoding: .utf8)) ?? ""
            return text.split(separator: "\n").first { $0.contains("\"error\"") }.map { "\(name): \($0)" }
        }.joined(separator: "\n")
        #expect(result.status == 0, "\(result.output)\ntraces' first errors:\n\(errors)")
        #expect(!result.output.contains(token.pin), "the PIN is in the doctor's output")
        #expect(row(result.stdout, "pkcs11-provider, 3 forked workers") == ["pkcs11-provider, 3 forked workers", "ok", "ok"], "\(result.output)")
        #expect(result.stdout.contains("; with p11fork all pass (auto picks broker)"), "\(result.output)")
        #expect(result.stdout.contains(", pkcs11-provider, 3 forked workers: openCryptoki's module cannot be copied into a child: the broker runs it for this child\n"),
                "\(result.output)")
        #expect(!result.stdout.contains("P11FORK_STRATEGY"), "\(result.output)")
    }

    @Test func consumerAndProviderArgumentsAreChecked() throws {
        let token = try SoftHSMToken()
        let base = ["doctor", "--module", RealModules.softHSM, "--p11fork", Products.module, "--pin-env", "DOCTOR_PIN"]
        let environment = token.environment.merging(["DOCTOR_PIN": token.pin]) { $1 }
        let unknown = try runProgram(Products.path("p11fork-cli"), base + ["--consumer", "engine"], environment: environment, timeout: 60)
        #expect(unknown.status == 2 && unknown.stderr.contains("--consumer engine: the one consumer the doctor runs is 'provider'"), "\(unknown.output)")
        let alone = try runProgram(Products.path("p11fork-cli"), base + ["--provider", "/nonexistent/pkcs11.so"], environment: environment, timeout: 60)
        #expect(alone.status == 2 && alone.stderr.contains("--provider goes with --consumer provider"), "\(alone.output)")
        let missing = try runProgram(Products.path("p11fork-cli"), base + ["--consumer", "provider", "--provider", "/nonexistent/pkcs11.so"],
                                     environment: environment, timeout: 60)
        #expect(missing.status == 2 && missing.stderr.contains("--provider /nonexistent/pkcs11.so: no such file"), "\(missing.output)")
    }
}
