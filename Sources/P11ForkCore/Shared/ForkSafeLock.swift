import Glibc

/// A mutex that a forked child can always take.
///
/// Swift's `Synchronization.Mutex` held by another thread at the moment of fork traps in the
/// child on its next acquire (measured: docs/DESIGN.md "Threads and locks"). The fork handlers take every
/// such lock before a fork, release it after in the parent and make it afresh in the child, so
/// that what a lock guards is never copied half-changed; and the lock keeps its
/// `pthread_mutex_t` behind a pointer so that a child made without the handlers can initialise
/// it afresh too.
/// Never held across a call into the real module, except by recovery in a child.
final class ForkSafeLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    /// A recursive lock may be taken again by the thread holding it (recovery, which resolves
    /// one handle while resolving another).
    private let recursive: Bool

    init(recursive: Bool = false) {
        mutex = .allocate(capacity: 1)
        self.recursive = recursive
        initialize()
    }

    private func initialize() {
        guard recursive else {
            pthread_mutex_init(mutex, nil)
            return
        }
        var attributes = pthread_mutexattr_t()
        pthread_mutexattr_init(&attributes)
        pthread_mutexattr_settype(&attributes, Int32(PTHREAD_MUTEX_RECURSIVE))
        pthread_mutex_init(mutex, &attributes)
        pthread_mutexattr_destroy(&attributes)
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

    /// For the fork handlers only (taken before a fork, released after it in the parent).
    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }

    /// Only in a freshly forked child, before any other thread of the child can use the lock.
    func reinitializeAfterFork() {
        initialize()
    }
}
