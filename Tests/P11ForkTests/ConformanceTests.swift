import XCTest

/// One fixed call sequence (Tests/Tools/Conformance) run directly against SoftHSM and
/// through libp11fork.so, with tracing off and at its fullest: the transcripts must be
/// identical (return codes and outputs, slot IDs, session and object handle values included: in a
/// process that never forked they are the real module's). The slot is named on the command line, as configurations
/// do, and used before anything lists the slots.
final class ConformanceTests: XCTestCase {
    private func transcript(_ token: SoftHSMToken, module: String, environment: [String: String] = [:]) throws -> [String] {
        let result = try runProgram(Products.path("p11fork-conformance"),
                                    ["--module", module, "--token", token.label, "--pin", token.pin, "--slot", String(token.slot)],
                                    environment: token.environment.merging(environment) { $1 }, timeout: 120)
        XCTAssertEqual(result.status, 0, result.output)
        return result.stdout.split(separator: "\n").map(String.init)
    }

    private func assertSame(_ expected: [String], _ actual: [String], _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(expected.count, actual.count, "\(what): number of steps", file: file, line: line)
        for (a, b) in zip(expected, actual) where a != b {
            XCTFail("\(what) differs:\n  direct:  \(a)\n  p11fork: \(b)", file: file, line: line)
        }
    }

    func testSameResultsDirectlyAndThroughP11Fork() throws {
        let token = try SoftHSMToken()
        let direct = try transcript(token, module: RealModules.softHSM)
        // The sequence really exercises the module: these must hold, so that two runs failing
        // alike cannot pass.
        for expected in ["C_Initialize(CKF_OS_LOCKING_OK) CKR_OK", "C_Login CKR_OK", "RSA-SHA256 C_Verify CKR_OK",
                         "RSA-SHA256 C_Verify(corrupted) CKR_SIGNATURE_INVALID", "RSA-PSS C_Verify CKR_OK", "ECDSA C_Verify CKR_OK",
                         "RSA-SHA256 C_Sign(8 bytes) CKR_BUFFER_TOO_SMALL len=256", "C_Encrypt(unwrapped key) CKR_OK same=yes",
                         "C_Decrypt(RSA-OAEP) CKR_OK 'conformance: the'", "C_Initialize(again) CKR_CRYPTOKI_ALREADY_INITIALIZED",
                         "C_GetInfo(before C_Initialize) CKR_CRYPTOKI_NOT_INITIALIZED", "C_Finalize(non-NULL) CKR_ARGUMENTS_BAD",
                         "C_GetSessionInfo(unknown) CKR_SESSION_HANDLE_INVALID", "C_SignInit(unknown key) CKR_OBJECT_HANDLE_INVALID",
                         "C_GetSlotList(with callbacks) CKR_OK count=2 callbacks used=yes",
                         "C_GetSlotInfo(named slot, first call) CKR_OK slot=0x\(String(token.slot, radix: 16))",
                         "C_OpenSession(named slot) CKR_OK session#1=0x", "C_GetSessionInfo(named slot) CKR_OK slot=0x\(String(token.slot, radix: 16))"] {
            XCTAssertTrue(direct.contains { $0.hasSuffix(expected) || $0.contains(expected + " ") || (expected.hasSuffix("=0x") && $0.contains(expected)) }, "missing from the direct run: \(expected)")
        }
        XCTAssertGreaterThan(direct.count, 100)
        // Two direct runs agree, so any difference below is p11fork's, not the normalisation's.
        assertSame(direct, try transcript(token, module: RealModules.softHSM), "a second direct run")

        let proxied = try transcript(token, module: Products.module, environment: ["P11FORK_MODULE": RealModules.softHSM])
        assertSame(direct, proxied, "through p11fork")

        let trace = token.directory.appendingPathComponent("conformance.log")
        let traced = try transcript(token, module: Products.module, environment: [
            "P11FORK_MODULE": RealModules.softHSM, "P11FORK_TRACE": trace.path, "P11FORK_TRACE_LEVEL": "full",
        ])
        assertSame(direct, traced, "through p11fork with a full trace")
        let traceText = try String(contentsOf: trace, encoding: .utf8)
        XCTAssertGreaterThan(traceText.split(separator: "\n").count, 100)
        XCTAssertFalse(traceText.contains(token.pin))
    }
}
