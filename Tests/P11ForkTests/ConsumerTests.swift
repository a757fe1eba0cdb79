import XCTest

/// Real consumers through libp11fork.so: OpenSC's pkcs11-tool and OpenSSL's pkcs11 engine,
/// driven by the scripts in examples/ (so the examples are run by the tests).
final class ConsumerTests: XCTestCase {
    private var token: SoftHSMToken!

    override func setUpWithError() throws {
        token = try SoftHSMToken()
        try token.generateKeyPair(label: "rsa-key", type: "rsa:2048", id: "01")
        try token.generateKeyPair(label: "ec-key", type: "EC:prime256v1", id: "02")
    }

    override func tearDown() { token = nil }

    private var environment: [String: String] {
        token.environment.merging(["P11FORK_MODULE": RealModules.softHSM, "PIN": token.pin]) { $1 }
    }

    private func dataFile() throws -> String {
        let file = token.directory.appendingPathComponent("data.txt")
        try "signed through p11fork\n".write(to: file, atomically: true, encoding: .utf8)
        return file.path
    }

    func testPkcs11ToolListsTheTokenThroughP11Fork() throws {
        let result = try runProgram("/usr/bin/pkcs11-tool", ["--module", Products.module, "-L"], environment: environment)
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertTrue(result.stdout.contains("token label        : \(token.label)"), result.stdout)
        XCTAssertTrue(result.stdout.contains("(0x\(String(token.slot, radix: 16)))"), "slots are SoftHSM's own IDs: \(result.stdout)")
        let direct = try runProgram("/usr/bin/pkcs11-tool", ["--module", RealModules.softHSM, "-L"], environment: environment)
        XCTAssertEqual(direct.status, 0, direct.output)
        XCTAssertEqual(result.stdout, direct.stdout, "the slot list through p11fork is not SoftHSM's")
    }

    /// A new process naming the slot by the ID the module reports, without listing slots first.
    func testPkcs11ToolUsesTheModulesSlotIDInANewProcess() throws {
        try token.generateKeyPair(label: "named-slot", type: "EC:prime256v1", id: "07")
        func objects(_ module: String, slot: UInt) throws -> ProcessResult {
            try runProgram("/usr/bin/pkcs11-tool", ["--module", module, "--slot", String(slot), "--login", "--pin", token.pin, "-O"],
                           environment: environment)
        }
        let direct = try objects(RealModules.softHSM, slot: token.slot)
        XCTAssertEqual(direct.status, 0, direct.output)
        XCTAssertTrue(direct.stdout.contains("label:      named-slot"), direct.output)
        let through = try objects(Products.module, slot: token.slot)
        XCTAssertEqual(through.status, 0, through.output)
        XCTAssertEqual(through.stdout, direct.stdout)
        // A slot the module does not have: the module's own answer, through p11fork as directly.
        let unknownDirect = try objects(RealModules.softHSM, slot: token.slot &+ 77)
        let unknownThrough = try objects(Products.module, slot: token.slot &+ 77)
        XCTAssertNotEqual(unknownDirect.status, 0)
        XCTAssertTrue(unknownDirect.output.contains("CKR_SLOT_ID_INVALID"), unknownDirect.output)
        XCTAssertEqual(unknownThrough.status, unknownDirect.status)
        XCTAssertEqual(unknownThrough.output, unknownDirect.output)
    }

    func testPkcs11ToolSignatureVerifiesWithOpenSSL() throws {
        let result = try runProgram(Products.example("sign-with-pkcs11-tool.sh"),
                                    [Products.module, token.label, "01", try dataFile()], environment: environment)
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertTrue(result.stdout.contains("Verified OK"), result.output)
    }

    func testOpenSSLEngineSignsWithRSAKey() throws {
        let result = try runProgram(Products.example("sign-with-openssl-engine.sh"),
                                    [Products.module, token.label, "rsa-key", try dataFile()], environment: environment)
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertTrue(result.stdout.contains("Signature Verified Successfully"), result.output)
    }

    func testOpenSSLEngineSignsWithECKey() throws {
        let result = try runProgram(Products.example("sign-with-openssl-engine.sh"),
                                    [Products.module, token.label, "ec-key", try dataFile()], environment: environment)
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertTrue(result.stdout.contains("Signature Verified Successfully"), result.output)
    }
}

/// A forking program signing through OpenSSL's pkcs11 engine (Tests/Tools/EngineFork):
/// libp11 follows the old rule in each child (C_Initialize, new session, login, find the key
/// again). p11fork must cope with such a consumer: the child's C_Initialize answers CKR_OK and
/// the key it finds again has the handle the parent had.
final class EngineForkTests: XCTestCase {
    private func run(_ token: SoftHSMToken, through: Bool, trace: URL? = nil) throws -> ProcessResult {
        var environment = token.environment
        environment["OPENSSL_CONF"] = Products.example("openssl-engine.cnf")
        environment["LIBP11FORK"] = through ? Products.module : RealModules.softHSM
        if through { environment["P11FORK_MODULE"] = RealModules.softHSM }
        if let trace {
            environment["P11FORK_TRACE"] = trace.path
            environment["P11FORK_TRACE_LEVEL"] = "calls"
        }
        return Baseline.note("enginefork", try runProgram(Products.path("p11fork-enginefork"),
                                                          ["pkcs11:token=\(token.label);object=engine-key", token.pin, "3"],
                                                          environment: environment, timeout: Baseline.timeout(through: through, else: 120)),
                             through: through)
    }

    private func check(strict: Bool) throws {
        let token = try SoftHSMToken(strict: strict)
        try token.generateKeyPair(label: "engine-key")
        // libp11 copes with SoftHSM by itself: the baseline p11fork must not spoil.
        let direct = try run(token, through: false)
        XCTAssertTrue(direct.stdout.contains("result: ok 3 signature(s)"), "directly: \(direct.output)")
        let trace = token.directory.appendingPathComponent("engine.log")
        let through = try run(token, through: true, trace: trace)
        XCTAssertEqual(through.status, 0, through.output)
        XCTAssertTrue(through.stdout.contains("result: ok 3 signature(s) from children verified; the parent still signs"), through.output)
        let text = try String(contentsOf: trace, encoding: .utf8)
        XCTAssertEqual(text.components(separatedBy: "C_Initialize in the child: the module was already made ready for this process: answered CKR_OK").count - 1, 3, text)
        XCTAssertFalse(text.contains(token.pin))
    }

    func testEngineWorkersOverSoftHSMDefaultMode() throws { try check(strict: false) }
    func testEngineWorkersOverStrictSoftHSM() throws { try check(strict: true) }
}
