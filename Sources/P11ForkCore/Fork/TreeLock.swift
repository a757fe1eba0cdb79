import CPKCS11
import Glibc

/// What a real module cannot do in two processes at once, done by one process of the tree at a
/// time: a child's initialisation of its module and its login replay (docs/DESIGN.md "Threads and
/// locks"). SoftHSM's file store, read by one child while another child's login or initialisation
/// rewrites it, showed a child a token without a user PIN (CKR_USER_PIN_NOT_INITIALIZED), with and
/// without p11fork.
///
/// The lock is a robust, process-shared mutex in a shared anonymous page (Sources/CPKCS11/shim.c),
/// made by the fork handler before a process's first fork, so every descendant shares it and a
/// process that never forks has none and pays nothing. A holder that ends without releasing it
/// hands it on (EOWNERDEAD); a wait longer than `bound` is traced and recovery goes on without it.
/// Taken with Recovery's lock held and never the other way round; nothing else is taken under it.
enum TreeLock {
    /// How long a process waits for another one's recovery step, in milliseconds.
    static let bound = 30_000

    /// Called by the fork handler in the parent, before every fork (after the first, nothing to do).
    static func makeBeforeFork() {
        _ = CPKCS11_tree_lock_make()
    }

    /// The process this one waited for until the bound: while it holds the lock (hung in its
    /// module), this process's later steps go on without waiting for it again.
    nonisolated(unsafe) static var givenUpOn: pid_t = 0

    /// Runs `body` with the lock held (or, past the bound, without it); `step` names it for the trace.
    static func withLock<T>(_ step: String, _ body: () -> T) -> T {
        var holder: Int32 = 0
        let started = Clock.monotonicNanoseconds()
        let taken = CPKCS11_tree_lock_take(bound, givenUpOn, &holder)
        switch taken {
        case 0, -1, EDEADLK:
            // Free; no lock in this process tree (a fork that skipped the atfork handlers); or
            // this thread holds it already.
            break
        case 1:
            Trace.event(.fork, "\(step): waited for pid \(holder) to finish its own (\(Format.milliseconds(since: started)))")
        case 2:
            Trace.event(.fork, "\(step): pid \(holder) ended while it held the tree lock; taken over (\(Format.milliseconds(since: started)))")
        case ETIMEDOUT where givenUpOn != 0 && holder == givenUpOn:
            Trace.event(.error, "\(step): pid \(holder) still holds the tree lock (not waited for again); going on without it")
        case ETIMEDOUT:
            givenUpOn = holder
            Trace.event(.error, "\(step): pid \(holder) still holds the tree lock after \(bound / 1000) s; going on without it (\(Format.milliseconds(since: started)))")
        default:
            Trace.event(.error, "\(step): the tree lock could not be taken (\(String(cString: strerror(taken)))); going on without it")
        }
        defer { if (0...2).contains(taken) { CPKCS11_tree_lock_give() } }
        return body()
    }
}

/// When a failed recovery step that may pass (the module's initialisation, a login replay the
/// module answered without judging the PIN) is tried again: not before 50 ms after the first
/// failure, then twice as long after each further one, at most 3.2 s. Calls before then answer
/// the failure without reaching the module.
struct RetrySchedule: Equatable {
    /// Failures so far.
    private(set) var failures = 0
    /// Monotonic time of the next try.
    private(set) var due: UInt64 = 0

    static let firstDelay: UInt64 = 50_000_000
    static let longestDelay: UInt64 = 3_200_000_000

    var isDue: Bool { Clock.monotonicNanoseconds() >= due }

    /// Counts a failure; returns the delay before the next try, for the trace.
    mutating func failed() -> String {
        failures += 1
        let delay = min(Self.firstDelay << UInt64(min(failures - 1, 16)), Self.longestDelay)
        due = Clock.monotonicNanoseconds() &+ delay
        return "\(delay / 1_000_000) ms"
    }

    /// "try N", the try about to be made.
    var nextTry: String { "try \(failures + 1)" }
}
