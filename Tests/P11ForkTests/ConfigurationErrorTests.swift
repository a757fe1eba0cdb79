import XCTest

/// Misconfiguration: one line on stderr naming the problem and the fix, C_Initialize answers
/// CKR_GENERAL_ERROR; never a crash or a hang. Seen through a real consumer, pkcs11-tool.
final class ConfigurationErrorTests: XCTestCase {
    private func initialize(_ environment: [String: String]) throws -> ProcessResult {
        try runProgram("/usr/bin/pkcs11-tool", ["--module", Products.module, "-I"], environment: environment, timeout: 30)
    }

    /// The one p11fork line, after checking it is the only one and C_Initialize failed as it should.
    private func problemLine(_ environment: [String: String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let result = try initialize(environment)
        XCTAssertFalse(result.timedOut, file: file, line: line)
        XCTAssertNotEqual(result.status, 0, file: file, line: line)
        XCTAssertTrue(result.output.contains("C_Initialize failed: rv = CKR_GENERAL_ERROR"), result.output, file: file, line: line)
        let lines = result.stderr.split(separator: "\n").filter { $0.hasPrefix("p11fork: ") }
        XCTAssertEqual(lines.count, 1, result.stderr, file: file, line: line)
        return lines.first.map(String.init) ?? ""
    }

    func testUnsetModuleNamesTheVariable() throws {
        let line = try problemLine([:])
        XCTAssertTrue(line.contains("P11FORK_MODULE is not set: set it to the path of the real PKCS#11 module"), line)
    }

    func testMissingFileNamesThePath() throws {
        let line = try problemLine(["P11FORK_MODULE": "/nonexistent/libvendor.so"])
        XCTAssertTrue(line.contains("P11FORK_MODULE=/nonexistent/libvendor.so: no such file"), line)
    }

    func testLibraryThatIsNotAPKCS11Module() throws {
        let line = try problemLine(["P11FORK_MODULE": "/lib/x86_64-linux-gnu/libm.so.6"])
        XCTAssertTrue(line.contains("is not a PKCS#11 module (it has no C_GetFunctionList)"), line)
    }

    func testModuleWhoseFunctionListFails() throws {
        let line = try problemLine(["P11FORK_MODULE": Products.failingModule])
        XCTAssertTrue(line.contains("the module's C_GetFunctionList failed (CKR_DEVICE_ERROR)"), line)
    }

    func testPointingAtItselfIsRefused() throws {
        let line = try problemLine(["P11FORK_MODULE": Products.module])
        XCTAssertTrue(line.contains("is p11fork itself"), line)
    }

    func testConfigFileWithUnknownKey() throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("p11fork-\(UUID().uuidString).conf")
        defer { try? FileManager.default.removeItem(at: file) }
        try "module = \(RealModules.softHSM)\ntrace_levle = full\n".write(to: file, atomically: true, encoding: .utf8)
        let line = try problemLine(["P11FORK_CONFIG": file.path])
        XCTAssertTrue(line.contains("\(file.path) line 2: unknown key 'trace_levle'"), line)
    }

    func testBadValuesNameTheChoices() throws {
        var line = try problemLine(["P11FORK_MODULE": RealModules.softHSM, "P11FORK_TRACE": "stderr", "P11FORK_TRACE_LEVEL": "loud"])
        XCTAssertTrue(line.contains("'loud' is not a trace level: use error, fork, calls or full"), line)
        line = try problemLine(["P11FORK_MODULE": RealModules.softHSM, "P11FORK_STRATEGY": "magic"])
        XCTAssertTrue(line.contains("'magic' is not a strategy: use auto, fresh-copy, broker, out-of-process, reinitialize"), line)
    }

    func testMissingConfigFile() throws {
        let line = try problemLine(["P11FORK_CONFIG": "/nonexistent/p11fork.conf"])
        XCTAssertTrue(line.contains("P11FORK_CONFIG=/nonexistent/p11fork.conf: cannot read the file"), line)
    }

    func testConfigFileAloneIsEnough() throws {
        let token = try SoftHSMToken()
        let file = token.directory.appendingPathComponent("p11fork.conf")
        try "# all settings in one file\nmodule = \(RealModules.softHSM)\n".write(to: file, atomically: true, encoding: .utf8)
        var environment = token.environment
        environment["P11FORK_CONFIG"] = file.path
        let result = try runProgram("/usr/bin/pkcs11-tool", ["--module", Products.module, "-L"], environment: environment, timeout: 30)
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertTrue(result.stdout.contains("token label        : \(token.label)"), result.stdout)
    }
}
