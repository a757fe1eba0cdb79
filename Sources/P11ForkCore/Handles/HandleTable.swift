import Synchronization

/// One table of virtual handles (slots, sessions or objects) over the real module's handles.
///
/// Look-ups are lock-free (a few loads), so signing threads never serialise on the table; only
/// issuing and releasing a handle take the table's lock. A virtual handle is
/// `base + index` for the first use of an index and carries a reuse generation in its upper
/// 32 bits afterwards, so a stale handle never reaches the object that later took its index.
/// Each entry holds the real handle, the epoch in which that real handle is valid (handles of
/// an earlier epoch are stale: the module was finalized, or the process forked), and one more
/// word of the owner's choosing (`aux`: a session's or object's slot, as the application knows it).
final class HandleTable: @unchecked Sendable {
    struct Entry: ~Copyable {
        /// The virtual handle currently issued for this index; 0 when free.
        let virtual: Atomic<UInt>
        let real: Atomic<UInt>
        let epoch: Atomic<UInt>
        let aux: Atomic<UInt>
        /// Flags of the owner's choosing, cleared when the handle is issued (sessions: which
        /// operations are in progress and recorded, Replay/OperationsRecording.swift).
        let state: Atomic<UInt>
    }

    let base: UInt
    /// The lock-free read side, copied into the hot path's globals (no reference counting there).
    let view: HandleView
    static let chunkBits = 10
    static let chunkSize = 1 << chunkBits
    static let chunkCount = 1 << 14
    /// 16,777,216 handles live at once, at most.
    static let capacity = chunkSize * chunkCount

    let chunks: UnsafeMutablePointer<Atomic<UnsafeMutablePointer<Entry>?>>
    let lock: ForkSafeLock
    // Guarded by `lock`.
    private var nextIndex = 1
    private var freeIndices: [Int] = []
    private var generations: [Int: UInt] = [:]
    /// Real handle (with its aux word) -> virtual, for tables whose handles are exposed repeatedly
    /// (slots and objects: the same real object must always get the same virtual handle).
    private var exposed: [RealKey: UInt] = [:]

    private struct RealKey: Hashable {
        let real: UInt
        let aux: UInt
    }

    init(base: UInt, lock: ForkSafeLock = ForkSafeLock()) {
        self.base = base
        self.lock = lock
        chunks = .allocate(capacity: Self.chunkCount)
        for i in 0..<Self.chunkCount { (chunks + i).initialize(to: Atomic(nil)) }
        view = HandleView(chunks: chunks, base: base)
    }

    deinit {
        for i in 0..<Self.chunkCount {
            if let chunk = chunks[i].load(ordering: .relaxed) {
                chunk.deinitialize(count: Self.chunkSize)
                chunk.deallocate()
            }
        }
        chunks.deinitialize(count: Self.chunkCount)
        chunks.deallocate()
    }

    @inline(__always)
    private func entry(_ virtual: UInt) -> UnsafeMutablePointer<Entry>? { view.entry(virtual) }

    func real(_ virtual: UInt, epoch: UInt) -> UInt? { view.real(virtual, epoch: epoch) }
    func lookup(_ virtual: UInt, epoch: UInt) -> (real: UInt, aux: UInt)? { view.lookup(virtual, epoch: epoch) }

    /// Issues a new virtual handle for `real`; nil when the table is full.
    func issue(real: UInt, epoch: UInt, aux: UInt = 0) -> UInt? {
        lock.withLock { issueLocked(real: real, epoch: epoch, aux: aux) }
    }

    /// The virtual handle already exposed for (`real`, `aux`) in `epoch`, or a new one.
    func expose(real: UInt, epoch: UInt, aux: UInt = 0) -> UInt? {
        lock.withLock {
            let key = RealKey(real: real, aux: aux)
            if let known = exposed[key], let entry = entry(known),
               entry.pointee.epoch.load(ordering: .relaxed) == epoch {
                return known
            }
            guard let virtual = issueLocked(real: real, epoch: epoch, aux: aux) else { return nil }
            exposed[key] = virtual
            return virtual
        }
    }

