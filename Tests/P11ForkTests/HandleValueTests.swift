import Foundation
import Testing

/// Handle values (docs/FORK.md "Handle values"): the parent's session and object handles are
/// SoftHSM's own, as directly; a child whose module issues the parent's values again (a fresh
/// copy counts from 1 like the parent's did) opens a session of its own before it touches an
/// inherited one, and that session gets a value of the reserved range, translated; the child
/// signs with the inherited handles and with its own, and a grandchild does so with its
/// grandparent's, its parent's and its own (`handle-values` in p11fork-forkcheck).
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
            guard line.contains("\(who) "), let match = line.firstMatch(
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
}
