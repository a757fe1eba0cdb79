import CPKCS11

// The three kinds of virtual handle an application sees (DESIGN.md "Handles"). Each starts at
// its own offset, so a real value passed by mistake, or a handle of the wrong kind, finds
// nothing. An unknown virtual handle is forwarded as a value the real module must reject, so
// the application gets exactly the error (and the order of checks) of the real module.

/// Virtual slot IDs: stable for the life of the process, whatever the real module numbers.
enum Slots {
    static let base: UInt = 0x5100_0000
    /// What an unknown virtual slot is forwarded as: no module issues this slot ID.
    static let invalidReal: CK_SLOT_ID = .max
    nonisolated(unsafe) static var view = HandleView()
    nonisolated(unsafe) static var table: HandleTable!

    /// The real slot ID; in a forked child, an inherited slot is first matched by its token.
    @inline(__always)
    static func real(_ slot: CK_SLOT_ID, _ failure: inout CK_RV) -> CK_SLOT_ID {
        if let real = view.real(slot, epoch: Core.slotEpoch) { return real }
        let resolved = Recovery.resolveSlot(slot, after: failure)
        failure = resolved.failure
        return resolved.real
    }

    /// The virtual ID for a real slot ID the module reported.
    static func expose(real: CK_SLOT_ID) -> CK_SLOT_ID {
        Recovery.matchSlots()
        return table.expose(real: real, epoch: Core.slotEpoch) ?? invalidReal
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

    /// The real handle and virtual slot of a session, recovering an inherited one first.
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

    /// The real handle and the virtual slot of a session.
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
        Slots.table = HandleTable(base: Slots.base, lock: ForkDetection.register(ForkSafeLock()))
        Sessions.table = HandleTable(base: Sessions.base, lock: ForkDetection.register(ForkSafeLock()))
        Objects.table = HandleTable(base: Objects.base, lock: ForkDetection.register(ForkSafeLock()))
        Slots.view = Slots.table.view
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
