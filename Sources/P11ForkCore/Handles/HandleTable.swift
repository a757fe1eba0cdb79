import Synchronization

/// One table of session or object handles: the value the application holds (the exposed value)
/// to the real module's handle (docs/FORK.md "Handle values").
///
/// In a process that is not a forked child, a handle is exposed as its real value, so the table
/// only remembers what a child needs (the slot, the session's operation flags) and the calls
/// never translate. In a child (`remapsCollisions`), a handle the child's module issues keeps its
/// real value too, unless a live entry holds that value (an inherited handle): then it gets a
/// value from the reserved range, values with the top bit set, not held by any live entry.
///
/// Look-ups are lock-free: open addressing with linear probing over an index of atomic words,
/// each naming an entry; an entry has a stable address and carries its exposed value, so a
/// look-up that meets a slot being changed compares that value and never finds a wrong entry.
/// Inserting and removing take the table's lock; a removal shifts the entries after it back
/// (no tombstones, so the index never fills with them), which may make a concurrent look-up
/// miss: a miss is confirmed under the lock before it is believed. Each entry holds the real
/// handle, the epoch in which that real handle is valid (handles of an earlier epoch are stale:
/// the module was finalized, or the process forked), and one word of the owner's choosing (`aux`:
/// a session's or object's slot, as the application knows it).
final class HandleTable: @unchecked Sendable {
    struct Entry: ~Copyable {
        /// The value the application holds for this entry; 0 when the entry is free.
        let exposed: Atomic<UInt>
        let real: Atomic<UInt>
        let epoch: Atomic<UInt>
        let aux: Atomic<UInt>
        /// Flags of the owner's choosing, cleared when the handle is issued (sessions: which
        /// operations are in progress and recorded, Replay/OperationsRecording.swift).
        let state: Atomic<UInt>
    }

    /// The reserved range: values with the top bit set. Modules count their handles up from a
    /// small number or use addresses (below 2^47 in user space), so they reach it in practice
    /// never; a module value in it is still handled (it is remapped like any other collision).
    static let reservedBit: UInt = 1 << (UInt.bitWidth - 1)

    /// The lock-free read side, copied into the hot path's globals (no reference counting there).
    var view: HandleView { HandleView(chunks: chunks, current: current, table: Unmanaged.passUnretained(self)) }
    static let chunkBits = 10
    static let chunkSize = 1 << chunkBits
    static let chunkCount = 1 << 14
    /// 16,777,215 handles live at once, at most (entry number 0 is never used).
    static let capacity = chunkSize * chunkCount - 1

    let chunks: UnsafeMutablePointer<Atomic<UnsafeMutablePointer<Entry>?>>
    /// The index the readers probe; replaced (never changed in place) when it grows.
    let current: UnsafeMutablePointer<Atomic<UnsafeMutablePointer<Atomic<UInt>>>>
    let lock: ForkSafeLock
    /// Set in a forked child (Recovery.enterChild, with the child's other threads waiting): new
    /// handles that collide with a live entry are then given a reserved value.
    var remapsCollisions = false
    // Guarded by `lock`.
    private var nextEntry = 1
    private var freeEntries: [Int] = []
    private var live = 0
    private var nextReserved: UInt = 1
    /// Indexes replaced by a larger one: a reader may still be probing one, so they are kept
    /// (together at most the size of the current one) until the table goes.
    private var retired: [UnsafeMutablePointer<Atomic<UInt>>] = []
    /// Real handle (with its aux word) -> exposed value, for tables whose handles are exposed
    /// repeatedly (objects: the same real object must always get the same value).
    private var byReal: [RealKey: UInt] = [:]

    private struct RealKey: Hashable {
        let real: UInt
        let aux: UInt
    }

    init(lock: ForkSafeLock = ForkSafeLock()) {
        self.lock = lock
        chunks = .allocate(capacity: Self.chunkCount)
        for i in 0..<Self.chunkCount { (chunks + i).initialize(to: Atomic(nil)) }
        current = .allocate(capacity: 1)
        current.initialize(to: Atomic(HandleIndex.make(bits: 6)))
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
        for index in retired + [current.pointee.load(ordering: .relaxed)] { HandleIndex.free(index) }
        current.deinitialize(count: 1)
        current.deallocate()
    }

