import Foundation
import XCTest

/// A token with an RSA and an EC key, shared by the consumers below, and the trace files a run
/// leaves in its folder.
fileprivate final class ToolBench {
    let token: SoftHSMToken
    let traces: URL

    init() throws {
        token = try SoftHSMToken()
        try token.generateKeyPair(label: "tool-rsa", type: "rsa:2048", id: "01")
        try token.generateKeyPair(label: "tool-ec", type: "EC:prime256v1", id: "02")
        traces = token.directory.appendingPathComponent("traces")
        try FileManager.default.createDirectory(at: traces, withIntermediateDirectories: true)
    }

    var traceTemplate: String { traces.appendingPathComponent("p11fork-%p.log").path }

    /// Every trace line written so far, by any process.
    func traceText() throws -> String {
        try FileManager.default.contentsOfDirectory(atPath: traces.path).sorted()
            .map { try String(contentsOfFile: traces.appendingPathComponent($0).path, encoding: .utf8) }.joined()
    }

    func file(_ name: String, _ contents: String) throws -> URL {
        let url = token.directory.appendingPathComponent(name)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try contents.write(to: url, atomically: true, encoding: .utf8)
        return url
    }

    /// Checks that p11fork traced a signature and that the PIN is nowhere in its traces.
    func assertSignedThroughP11Fork(file: StaticString = #filePath, line: UInt = #line) throws {
        let text = try traceText()
        XCTAssertTrue(text.contains("C_Sign"), "p11fork's trace shows no signature: \(text.suffix(2000))", file: file, line: line)
        XCTAssertFalse(text.contains(token.pin), "the PIN is in the trace", file: file, line: line)
    }

    /// Stores a certificate for the key with CKA_ID `id` on the token (SunPKCS11 shows a key as a
    /// KeyStore entry only with one). It holds the token's public key; a throw-away software key
    /// signs it, so no PIN goes on a command line.
    func storeCertificate(id: String, label: String) throws {
        let work = token.directory.appendingPathComponent("cert-\(id)")
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
        let p = { (name: String) in work.appendingPathComponent(name).path }
        let steps: [(String, [String])] = [
            ("/usr/bin/pkcs11-tool", ["--module", RealModules.softHSM, "--token-label", token.label, "--read-object",
                                      "--type", "pubkey", "--id", id, "-o", p("public.der")]),
            ("/usr/bin/openssl", ["pkey", "-pubin", "-inform", "DER", "-in", p("public.der"), "-out", p("public.pem")]),
            ("/usr/bin/openssl", ["req", "-new", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                                  "-keyout", p("issuer.key"), "-subj", "/CN=p11fork test issuer", "-days", "2", "-out", p("issuer.pem")]),
            ("/usr/bin/openssl", ["req", "-new", "-key", p("issuer.key"), "-subj", "/CN=\(label)", "-out", p("request.csr")]),
            ("/usr/bin/openssl", ["x509", "-req", "-in", p("request.csr"), "-CA", p("issuer.pem"), "-CAkey", p("issuer.key"),
                                  "-force_pubkey", p("public.pem"), "-days", "2", "-outform", "DER", "-out", p("cert.der")]),
            ("/usr/bin/pkcs11-tool", ["--module", RealModules.softHSM, "--token-label", token.label, "--login", "--pin", token.pin,
                                      "--write-object", p("cert.der"), "--type", "cert", "--id", id, "--label", label]),
        ]
        for (tool, arguments) in steps {
            let result = try runProgram(tool, arguments, environment: token.environment, timeout: 60)
            guard result.status == 0 else { throw TestFailure("\(tool) \(arguments.first ?? ""): \(result.output)") }
        }
    }
}

/// The shape of the consumer tests below: skipped when a tool is missing, a fresh bench each.
class ToolTestCase: XCTestCase {
    fileprivate var bench: ToolBench!
    /// The programs the test needs (scripts/install-deps.sh installs them).
    var tools: [String] { [] }

    override func setUpWithError() throws {
        for tool in tools where !FileManager.default.isExecutableFile(atPath: tool) {
            throw XCTSkip("\(tool) is not installed: run scripts/install-deps.sh")
        }
        bench = try ToolBench()
    }

