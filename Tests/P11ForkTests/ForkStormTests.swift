import Foundation
import Testing

/// A fork storm (docs/DESIGN.md "Threads and locks"): two threads of the parent sign without pause
/// while it forks 1,000 children, every tenth of which forks a grandchild; every one of them
/// signs with the inherited session and key under alarm(). No child may fail, hang or crash, and
/// no signature of the parent's may fail. The module alone loses every child first.
@Suite(.serialized) struct ForkStormTests {
    private static func counts(_ output: String) -> String {
        output.split(separator: "\n").first { $0.hasPrefix("storm:") }.map(String.init) ?? output
    }

    @Test func softHSMWithResetOnForkThousandChildren() throws {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "fork-key")
        let check = ForkCheck(token: token)
        let direct = try check.run("storm", throughP11Fork: false, children: 10)
        #expect(!direct.succeeded && direct.result.stdout.contains("0 signed and verified"), "directly: \(direct.report)")
        let outcome = try check.run("storm", throughP11Fork: true, children: 1000)
        #expect(outcome.succeeded, "\(outcome.report)")
        #expect(outcome.result.stdout.contains("1000 signed and verified, 0 failed, 0 hung, 0 crashed; 0 grandchild problem(s)"),
                "\(Self.counts(outcome.result.stdout))")
        print("fork storm, SoftHSM reset_on_fork: \(Self.counts(outcome.result.stdout))")
    }

    @Test func networkHSMTestModuleThousandChildrenThreeAtATime() throws {
        let token = try NetHSMToken()
        try token.generateSecretKey(label: "hmac-key")
        var check = ForkCheck(token: token, keyLabel: "hmac-key", mechanism: "hmac")
        check.realModule = NetHSMToken.module
        // Directly, each child hangs until its 20 s alarm: three, in one wave, show it.
        let direct = try check.run("storm", throughP11Fork: false, children: 3, extra: ["--in-flight", "3"])
        #expect(!direct.succeeded && direct.result.stdout.contains("0 signed and verified"), "directly: \(direct.report)")
        let outcome = try check.run("storm", throughP11Fork: true, children: 1000, extra: ["--in-flight", "3"])
        #expect(outcome.succeeded, "\(outcome.report)")
        #expect(outcome.result.stdout.contains("1000 signed and verified, 0 failed, 0 hung, 0 crashed; 0 grandchild problem(s)"),
                "\(Self.counts(outcome.result.stdout))")
        print("fork storm, network-HSM test module: \(Self.counts(outcome.result.stdout))")
    }

    /// Over the 3.2 test module, with a signature-first verification (C_VerifySignatureInit +
    /// Update) in progress in the parent at every fork: each of 1,000 children signs, verifies and
    /// finishes the parent's verification (the signature verifies); each grandchild verifies its
    /// own signature through C_VerifySignature; the parent finishes its own at the end.
    @Test func pkcs11v32ModuleThousandChildrenFinishTheParentsVerification() throws {
        let token = try NetHSMToken()
        try token.generateSecretKey(label: "hmac-key")
        var check = ForkCheck(token: token, keyLabel: "hmac-key", mechanism: "hmac")
        check.realModule = NetHSMToken.module
        let direct = try check.run("storm", throughP11Fork: false, children: 3, extra: ["--in-flight", "3", "--verify-signature"])
        #expect(!direct.succeeded && direct.result.stdout.contains("0 signed and verified"), "directly: \(direct.report)")
        let outcome = try check.run("storm", throughP11Fork: true, children: 1000, extra: ["--in-flight", "3", "--verify-signature"])
        #expect(outcome.succeeded, "\(outcome.report)")
        #expect(outcome.result.stdout.contains("1000 signed and verified, 0 failed, 0 hung, 0 crashed; 0 grandchild problem(s)"),
                "\(Self.counts(outcome.result.stdout))")
        #expect(outcome.result.stdout.contains("every child finished the parent's C_VerifySignatureInit + Update (signature verified); so did the parent"),
                "\(outcome.report)")
        #expect(outcome.trace.components(separatedBy: "operation C_VerifySignatureInit on session").count - 1 >= 1000, "\(Self.counts(outcome.result.stdout))")
        print("fork storm, 3.2 test module with a verification in progress: \(Self.counts(outcome.result.stdout))")
    }
}
