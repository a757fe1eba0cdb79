import CPKCS11
import Glibc
import Synchronization

/// Tells, with one load, whether this is still the process that set the mark — and whether the
/// call may take the fast path at all (no trace line to time, no module copy whose libc a thread
/// must be set up for), so that every entry point checks one word.
///
/// The mark lives in a page marked `MADV_WIPEONFORK`: the kernel hands every child a zeroed copy,
/// so a child sees 0 on its first call even when it was forked without running `pthread_atfork`
/// handlers. Where the kernel refuses the advice (very old kernels, some sandboxes), an atfork
/// child handler zeroes the page instead, which covers every fork made through libc.
/// (docs/DESIGN.md "Fork detection": `getpid()` costs ~180 ns here, far too much for every call.)
enum ProcessMark {
    /// `fast` or `adopted` in the process that owns the mark; 0 in a child that has not adopted
    /// it yet, -1 while one of its threads does.
    nonisolated(unsafe) static var page: UnsafeMutablePointer<Atomic<Int>>?
    /// This process is adopted, and calls need no tracing clock and no module-copy check.
    static let fast = 1
    /// This process is adopted; calls check the trace level and the module copy.
    static let adopted = 2

    /// The mark of an adopted process, as things stand (trace level, module copy in use).
    static var adoptedMark: Int {
        Trace.level < .calls && CPKCS11_copy_in_use() == 0 && !Broker.servesThisProcess ? fast : adopted
    }

    /// After something the mark depends on changed (tracing configured, a copy in use).
    static func refresh() {
        guard let page, page.pointee.load(ordering: .relaxed) > 0 else { return }
        page.pointee.store(adoptedMark, ordering: .releasing)
    }
    /// True when the kernel accepted MADV_WIPEONFORK.
    nonisolated(unsafe) static var wipedByKernel = false

    static func install() {
        let size = Int(sysconf(Int32(_SC_PAGESIZE)))
        let raw = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let raw, raw != MAP_FAILED else {
            // No page: a plain mark that the atfork child handler clears (page is never nil
            // once installed, and every entry point but the three exports runs after install).
            let mark = UnsafeMutablePointer<Atomic<Int>>.allocate(capacity: 1)
            mark.initialize(to: Atomic(adopted))
            page = mark
            return
        }
        wipedByKernel = madvise(raw, size, CPKCS11_madv_wipeonfork()) == 0
        let mark = raw.bindMemory(to: Atomic<Int>.self, capacity: 1)
        mark.initialize(to: Atomic(adopted))
        page = mark
    }

    /// The per-call check: true when nothing but the call itself is to be done.
    @inline(__always)
    static var isFast: Bool {
        // Set by install(), which runs before any function list is handed out.
        page.unsafelyUnwrapped.pointee.load(ordering: .acquiring) == fast
    }

    /// The per-call check: true once this process has been adopted. 0 means a new child, -1 a
    /// child being adopted by another of its threads: both must wait in ForkDetection.
    @inline(__always)
    static var isCurrentProcess: Bool {
        // Set by install(), which runs before any function list is handed out.
        page.unsafelyUnwrapped.pointee.load(ordering: .acquiring) > 0
    }

    /// Called by the atfork child handler when the kernel does not wipe the page.
    static func clearInChild() {
        page?.pointee.store(0, ordering: .relaxed)
    }
}
