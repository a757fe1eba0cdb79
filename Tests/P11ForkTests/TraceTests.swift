import Foundation
import XCTest

/// Tracing through real calls: what it shows, and what it must never show.
final class TraceTests: XCTestCase {
    private var token: SoftHSMToken!
    /// A secret key value the test imports; no trace may contain it in any form.
    private let keyBytes: [UInt8] = (0..<32).map { UInt8(0xA0 + $0 % 16) ^ 0x5C }

    override func setUpWithError() throws {
        token = try SoftHSMToken()
        try token.generateKeyPair(label: "rsa-key")
    }

    override func tearDown() { token = nil }

    /// Imports an AES key with known bytes, then signs with the RSA key, all through p11fork.
    private func traced(level: String, format: String) throws -> String {
        let trace = token.directory.appendingPathComponent("trace-\(level)-\(format).log")
        let keyFile = token.directory.appendingPathComponent("aes.key")
        try Data(keyBytes).write(to: keyFile)
        let data = token.directory.appendingPathComponent("data.bin")
        try Data("plaintext that must not be traced".utf8).write(to: data)
        var environment = token.environment
        environment["P11FORK_MODULE"] = RealModules.softHSM
        environment["P11FORK_TRACE"] = trace.path
        environment["P11FORK_TRACE_LEVEL"] = level
        environment["P11FORK_TRACE_FORMAT"] = format
        let base = ["--module", Products.module, "--token-label", token.label, "--login", "--pin", token.pin]
        var result = try runProgram("/usr/bin/pkcs11-tool", base + ["--write-object", keyFile.path, "--type", "secrkey",
                                                                     "--key-type", "AES:32", "--label", "aes-key"], environment: environment)
        XCTAssertEqual(result.status, 0, result.output)
        result = try runProgram("/usr/bin/pkcs11-tool", base + ["--sign", "--mechanism", "SHA256-RSA-PKCS", "--id", "01",
                                                                 "-i", data.path, "-o", token.directory.appendingPathComponent("sig").path],
                                environment: environment)
        XCTAssertEqual(result.status, 0, result.output)
        return try String(contentsOf: trace, encoding: .utf8)
    }

    private func assertNoSecrets(_ trace: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertFalse(trace.contains(token.pin), "PIN in the trace", file: file, line: line)
        let hex = keyBytes.map { String(format: "%02x", $0) }.joined()
        XCTAssertFalse(trace.lowercased().contains(hex), "key bytes (hex) in the trace", file: file, line: line)
        XCTAssertFalse(trace.lowercased().contains(String(hex.prefix(16))), "part of the key in the trace", file: file, line: line)
        XCTAssertFalse(trace.utf8.contains(Array(keyBytes.prefix(8))), "raw key bytes in the trace", file: file, line: line)
        XCTAssertFalse(trace.contains("plaintext that must not be traced"), "data in the trace", file: file, line: line)
    }

    func testFullTextTraceShowsCallsButNoSecrets() throws {
        let trace = try traced(level: "full", format: "text")
        assertNoSecrets(trace)
        // The session handle is the real module's, as C_OpenSession returned it.
        let opened = try XCTUnwrap(trace.split(separator: "\n").first { $0.contains("C_OpenSession(") })
        let session = try XCTUnwrap(opened.firstMatch(of: /session=(0x[0-9a-f]+)\)/)?.1)
        XCTAssertTrue(trace.contains("C_Login(session=\(session)"), trace)
        XCTAssertTrue(trace.contains("pin=hidden"), trace)
        XCTAssertTrue(trace.contains("C_CreateObject("), trace)
        XCTAssertTrue(trace.contains("CKA_VALUE(len 32)"), "the key value appears as its length only: \(trace)")
        XCTAssertTrue(trace.contains("CKA_LABEL=\"aes-key\""), trace)
        XCTAssertTrue(trace.contains("C_SignInit(session=\(session)"), trace)
        XCTAssertTrue(trace.contains("mechanism=CKM_SHA256_RSA_PKCS"), trace)
        XCTAssertTrue(trace.contains("C_Sign(") && trace.contains(") = CKR_OK "), trace)
        for line in trace.split(separator: "\n") {
            XCTAssertNotNil(line.range(of: #"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z p11fork\[\d+/\d+\] "#, options: .regularExpression), String(line))
        }
    }

    func testJSONTraceIsOneObjectPerLineWithoutSecrets() throws {
        let trace = try traced(level: "full", format: "json")
        assertNoSecrets(trace)
        var calls = Set<String>()
        for line in trace.split(separator: "\n") {
            let object = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], String(line))
            XCTAssertNotNil(object["time"] as? String)
            XCTAssertNotNil(object["pid"] as? Int)
            if let call = object["call"] as? String {
                calls.insert(call)
                XCTAssertNotNil(object["rv"] as? String, String(line))
                XCTAssertNotNil(object["us"] as? Double, String(line))
            }
        }
        XCTAssertTrue(calls.isSuperset(of: ["C_Initialize", "C_Login", "C_CreateObject", "C_Sign", "C_Finalize"]), "\(calls)")
    }

    func testNothingIsWrittenWhenTracingIsOff() throws {
        var environment = token.environment
        environment["P11FORK_MODULE"] = RealModules.softHSM
        let result = try runProgram("/usr/bin/pkcs11-tool", ["--module", Products.module, "--token-label", token.label,
                                                             "--login", "--pin", token.pin, "-O"], environment: environment)
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertFalse(result.stderr.contains("p11fork"), result.stderr)
    }

    func testTraceFileNamedWithPidGetsOneFilePerProcess() throws {
        try token.generateKeyPair(label: "fork-key")
        let pattern = token.directory.appendingPathComponent("per-process-%p.log").path
        var environment = token.environment
        environment["P11FORK_MODULE"] = RealModules.softHSM
        environment["P11FORK_TRACE"] = pattern
        let result = try runProgram(Products.forkcheck, ["--module", Products.module, "--token", token.label, "--pin", token.pin,
                                                         "--key", "fork-key", "--children", "2", "inherited"], environment: environment)
        XCTAssertEqual(result.status, 0, result.output)
        let files = try FileManager.default.contentsOfDirectory(atPath: token.directory.path).filter { $0.hasPrefix("per-process-") }
        XCTAssertEqual(files.count, 4, "parent, two children and the broker the parent started at its first fork: \(files)")
        for name in files {
            let text = try String(contentsOfFile: token.directory.appendingPathComponent(name).path, encoding: .utf8)
            let pid = name.dropFirst("per-process-".count).dropLast(".log".count)
            XCTAssertTrue(text.split(separator: "\n").allSatisfy { $0.contains("p11fork[\(pid)/") }, "\(name): \(text)")
        }
    }
}
