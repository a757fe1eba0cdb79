import Foundation
import XCTest

/// scripts/install.sh, the README's one step that installs p11fork: into a temporary PREFIX, the
/// command runs as `p11fork`, the module lists the real module's slots, the doctor finds the
/// module beside it (PREFIX/lib), and a forked child is served by the broker the module starts
/// from its own folder. The script builds the release products (a few minutes on a fresh
/// checkout; seconds once built), in the package's build folder: run by scripts/test.sh, which
/// runs the test binary directly (under `swift test`, SwiftPM's lock on .build would make the
/// nested build wait for it).
final class InstallTests: XCTestCase {
    nonisolated(unsafe) private static var prefix: URL?
    nonisolated(unsafe) private static var installOutput = ""

    /// Installs once for the class's tests.
    private func installed() throws -> URL {
        if let prefix = Self.prefix { return prefix }
        let prefix = FileManager.default.temporaryDirectory.appendingPathComponent("p11fork-install-\(UUID().uuidString)")
        let script = Products.packageRoot.appendingPathComponent("scripts/install.sh").path
        let result = try runProgram("/bin/bash", [script, prefix.path], timeout: 1200)
        XCTAssertEqual(result.status, 0, "scripts/install.sh \(prefix.path): \(result.ending)\n\(result.output)")
        guard result.status == 0 else { throw TestFailure("scripts/install.sh failed") }
        Self.prefix = prefix
        Self.installOutput = result.output
        return prefix
    }

    override class func tearDown() {
        if let prefix { try? FileManager.default.removeItem(at: prefix) }
        prefix = nil
        super.tearDown()
    }

    func testInstallsTheModuleTheBrokerBesideItAndTheCommandAsP11Fork() throws {
        let prefix = try installed()
        for file in ["bin/p11fork", "lib/libp11fork.so", "lib/p11fork-broker"] {
            XCTAssertTrue(FileManager.default.isExecutableFile(atPath: prefix.appendingPathComponent(file).path),
                          "\(file) missing under \(prefix.path): \(Self.installOutput)")
        }
        let help = try runProgram(prefix.appendingPathComponent("bin/p11fork").path, ["--help"])
        XCTAssertEqual(help.status, 0, help.output)
        XCTAssertTrue(help.stdout.contains("doctor") && help.stdout.contains("trace"), help.output)
        // The command needs no Swift installed where it runs.
        let libraries = try runProgram("/usr/bin/ldd", [prefix.appendingPathComponent("bin/p11fork").path])
        XCTAssertFalse(libraries.stdout.lowercased().contains("swift"), libraries.stdout)
    }

    func testInstalledModuleListsTheRealModulesSlots() throws {
        let prefix = try installed()
        let token = try SoftHSMToken(label: "p11fork-install")
        let result = try runProgram("/usr/bin/pkcs11-tool", ["--module", prefix.appendingPathComponent("lib/libp11fork.so").path, "-L"],
                                    environment: token.environment.merging(["P11FORK_MODULE": RealModules.softHSM]) { $1 })
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertTrue(result.stdout.contains("p11fork-install"), result.output)
    }

    func testInstalledDoctorFindsTheInstalledModule() throws {
        let prefix = try installed()
        let token = try SoftHSMToken(label: "p11fork-doctor", strict: true)
        try token.generateKeyPair(label: "doctor-key")
        let result = try runProgram(prefix.appendingPathComponent("bin/p11fork").path,
                                    ["doctor", "--module", RealModules.softHSM, "--token", token.label, "--pin", token.pin],
                                    environment: token.environment, timeout: 300)
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertTrue(result.output.contains(prefix.appendingPathComponent("lib/libp11fork.so").path), result.output)
    }

    func testInstalledModuleStartsTheBrokerBesideIt() throws {
        let prefix = try installed()
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "fork-key")
        var check = ForkCheck(token: token)
        check.p11fork = prefix.appendingPathComponent("lib/libp11fork.so").path
        check.extraEnvironment = ["P11FORK_STRATEGY": "broker"]
        let outcome = try check.run("inherited", throughP11Fork: true)
        XCTAssertTrue(outcome.succeeded, outcome.report)
        XCTAssertTrue(outcome.trace.contains("module served by the broker"), outcome.report)
    }
}