    /// The virtual handle exposed for (`real`, `aux`) in `epoch`, without issuing one.
    func exposed(real: UInt, epoch: UInt, aux: UInt) -> UInt? {
        lock.withLock {
            guard let known = exposed[RealKey(real: real, aux: aux)], let entry = entry(known),
                  entry.pointee.epoch.load(ordering: .relaxed) == epoch else { return nil }
            return known
        }
    }

    /// Points a live virtual handle at a new real handle in a new epoch (recovery in a child).
    @discardableResult
    func rebind(_ virtual: UInt, real: UInt, epoch: UInt) -> Bool {
        lock.withLock {
            guard let entry = entry(virtual) else { return false }
            let aux = entry.pointee.aux.load(ordering: .relaxed)
            let old = RealKey(real: entry.pointee.real.load(ordering: .relaxed), aux: aux)
            if exposed[old] == virtual { exposed[old] = nil }
            exposed[RealKey(real: real, aux: aux)] = virtual
            entry.pointee.real.store(real, ordering: .relaxed)
            entry.pointee.epoch.store(epoch, ordering: .releasing)
            return true
        }
    }

    private func issueLocked(real: UInt, epoch: UInt, aux: UInt) -> UInt? {
        let index: Int
        if let reused = freeIndices.popLast() {
            index = reused
        } else {
            guard nextIndex < Self.capacity else { return nil }
            index = nextIndex
            nextIndex += 1
        }
        let chunkIndex = index >> Self.chunkBits
        var chunk = chunks[chunkIndex].load(ordering: .relaxed)
        if chunk == nil {
            let fresh = UnsafeMutablePointer<Entry>.allocate(capacity: Self.chunkSize)
            for i in 0..<Self.chunkSize {
                (fresh + i).initialize(to: Entry(virtual: Atomic(0), real: Atomic(0), epoch: Atomic(0), aux: Atomic(0), state: Atomic(0)))
            }
            chunks[chunkIndex].store(fresh, ordering: .releasing)
            chunk = fresh
        }
        let entry = chunk! + (index & (Self.chunkSize - 1))
        let virtual = (generations[index, default: 0] << 32) | (base + UInt(index))
        entry.pointee.real.store(real, ordering: .relaxed)
        entry.pointee.epoch.store(epoch, ordering: .relaxed)
        entry.pointee.aux.store(aux, ordering: .relaxed)
        entry.pointee.state.store(0, ordering: .relaxed)
        entry.pointee.virtual.store(virtual, ordering: .releasing)
        return virtual
    }

    /// Gives `virtual` up; later look-ups of it fail. Returns false if it was not issued.
    @discardableResult
    func release(_ virtual: UInt) -> Bool {
        lock.withLock { releaseLocked(virtual) }
    }

    private func releaseLocked(_ virtual: UInt) -> Bool {
        guard let entry = entry(virtual) else { return false }
        let key = RealKey(real: entry.pointee.real.load(ordering: .relaxed), aux: entry.pointee.aux.load(ordering: .relaxed))
        if exposed[key] == virtual { exposed[key] = nil }
        entry.pointee.virtual.store(0, ordering: .releasing)
        entry.pointee.state.store(0, ordering: .relaxed)
        let index = Int(UInt(truncatingIfNeeded: UInt32(truncatingIfNeeded: virtual)) - base)
        generations[index, default: 0] += 1
        freeIndices.append(index)
        return true
    }

    /// Releases every live handle for which `predicate(real, aux)` holds; returns them.
    @discardableResult
    func releaseAll(where predicate: (_ real: UInt, _ aux: UInt) -> Bool) -> [UInt] {
        lock.withLock {
            var released: [UInt] = []
            for index in 1..<nextIndex {
                guard let chunk = chunks[index >> Self.chunkBits].load(ordering: .relaxed) else { continue }
                let entry = chunk + (index & (Self.chunkSize - 1))
                let virtual = entry.pointee.virtual.load(ordering: .relaxed)
                guard virtual != 0,
                      predicate(entry.pointee.real.load(ordering: .relaxed), entry.pointee.aux.load(ordering: .relaxed))
                else { continue }
                _ = releaseLocked(virtual)
                released.append(virtual)
            }
            return released
        }
    }

