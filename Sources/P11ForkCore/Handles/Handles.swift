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

    @inline(__always)
    static func real(_ slot: CK_SLOT_ID) -> CK_SLOT_ID {
        view.real(slot, epoch: 0) ?? invalidReal
    }

    /// The virtual ID for a real slot ID the module reported.
    static func expose(real: CK_SLOT_ID) -> CK_SLOT_ID {
        table.expose(real: real, epoch: 0) ?? invalidReal
    }
}

/// Virtual session handles.
enum Sessions {
    static let base: UInt = 0x5E00_0000
    nonisolated(unsafe) static var view = HandleView()
    nonisolated(unsafe) static var table: HandleTable!

    @inline(__always)
    static func real(_ session: CK_SESSION_HANDLE) -> CK_SESSION_HANDLE {
        view.real(session, epoch: Core.epoch) ?? CK_SESSION_HANDLE(CK_INVALID_HANDLE)
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

    @inline(__always)
    static func real(_ object: CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE {
        view.real(object, epoch: Core.epoch) ?? CK_OBJECT_HANDLE(CK_INVALID_HANDLE)
    }

    /// The virtual handle for an object handle the real module returned on `session`.
    static func expose(real: CK_OBJECT_HANDLE, session: CK_SESSION_HANDLE) -> CK_OBJECT_HANDLE {
        let slot = Sessions.lookup(session)?.slot ?? 0
        if let virtual = table.expose(real: real, epoch: Core.epoch, aux: slot) { return virtual }
        Trace.event(.error, "object handle table full (\(HandleTable.capacity) live handles): object not exposed")
        return CK_OBJECT_HANDLE(CK_INVALID_HANDLE)
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
    }
}
