import XCTest

/// The PKCS#11 3.0 interfaces (Sources/TestTools/Interfaces): over a 3.0 module (NSS's softoken)
/// p11fork offers its 3.0 list and the 3.0 functions behave as the module's own; over a 2.40
/// module (SoftHSM) it offers both, and every interface it offers is fork safe.
final class InterfaceTests: XCTestCase {
    static let nss = "/usr/lib/x86_64-linux-gnu/libsoftokn3.so"

    private func transcript(_ module: String, environment: [String: String] = [:], nss: Bool) throws -> [String] {
        let result = try runProgram(Products.path("p11fork-interfaces"), ["--module", module] + (nss ? ["--nss-nodb"] : []),
                                    environment: environment)
        XCTAssertEqual(result.status, 0, result.output)
        return result.stdout.split(separator: "\n").map(String.init)
    }

    func testThreePointZeroModuleIsForwardedThroughThe30List() throws {
        try XCTSkipUnless(FileManager.default.fileExists(atPath: Self.nss), "NSS softoken (libnss3) not installed")
        let direct = try transcript(Self.nss, nss: true)
        XCTAssertTrue(direct.contains { $0.contains("interface rv=0x0 'PKCS 11' 3.0") }, direct.joined(separator: "\n"))
        XCTAssertTrue(direct.contains { $0.hasPrefix("14 C_EncryptMessage rv=0x0 ") }, direct.joined(separator: "\n"))
        let through = try transcript(Products.module, environment: ["P11FORK_MODULE": Self.nss], nss: true)
        XCTAssertEqual(direct, through)
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
}