    override func tearDown() { bench = nil }
}

/// p11fork registered with p11-kit by a module file, configured without any P11FORK_* variable:
/// by the file's x-init-reserved (C_Initialize's pReserved), or by /etc/p11fork.conf for
/// programs that initialise the module with their own arguments (GnuTLS).
final class P11KitRegistrationTests: ToolTestCase {
    override var tools: [String] { ["/usr/bin/p11-kit", "/usr/bin/p11tool", "/usr/bin/certtool", "/usr/bin/setpriv", "/usr/bin/unshare"] }

    override func setUpWithError() throws {
        // Switching to another user and mounting in a private namespace need root.
        guard getuid() == 0 else { throw XCTSkip("these tests run as root (setpriv, unshare -m)") }
        try super.setUpWithError()
    }

    /// The example module file with this build's paths; `traced` adds a trace to its settings.
    private func moduleFile(initReserved: Bool) throws -> String {
        var text = try String(contentsOfFile: Products.example("p11-kit/p11fork.module"), encoding: .utf8)
        text = text.replacingOccurrences(of: "module: /usr/local/lib/libp11fork.so", with: "module: \(Products.module)")
        text = text.replacingOccurrences(of: "\nx-init-reserved: p11fork: module=/usr/lib/softhsm/libsofthsm2.so",
                                         with: initReserved ? "\nx-init-reserved: p11fork: module=\(RealModules.softHSM) trace=\(bench.traceTemplate)" : "")
        XCTAssertTrue(text.contains("module: \(Products.module)"), "the example's module line changed")
        return text
    }

    /// The folder of module files: p11fork's, and an empty one per system module, which p11-kit
    /// then skips, so that only p11fork is loaded.
    private func writeModuleFolder(_ folder: String, moduleFile: String) throws {
        for name in try FileManager.default.contentsOfDirectory(atPath: "/usr/share/p11-kit/modules") where name.hasSuffix(".module") {
            _ = try bench.file("\(folder)/\(name)", "module:\n")
        }
        _ = try bench.file("\(folder)/p11fork.module", moduleFile)
    }

    /// `p11-kit list-modules` as an ordinary user (p11-kit reads no user configuration for root)
    /// whose ~/.config/pkcs11/modules holds the module file.
    private func listModulesAsUser(initReserved: Bool) throws -> ProcessResult {
        try asUser(["/usr/bin/p11-kit", "list-modules"], initReserved: initReserved)
    }