    func real(_ exposed: UInt, epoch: UInt) -> UInt? { view.real(exposed, epoch: epoch) }
    func lookup(_ exposed: UInt, epoch: UInt) -> (real: UInt, aux: UInt)? { view.lookup(exposed, epoch: epoch) }

    /// Issues a handle for `real` (its own value, unless that collides in a child); nil when the
    /// table is full.
    func issue(real: UInt, epoch: UInt, aux: UInt = 0) -> UInt? {
        lock.withLock { issueLocked(real: real, epoch: epoch, aux: aux) }
    }

    /// The value already exposed for (`real`, `aux`) in `epoch`, or a new one.
    func expose(real: UInt, epoch: UInt, aux: UInt = 0) -> UInt? {
        lock.withLock {
            if let known = exposedLocked(real: real, epoch: epoch, aux: aux) { return known }
            guard let exposed = issueLocked(real: real, epoch: epoch, aux: aux) else { return nil }
            byReal[RealKey(real: real, aux: aux)] = exposed
            return exposed
        }
    }

    /// The value exposed for (`real`, `aux`) in `epoch`, without issuing one.
    func exposed(real: UInt, epoch: UInt, aux: UInt) -> UInt? {
        lock.withLock { exposedLocked(real: real, epoch: epoch, aux: aux) }
    }

    private func exposedLocked(real: UInt, epoch: UInt, aux: UInt) -> UInt? {
        guard let known = byReal[RealKey(real: real, aux: aux)], let entry = findLocked(known),
              entry.pointee.epoch.load(ordering: .relaxed) == epoch,
              entry.pointee.real.load(ordering: .relaxed) == real else { return nil }
        return known
    }

    /// Points a live handle at a new real handle in a new epoch (recovery in a child).
    @discardableResult
    func rebind(_ exposed: UInt, real: UInt, epoch: UInt) -> Bool {
        lock.withLock {
            guard let entry = findLocked(exposed) else { return false }
            let aux = entry.pointee.aux.load(ordering: .relaxed)
            let old = RealKey(real: entry.pointee.real.load(ordering: .relaxed), aux: aux)
            if byReal[old] == exposed { byReal[old] = nil }
            byReal[RealKey(real: real, aux: aux)] = exposed
            entry.pointee.real.store(real, ordering: .relaxed)
            entry.pointee.epoch.store(epoch, ordering: .releasing)
            return true
        }
    }

    private func issueLocked(real: UInt, epoch: UInt, aux: UInt) -> UInt? {
        var exposed = real
        if real == 0 || findLocked(real) != nil {
            guard remapsCollisions || real == 0 else {
                // Not a forked child: the module issued a value the table still holds (a handle
                // it ended behind p11fork's back); the module's word is the truth, the entry is
                // taken over.
                let entry = findLocked(real)!
                fill(entry, exposed: real, real: real, epoch: epoch, aux: aux)
                return real
            }
            exposed = reservedValueLocked()
        }
        guard let number = newEntryLocked() else { return nil }
        let entry = entryPointer(number)
        fill(entry, exposed: exposed, real: real, epoch: epoch, aux: aux)
        insertLocked(number, exposed)
        return exposed
    }

    /// A value of the reserved range that no live entry holds.
    private func reservedValueLocked() -> UInt {
        while true {
            let candidate = Self.reservedBit | nextReserved
            nextReserved = (nextReserved &+ 1) & ~Self.reservedBit
            if nextReserved == 0 { nextReserved = 1 }
            if findLocked(candidate) == nil { return candidate }
        }
    }

    private func fill(_ entry: UnsafeMutablePointer<Entry>, exposed: UInt, real: UInt, epoch: UInt, aux: UInt) {
        entry.pointee.real.store(real, ordering: .relaxed)
        entry.pointee.epoch.store(epoch, ordering: .relaxed)
        entry.pointee.aux.store(aux, ordering: .relaxed)
        entry.pointee.state.store(0, ordering: .relaxed)
        entry.pointee.exposed.store(exposed, ordering: .releasing)
    }

