import CPKCS11

// Resolving the handles a call carries (docs/DESIGN.md "Handles"): the tables in Handles/ are
// pure look-ups; what a miss means (an inherited handle in a child, to be recovered first, or an
// object the child came across by itself) is decided here, in the calls' layer, which hands it to
// Recovery and Records. In a process that is not a forked child a handle is the real module's and
// goes through as it is (one load); in a child the found path is a few loads, inlined into every
// forwarder, and the miss path is out of line.

extension Slots {
    /// This module's slot ID for the application's.
    @inline(__always)
    static func real(_ slot: CK_SLOT_ID, _ failure: inout CK_RV) -> CK_SLOT_ID {
        if !translating { return slot }
        let resolved = Recovery.resolveSlot(slot, after: failure)
        failure = resolved.failure
        return resolved.real
    }

    /// The application's slot ID for one this module reported.
    static func expose(real: CK_SLOT_ID) -> CK_SLOT_ID {
        translating ? Recovery.applicationSlot(real: real) : real
    }
}

extension Sessions {
    /// The real session handle; in a forked child, an inherited session is first re-opened.
    @inline(__always)
    static func real(_ session: CK_SESSION_HANDLE, _ failure: inout CK_RV) -> CK_SESSION_HANDLE {
        if !HandleValues.translated { return session }
        if let real = view.real(session, epoch: Core.epoch) { return real }
        let resolved = Recovery.resolveSession(session, after: failure)
        failure = resolved.failure
        return resolved.real
    }
}

extension Objects {
    /// The real object handle; in a forked child, an inherited object is first re-found.
    @inline(__always)
    static func real(_ object: CK_OBJECT_HANDLE, _ failure: inout CK_RV) -> CK_OBJECT_HANDLE {
        if !HandleValues.translated { return object }
        if let real = view.real(object, epoch: Core.epoch) { return real }
        let resolved = Recovery.resolveObject(object, after: failure)
        failure = resolved.failure
        return resolved.real
    }

    /// The application's handle for an object handle the real module returned on `session`: the
    /// same value, except in a child where it collides with an inherited one. An object seen for
    /// the first time has its identity recorded (for a child to find it again); in a child, an
    /// object the parent had exposed gets its inherited handle back.
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
        guard let exposed = table.expose(real: real, epoch: Core.epoch, aux: slot) else {
            Trace.event(.error, "object handle table full (\(HandleTable.capacity) live handles): object not exposed")
            return HandleValues.translated ? CK_OBJECT_HANDLE(CK_INVALID_HANDLE) : real
        }
        if let identity {
            // A value the module gave again (the same real handle on another slot, or reused
            // after an object went behind p11fork's back) names what the module says now.
            if Records.object(exposed) != nil { Records.forgetObject(exposed) }
            Records.noteObject(exposed, identity)
        }
        return exposed
    }
}