    private func asUser(_ program: [String], initReserved: Bool = true, extra: [String: String] = [:]) throws -> ProcessResult {
        try writeModuleFolder("home/.config/pkcs11/modules", moduleFile: moduleFile(initReserved: initReserved))
        // The user (nobody) must reach the token, the home folder and the trace folder.
        _ = try runProgram("/bin/chmod", ["-R", "a+rwX", bench.token.directory.path])
        let home = bench.token.directory.appendingPathComponent("home").path
        var environment = bench.token.environment
        environment["HOME"] = home
        environment["XDG_CONFIG_HOME"] = home + "/.config"
        environment.merge(extra) { $1 }
        return try runProgram("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups"] + program,
                              environment: environment, timeout: 60)
    }

    /// p11-kit's proxy module initialises its modules with their x-init-reserved: pkcs11-tool
    /// signs through the proxy and p11fork, and openssl verifies (examples/sign-with-pkcs11-tool.sh).
    func testProxySignsThroughP11ForkConfiguredByInitReserved() throws {
        let data = try bench.file("proxy-data.txt", "signed through p11-kit's proxy and p11fork\n")
        let result = try asUser([Products.example("sign-with-pkcs11-tool.sh"), RealModules.p11KitProxy, bench.token.label, "01", data.path],
                                extra: ["PIN": bench.token.pin])
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertTrue(result.stdout.contains("Verified OK"), result.output)
        XCTAssertTrue(try bench.traceText().contains("the module was named by pReserved module"))
        try bench.assertSignedThroughP11Fork()
    }

    func testUserModuleFileWithInitReservedConfiguresP11Fork() throws {
        let result = try listModulesAsUser(initReserved: true)
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertTrue(result.stdout.contains("p11fork: \(URL(fileURLWithPath: Products.module).resolvingSymlinksInPath().path)")
                      || result.stdout.contains("p11fork: \(Products.module)"), result.output)
        XCTAssertTrue(result.stdout.contains("token: \(bench.token.label)"), result.output)
        let trace = try bench.traceText()
        XCTAssertTrue(trace.contains("the module was named by pReserved module"), trace)
        XCTAssertTrue(trace.contains("C_Initialize(flags=CKF_OS_LOCKING_OK, mutexCallbacks=yes, reserved=p11fork-settings) = CKR_OK"), trace)
        XCTAssertTrue(trace.contains("C_GetTokenInfo("), trace)
    }

    /// The control: the same file without x-init-reserved leaves p11fork unconfigured.
    func testWithoutInitReservedP11ForkSaysWhatIsMissing() throws {
        let result = try listModulesAsUser(initReserved: false)
        XCTAssertFalse(result.stdout.contains("token: \(bench.token.label)"), result.output)
        XCTAssertTrue(result.stderr.contains("p11fork: P11FORK_MODULE is not set"), result.output)
        XCTAssertTrue(result.stderr.contains("(p11-kit: x-init-reserved)"), result.output)
    }

    /// Runs a program in a private mount namespace whose /etc is an overlay holding this test's
    /// /etc/p11fork.conf and p11-kit module files: the host's /etc is never written.
    private func withHostConfiguration(_ program: [String]) throws -> ProcessResult {
        let conf = try String(contentsOfFile: Products.example("p11-kit/p11fork.conf"), encoding: .utf8)
            .replacingOccurrences(of: "module = /usr/lib/softhsm/libsofthsm2.so", with: "module = \(RealModules.softHSM)")
            .replacingOccurrences(of: "# trace = /var/log/p11fork/%p.log", with: "trace = \(bench.traceTemplate)")
        _ = try bench.file("etc/p11fork.conf", conf)
        try writeModuleFolder("etc/pkcs11/modules", moduleFile: moduleFile(initReserved: false))
        let overlay = bench.token.directory.appendingPathComponent("overlay")
        try FileManager.default.createDirectory(at: overlay, withIntermediateDirectories: true)
        let script = """
        set -e
        mount --make-rprivate /
        mount -t tmpfs p11fork-test "$1"
        mkdir "$1/upper" "$1/work"
        mount -t overlay p11fork-test -o lowerdir=/etc,upperdir="$1/upper",workdir="$1/work" /etc
        cp -r "$2/." /etc/
        shift 2
        exec "$@"
        """
        var environment = bench.token.environment
        environment["GNUTLS_PIN"] = bench.token.pin
        return try runProgram("/usr/bin/unshare", ["-m", "/bin/sh", "-c", script, "sh", overlay.path,
                                                   bench.token.directory.appendingPathComponent("etc").path] + program,
                              environment: environment, timeout: 90)
    }

    func testGnuTLSListsAndSignsThroughP11ForkConfiguredByTheSystemFile() throws {
        let tokens = try withHostConfiguration(["/usr/bin/p11tool", "--list-tokens"])
        XCTAssertEqual(tokens.status, 0, tokens.output)
        XCTAssertTrue(tokens.stdout.contains("Label: \(bench.token.label)"), tokens.output)

        let keys = try withHostConfiguration(["/usr/bin/p11tool", "--login", "--list-all-privkeys", "pkcs11:token=\(bench.token.label)"])
        XCTAssertEqual(keys.status, 0, keys.output)
        XCTAssertTrue(keys.stdout.contains("object=tool-rsa"), keys.output)
        XCTAssertTrue(keys.stdout.contains("object=tool-ec"), keys.output)

        // certtool signs a self-signed certificate with the token's key, through p11fork.
        let template = try bench.file("cert.template", "cn = p11fork gnutls test\nexpiration_days = 1\nsigning_key\n")
        let certificate = bench.token.directory.appendingPathComponent("gnutls-cert.pem")
        let made = try withHostConfiguration(["/usr/bin/certtool", "--generate-self-signed", "--template", template.path,
                                              "--load-privkey", "pkcs11:token=\(bench.token.label);object=tool-rsa;type=private",
                                              "--outfile", certificate.path])
        XCTAssertEqual(made.status, 0, made.output)
        let verified = try runProgram("/usr/bin/openssl", ["verify", "-CAfile", certificate.path, certificate.path])
        XCTAssertTrue(verified.stdout.contains(": OK"), "the certificate's signature verifies with its own key: \(verified.output)")
        // Its public key is the token's: the token signed it.
        let certificateKey = try runProgram("/usr/bin/openssl", ["x509", "-in", certificate.path, "-noout", "-pubkey"])
        let der = bench.token.directory.appendingPathComponent("token-public.der").path
        let read = try runProgram("/usr/bin/pkcs11-tool", ["--module", RealModules.softHSM, "--token-label", bench.token.label,
                                                           "--read-object", "--type", "pubkey", "--label", "tool-rsa", "-o", der],
                                  environment: bench.token.environment)
        XCTAssertEqual(read.status, 0, read.output)
        let tokenKey = try runProgram("/usr/bin/openssl", ["pkey", "-pubin", "-inform", "DER", "-in", der])
        XCTAssertFalse(certificateKey.stdout.isEmpty, certificateKey.output)
        XCTAssertEqual(certificateKey.stdout, tokenKey.stdout)

        let trace = try bench.traceText()
        XCTAssertTrue(trace.contains("the module was named by /etc/p11fork.conf line"), trace)
        try bench.assertSignedThroughP11Fork()
    }
}