    /// Every live handle with its real handle and epoch.
    func entries() -> [(virtual: UInt, real: UInt, epoch: UInt)] {
        lock.withLock {
            var result: [(UInt, UInt, UInt)] = []
            for index in 1..<nextIndex {
                guard let chunk = chunks[index >> Self.chunkBits].load(ordering: .relaxed) else { continue }
                let entry = chunk + (index & (Self.chunkSize - 1))
                let virtual = entry.pointee.virtual.load(ordering: .relaxed)
                if virtual != 0 {
                    result.append((virtual, entry.pointee.real.load(ordering: .relaxed), entry.pointee.epoch.load(ordering: .relaxed)))
                }
            }
            return result
        }
    }

    /// The number of live handles (for tests and memory figures).
    var liveCount: Int {
        lock.withLock { nextIndex - 1 - freeIndices.count }
    }
}

/// The read side of a `HandleTable`: plain pointers, so looking a handle up costs no reference
/// counting and no lock. A default view (no table yet) finds nothing.
struct HandleView: @unchecked Sendable {
    let chunks: UnsafeMutablePointer<Atomic<UnsafeMutablePointer<HandleTable.Entry>?>>
    let base: UInt

    /// Finds nothing: every handle's index falls outside the table (so `chunks`, which points
    /// nowhere, is never read) — one bounds check serves both cases on the hot path.
    init() {
        chunks = UnsafeMutablePointer(bitPattern: 0x10)!
        base = 0x8000_0000_0000_0000
    }

    init(chunks: UnsafeMutablePointer<Atomic<UnsafeMutablePointer<HandleTable.Entry>?>>, base: UInt) {
        self.chunks = chunks
        self.base = base
    }

    @inline(__always)
    func entry(_ virtual: UInt) -> UnsafeMutablePointer<HandleTable.Entry>? {
        let index = UInt(truncatingIfNeeded: UInt32(truncatingIfNeeded: virtual)) &- base
        guard index < UInt(HandleTable.capacity),
              let chunk = chunks[Int(index) >> HandleTable.chunkBits].load(ordering: .acquiring) else { return nil }
        let entry = chunk + (Int(index) & (HandleTable.chunkSize - 1))
        guard entry.pointee.virtual.load(ordering: .acquiring) == virtual else { return nil }
        return entry
    }

    /// The real handle behind `virtual` if it was issued in `epoch`, else nil.
    @inline(__always)
    func real(_ virtual: UInt, epoch: UInt) -> UInt? {
        guard let entry = entry(virtual), entry.pointee.epoch.load(ordering: .relaxed) == epoch else { return nil }
        return entry.pointee.real.load(ordering: .relaxed)
    }

    /// The real handle and the aux word behind `virtual` if it was issued in `epoch`.
    @inline(__always)
    func lookup(_ virtual: UInt, epoch: UInt) -> (real: UInt, aux: UInt)? {
        guard let entry = entry(virtual), entry.pointee.epoch.load(ordering: .relaxed) == epoch else { return nil }
        return (entry.pointee.real.load(ordering: .relaxed), entry.pointee.aux.load(ordering: .relaxed))
    }

    /// Whatever `virtual` is bound to, in any epoch (recovery decides what a stale one means).
    func lookupAnyEpoch(_ virtual: UInt) -> (real: UInt, epoch: UInt, aux: UInt)? {
        guard let entry = entry(virtual) else { return nil }
        return (entry.pointee.real.load(ordering: .relaxed), entry.pointee.epoch.load(ordering: .acquiring),
                entry.pointee.aux.load(ordering: .relaxed))
    }
}
