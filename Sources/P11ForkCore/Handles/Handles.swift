import CPKCS11

// Slot IDs are the real module's (docs/FORK.md "Handles in the child", "Slot IDs"):
// the ones the module of the process that first initialised it reports. Session and object
// handles are p11fork's virtual values, each kind from its own offset, so that a real value
// passed by mistake, or a handle of the wrong kind, finds nothing. An unknown handle is
// forwarded as a value the real module must reject, so the application gets exactly the error
// (and the order of checks) of the real module.

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

    /// This module's slot ID for the application's.
    @inline(__always)
    static func real(_ slot: CK_SLOT_ID, _ failure: inout CK_RV) -> CK_SLOT_ID {
        if !translating { return slot }
        let resolved = Recovery.resolveSlot(slot, after: failure)
        failure = resolved.failure
        return resolved.real
    }

    /// Every slot `functions` lists, with or without a token.
    static func all(_ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) -> [CK_SLOT_ID] {
        guard let getSlotList = functions.pointee.C_GetSlotList else { return [] }
        var count: CK_ULONG = 0
        guard getSlotList(CK_BBOOL(CK_FALSE), nil, &count) == CKR_OK, count > 0 else { return [] }
        var slots = [CK_SLOT_ID](repeating: 0, count: Int(count))
        guard getSlotList(CK_BBOOL(CK_FALSE), &slots, &count) == CKR_OK else { return [] }
        return Array(slots.prefix(Int(count)))
    }

    /// The application's slot ID for one this module reported.
    static func expose(real: CK_SLOT_ID) -> CK_SLOT_ID {
        translating ? Recovery.applicationSlot(real: real) : real
    }
}

/// Virtual session handles.
enum Sessions {
    static let base: UInt = 0x5E00_0000
    nonisolated(unsafe) static var view = HandleView()
    nonisolated(unsafe) static var table: HandleTable!

    /// The real session handle; in a forked child, an inherited session is first re-opened.
    @inline(__always)
    static func real(_ session: CK_SESSION_HANDLE, _ failure: inout CK_RV) -> CK_SESSION_HANDLE {
        if let real = view.real(session, epoch: Core.epoch) { return real }
        let resolved = Recovery.resolveSession(session, after: failure)
        failure = resolved.failure
        return resolved.real
    }

    /// The real handle and the (application's) slot of a session, recovering an inherited one first.
    @inline(__always)
    static func resolve(_ session: CK_SESSION_HANDLE, _ failure: inout CK_RV) -> (real: CK_SESSION_HANDLE, slot: CK_SLOT_ID)? {
        if let bound = view.lookup(session, epoch: Core.epoch) { return (bound.real, bound.aux) }
        failure = Recovery.resolveSession(session, after: failure).failure
        return lookup(session)
    }

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

/// Virtual object handles: the same real object always gets the same virtual handle.
enum Objects {
    static let base: UInt = 0x0B00_0000
    nonisolated(unsafe) static var view = HandleView()
    nonisolated(unsafe) static var table: HandleTable!

    /// The real object handle; in a forked child, an inherited object is first re-found.
    @inline(__always)
    static func real(_ object: CK_OBJECT_HANDLE, _ failure: inout CK_RV) -> CK_OBJECT_HANDLE {
        if let real = view.real(object, epoch: Core.epoch) { return real }
        let resolved = Recovery.resolveObject(object, after: failure)
        failure = resolved.failure
        return resolved.real
    }

    /// The virtual handle for an object handle the real module returned on `session`. An object
    /// seen for the first time has its identity recorded (for a child to find it again); in a
    /// child, an object the parent had exposed gets its inherited handle back.
    static func expose(real: CK_OBJECT_HANDLE, session: CK_SESSION_HANDLE) -> CK_OBJECT_HANDLE {
        let bound = Sessions.lookup(session)
        let slot = bound?.slot ?? 0
        if let known = table.exposed(real: real, epoch: Core.epoch, aux: slot) { return known }
        let identity = bound.flatMap { bound in
            Core.functions.flatMap { ObjectIdentity.read($0, session: bound.real, object: real) }
        }
        if let identity, let inherited = Recovery.inheritedHandle(for: identity, slot: slot) {
            table.rebind(inherited, real: real, epoch: Core.epoch)
            return inherited
        }
        guard let virtual = table.expose(real: real, epoch: Core.epoch, aux: slot) else {
            Trace.event(.error, "object handle table full (\(HandleTable.capacity) live handles): object not exposed")
            return CK_OBJECT_HANDLE(CK_INVALID_HANDLE)
        }
        if let identity { Records.noteObject(virtual, identity) }
        return virtual
    }
}

extension Core {
    static func installHandleTables() {
        Sessions.table = HandleTable(base: Sessions.base, lock: ForkDetection.register(ForkSafeLock()))
        Objects.table = HandleTable(base: Objects.base, lock: ForkDetection.register(ForkSafeLock()))
        Sessions.view = Sessions.table.view
        Objects.view = Objects.table.view
    }

    /// After C_Finalize: every session and object handle of this life of the module is gone.
    static func forgetSessionsAndObjects() {
        epoch &+= 1
        Sessions.table.releaseAll { _, _ in true }
        Objects.table.releaseAll { _, _ in true }
        SessionNotifications.removeAll()
        Records.forgetSessionsAndObjects()
        Logins.forgetAll()
    }
}
