import Foundation
import Testing

/// Fork tolerance over openCryptoki's soft token (pkcsslotd). openCryptoki notices a fork
/// itself (a child gets CKR_CRYPTOKI_NOT_INITIALIZED), but a private copy of it cannot be
/// initialised in one process next to the first (it loads its token library with RTLD_GLOBAL,
/// which glibc 2.36 does not support in a dlmopen namespace), and re-initialising it in place
/// hung a child whose parent had threads inside it at the fork (seen in CI). With the default
/// strategy (auto) the broker runs it for every child, with no setting; the operator used to
/// have to set P11FORK_STRATEGY=out-of-process.
@Suite(.serialized) struct OpenCryptokiForkTests {
    static let available = FileManager.default.fileExists(atPath: "/usr/sbin/pkcsslotd")

    private func setUp() throws -> (OpenCryptokiToken, ForkCheck) {
        let token = try OpenCryptokiToken()
        var check = ForkCheck(token: token, keyLabel: "ock-key", mechanism: "rsa-pkcs")
        check.realModule = OpenCryptokiToken.module
        check.launcher = token.launcher(keyLabel: "ock-key")
        return (token, check)
    }

    @Test(.enabled(if: available), arguments: ["inherited", "generations", "threads", "child-threads"])
    func childSignsWithInheritedHandles(_ scenario: String) throws {
        let (token, check) = try setUp()
        let direct = try check.run(scenario, throughP11Fork: false, children: 2)
        #expect(!direct.succeeded && direct.result.output.contains("CKR_CRYPTOKI_NOT_INITIALIZED"), "directly: \(direct.report)")
        let outcome = try check.run(scenario, throughP11Fork: true, children: 2, signatures: 3)
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        #expect(outcome.trace.contains("openCryptoki's module cannot be copied into a child: the broker runs it"), "\(outcome.report)")
        _ = token
    }

    @Test(.enabled(if: available), arguments: ["child-initializes", "child-teardown"])
    func oldRuleChildrenAndTeardownWork(_ scenario: String) throws {
        let (token, check) = try setUp()
        let outcome = try check.run(scenario, throughP11Fork: true, children: 2)
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        _ = token
    }

    @Test(.enabled(if: available))
    func workerPoolOfFourChildrenSignsTenTimesEach() throws {
        let (token, check) = try setUp()
        let outcome = try check.run("inherited", throughP11Fork: true, children: 4, signatures: 10)
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        _ = token
    }

    /// openCryptoki numbers its slots in opencryptoki.conf (the soft token is slot 3): a new
    /// process naming slot 3 gets through p11fork what it gets directly.
    @Test(.enabled(if: available))
    func pkcs11ToolUsesSlot3ThroughP11ForkAsDirectly() throws {
        let (token, _) = try setUp()
        func objects(_ module: String, _ environment: [String: String]) throws -> ProcessResult {
            let command = token.launcher(keyLabel: "ock-key") + ["/usr/bin/pkcs11-tool", "--module", module, "--slot", "3",
                                                                 "--login", "--pin", token.pin, "-O"]
            return try runProgram(command[0], Array(command.dropFirst()), environment: environment, timeout: 120)
        }
        let direct = try objects(OpenCryptokiToken.module, [:])
        #expect(direct.status == 0 && direct.stdout.contains("label:      ock-key"), "directly: \(direct.output)")
        let through = try objects(Products.module, ["P11FORK_MODULE": OpenCryptokiToken.module])
        #expect(through.status == 0, "through p11fork: \(through.output)")
        #expect(through.stdout == direct.stdout, "through p11fork: \(through.output)\ndirectly: \(direct.output)")
    }

    /// A child's first call opens a session on slot 3 (never listed in the child); the child sees
    /// its parent's C_GetInfo, slot lists, slot and token infos, and mechanisms (but for what
    /// p11-kit's RPC cannot carry), through the helper.
    @Test(.enabled(if: available))
    func childOpensSlot3AndSeesTheParentsModule() throws {
        let (token, check) = try setUp()
        let outcome = try check.run("same-view", throughP11Fork: true, children: 2, extra: ["--named-slot", "3", "--helper-mechanisms"])
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        #expect(outcome.result.stdout.contains("their infos and"), "\(outcome.report)")
        _ = token
    }
}