/// Java's SunPKCS11 provider with p11fork as its library: the PKCS11 KeyStore, a signature on
/// the token, verified in software. Directly against SoftHSM too: both must work (no fork here;
/// this shows p11fork behaves as a module Java can use).
final class JavaConsumerTests: ToolTestCase {
    override var tools: [String] { ["/usr/bin/java"] }

    override func setUpWithError() throws {
        try super.setUpWithError()
        try bench.storeCertificate(id: "01", label: "tool-rsa")
        try bench.storeCertificate(id: "02", label: "tool-ec")
    }

    /// `slot`: the configuration names the slot by its ID (`slot = N`) instead of `slotListIndex`.
    private func sign(library: String, alias: String, slot: UInt? = nil, environment extra: [String: String] = [:]) throws -> ProcessResult {
        var config = try String(contentsOfFile: Products.example("java/p11fork.cfg"), encoding: .utf8)
            .replacingOccurrences(of: "library = /usr/local/lib/libp11fork.so", with: "library = \(library)")
        XCTAssertTrue(config.contains("library = \(library)"), "the example's library line changed")
        if let slot {
            XCTAssertTrue(config.contains("\nslotListIndex = 0"), "the example's slotListIndex line changed")
            config = config.replacingOccurrences(of: "\nslotListIndex = 0", with: "\nslot = \(slot)")
        }
        let file = try bench.file("java-\(UUID().uuidString).cfg", config)
        let environment = bench.token.environment.merging(["PIN": bench.token.pin]) { $1 }.merging(extra) { $1 }
        return try runProgram("/usr/bin/java", [Products.example("java/Sign.java"), file.path, alias],
                              environment: environment, timeout: 180)
    }

    func testSunPKCS11SignsThroughP11ForkAndDirectly() throws {
        let direct = try sign(library: RealModules.softHSM, alias: "tool-rsa")
        XCTAssertEqual(direct.status, 0, "directly: \(direct.output)")
        XCTAssertTrue(direct.stdout.contains("signature verified: SHA256withRSA"), direct.output)

        let through = ["P11FORK_MODULE": RealModules.softHSM, "P11FORK_TRACE": bench.traceTemplate]
        for (alias, algorithm) in [("tool-rsa", "SHA256withRSA"), ("tool-ec", "SHA256withECDSA")] {
            let result = try sign(library: Products.module, alias: alias, environment: through)
            XCTAssertEqual(result.status, 0, "through p11fork: \(result.output)")
            XCTAssertTrue(result.stdout.contains("alias: \(alias)"), result.output)
            XCTAssertTrue(result.stdout.contains("signature verified: \(algorithm)"), result.output)
        }
        try bench.assertSignedThroughP11Fork()
    }