    private func newEntryLocked() -> Int? {
        if let reused = freeEntries.popLast() { return reused }
        guard nextEntry <= Self.capacity else { return nil }
        let number = nextEntry
        nextEntry += 1
        let chunkIndex = number >> Self.chunkBits
        if chunks[chunkIndex].load(ordering: .relaxed) == nil {
            let fresh = UnsafeMutablePointer<Entry>.allocate(capacity: Self.chunkSize)
            for i in 0..<Self.chunkSize {
                (fresh + i).initialize(to: Entry(exposed: Atomic(0), real: Atomic(0), epoch: Atomic(0), aux: Atomic(0), state: Atomic(0)))
            }
            chunks[chunkIndex].store(fresh, ordering: .releasing)
        }
        return number
    }

    private func entryPointer(_ number: Int) -> UnsafeMutablePointer<Entry> {
        chunks[number >> Self.chunkBits].load(ordering: .relaxed)! + (number & (Self.chunkSize - 1))
    }

    /// The index slot that names the live entry exposed as `exposed`.
    private func slotLocked(_ exposed: UInt) -> Int? {
        let index = current.pointee.load(ordering: .relaxed)
        let mask = HandleIndex.mask(index)
        var i = HandleIndex.home(exposed, index)
        while true {
            let number = HandleIndex.slot(index, i).pointee.load(ordering: .relaxed)
            if number == 0 { return nil }
            if entryPointer(Int(number)).pointee.exposed.load(ordering: .relaxed) == exposed { return i }
            i = (i + 1) & mask
        }
    }

    private func findLocked(_ exposed: UInt) -> UnsafeMutablePointer<Entry>? {
        guard exposed != 0, let i = slotLocked(exposed) else { return nil }
        let index = current.pointee.load(ordering: .relaxed)
        return entryPointer(Int(HandleIndex.slot(index, i).pointee.load(ordering: .relaxed)))
    }

    /// What a reader's miss is checked against (HandleView.entry).
    fileprivate func confirmedEntry(_ exposed: UInt) -> UnsafeMutablePointer<Entry>? {
        lock.withLock { findLocked(exposed) }
    }

    private func insertLocked(_ number: Int, _ exposed: UInt) {
        var index = current.pointee.load(ordering: .relaxed)
        // At most half full, so a probe always ends at an empty slot.
        if (live + 1) * 2 > HandleIndex.mask(index) + 1 {
            let grown = HandleIndex.make(bits: HandleIndex.bits(index) + 1)
            for i in 0...HandleIndex.mask(index) {
                let moved = HandleIndex.slot(index, i).pointee.load(ordering: .relaxed)
                if moved != 0 { place(moved, entryPointer(Int(moved)).pointee.exposed.load(ordering: .relaxed), in: grown) }
            }
            retired.append(index)
            current.pointee.store(grown, ordering: .releasing)
            index = grown
        }
        place(UInt(number), exposed, in: index)
        live += 1
    }

    private func place(_ number: UInt, _ exposed: UInt, in index: UnsafeMutablePointer<Atomic<UInt>>) {
        let mask = HandleIndex.mask(index)
        var i = HandleIndex.home(exposed, index)
        while HandleIndex.slot(index, i).pointee.load(ordering: .relaxed) != 0 { i = (i + 1) & mask }
        HandleIndex.slot(index, i).pointee.store(number, ordering: .releasing)
    }

