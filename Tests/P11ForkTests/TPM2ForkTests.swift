import Foundation
import Testing

/// Fork tolerance over tpm2-pkcs11 on a software TPM: a module whose stack (GLib, D-Bus to
/// tpm2-abrmd) can neither be loaded twice in one process nor re-initialised in a child, and
/// whose children break their parent: a child signing with inherited state advances the shared
/// TPM session, after which the parent's signatures fail with CKR_GENERAL_ERROR. Through
/// p11fork (auto strategy: the module runs in the broker for every child) the children sign and the
/// parent keeps signing.
@Suite(.serialized) struct TPM2ForkTests {
    private func setUp() throws -> (TPM2Token, ForkCheck) {
        let token = try TPM2Token()
        var check = ForkCheck(token: token, keyLabel: "tpm-key", mechanism: "rsa")
        check.realModule = TPM2Token.module
        check.launcher = token.launcher(keyLabel: "tpm-key")
        return (token, check)
    }

    @Test(.enabled(if: TPM2Token.available))
    func childrenSignAndTheParentIsNotBroken() throws {
        let (token, check) = try setUp()
        let direct = try check.run("inherited", throughP11Fork: false, children: 2)
        #expect(!direct.succeeded, "directly: \(direct.report)")
        let outcome = try check.run("inherited", throughP11Fork: true, children: 2, signatures: 2)
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        #expect(outcome.trace.contains("the broker runs it for this child"), "\(outcome.report)")
        _ = token
    }

    @Test(.enabled(if: TPM2Token.available), arguments: ["generations", "child-initializes", "child-teardown", "child-threads"])
    func scenariosWorkThroughP11Fork(_ scenario: String) throws {
        let (token, check) = try setUp()
        let outcome = try check.run(scenario, throughP11Fork: true, children: 2)
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        _ = token
    }

    @Test(.enabled(if: TPM2Token.available))
    func workerPoolOfFourChildrenSignsTenTimesEach() throws {
        let (token, check) = try setUp()
        let outcome = try check.run("inherited", throughP11Fork: true, children: 4, signatures: 10)
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        _ = token
    }

    /// A child served by the broker sees the real module, not p11-kit's RPC client: C_GetInfo,
    /// the slot lists and IDs, every CK_SLOT_INFO /
    /// CK_TOKEN_INFO, the mechanism list but for what p11-kit's RPC cannot carry; its first call
    /// opens a session on the token's slot ID, which it never listed.
    @Test(.enabled(if: TPM2Token.available))
    func childServedByTheBrokerSeesTheParentsModule() throws {
        let (token, check) = try setUp()
        let outcome = try check.run("same-view", throughP11Fork: true, children: 2, extra: ["--helper-mechanisms"])
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        // The broker serves the module itself, not p11-kit's proxy of it: the slot IDs are the module's.
        #expect(!outcome.trace.contains("renumbered by this module: slot "), "\(outcome.report)")
        #expect(outcome.result.stdout.contains("their infos and"), "\(outcome.report)")
        #expect(outcome.trace.contains("the broker runs it for this child"), "\(outcome.report)")
        _ = token
    }
}
