import Glibc

/// A mutex that a forked child can always take.
///
/// Swift's `Synchronization.Mutex` held by another thread at the moment of fork traps in the
/// child on its next acquire (measured: SWIFT-MODULE-NOTES.md). This lock keeps its
/// `pthread_mutex_t` behind a pointer so the child's fork handling can initialise it afresh:
/// in the child only the forking thread exists, so no one can legitimately hold it.
/// Never held across a call into the real module.
final class ForkSafeLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inline(__always)
    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Only in a freshly forked child, before any other thread of the child can use the lock.
    func reinitializeAfterFork() {
        pthread_mutex_init(mutex, nil)
    }
}
