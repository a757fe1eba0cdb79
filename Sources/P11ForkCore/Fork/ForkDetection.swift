import Glibc
import Synchronization

/// What happens when a call finds itself in a new process.
///
/// The check on every call is one load (`ProcessMark.isCurrentProcess`). The first call in a
/// child adopts the process exactly once, while other threads of the child wait: locks are
/// made afresh, the pid is read, the trace file re-opened when its name holds `%p`.
enum ForkDetection {
    /// Locks a child must re-create; registered when they are made (all at load time).
    nonisolated(unsafe) static var locks: [ForkSafeLock] = []
    /// The pid of this process as last adopted (getpid() is a system call: never per call).
    nonisolated(unsafe) static var pid: pid_t = getpid()
    /// How many times this lineage of processes has forked (0 in the process that loaded us).
    nonisolated(unsafe) static var generation = 0

    static func install() {
        ProcessMark.install()
        pthread_atfork(nil, nil, {
            // Only marks; anything more is done lazily on the child's first call.
            if !ProcessMark.wipedByKernel { ProcessMark.clearInChild() }
        })
    }

    static func register(_ lock: ForkSafeLock) -> ForkSafeLock {
        locks.append(lock)
        return lock
    }

    /// Called from `Call.init` when the mark says this is a new process.
    @inline(never)
    static func adoptChild() {
        guard let page = ProcessMark.page else { return }
        // One thread adopts; the others of the child wait for it to finish.
        if page.pointee.compareExchange(expected: 0, desired: -1, ordering: .acquiring).exchanged {
            let parent = pid
            for lock in locks { lock.reinitializeAfterFork() }
            pid = getpid()
            generation += 1
            Trace.adoptChild()
            Trace.event(.fork, "fork detected: this is a child of pid \(parent) (fork generation \(generation))")
            page.pointee.store(Int(pid), ordering: .releasing)
            return
        }
        while page.pointee.load(ordering: .acquiring) <= 0 { sched_yield() }
    }
}
