import Glibc
import Synchronization

/// Makes `C_Finalize` wait for the calls other threads are making, and holds new ones until it
/// is done: PKCS#11 2.40 section 5.4 leaves a finalization racing other calls unspecified, and a
/// real module frees what those calls are using (measured: SoftHSM crashes). With the gate, a
/// call that started before `C_Finalize` ends first; one that starts during it waits and then
/// gets what the module answers after a finalization (`CKR_CRYPTOKI_NOT_INITIALIZED`).
///
/// Each call counts itself in one of 64 counters on cache lines of their own, picked by its
/// thread, so that signing threads do not contend on one line: one atomic add on entry, one
/// subtract on return. `C_WaitForSlotEvent` is not counted (the finalization is what ends it,
/// section 5.4), nor `C_Initialize` and `C_Finalize` themselves.
enum FinalizeGate {
    /// Words per cache line: counters are one line apart.
    private static let stride = 8
    private static let counters = 64
    /// Word 0: 1 while a C_Finalize runs; counter i at word (i + 1) * stride.
    nonisolated(unsafe) private static var words: UnsafeMutablePointer<Atomic<Int>>?

    static func install() {
        let count = (counters + 1) * stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: count * MemoryLayout<Atomic<Int>>.stride, alignment: 64)
        let pointer = raw.bindMemory(to: Atomic<Int>.self, capacity: count)
        for i in 0..<count { (pointer + i).initialize(to: Atomic(0)) }
        words = pointer
    }

    /// Counts a call in; waits while a C_Finalize runs. Returns what `leave` needs.
    @inline(__always)
    static func enter() -> UnsafeMutablePointer<Atomic<Int>> {
        let words = words.unsafelyUnwrapped
        // Threads' control blocks are a stack apart: mix the address's bits to spread them.
        let mixed = UInt(pthread_self()) &* 0x9E37_79B9_7F4A_7C15
        let counter = words + (Int(mixed >> 58) + 1) * stride
        counter.pointee.wrappingAdd(1, ordering: .sequentiallyConsistent)
        // Sequentially consistent on both sides: either this call sees the finalization, or the
        // finalization sees this call's count.
        if _slowPath(words.pointee.load(ordering: .sequentiallyConsistent) != 0) { waitForFinalize(counter) }
        return counter
    }

    @inline(__always)
    static func leave(_ counter: UnsafeMutablePointer<Atomic<Int>>) {
        counter.pointee.wrappingSubtract(1, ordering: .releasing)
    }

    @inline(never)
    private static func waitForFinalize(_ counter: UnsafeMutablePointer<Atomic<Int>>) {
        let words = words.unsafelyUnwrapped
        repeat {
            counter.pointee.wrappingSubtract(1, ordering: .releasing)
            while words.pointee.load(ordering: .acquiring) != 0 { pause() }
            counter.pointee.wrappingAdd(1, ordering: .sequentiallyConsistent)
        } while words.pointee.load(ordering: .sequentiallyConsistent) != 0
    }

    /// Runs `finalize` once no other call is in flight, holding new calls until it returns.
    /// One C_Finalize at a time; the caller's own call is not counted.
    static func whileClosed<T>(_ finalize: () -> T) -> T {
        let words = words.unsafelyUnwrapped
        while !words.pointee.compareExchange(expected: 0, desired: 1, ordering: .sequentiallyConsistent).exchanged { pause() }
        defer { words.pointee.store(0, ordering: .releasing) }
        for i in 1...counters {
            while words[i * stride].load(ordering: .sequentiallyConsistent) != 0 { pause() }
        }
        return finalize()
    }

    /// In a new child, before any of its calls: the calls and a finalization in flight at the
    /// fork were other threads', which the child does not have.
    static func resetInChild() {
        guard let words else { return }
        for i in 0..<(counters + 1) * stride { words[i].store(0, ordering: .relaxed) }
    }

    /// Waiting costs the waiting thread nothing else: a call in flight may take milliseconds.
    private static func pause() {
        var pause = timespec(tv_sec: 0, tv_nsec: 50_000)
        nanosleep(&pause, nil)
    }
}
