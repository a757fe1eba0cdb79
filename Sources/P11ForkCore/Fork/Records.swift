import CPKCS11

/// What the parent records as it hands out handles, so that a child can rebuild what it uses
/// without asking the parent's state anything (docs/DESIGN.md "Handles", "Recovery in the child").
/// Written on the calls that open sessions, log in and expose objects; never on the signing path.
enum Records {
    struct Session {
        let slot: CK_SLOT_ID
        let flags: CK_FLAGS
    }

    nonisolated(unsafe) static var lock: ForkSafeLock!
    // All guarded by `lock`.
    nonisolated(unsafe) static var tokens: [CK_SLOT_ID: TokenIdentity] = [:]
    nonisolated(unsafe) static var sessions: [CK_SESSION_HANDLE: Session] = [:]
    nonisolated(unsafe) static var knownSlots: Set<CK_SLOT_ID> = []
    nonisolated(unsafe) static var objects: [CK_OBJECT_HANDLE: ObjectIdentity] = [:]
    /// Object handles by identity, to give a re-found object its inherited handle back.
    nonisolated(unsafe) static var objectsByIdentity: [ObjectIdentity: [CK_OBJECT_HANDLE]] = [:]

    static func install() { lock = ForkDetection.register(ForkSafeLock()) }

    static func noteToken(_ slot: CK_SLOT_ID, _ identity: TokenIdentity) {
        lock.withLock { tokens[slot] = identity }
    }

    static func token(_ slot: CK_SLOT_ID) -> TokenIdentity? {
        lock.withLock { tokens[slot] }
    }

    /// What the application's first module said of itself (C_GetInfo); a child whose module
    /// is reached through the helper answers it (docs/FORK.md "Handles in the child").
    nonisolated(unsafe) static var moduleInfo: CK_INFO?

    /// After the application's C_Initialize, in a process whose module numbers its slots: the
    /// module's own description and every slot's token, so that a child whose module numbers
    /// slots differently still finds the token behind any slot ID the application may name.
    static func noteModule(_ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) {
        var info = CK_INFO()
        let described = functions.pointee.C_GetInfo?(&info) == CKR_OK
        let slots = Slots.all(functions)
        let found = slots.compactMap { slot in TokenIdentity.read(functions, slot: slot).map { (slot, $0) } }
        lock.withLock {
            if described { moduleInfo = info }
            for (slot, identity) in found { tokens[slot] = identity }
            knownSlots.formUnion(slots)
        }
    }

    static func allTokens() -> [CK_SLOT_ID: TokenIdentity] {
        lock.withLock { tokens }
    }

    /// Slot IDs the application was given or used successfully in this process or its parents.
    static func noteSlots(_ slots: UnsafeBufferPointer<CK_SLOT_ID>) {
        lock.withLock { for slot in slots { knownSlots.insert(slot) } }
    }

    static func knowsSlot(_ slot: CK_SLOT_ID) -> Bool {
        lock.withLock { knownSlots.contains(slot) || tokens[slot] != nil || sessions.values.contains { $0.slot == slot } }
    }

    static func noteSession(_ session: CK_SESSION_HANDLE, slot: CK_SLOT_ID, flags: CK_FLAGS) {
        lock.withLock { sessions[session] = Session(slot: slot, flags: flags) }
    }

    /// Forgets closed sessions, what was kept of their operations and of the session objects
    /// they made (the module destroyed those, and their handles are released); returns the
    /// slots left with no open session (their login is gone).
    @discardableResult
    static func forgetSessions(_ closed: [CK_SESSION_HANDLE]) -> Set<CK_SLOT_ID> {
        let (slots, objectsGone) = lock.withLock { () -> (Set<CK_SLOT_ID>, [CK_OBJECT_HANDLE]) in
            var slots = Set<CK_SLOT_ID>()
            for session in closed { if let record = sessions.removeValue(forKey: session) { slots.insert(record.slot) } }
            for record in sessions.values { slots.remove(record.slot) }
            Operations.forgetLocked(closed)
            AsyncOperations.forgetLocked(closed)
            return (slots, SessionObjects.forgetLocked(sessions: Set(closed)))
        }
        for object in objectsGone {
            Objects.table.release(object)
            forgetObject(object)
        }
        return slots
    }

    static func session(_ session: CK_SESSION_HANDLE) -> Session? {
        lock.withLock { sessions[session] }
    }

    static func noteObject(_ object: CK_OBJECT_HANDLE, _ identity: ObjectIdentity) {
        lock.withLock {
            objects[object] = identity
            objectsByIdentity[identity, default: []].append(object)
        }
    }

    static func object(_ object: CK_OBJECT_HANDLE) -> ObjectIdentity? {
        lock.withLock { objects[object] }
    }

    static func forgetObject(_ object: CK_OBJECT_HANDLE) {
        lock.withLock {
            guard let identity = objects.removeValue(forKey: object) else { return }
            objectsByIdentity[identity]?.removeAll { $0 == object }
            if objectsByIdentity[identity]?.isEmpty == true { objectsByIdentity[identity] = nil }
        }
    }

    static func objects(with identity: ObjectIdentity) -> [CK_OBJECT_HANDLE] {
        lock.withLock { objectsByIdentity[identity] ?? [] }
    }

    /// After C_Finalize: sessions and objects are gone (token identities stay: slots outlive it).
    static func forgetSessionsAndObjects() {
        lock.withLock {
            sessions.removeAll()
            objects.removeAll()
            objectsByIdentity.removeAll()
            Operations.forgetAllLocked()
            AsyncOperations.forgetAllLocked()
            SessionObjects.forgetAllLocked()
        }
    }

    /// Sizes for memory figures and tests.
    static var counts: (sessions: Int, objects: Int, tokens: Int) {
        lock.withLock { (sessions.count, objects.count, tokens.count) }
    }
}
