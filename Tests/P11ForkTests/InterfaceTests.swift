import XCTest

/// The PKCS#11 3.0 and 3.2 interfaces (Tests/Tools/Interfaces): over a 3.0 module (NSS's
/// softoken) p11fork offers its 3.0 list and the 3.0 functions behave as the module's own; over a
/// 2.40 module (SoftHSM) it offers 3.0 and 2.40; over a 3.2 module (the NetHSM test module) it
/// offers 3.2 too, and every 3.2 function answers as the module's own. Every interface p11fork
/// offers is fork safe (docs/FORK.md "PKCS#11 3.0 and 3.2").
final class InterfaceTests: XCTestCase {
    static let nss = "/usr/lib/x86_64-linux-gnu/libsoftokn3.so"

    private func transcript(_ module: String, environment: [String: String] = [:], nss: Bool, pin: String? = nil) throws -> [String] {
        let result = try runProgram(Products.path("p11fork-interfaces"),
                                    ["--module", module] + (nss ? ["--nss-nodb"] : []) + (pin.map { ["--pin", $0] } ?? []),
                                    environment: environment)
        XCTAssertEqual(result.status, 0, result.output)
        return result.stdout.split(separator: "\n").map(String.init)
    }

    /// The lines that must be the same directly and through p11fork: all but each interface's
    /// flags and the request for a fork-safe interface (p11fork adds CKF_INTERFACE_FORK_SAFE).
    private func comparable(_ lines: [String]) -> [String] {
        lines.filter { !$0.hasPrefix("flags ") && !$0.contains("C_GetInterface(fork safe)") }
    }

    func testThreePointZeroModuleIsForwardedThroughThe30List() throws {
        try XCTSkipUnless(FileManager.default.fileExists(atPath: Self.nss), "NSS softoken (libnss3) not installed")
        let direct = try transcript(Self.nss, nss: true)
        XCTAssertTrue(direct.contains { $0.contains("interface rv=0x0 'PKCS 11' 3.0") }, direct.joined(separator: "\n"))
        XCTAssertTrue(direct.contains { $0.hasPrefix("14 C_EncryptMessage rv=0x0 ") }, direct.joined(separator: "\n"))
        let through = try transcript(Products.module, environment: ["P11FORK_MODULE": Self.nss], nss: true)
        XCTAssertEqual(comparable(direct), comparable(through))
        // A 3.0 module gets no 3.2 list: p11fork could not back it.
        XCTAssertEqual(through.filter { $0.hasPrefix("flags ") }, ["flags 'PKCS 11' 3.0 0x1", "flags 'PKCS 11' 2.40 0x1"])
        XCTAssertTrue(through.contains { $0.hasSuffix("C_GetInterface('PKCS 11', any) rv=0x0 3.0") }, through.joined(separator: "\n"))
    }

    /// Over a 2.40 module p11fork offers its 3.0 list too (3.0-only functions answer
    /// CKR_FUNCTION_NOT_SUPPORTED), and both interfaces carry CKF_INTERFACE_FORK_SAFE.
    func testTwoPointFortyModuleGetsBothInterfacesForkSafe() throws {
        let token = try SoftHSMToken()
        let lines = try transcript(Products.module, environment: token.environment.merging(["P11FORK_MODULE": RealModules.softHSM]) { $1 },
                                   nss: false)
        XCTAssertEqual(lines.filter { $0.contains(" interface ") }, ["04 interface rv=0x0 'PKCS 11' 3.0", "05 interface rv=0x0 'PKCS 11' 2.40"])
        XCTAssertTrue(lines.contains("06 C_GetInterface('PKCS 11', 3.0) rv=0x0"), lines.joined(separator: "\n"))
        XCTAssertTrue(lines.contains("10 C_GetInterface(fork safe) rv=0x0"), lines.joined(separator: "\n"))
        XCTAssertTrue(lines.contains { $0.hasSuffix("C_MessageEncryptInit rv=0x54") }, lines.joined(separator: "\n"))
    }