    /// Empties slot `i` and shifts the entries after it back where their probe allows
    /// (linear probing's deletion, so no tombstones are left).
    private func removeSlotLocked(_ i: Int) {
        let index = current.pointee.load(ordering: .relaxed)
        let mask = HandleIndex.mask(index)
        var hole = i
        var j = i
        while true {
            j = (j + 1) & mask
            let number = HandleIndex.slot(index, j).pointee.load(ordering: .relaxed)
            if number == 0 { break }
            let home = HandleIndex.home(entryPointer(Int(number)).pointee.exposed.load(ordering: .relaxed), index)
            // The entry at j stays when its home lies cyclically in (hole, j].
            let stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j)
            if stays { continue }
            HandleIndex.slot(index, hole).pointee.store(number, ordering: .releasing)
            hole = j
        }
        HandleIndex.slot(index, hole).pointee.store(0, ordering: .releasing)
        live -= 1
    }

    /// Gives `exposed` up; later look-ups of it fail. Returns false if it was not issued.
    @discardableResult
    func release(_ exposed: UInt) -> Bool {
        lock.withLock { releaseLocked(exposed) }
    }

    private func releaseLocked(_ exposed: UInt) -> Bool {
        guard exposed != 0, let i = slotLocked(exposed) else { return false }
        let index = current.pointee.load(ordering: .relaxed)
        let number = Int(HandleIndex.slot(index, i).pointee.load(ordering: .relaxed))
        let entry = entryPointer(number)
        let key = RealKey(real: entry.pointee.real.load(ordering: .relaxed), aux: entry.pointee.aux.load(ordering: .relaxed))
        if byReal[key] == exposed { byReal[key] = nil }
        removeSlotLocked(i)
        entry.pointee.exposed.store(0, ordering: .releasing)
        entry.pointee.state.store(0, ordering: .relaxed)
        freeEntries.append(number)
        return true
    }

    /// Every live entry's number, exposed value and pointer, under the lock.
    private func liveEntriesLocked() -> [(exposed: UInt, entry: UnsafeMutablePointer<Entry>)] {
        var result: [(UInt, UnsafeMutablePointer<Entry>)] = []
        for number in 1..<nextEntry {
            let entry = entryPointer(number)
            let exposed = entry.pointee.exposed.load(ordering: .relaxed)
            if exposed != 0 { result.append((exposed, entry)) }
        }
        return result
    }

    /// Releases every live handle for which `predicate(real, aux)` holds; returns them.
    @discardableResult
    func releaseAll(where predicate: (_ real: UInt, _ aux: UInt) -> Bool) -> [UInt] {
        lock.withLock {
            var released: [UInt] = []
            for (exposed, entry) in liveEntriesLocked()
            where predicate(entry.pointee.real.load(ordering: .relaxed), entry.pointee.aux.load(ordering: .relaxed)) {
                _ = releaseLocked(exposed)
                released.append(exposed)
            }
            return released
        }
    }

    /// Every live handle with its real handle and epoch.
    func entries() -> [(exposed: UInt, real: UInt, epoch: UInt)] {
        lock.withLock {
            liveEntriesLocked().map { ($0.exposed, $0.entry.pointee.real.load(ordering: .relaxed), $0.entry.pointee.epoch.load(ordering: .relaxed)) }
        }
    }

    /// The number of live handles (for tests and memory figures).
    var liveCount: Int {
        lock.withLock { live }
    }
}

/// The probe index: word 0 holds the number of bits of the slot count, words 1... the slots
/// (an entry number; 0 for an empty slot).
enum HandleIndex {
    static func make(bits: Int) -> UnsafeMutablePointer<Atomic<UInt>> {
        let count = 1 << bits
        let index = UnsafeMutablePointer<Atomic<UInt>>.allocate(capacity: count + 1)
        index.initialize(to: Atomic(UInt(bits)))
        for i in 1...count { (index + i).initialize(to: Atomic(0)) }
        return index
    }

    static func free(_ index: UnsafeMutablePointer<Atomic<UInt>>) {
        index.deinitialize(count: mask(index) + 2)
        index.deallocate()
    }

    @inline(__always)
    static func bits(_ index: UnsafeMutablePointer<Atomic<UInt>>) -> Int {
        Int(index.pointee.load(ordering: .relaxed))
    }

    @inline(__always)
    static func mask(_ index: UnsafeMutablePointer<Atomic<UInt>>) -> Int { (1 << bits(index)) - 1 }

    /// Multiplicative hashing: consecutive handle values spread over the index.
    @inline(__always)
    static func home(_ exposed: UInt, _ index: UnsafeMutablePointer<Atomic<UInt>>) -> Int {
        let golden = UInt(truncatingIfNeeded: 0x9E37_79B9_7F4A_7C15 as UInt64)
        return Int((exposed &* golden) >> UInt(UInt.bitWidth - bits(index)))
    }

    @inline(__always)
    static func slot(_ index: UnsafeMutablePointer<Atomic<UInt>>, _ i: Int) -> UnsafeMutablePointer<Atomic<UInt>> {
        index + 1 + i
    }
}