    /// SunPKCS11 uses a configured slot ID without listing slots: SoftHSM's own ID works through
    /// p11fork as directly, from the first call.
    func testSunPKCS11WithTheModulesSlotIDThroughP11ForkAndDirectly() throws {
        let direct = try sign(library: RealModules.softHSM, alias: "tool-ec", slot: bench.token.slot)
        XCTAssertEqual(direct.status, 0, "directly: \(direct.output)")
        XCTAssertTrue(direct.stdout.contains("signature verified: SHA256withECDSA"), direct.output)
        let through = try sign(library: Products.module, alias: "tool-ec", slot: bench.token.slot,
                               environment: ["P11FORK_MODULE": RealModules.softHSM, "P11FORK_TRACE": bench.traceTemplate])
        XCTAssertEqual(through.status, 0, "through p11fork: \(through.output)")
        XCTAssertTrue(through.stdout.contains("signature verified: SHA256withECDSA"), through.output)
        let trace = try bench.traceText()
        XCTAssertFalse(trace.contains("C_GetSlotList"), "SunPKCS11 listed the slots: the test does not show what it should")
        XCTAssertTrue(trace.contains("C_GetSlotInfo"), trace.suffix(2000).description)
        try bench.assertSignedThroughP11Fork()
    }
}

/// OpenSSH: ssh-keygen -D lists the token's public keys, ssh-agent loads them (ssh-add -s) and
/// signs with them (ssh-keygen -Y sign), the signature checks; directly and through p11fork.
final class SSHConsumerTests: ToolTestCase {
    override var tools: [String] { ["/usr/bin/ssh-agent", "/usr/bin/ssh-keygen", "/usr/bin/ssh-add"] }

    private var throughP11Fork: [String: String] {
        bench.token.environment.merging(["P11FORK_MODULE": RealModules.softHSM, "P11FORK_TRACE": bench.traceTemplate]) { $1 }
    }

    func testSshKeygenListsTheSamePublicKeysAsTheRealModule() throws {
        let direct = try runProgram("/usr/bin/ssh-keygen", ["-D", RealModules.softHSM], environment: bench.token.environment, timeout: 60)
        let through = try runProgram("/usr/bin/ssh-keygen", ["-D", Products.module], environment: throughP11Fork, timeout: 60)
        XCTAssertEqual(direct.status, 0, direct.output)
        XCTAssertEqual(through.status, 0, through.output)
        let keys = direct.stdout.split(separator: "\n")
        XCTAssertEqual(keys.count, 2, direct.stdout)
        XCTAssertTrue(keys.contains { $0.hasPrefix("ssh-rsa ") } && keys.contains { $0.hasPrefix("ecdsa-sha2-nistp256 ") }, direct.stdout)
        // The same keys; their order is the order a search returns them in, which PKCS#11 leaves
        // open and SoftHSM's file store does not keep from one process to the next (seen).
        XCTAssertEqual(through.stdout.split(separator: "\n").sorted(), keys.sorted(), "through: \(through.stdout)\ndirect: \(direct.stdout)")
        XCTAssertTrue(try bench.traceText().contains("C_FindObjects"), "ssh-keygen went through p11fork")
    }

    private func signWithAgent(_ module: String, environment: [String: String]) throws -> ProcessResult {
        let data = try bench.file("data-\(UUID().uuidString).txt", "signed by ssh-agent with a PKCS#11 key\n")
        return try runProgram(Products.example("ssh/sign-with-agent.sh"), [module, data.path],
                              environment: environment.merging(["PIN": bench.token.pin]) { $1 }, timeout: 120)
    }

    func testAgentSignsWithTheTokenKeyThroughP11ForkAndDirectly() throws {
        let direct = try signWithAgent(RealModules.softHSM, environment: bench.token.environment)
        XCTAssertEqual(direct.status, 0, "directly: \(direct.output)")
        XCTAssertTrue(direct.stdout.contains("Good \"file\" signature for p11fork-signer"), direct.output)

        let through = try signWithAgent(Products.module, environment: throughP11Fork)
        XCTAssertEqual(through.status, 0, "through p11fork: \(through.output)")
        XCTAssertTrue(through.stdout.contains("Good \"file\" signature with"), through.output)
        XCTAssertTrue(through.stdout.contains("Good \"file\" signature for p11fork-signer"), through.output)
        try bench.assertSignedThroughP11Fork()
    }
}