    /// Over the 3.2 test module: the same interface list (3.2, 3.0, 2.40, newest first) and the
    /// same codes and outputs for every 3.2 function, directly and through p11fork; the module's
    /// interfaces have no flags, p11fork's are all fork safe. The trace shows each 3.2 call with
    /// lengths for the ciphertext and no key value or PIN.
    func testThreePointTwoModuleIsForwardedThroughThe32List() throws {
        let token = try NetHSMToken()
        let direct = try transcript(NetHSMToken.module, environment: token.environment, nss: false, pin: token.pin)
        let traceFile = token.directory.appendingPathComponent("trace.log").path
        let through = try transcript(Products.module, environment: token.environment.merging(
            ["P11FORK_MODULE": NetHSMToken.module, "P11FORK_TRACE": traceFile, "P11FORK_TRACE_LEVEL": "full"]) { $1 },
                                     nss: false, pin: token.pin)
        XCTAssertEqual(comparable(direct), comparable(through))
        XCTAssertEqual(direct.filter { $0.contains(" interface ") }, ["04 interface rv=0x0 'PKCS 11' 3.2", "05 interface rv=0x0 'PKCS 11' 3.0",
                                                                      "06 interface rv=0x0 'PKCS 11' 2.40"])
        XCTAssertEqual(direct.filter { $0.hasPrefix("flags ") }, ["flags 'PKCS 11' 3.2 0x0", "flags 'PKCS 11' 3.0 0x0", "flags 'PKCS 11' 2.40 0x0"])
        XCTAssertEqual(through.filter { $0.hasPrefix("flags ") }, ["flags 'PKCS 11' 3.2 0x1", "flags 'PKCS 11' 3.0 0x1", "flags 'PKCS 11' 2.40 0x1"])
        XCTAssertTrue(direct.contains("11 C_GetInterface(fork safe) rv=0x7"), direct.joined(separator: "\n"))
        XCTAssertTrue(through.contains("11 C_GetInterface(fork safe) rv=0x0"), through.joined(separator: "\n"))
        // What the 3.2 functions answered (the module's own codes, through p11fork as directly).
        for expected in ["C_VerifySignature rv=0x0", "C_VerifySignature rv=0xc0", "C_VerifySignatureFinal rv=0x0",
                         "C_GetSessionValidationFlags rv=0x0 flags=0x1", "C_EncapsulateKey(NULL) rv=0x0 len=65",
                         "C_EncapsulateKey(10 bytes) rv=0x150 len=65", "C_DecapsulateKey rv=0x0", "C_OpenSession(CKF_ASYNC_SESSION) rv=0x0",
                         "C_VerifySignature(async session) rv=0x204", "C_AsyncGetID rv=0x0 id=given", "C_AsyncComplete rv=0x0",
                         "C_AsyncComplete(again) rv=0x91", "C_AsyncJoin(another ID) rv=0x160", "C_UnwrapKeyAuthenticated rv=0x54"] {
            XCTAssertTrue(through.contains { $0.hasSuffix(expected) }, "\(expected) missing:\n" + through.joined(separator: "\n"))
        }
        XCTAssertTrue(through.contains("the two keys agree: yes"), through.joined(separator: "\n"))
        let trace = try String(contentsOfFile: traceFile, encoding: .utf8)
        for call in ["C_EncapsulateKey(", "C_DecapsulateKey(", "C_VerifySignatureInit(", "C_VerifySignatureUpdate(",
                     "C_VerifySignatureFinal(", "C_GetSessionValidationFlags(", "C_AsyncComplete(", "C_AsyncGetID(",
                     "C_AsyncJoin(", "C_WrapKeyAuthenticated(", "C_UnwrapKeyAuthenticated("] {
            XCTAssertTrue(trace.contains(call), "no \(call) in the trace")
        }
        XCTAssertTrue(trace.contains("ciphertext=len 128->65"), trace)
        let value = try XCTUnwrap(through.first { $0.hasPrefix("decapsulated value ") }).dropFirst("decapsulated value ".count)
        XCTAssertEqual(value.count, 64)
        XCTAssertFalse(trace.lowercased().contains(value.lowercased()), "a key value in the trace")
        XCTAssertFalse(trace.contains(token.pin), "the PIN in the trace")
    }

    /// The settings only in C_Initialize's pReserved: the interface list was made before the
    /// module was known, so it stays 3.0 and 2.40 even over a 3.2 module (docs/FORK.md "PKCS#11
    /// 3.0 and 3.2"); the module then works through the 3.0 list.
    func testThreePointTwoModuleNamedOnlyInPReservedGetsNo32List() throws {
        let token = try NetHSMToken()
        let result = try runProgram(Products.path("p11fork-interfaces"),
                                    ["--module", Products.module, "--reserved", "p11fork: module=\(NetHSMToken.module)"],
                                    environment: token.environment)
        XCTAssertEqual(result.status, 0, result.output)
        let lines = result.stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(lines.filter { $0.contains(" interface ") }, ["04 interface rv=0x0 'PKCS 11' 3.0", "05 interface rv=0x0 'PKCS 11' 2.40"])
        XCTAssertTrue(lines.contains { $0.hasSuffix("C_Initialize (3.0 list) rv=0x0") }, result.output)
        XCTAssertTrue(lines.contains("after C_Initialize: 2 interface(s), the first 3.0"), result.output)
        XCTAssertTrue(lines.contains { $0.hasSuffix("C_OpenSession rv=0x0") }, result.output)
        XCTAssertFalse(lines.contains { $0.contains("3.2") }, result.output)
    }

    /// The 3.2 test module's own known-answer checks (its self-test: the NIST CAVS P-256 vector
    /// through C_DecapsulateKey, HMAC-SHA256 through C_VerifySignature*, the interface list).
    func testThreePointTwoTestModulePassesItsKnownAnswerChecks() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: "/usr/bin/gcc"), "gcc not installed")
        let script = Products.packageRoot.appendingPathComponent("Tests/Modules/NetHSM/selftest/run.sh").path
        let result = try runProgram("/bin/sh", [script], timeout: 300)
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertTrue(result.stdout.contains("KEM (ECDH P-256): NIST CAVS count 0 decapsulation known answer checked"), result.output)
        XCTAssertTrue(result.stdout.contains("C_VerifySignature: HMAC-SHA256(key, \"hello\") checked whole and in parts"), result.output)
        XCTAssertTrue(result.stdout.contains("selftest: ok"), result.output)
    }
}
