import CPKCS11
import Glibc
import Synchronization

/// Tells, with one load, whether this is still the process that set the mark.
///
/// The mark lives in a page marked `MADV_WIPEONFORK`: the kernel hands every child a zeroed copy,
/// so a child sees 0 on its first call even when it was forked without running `pthread_atfork`
/// handlers. Where the kernel refuses the advice (very old kernels, some sandboxes), an atfork
/// child handler zeroes the page instead, which covers every fork made through libc.
/// (DESIGN.md "Fork detection": `getpid()` costs ~180 ns here, far too much for every call.)
enum ProcessMark {
    /// The pid of the process that owns the mark, or 0 in a child that has not yet adopted it.
    nonisolated(unsafe) static var page: UnsafeMutablePointer<Atomic<Int>>?
    /// True when the kernel accepted MADV_WIPEONFORK.
    nonisolated(unsafe) static var wipedByKernel = false

    static func install() {
        let size = Int(sysconf(Int32(_SC_PAGESIZE)))
        let raw = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let raw, raw != MAP_FAILED else {
            // No page: a plain mark that the atfork child handler clears (page is never nil
            // once installed, and every entry point but the three exports runs after install).
            let mark = UnsafeMutablePointer<Atomic<Int>>.allocate(capacity: 1)
            mark.initialize(to: Atomic(Int(getpid())))
            page = mark
            return
        }
        wipedByKernel = madvise(raw, size, CPKCS11_madv_wipeonfork()) == 0
        let mark = raw.bindMemory(to: Atomic<Int>.self, capacity: 1)
        mark.initialize(to: Atomic(Int(getpid())))
        page = mark
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