/// The read side of a `HandleTable`: plain pointers, so looking a handle up costs no reference
/// counting and, when found, no lock. A default view (no table yet) finds nothing.
struct HandleView: @unchecked Sendable {
    let chunks: UnsafeMutablePointer<Atomic<UnsafeMutablePointer<HandleTable.Entry>?>>
    let current: UnsafeMutablePointer<Atomic<UnsafeMutablePointer<Atomic<UInt>>>>
    let table: Unmanaged<HandleTable>?

    /// Finds nothing: an index with one empty slot, and no table to confirm a miss with.
    init() {
        (chunks, current) = Self.nothing
        table = nil
    }

    /// What every default view shares, made once (at load: the handle tables' globals are set
    /// up there).
    nonisolated(unsafe) private static let nothing: (UnsafeMutablePointer<Atomic<UnsafeMutablePointer<HandleTable.Entry>?>>,
                                 UnsafeMutablePointer<Atomic<UnsafeMutablePointer<Atomic<UInt>>>>) = {
        let chunks = UnsafeMutablePointer<Atomic<UnsafeMutablePointer<HandleTable.Entry>?>>.allocate(capacity: 1)
        chunks.initialize(to: Atomic(nil))
        let current = UnsafeMutablePointer<Atomic<UnsafeMutablePointer<Atomic<UInt>>>>.allocate(capacity: 1)
        current.initialize(to: Atomic(HandleIndex.make(bits: 0)))
        return (chunks, current)
    }()

    init(chunks: UnsafeMutablePointer<Atomic<UnsafeMutablePointer<HandleTable.Entry>?>>,
         current: UnsafeMutablePointer<Atomic<UnsafeMutablePointer<Atomic<UInt>>>>, table: Unmanaged<HandleTable>) {
        self.chunks = chunks
        self.current = current
        self.table = table
    }

    /// The live entry exposed as `exposed`: a probe of the index without a lock; a miss is
    /// confirmed under the table's lock (a removal may have been shifting entries meanwhile).
    @inline(__always)
    func entry(_ exposed: UInt) -> UnsafeMutablePointer<HandleTable.Entry>? {
        let index = current.pointee.load(ordering: .acquiring)
        let mask = HandleIndex.mask(index)
        var i = HandleIndex.home(exposed, index)
        for _ in 0...mask {
            let number = Int(HandleIndex.slot(index, i).pointee.load(ordering: .acquiring))
            if number == 0 { break }
            if let chunk = chunks[number >> HandleTable.chunkBits].load(ordering: .acquiring) {
                let entry = chunk + (number & (HandleTable.chunkSize - 1))
                if entry.pointee.exposed.load(ordering: .acquiring) == exposed, exposed != 0 { return entry }
            }
            i = (i + 1) & mask
        }
        return confirmMiss(exposed)
    }

    @inline(never)
    private func confirmMiss(_ exposed: UInt) -> UnsafeMutablePointer<HandleTable.Entry>? {
        guard exposed != 0, let table else { return nil }
        return table._withUnsafeGuaranteedRef { $0.confirmedEntry(exposed) }
    }

    /// The real handle behind `exposed` if it was issued in `epoch`, else nil.
    @inline(__always)
    func real(_ exposed: UInt, epoch: UInt) -> UInt? {
        guard let entry = entry(exposed), entry.pointee.epoch.load(ordering: .relaxed) == epoch else { return nil }
        return entry.pointee.real.load(ordering: .relaxed)
    }

    /// The real handle and the aux word behind `exposed` if it was issued in `epoch`.
    @inline(__always)
    func lookup(_ exposed: UInt, epoch: UInt) -> (real: UInt, aux: UInt)? {
        guard let entry = entry(exposed), entry.pointee.epoch.load(ordering: .relaxed) == epoch else { return nil }
        return (entry.pointee.real.load(ordering: .relaxed), entry.pointee.aux.load(ordering: .relaxed))
    }

    /// Whatever `exposed` is bound to, in any epoch (recovery decides what a stale one means).
    func lookupAnyEpoch(_ exposed: UInt) -> (real: UInt, epoch: UInt, aux: UInt)? {
        guard let entry = entry(exposed) else { return nil }
        return (entry.pointee.real.load(ordering: .relaxed), entry.pointee.epoch.load(ordering: .acquiring),
                entry.pointee.aux.load(ordering: .relaxed))
    }
}
