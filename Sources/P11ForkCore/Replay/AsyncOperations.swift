import CPKCS11

/// PKCS#11 3.2 asynchronous operations (a call answered CKR_PENDING; C_AsyncComplete,
/// C_AsyncGetID, C_AsyncJoin), and what a forked child gets of them (docs/FORK.md "PKCS#11 3.0
/// and 3.2"). CKR_PENDING itself passes through untouched in every process: p11fork only notes
/// which function of which session has an operation under way, and the ID C_AsyncGetID gave.
///
/// An operation the module runs for the parent stays the parent's: in a child, C_AsyncComplete
/// and C_AsyncGetID for it answer CKR_OPERATION_NOT_INITIALIZED and C_AsyncJoin with its ID
/// CKR_SAVED_STATE_INVALID, each with a trace line, and the module is not asked (joining it in
/// the child could take the parent's result away from the parent).
enum AsyncOperations {
    struct Pending {
        /// ForkDetection.generation of the process that began it.
        let generation: Int
        var id: CK_ULONG?
    }

    // Guarded by Records.lock: per (virtual) session, the functions with an operation under way.
    nonisolated(unsafe) static var pending: [CK_SESSION_HANDLE: [String: Pending]] = [:]

    /// After any call on a session: CKR_PENDING means the module goes on with it.
    @inline(__always)
    static func noted(_ function: Function, _ session: CK_SESSION_HANDLE, _ rv: CK_RV) {
        if _slowPath(rv == CKR_PENDING) { began("\(function.name)", session) }
    }

    static func began(_ name: String, _ session: CK_SESSION_HANDLE) {
        let generation = ForkDetection.generation
        Records.lock.withLock { pending[session, default: [:]][name] = Pending(generation: generation) }
    }

    /// The parent's operation behind (session, name), when this process is a child of the one that began it.
    static func inherited(_ session: CK_SESSION_HANDLE, _ name: String?) -> Pending? {
        guard ForkDetection.generation > 0, let name else { return nil }
        let generation = ForkDetection.generation
        return Records.lock.withLock { pending[session]?[name].flatMap { $0.generation != generation ? $0 : nil } }
    }

    /// The parent's operation that C_AsyncGetID named `id`, on any session: the ID names it
    /// module-wide, and C_AsyncJoin may be called on another session than the one that began it.
    static func inherited(id: CK_ULONG) -> String? {
        guard ForkDetection.generation > 0 else { return nil }
        let generation = ForkDetection.generation
        return Records.lock.withLock {
            for operations in pending.values {
                if let found = operations.first(where: { $0.value.generation != generation && $0.value.id == id }) { return found.key }
            }
            return nil
        }
    }

    /// After C_AsyncComplete (anything but CKR_PENDING ends the operation) or C_AsyncGetID.
    static func completed(_ name: String, _ session: CK_SESSION_HANDLE, _ rv: CK_RV) {
        if rv == CKR_PENDING { return began(name, session) }
        Records.lock.withLock { _ = pending[session]?.removeValue(forKey: name) }
    }

    static func identified(_ name: String, _ session: CK_SESSION_HANDLE, _ id: CK_ULONG) {
        let generation = ForkDetection.generation
        Records.lock.withLock { pending[session, default: [:]][name] = Pending(generation: generation, id: id) }
    }

    /// The answer p11fork gives in a child about the parent's operation, with its trace line.
    static func refused(_ function: String, _ name: String, _ session: CK_SESSION_HANDLE, _ rv: CK_RV) -> CK_RV {
        Trace.event(.fork, "\(function)(\(name)) on session 0x\(Format.hex(session)): the asynchronous operation was begun in the parent and stays the parent's; answered \(Format.name(rv)) without asking the module")
        return rv
    }

    /// Sessions closed (or C_Finalize). Under Records.lock.
    static func forgetLocked(_ sessions: some Sequence<CK_SESSION_HANDLE>) {
        for session in sessions { pending[session] = nil }
    }

    static func forgetAllLocked() { pending.removeAll() }
}
