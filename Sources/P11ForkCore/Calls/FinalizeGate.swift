import Glibc
import Synchronization

/// Makes `C_Finalize` and `C_Initialize` wait for the calls other threads are making, and holds
/// new ones until they are done: PKCS#11 2.40 section 5.4 leaves a finalization racing other calls
/// unspecified, and a real module frees what those calls are using (measured: SoftHSM crashes).
/// With the gate, a call that started before `C_Finalize` ends first; one that starts during it
/// waits. While the application has not initialised the library (before its first
/// `C_Initialize`, after a `C_Finalize`), calls answer `CKR_CRYPTOKI_NOT_INITIALIZED` without
/// reaching the module — what the module must answer then, and SoftHSM, called so from several
/// threads at once, crashes (it makes its state again on such a call, unguarded).
///
/// Each call counts itself in one of 64 counters on cache lines of their own, picked by its
/// thread, so that signing threads do not contend on one line: one atomic add on entry, one
/// subtract on return. `C_WaitForSlotEvent` is not counted (the finalization is what ends it,
/// section 5.4), nor `C_Initialize` and `C_Finalize` themselves.
enum FinalizeGate {
    /// Words per cache line: counters are one line apart.
    private static let stride = 8
    private static let counters = 64
    /// Word 0: the state below; counter i at word (i + 1) * stride.
    nonisolated(unsafe) private static var words: UnsafeMutablePointer<Atomic<Int>>?
    /// Calls go to the module.
    private static let open = 0
    /// A C_Initialize or C_Finalize runs: calls wait.
    private static let closed = 1
    /// The application has not initialised the library: calls are refused.
    private static let uninitialized = 2

    /// Once at load; again only in the unit tests, which start from a fresh gate in the same words.
    static func install() {
        let count = (counters + 1) * stride
        if let words {
            for i in 0..<count { (words + i).pointee.store(0, ordering: .relaxed) }
            words.pointee.store(uninitialized, ordering: .relaxed)
            return
        }
        let raw = UnsafeMutableRawPointer.allocate(byteCount: count * MemoryLayout<Atomic<Int>>.stride, alignment: 64)
        let pointer = raw.bindMemory(to: Atomic<Int>.self, capacity: count)
        for i in 0..<count { (pointer + i).initialize(to: Atomic(0)) }
        pointer.pointee.store(uninitialized, ordering: .relaxed)
        words = pointer
    }

    /// Counts a call in; waits while a C_Initialize or C_Finalize runs. Returns what `leave`
    /// needs, and whether the call may go on (false: the library is not initialised, and the call
    /// is not counted).
    @inline(__always)
    static func enter() -> (counter: UnsafeMutablePointer<Atomic<Int>>, admitted: Bool) {
        let words = words.unsafelyUnwrapped
        // Threads' control blocks are a stack apart: mix the address's bits to spread them.
        let mixed = UInt(pthread_self()) &* 0x9E37_79B9_7F4A_7C15
        let counter = words + (Int(mixed >> 58) + 1) * stride
        counter.pointee.wrappingAdd(1, ordering: .sequentiallyConsistent)
        // Sequentially consistent on both sides: either this call sees the finalization, or the
        // finalization sees this call's count.
        if _slowPath(words.pointee.load(ordering: .sequentiallyConsistent) != open) {
            return (counter, admittedAfterWaiting(counter))
        }
        return (counter, true)
    }

    @inline(__always)
    static func leave(_ counter: UnsafeMutablePointer<Atomic<Int>>) {
        counter.pointee.wrappingSubtract(1, ordering: .releasing)
    }

    /// The gate was not open: waits while it is closed; refuses (uncounted) when the library is
    /// not initialised.
    @inline(never)
    private static func admittedAfterWaiting(_ counter: UnsafeMutablePointer<Atomic<Int>>) -> Bool {
        let words = words.unsafelyUnwrapped
        while true {
            let state = words.pointee.load(ordering: .sequentiallyConsistent)
            if state == open { return true }
            counter.pointee.wrappingSubtract(1, ordering: .releasing)
            if state == uninitialized { return false }
            while words.pointee.load(ordering: .acquiring) == closed { pause() }
            counter.pointee.wrappingAdd(1, ordering: .sequentiallyConsistent)
        }
    }

    /// Runs `body` (a C_Initialize or C_Finalize) once no other call is in flight, holding new
    /// calls until it returns; then opens the gate if the application has the library
    /// initialised, else leaves it refusing. One at a time; the caller's own call is not counted.
    static func whileClosed<T>(_ body: () -> T) -> T {
        let words = words.unsafelyUnwrapped
        while true {
            let state = words.pointee.load(ordering: .sequentiallyConsistent)
            if state != closed,
               words.pointee.compareExchange(expected: state, desired: closed, ordering: .sequentiallyConsistent).exchanged { break }
            pause()
        }
        defer { words.pointee.store(Core.appInitialized && !moduleGone ? open : uninitialized, ordering: .releasing) }
        for i in 1...counters {
            while words[i * stride].load(ordering: .sequentiallyConsistent) != 0 { pause() }
        }
        return body()
    }

    /// In a new child, before any of its calls: the calls and a finalization in flight at the
    /// fork were other threads', which the child does not have; the library is initialised in
    /// the child as it was in the parent.
    static func resetInChild() {
        guard let words else { return }
        for i in 1..<(counters + 1) * stride { words[i].store(0, ordering: .relaxed) }
        words.pointee.store(Core.appInitialized && !moduleGone ? open : uninitialized, ordering: .relaxed)
    }

    /// True once the process is exiting and the real module's own exit handlers have run.
    nonisolated(unsafe) private(set) static var moduleGone = false

    /// Called just before the real module is loaded. Exit handlers run in the reverse order of
    /// their registration, so this one runs right after everything the module registered when it
    /// was loaded or initialised (C++ static destructors: SoftHSM's) and before the handlers
    /// registered earlier, such as OpenSSL's cleanup, whose pkcs11-provider then closes sessions
    /// and finalizes (measured: SoftHSM crashes in C_CloseSession then). From that point every
    /// call answers CKR_CRYPTOKI_NOT_INITIALIZED without reaching the module: the gate's word
    /// says "not initialised", so the calls pay nothing for it. An atexit handler of a shared
    /// library also runs when the library is unloaded, which it then is.
    static func closeAtExit() {
        guard !exitHandlerRegistered else { return }
        exitHandlerRegistered = true
        atexit {
            let wasInitialized = Core.appInitialized
            FinalizeGate.moduleGone = true
            FinalizeGate.words?.pointee.store(FinalizeGate.uninitialized, ordering: .sequentiallyConsistent)
            if wasInitialized {
                Trace.event(.fork, "process exiting: the real module's exit handlers have run; calls from now on answer CKR_CRYPTOKI_NOT_INITIALIZED without reaching it")
            }
        }
    }
    nonisolated(unsafe) private static var exitHandlerRegistered = false

    /// Waiting costs the waiting thread nothing else: a call in flight may take milliseconds.
    private static func pause() {
        var pause = timespec(tv_sec: 0, tv_nsec: 50_000)
        nanosleep(&pause, nil)
    }
}
