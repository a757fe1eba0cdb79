import CPKCS11

// Slot IDs are the real module's (docs/FORK.md "Handles in the child", "Slot IDs"):
// the ones the module of the process that first initialised it reports. Session and object
// handles are the real module's too in a process that is not a forked child, and are passed on
// untouched there, so a handle of the wrong kind or a closed one reaches the module, which
// answers as it would directly. In a forked child they are translated (docs/FORK.md "Handle
// values"); an unknown one is forwarded there as a value the real module must reject.

/// Whether session and object handles are translated in this process.
enum HandleValues {
    /// True in a forked child (and its own children): set when the child is adopted, with its
    /// other threads waiting (ForkDetection), like Slots.translating.
    nonisolated(unsafe) static var translated = false

    /// From the child's first call on: inherited handles keep their values, and a new handle
    /// that collides with one is given a value of the reserved range.
    static func enterChild() {
        translated = true
        Sessions.table.remapsCollisions = true
        Objects.table.remapsCollisions = true
    }
}

/// Slot IDs: passed through unchanged until a child's module replaces the inherited one; from
/// then on the application's IDs (its first module's) are translated to that module's.
enum Slots {
    /// What a slot ID unknown in a child is forwarded as: no module issues this slot ID.
    static let invalidReal: CK_SLOT_ID = .max
    /// Where the values for a child's slots whose own number names another token start.
    static let freshBase: UInt = 0x5100_0000
    /// True once this process's module is not the one that numbered the application's slots.
    /// Set only while the process's other threads wait (ForkDetection), like Core.functions.
    nonisolated(unsafe) static var translating = false

    /// Every slot `functions` lists, with or without a token.
    static func all(_ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) -> [CK_SLOT_ID] {
        guard let getSlotList = functions.pointee.C_GetSlotList else { return [] }
        var count: CK_ULONG = 0
        guard getSlotList(CK_BBOOL(CK_FALSE), nil, &count) == CKR_OK, count > 0 else { return [] }
        var slots = [CK_SLOT_ID](repeating: 0, count: Int(count))
        guard getSlotList(CK_BBOOL(CK_FALSE), &slots, &count) == CKR_OK else { return [] }
        return Array(slots.prefix(Int(count)))
    }
}

/// Session handles: the real module's, translated in a forked child.
enum Sessions {
    nonisolated(unsafe) static var view = HandleView()
    nonisolated(unsafe) static var table: HandleTable!

    /// True for a handle issued before this process's module (a fork) and not yet recovered.
    static func isStale(_ session: CK_SESSION_HANDLE) -> Bool {
        guard let bound = view.lookupAnyEpoch(session) else { return false }
        return bound.epoch != Core.epoch
    }

    /// The real handle and the (application's) slot of a session.
    @inline(__always)
    static func lookup(_ session: CK_SESSION_HANDLE) -> (real: CK_SESSION_HANDLE, slot: CK_SLOT_ID)? {
        view.lookup(session, epoch: Core.epoch).map { ($0.real, $0.aux) }
    }
}

/// Object handles: the real module's, translated in a forked child, where the same real object
/// always gets the same value.
enum Objects {
    nonisolated(unsafe) static var view = HandleView()
    nonisolated(unsafe) static var table: HandleTable!
}
