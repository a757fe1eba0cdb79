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
        XCTAssertTrue(result.stdout.contains("(0x51000001)"), "slots are p11fork's virtual IDs: \(result.stdout)")
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