/// p11fork's settings given as C_Initialize's pReserved by a program of its own (Python ctypes,
/// so that the exact arguments are under the test's control): taken and not passed on, another
/// pReserved passed on unchanged, a problem reported in one line, and a child that calls
/// C_Initialize again with the same settings keeps working with what it inherited.
final class InitReservedTests: XCTestCase {
    private var token: SoftHSMToken!
    private var script: URL!

    override func setUpWithError() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") else { throw XCTSkip("python3 is not installed") }
        token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "reserved-key", type: "rsa:2048", id: "01")
        script = token.directory.appendingPathComponent("init_reserved.py")
        try Self.program.write(to: script, atomically: true, encoding: .utf8)
    }

    override func tearDown() { token = nil }

    private var traceTemplate: String { token.directory.appendingPathComponent("trace-%p.log").path }

    private func run(_ module: String, _ mode: String, reserved: String?, environment extra: [String: String] = [:]) throws -> ProcessResult {
        let environment = token.environment.merging(["PIN": token.pin]) { $1 }.merging(extra) { $1 }
        return try runProgram("/usr/bin/python3", [script.path, module, mode, reserved ?? "-"], environment: environment, timeout: 60)
    }

    private func traceText() throws -> String {
        try FileManager.default.contentsOfDirectory(atPath: token.directory.path).filter { $0.hasPrefix("trace-") }
            .map { try String(contentsOfFile: token.directory.appendingPathComponent($0).path, encoding: .utf8) }.joined()
    }

    private var settings: String { "p11fork: module=\(RealModules.softHSM) trace=\(traceTemplate)" }

    func testP11ForkSettingsAreTakenAndNotPassedOn() throws {
        // SoftHSM refuses any pReserved: through p11fork it never sees p11fork's string.
        let direct = try run(RealModules.softHSM, "init", reserved: settings)
        XCTAssertTrue(direct.stdout.contains("C_Initialize rv=0x7"), "SoftHSM itself answers CKR_ARGUMENTS_BAD: \(direct.output)")
        let through = try run(Products.module, "init", reserved: settings)
        XCTAssertTrue(through.stdout.contains("C_Initialize rv=0x0"), through.output)
        let traces = try FileManager.default.contentsOfDirectory(atPath: token.directory.path).filter { $0.hasPrefix("trace-") }
        XCTAssertEqual(traces.count, 1, "the trace named in pReserved was written")
    }

    /// The environment wins: its module is used, and the p11fork string is still kept from SoftHSM.
    func testTheEnvironmentWinsOverPReservedSettings() throws {
        let result = try run(Products.module, "init", reserved: "p11fork: module=/nonexistent/libvendor.so",
                             environment: ["P11FORK_MODULE": RealModules.softHSM, "P11FORK_TRACE": traceTemplate,
                                           "P11FORK_TRACE_LEVEL": "fork"])
        XCTAssertTrue(result.stdout.contains("C_Initialize rv=0x0"), result.output)
        let trace = try traceText()
        XCTAssertTrue(trace.contains("the module was named by P11FORK_MODULE"), trace)
        XCTAssertTrue(trace.contains("the p11fork settings in pReserved are not used: the environment named the module (P11FORK_MODULE)"), trace)
    }

    func testAnotherPReservedGoesOnUnchanged() throws {
        let direct = try run(RealModules.softHSM, "init", reserved: "configdir='sql:/nonexistent'")
        let through = try run(Products.module, "init", reserved: "configdir='sql:/nonexistent'",
                              environment: ["P11FORK_MODULE": RealModules.softHSM])
        XCTAssertTrue(direct.stdout.contains("C_Initialize rv=0x7"), direct.output)
        XCTAssertEqual(through.stdout, direct.stdout)
    }

    func testBadSettingsAreOneLineAndGeneralError() throws {
        let missing = try run(Products.module, "init", reserved: "p11fork: module=/nonexistent/libvendor.so")
        XCTAssertTrue(missing.stdout.contains("C_Initialize rv=0x5"), missing.output)
        let lines = missing.stderr.split(separator: "\n").filter { $0.hasPrefix("p11fork: ") }
        XCTAssertEqual(lines, ["p11fork: pReserved module=/nonexistent/libvendor.so: no such file: set it to the path of the real PKCS#11 module"])
        let typo = try run(Products.module, "init", reserved: "p11fork: modul=/x.so")
        XCTAssertTrue(typo.stdout.contains("C_Initialize rv=0x5"), typo.output)
        XCTAssertTrue(typo.stderr.contains("p11fork: pReserved: unknown key 'modul'"), typo.output)
        let trace = try run(Products.module, "init", reserved: "p11fork: module=\(RealModules.softHSM) trace=/nonexistent/dir/t.log")
        XCTAssertTrue(trace.stdout.contains("C_Initialize rv=0x5"), trace.output)
        XCTAssertTrue(trace.stderr.contains("p11fork: pReserved trace=/nonexistent/dir/t.log: cannot open the trace file"), trace.output)
    }

    /// The parent initialises with p11fork's settings, logs in and signs, then forks; the child
    /// calls C_Initialize again with the same arguments (the old rule) and signs with the
    /// inherited session and key: the signature must equal the parent's (RSA PKCS#1 v1.5 is
    /// deterministic). Directly, SoftHSM (reset_on_fork) drops the inherited session: the child fails.
    func testChildInitializingAgainWithTheSameSettingsSigns() throws {
        let direct = try run(RealModules.softHSM, "fork", reserved: nil)
        XCTAssertTrue(direct.stdout.contains("parent signed"), direct.output)
        // SoftHSM resets in the child's C_Initialize: the inherited session is gone (CKR_SESSION_HANDLE_INVALID).
        XCTAssertTrue(direct.stdout.contains("child signed rv=0xb3"), "directly the child cannot use what it inherited: \(direct.output)")
        XCTAssertTrue(direct.stdout.contains("child exit 2"), direct.output)

        let through = try run(Products.module, "fork", reserved: settings)
        XCTAssertTrue(through.stdout.contains("child C_Initialize rv=0x0"), through.output)
        XCTAssertTrue(through.stdout.contains("child exit 0"), "through p11fork: \(through.output)")
        let trace = try traceText()
        XCTAssertFalse(trace.contains(token.pin), "the PIN is in the trace")
    }

    /// A child that never calls C_Initialize works with its parent's settings (read from pReserved
    /// in the parent). Directly, SoftHSM (reset_on_fork) answers the child CKR_CRYPTOKI_NOT_INITIALIZED.
    func testChildThatDoesNotInitializeUsesTheParentsSettings() throws {
        let direct = try run(RealModules.softHSM, "fork-inherit", reserved: nil)
        XCTAssertTrue(direct.stdout.contains("child signed rv=0x190"), direct.output)
        XCTAssertTrue(direct.stdout.contains("child exit 2"), direct.output)

        let through = try run(Products.module, "fork-inherit", reserved: settings)
        XCTAssertTrue(through.stdout.contains("child exit 0"), "through p11fork: \(through.output)")
        XCTAssertTrue(try traceText().contains("fork detected: this is a child of pid"), "the child traced to its own file")
    }

    /// Calls a PKCS#11 module through ctypes. Modes: `init` (C_Initialize only), `fork` (the
    /// child calls C_Initialize again first) and `fork-inherit` (it does not).
    /// The child arms alarm() and _exit()s: 0 when its signature equals the parent's.
    static let program = #"""
    import ctypes, os, signal, sys

    UL = ctypes.c_ulong
    NAMES = ["C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList", "C_GetSlotInfo",
             "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo", "C_InitToken", "C_InitPIN", "C_SetPIN",
             "C_OpenSession", "C_CloseSession", "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState",
             "C_SetOperationState", "C_Login", "C_Logout", "C_CreateObject", "C_CopyObject", "C_DestroyObject",
             "C_GetObjectSize", "C_GetAttributeValue", "C_SetAttributeValue", "C_FindObjectsInit", "C_FindObjects",
             "C_FindObjectsFinal", "C_EncryptInit", "C_Encrypt", "C_EncryptUpdate", "C_EncryptFinal", "C_DecryptInit",
             "C_Decrypt", "C_DecryptUpdate", "C_DecryptFinal", "C_DigestInit", "C_Digest", "C_DigestUpdate",
             "C_DigestKey", "C_DigestFinal", "C_SignInit", "C_Sign"]

    class Args(ctypes.Structure):
        _fields_ = [("CreateMutex", ctypes.c_void_p), ("DestroyMutex", ctypes.c_void_p), ("LockMutex", ctypes.c_void_p),
                    ("UnlockMutex", ctypes.c_void_p), ("flags", UL), ("pReserved", ctypes.c_char_p)]

    class Attribute(ctypes.Structure):
        _fields_ = [("type", UL), ("pValue", ctypes.c_void_p), ("ulValueLen", UL)]

    class Mechanism(ctypes.Structure):
        _fields_ = [("mechanism", UL), ("pParameter", ctypes.c_void_p), ("ulParameterLen", UL)]

    class FunctionList(ctypes.Structure):
        _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [(n, ctypes.c_void_p) for n in NAMES]

    module, mode, reserved = sys.argv[1], sys.argv[2], sys.argv[3]
    library = ctypes.CDLL(module)
    pointer = ctypes.POINTER(FunctionList)()
    library.C_GetFunctionList(ctypes.byref(pointer))
    table = pointer.contents

    def call(name, *argtypes):
        return ctypes.CFUNCTYPE(UL, *argtypes)(getattr(table, name))

    args = Args(flags=2, pReserved=None if reserved == "-" else reserved.encode())
    initialize = call("C_Initialize", ctypes.c_void_p)
    rv = initialize(ctypes.addressof(args))
    print("C_Initialize rv=0x%x" % rv, flush=True)
    if mode == "init" or rv != 0:
        sys.exit(0)

    slots, count = (UL * 8)(), UL(8)
    call("C_GetSlotList", ctypes.c_ubyte, ctypes.c_void_p, ctypes.c_void_p)(1, slots, ctypes.byref(count))
    session = UL()
    call("C_OpenSession", UL, UL, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(slots[0], 6, None, None, ctypes.byref(session))
    pin = os.environ["PIN"].encode()
    print("login rv=0x%x" % call("C_Login", UL, UL, ctypes.c_char_p, UL)(session, 1, pin, len(pin)), flush=True)
    klass = UL(3)
    template = Attribute(0, ctypes.cast(ctypes.byref(klass), ctypes.c_void_p), ctypes.sizeof(klass))
    key, found = UL(), UL()
    call("C_FindObjectsInit", UL, ctypes.c_void_p, UL)(session, ctypes.byref(template), 1)
    call("C_FindObjects", UL, ctypes.c_void_p, UL, ctypes.c_void_p)(session, ctypes.byref(key), 1, ctypes.byref(found))
    call("C_FindObjectsFinal", UL)(session)

    def sign():
        mechanism = Mechanism(0x40, None, 0)
        rv = call("C_SignInit", UL, ctypes.c_void_p, UL)(session, ctypes.byref(mechanism), key)
        if rv != 0:
            return rv, b""
        data = b"signed by parent and child"
        signature, length = ctypes.create_string_buffer(512), UL(512)
        rv = call("C_Sign", UL, ctypes.c_char_p, UL, ctypes.c_void_p, ctypes.c_void_p)(session, data, len(data), signature, ctypes.byref(length))
        return rv, signature.raw[:length.value]

    rv, parent = sign()
    print("parent signed rv=0x%x, %d bytes" % (rv, len(parent)), flush=True)
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        if mode == "fork":
            rv = initialize(ctypes.addressof(args))
            print("child C_Initialize rv=0x%x" % rv, flush=True)
        rv, child = sign()
        print("child signed rv=0x%x" % rv, flush=True)
        os._exit(0 if rv == 0 and child == parent else 2 if rv != 0 else 3)
    _, status = os.waitpid(pid, 0)
    print("child exit %d" % os.waitstatus_to_exitcode(status), flush=True)
    """#
}
