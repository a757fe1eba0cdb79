import Foundation
import Testing

/// Handle values (docs/FORK.md "Handle values"): the parent's session and object handles are
/// SoftHSM's own, as directly; a child whose module issues the parent's values again (a fresh
/// copy counts from 1 like the parent's did) opens a session of its own before it touches an
/// inherited one, and that session gets a value of the reserved range, translated; the child
/// signs with the inherited handles and with its own, and a grandchild does so with its
/// grandparent's, its parent's and its own (`handle-values` in p11fork-forkcheck). The same over
/// the network-HSM test module with `NETHSM_HANDLES=reuse`, which gives every value again as soon
/// as it is free (each connection's sessions count from 1): there a process that never forked
/// also sees the module's reuse after a close, as directly (`reuse`).
@Suite(.serialized) struct HandleValueTests {
    static let reservedBit: UInt64 = 1 << 63

    /// The values a process printed: "who index: handles: parent's session 0x…, key 0x…;
    /// child's session 0x…; own session 0x…, key found on it 0x…".
    struct Printed {
        let parentSession: UInt64
        let parentKey: UInt64
        let ownSession: UInt64
    }

    static func printed(_ output: String, _ who: String) -> [Printed] {
        output.split(separator: "\n").compactMap { line in
            guard line.contains("\(who) "), who == "grandchild" || !line.contains("grandchild"), let match = line.firstMatch(
                of: /handles: parent's session 0x([0-9a-f]+), key 0x([0-9a-f]+); child's session 0x[0-9a-f]+; own session 0x([0-9a-f]+)/)
            else { return nil }
            return Printed(parentSession: UInt64(match.1, radix: 16)!, parentKey: UInt64(match.2, radix: 16)!,
                           ownSession: UInt64(match.3, radix: 16)!)
        }
    }

    static func parentLine(_ output: String) -> String? {
        output.split(separator: "\n").first { $0.contains("parent: handles: session") }.map(String.init)
    }

    @Test(arguments: [false, true])
    func childrenTranslateWhereTheirModuleReusesTheParentsValues(_ strict: Bool) throws {
        let token = try SoftHSMToken(strict: strict)
        try token.generateKeyPair(label: "fork-key", type: "rsa:2048")
        let check = ForkCheck(token: token, mechanism: "rsa")

        // Directly: the parent's values, and what the module does with the scenario by itself.
        let direct = try check.run("handle-values", throughP11Fork: false)
        if strict {
            #expect(!direct.succeeded && direct.result.stdout.contains("CKR_CRYPTOKI_NOT_INITIALIZED"), "directly: \(direct.report)")
        }
        let through = try check.run("handle-values", throughP11Fork: true)
        #expect(through.succeeded, "through p11fork: \(through.report)")

        // The parent's handles are the module's: the same values as directly.
        let directParent = try #require(Self.parentLine(direct.result.stdout), "directly: \(direct.report)")
        #expect(Self.parentLine(through.result.stdout) == directParent, "through p11fork: \(through.report)")

        let child = try #require(Self.printed(through.result.stdout, "child").first, "\(through.report)")
        let grandchild = try #require(Self.printed(through.result.stdout, "grandchild").first, "\(through.report)")
        print("handle-values over SoftHSM \(strict ? "reset_on_fork" : "default mode"): \(directParent); child's own session 0x\(String(child.ownSession, radix: 16)), grandchild's 0x\(String(grandchild.ownSession, radix: 16)); directly: \(direct.succeeded ? "ok" : "failed")")
        #expect(child.parentSession & Self.reservedBit == 0 && child.parentKey & Self.reservedBit == 0)
        #expect(Set([child.parentSession, child.ownSession, grandchild.ownSession]).count == 3, "\(through.report)")
        if !strict {
            // A fresh copy numbers its sessions from the start again: the child's own session
            // collides with the inherited one, and so does the grandchild's.
            #expect(child.ownSession & Self.reservedBit != 0, "\(through.report)")
            #expect(grandchild.ownSession & Self.reservedBit != 0, "\(through.report)")
        }
        _ = token
    }

    static func reusingNetHSM() throws -> (NetHSMToken, ForkCheck) {
        let token = try NetHSMToken()
        try token.generateSecretKey(label: "hmac-key")
        var check = ForkCheck(token: token, keyLabel: "hmac-key", mechanism: "hmac")
        check.realModule = NetHSMToken.module
        check.extraEnvironment["NETHSM_HANDLES"] = "reuse"
        return (token, check)
    }

    @Test func aProcessThatNeverForkedSeesTheModulesReuseOfValues() throws {
        let (token, check) = try Self.reusingNetHSM()
        let direct = try check.run("reuse", throughP11Fork: false)
        let through = try check.run("reuse", throughP11Fork: true)
        #expect(direct.succeeded, "directly: \(direct.report)")
        #expect(through.succeeded, "through p11fork: \(through.report)")
        let line = { (outcome: ForkCheck.Outcome) in outcome.result.stdout.split(separator: "\n").first { $0.contains("reuse: session") } }
        let directLine = try #require(line(direct), "\(direct.report)")
        #expect(line(through) == directLine, "through p11fork: \(through.report)")
        // The module gave the closed session's value to the next one, and answers for a closed one.
        #expect(directLine.contains("then 0x2 and 0x3, after closing 0x2: 0x2") && directLine.hasSuffix("CKR_SESSION_HANDLE_INVALID"), "\(directLine)")
        print("reuse over the network-HSM test module, directly and through p11fork: \(directLine)")
        _ = token
    }

    @Test func childrenOfAModuleThatReusesValuesAggressivelyTranslateOnlyCollisions() throws {
        let (token, check) = try Self.reusingNetHSM()
        let direct = try check.run("handle-values", throughP11Fork: false)
        #expect(!direct.succeeded && direct.result.output.contains("CKR_DEVICE_ERROR"), "directly: \(direct.report)")
        let through = try check.run("handle-values", throughP11Fork: true, children: 2)
        #expect(through.succeeded, "through p11fork: \(through.report)\nlog:\n\(token.log)")
        #expect(Self.parentLine(through.result.stdout) == Self.parentLine(direct.result.stdout), "\(through.report)")
        let children = Self.printed(through.result.stdout, "child")
        let grandchildren = Self.printed(through.result.stdout, "grandchild")
        #expect(children.count == 2 && grandchildren.count == 2, "\(through.report)")
        for printed in children + grandchildren {
            // Each child's connection numbers its sessions from 1 again: its own session collides.
            #expect(printed.parentSession == 1 && printed.ownSession & Self.reservedBit != 0, "\(through.report)")
        }
        print("handle-values over the network-HSM test module (reuse): \(Self.parentLine(through.result.stdout) ?? ""); own sessions: \((children + grandchildren).map { "0x" + String($0.ownSession, radix: 16) })")
        _ = token
    }
}
