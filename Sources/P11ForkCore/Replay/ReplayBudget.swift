/// The bound on what p11fork keeps for replay in a child (docs/DESIGN.md "Recovery in the child",
/// steps 5 and 6): the bytes of session-object templates and parameters, of mechanism
/// parameters, of data fed to operations in progress and of handles a search already returned,
/// together, in the process. Set by P11FORK_REPLAY_LIMIT (`replay_limit`); 0 keeps nothing.
/// Past the bound nothing more is kept: an object made then is lost in a child, an operation
/// whose data goes past it is not carried into one; the child's trace says which and why.
enum ReplayBudget {
    static let defaultLimit = 1 << 20
    nonisolated(unsafe) static var limit = defaultLimit
    // Guarded by Records.lock.
    nonisolated(unsafe) static var used = 0

    /// Takes `count` bytes from the budget; first gives back what ended operations still hold.
    static func reserveLocked(_ count: Int) -> Bool {
        if used + count > limit { Operations.collectEndedLocked() }
        guard used + count <= limit else { return false }
        used += count
        return true
    }

    static func releaseLocked(_ count: Int) { used -= count }

    static var isOff: Bool { limit == 0 }
}
