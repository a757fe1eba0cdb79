import Glibc
import Synchronization
import Vocabulary

/// What happens when a call finds itself in a new process.
///
/// The check on every call is one load (`ProcessMark.isFast`, which also covers tracing and a
/// module copy; `isCurrentProcess` on the slow path). The first call in a
/// child adopts the process exactly once, while the child's other threads wait: locks are made
/// afresh (a fork that skipped the atfork handlers may have copied one held), the pid is read,
/// the trace file re-opened when its name holds `%p`, kept PINs locked again, and the real
/// module replaced (Recovery) unless the call leaves it alone.
enum ForkDetection {
    /// Locks a child must re-create; registered when they are made (all at load time).
    nonisolated(unsafe) static var locks: [ForkSafeLock] = []
    /// The pid of this process as last adopted (getpid() is a system call: never per call).
    /// Set in install(): a lazily initialised global would read the child's pid in a child.
    nonisolated(unsafe) static var pid: pid_t = 0
    /// How many forks separate this process from the one that loaded p11fork.
    nonisolated(unsafe) static var generation = 0

    static func install() {
        pid = getpid()
        ProcessMark.install()
        pthread_atfork({
            // In the parent, just before a fork: have a copy of the module ready for the child
            // (loading it in the child could not give the child's threads its libc), then take
            // every p11fork lock, so that no other thread is half-way through changing a table
            // or a record when the process is copied. The tree lock is made before the first fork,
            // so that this process's children share it (TreeLock).
            TreeLock.makeBeforeFork()
            ModuleRecovery.prepareSpareBeforeFork()
            ModuleRecovery.prepareBrokerBeforeFork()
            for lock in ForkDetection.locks { lock.lock() }
        }, {
            for lock in ForkDetection.locks.reversed() { lock.unlock() }
        }, {
            // In the child: make the locks afresh, and mark; anything more is done lazily on the
            // child's first call. Not unlock: a recursive mutex records its owner's thread id, the
            // child's thread has another, so unlocking fails (EPERM) and the lock stays held; the
            // child's own next fork then waits for it forever (nginx: daemon fork, then workers).
            for lock in ForkDetection.locks { lock.reinitializeAfterFork() }
            if !ProcessMark.wipedByKernel { ProcessMark.clearInChild() }
        })
    }

    /// Registers a lock the fork handlers take and release; outer locks must be registered first.
    static func register(_ lock: ForkSafeLock) -> ForkSafeLock {
        locks.append(lock)
        return lock
    }

    /// Called from `Call.init` when the mark says this process has not been adopted yet.
    @inline(never)
    static func adoptChild(_ function: Function) {
        guard let page = ProcessMark.page else { return }
        var waited = 0
        while true {
            let mark = page.pointee.load(ordering: .acquiring)
            if mark > 0 { return }
            if mark == 0, page.pointee.compareExchange(expected: 0, desired: -1, ordering: .acquiring).exchanged {
                adopt(function, page)
                return
            }
            // Another thread adopts the process. It may be stuck in the real module's C_Initialize,
            // which p11fork cannot interrupt: after a few yields, wait asleep (up to 10 ms at a
            // time), so a hung module never makes the child's other threads burn CPU.
            waited += 1
            if waited < 64 { sched_yield() } else { usleep(UInt32(min(waited - 63, 100)) * 100) }
        }
    }

    private static func adopt(_ function: Function, _ page: UnsafeMutablePointer<Atomic<Int>>) {
        let now = getpid()
        if now != pid {
            for lock in locks { lock.reinitializeAfterFork() }
            FinalizeGate.resetInChild()
            let parent = pid
            pid = now
            generation += 1
            Trace.adoptChild()
            Trace.event(.fork, "fork detected: this is a child of pid \(parent) (fork generation \(generation)), first call \(function.name)",
                        .forkDetected(parent: parent, generation: Int(generation)))
            Recovery.enterChild()
        }
        if Recovery.moduleToRecover && !function.leavesModuleAlone { Recovery.recoverModule() }
        // While the inherited module is still in place, or a failed recovery is to be tried
        // again, later calls come back here.
        page.pointee.store(Recovery.moduleToRecover ? 0 : ProcessMark.adoptedMark, ordering: .releasing)
    }
}
