import Foundation
import Testing

/// Fork tolerance over the network-HSM-like test module: after a fork every call on inherited
/// state fails with CKR_DEVICE_ERROR, its C_Initialize in a child answers
/// CKR_CRYPTOKI_ALREADY_INITIALIZED and stays broken, and a child's C_Finalize, C_Logout or
/// C_CloseSession on inherited state kills the parent's server-side state. Only a fresh copy of
/// the module works in a child. Every scenario runs directly first, to show the failure.
@Suite(.serialized) struct NetHSMForkTests {
    private func setUp() throws -> (NetHSMToken, ForkCheck) {
        let token = try NetHSMToken()
        try token.generateSecretKey(label: "hmac-key")
        var check = ForkCheck(token: token, keyLabel: "hmac-key", mechanism: "hmac")
        check.realModule = NetHSMToken.module
        return (token, check)
    }

    private func directFailsThenP11ForkWorks(_ scenario: String, children: Int = 2, signatures: Int = 1,
                                             directShows: String) throws {
        let (token, check) = try setUp()
        let direct = try check.run(scenario, throughP11Fork: false, children: children, signatures: signatures)
        #expect(!direct.succeeded && direct.result.output.contains(directShows), "directly: \(direct.report)\nlog:\n\(token.log)")
        let outcome = try check.run(scenario, throughP11Fork: true, children: children, signatures: signatures)
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)\nlog:\n\(token.log)")
    }

    /// The module gives each connection a slot ID of its own, so a child's fresh copy numbers the
    /// token's slot anew: the child's first call opens a session on its parent's slot ID (never
    /// listed in the child), and it sees the parent's C_GetInfo, slot list, slot and token infos
    /// and mechanisms, through translation.
    @Test func childUsesTheParentsSlotIDThoughItsModuleNumbersItAnew() throws {
        let (token, check) = try setUp()
        let outcome = try check.run("same-view", throughP11Fork: true, children: 2)
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)\nlog:\n\(token.log)")
        #expect(outcome.result.stdout.contains("C_GetInfo, 1 slots, their infos and"), "\(outcome.report)")
        #expect(outcome.trace.contains("renumbered by this module: slot "), "\(outcome.report)")
    }

    @Test func childSignsWithParentSessionAndKey() throws {
        try directFailsThenP11ForkWorks("inherited", directShows: "CKR_DEVICE_ERROR")
    }

    @Test func workerPoolOfFourChildrenSignsTenTimesEach() throws {
        try directFailsThenP11ForkWorks("inherited", children: 4, signatures: 10, directShows: "CKR_DEVICE_ERROR")
    }

    @Test func grandchildSignsWithInheritedHandles() throws {
        try directFailsThenP11ForkWorks("generations", directShows: "CKR_DEVICE_ERROR")
    }

    @Test func childThatInitializesItselfStartsOver() throws {
        try directFailsThenP11ForkWorks("child-initializes", directShows: "CKR_CRYPTOKI_ALREADY_INITIALIZED")
    }

    /// Directly, the child's teardown reaches the server and the parent loses its session.
    @Test func childTearingDownNeverReachesTheParent() throws {
        let (token, check) = try setUp()
        let direct = try check.run("child-teardown", throughP11Fork: false)
        #expect(!direct.succeeded && direct.result.output.contains("the parent cannot sign after them"), "directly: \(direct.report)")
        #expect(token.log.contains("inherited C_Finalize: killed connection"), "\(token.log)")
        let before = token.log
        let outcome = try check.run("child-teardown", throughP11Fork: true, children: 2)
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        // Nothing the children did reached the server on the parent's behalf.
        #expect(token.log == before, "new server log lines: \(token.log.dropFirst(before.count))")
    }

    @Test func forkWhileTwoThreadsSignNeverHangsTheChild() throws {
        let (token, check) = try setUp()
        let outcome = try check.run("threads", throughP11Fork: true, children: 30)
        #expect(outcome.succeeded, "\(outcome.report)")
        _ = token
    }

    @Test func threadsOfAChildRecoverOnceAndAllSign() throws {
        try directFailsThenP11ForkWorks("child-threads", directShows: "CKR_DEVICE_ERROR")
    }

    /// The PIN changes after the parent logged in: the child's replay fails once, and the token's
    /// failure counter shows exactly one wrong attempt (two would show "final try").
    @Test func changedPinFailsOnceAndIsNotTriedAgain() throws {
        let (token, check) = try setUp()
        let newPin = makeSecret()
        let change = "pkcs11-tool --module \(NetHSMToken.module) --token-label \(token.label) --login --pin \(token.pin) --change-pin --new-pin \(newPin) >/dev/null 2>&1"
        let outcome = try check.run("pin-changed", throughP11Fork: true, extra: ["--run-before-fork", change])
        #expect(outcome.succeeded, "\(outcome.report)")
        #expect(outcome.trace.components(separatedBy: "login replay failed").count - 1 == 1, "\(outcome.report)")
        let info = try token.tool(["-T"], login: false)
        #expect(info.stdout.contains("user PIN count low"), "\(info.output)")
        #expect(!info.stdout.contains("final try") && !info.stdout.contains("locked"), "\(info.output)")
        #expect(!outcome.trace.contains(token.pin) && !outcome.trace.contains(newPin))
    }

    /// The reinitialize strategy cannot help a module that does not notice forks: the child gets a
    /// clear CKR_DEVICE_ERROR and a trace line naming the strategy to use, never the inherited copy.
    @Test func reinitializeStrategyFailsClearlyOnAModuleThatIgnoresForks() throws {
        let (token, plain) = try setUp()
        var check = plain
        check.extraEnvironment = ["P11FORK_STRATEGY": "reinitialize"]
        let outcome = try check.run("inherited", throughP11Fork: true)
        #expect(!outcome.succeeded && outcome.result.stdout.contains("CKR_DEVICE_ERROR"), "\(outcome.report)")
        #expect(outcome.trace.contains("no working module in this child"), "\(outcome.report)")
        _ = token
    }
}
