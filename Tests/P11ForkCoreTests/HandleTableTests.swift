import Testing
import Glibc
@testable import P11ForkCore

/// The handle table (docs/FORK.md "Handle values"): the real module's values where nothing has
/// forked, inherited values kept and collisions moved to the reserved range in a child, look-ups
/// without a lock that never find a wrong entry and never miss a live one.
@Suite struct HandleTableTests {
    @Test func aHandleIsExposedAsTheRealModulesValue() throws {
        let table = HandleTable()
        #expect(table.issue(real: 7, epoch: 1, aux: 42) == 7)
        #expect(table.real(7, epoch: 1) == 7)
        #expect(table.lookup(7, epoch: 1)?.aux == 42)
        #expect(table.expose(real: 0x1234_5678, epoch: 1, aux: 3) == 0x1234_5678)
    }

    @Test func unknownValuesFindNothing() throws {
        let table = HandleTable()
        _ = try #require(table.issue(real: 1, epoch: 1))
        #expect(table.real(0, epoch: 1) == nil)
        #expect(table.real(2, epoch: 1) == nil)
        #expect(table.real(UInt.max, epoch: 1) == nil)
        #expect(table.real(HandleTable.reservedBit | 1, epoch: 1) == nil)
        #expect(HandleView().entry(1) == nil)
    }

    @Test func aHandleOfAnEarlierEpochIsStale() throws {
        let table = HandleTable()
        #expect(table.issue(real: 9, epoch: 1) == 9)
        #expect(table.real(9, epoch: 2) == nil)
        #expect(table.view.lookupAnyEpoch(9)?.epoch == 1)
    }

    @Test func aReleasedValueIsGoneAndTheModuleMayIssueItAgain() throws {
        let table = HandleTable()
        #expect(table.issue(real: 1, epoch: 1) == 1)
        #expect(table.release(1))
        #expect(table.real(1, epoch: 1) == nil)
        #expect(!table.release(1))
        // The module gives the value out again, to another session: the same value, as directly.
        #expect(table.issue(real: 1, epoch: 1, aux: 5) == 1)
        #expect(table.lookup(1, epoch: 1)?.aux == 5)
        #expect(table.liveCount == 1)
    }

    @Test func whereNothingForkedAValueTheTableStillHoldsIsTakenOver() throws {
        // A module that ended a handle behind p11fork's back and issues it again: its value stands.
        let table = HandleTable()
        #expect(table.issue(real: 4, epoch: 1, aux: 1) == 4)
        #expect(table.issue(real: 4, epoch: 1, aux: 2) == 4)
        #expect(table.lookup(4, epoch: 1)?.aux == 2)
        #expect(table.liveCount == 1)
    }

    @Test func exposingTheSameRealHandleTwiceGivesTheSameValue() throws {
        let table = HandleTable()
        #expect(table.expose(real: 5, epoch: 1, aux: 1) == 5)
        #expect(table.expose(real: 5, epoch: 1, aux: 1) == 5)
        #expect(table.exposed(real: 5, epoch: 1, aux: 1) == 5)
        #expect(table.exposed(real: 6, epoch: 1, aux: 1) == nil)
        #expect(table.liveCount == 1)
    }

    @Test func inAChildANewHandleThatCollidesWithAnInheritedOneGetsAReservedValue() throws {
        let table = HandleTable()
        for real in 1...3 { #expect(table.issue(real: UInt(real), epoch: 1, aux: 9) == UInt(real)) }
        // The fork: the child's module starts again from 1.
        table.remapsCollisions = true
        let collided = try #require(table.issue(real: 2, epoch: 2, aux: 9))
        #expect(collided & HandleTable.reservedBit != 0)
        #expect(table.real(collided, epoch: 2) == 2)
        #expect(table.issue(real: 7, epoch: 2) == 7)
        // The inherited handle 2 still names the parent's session, re-opened as 8 in the child.
        #expect(table.rebind(2, real: 8, epoch: 2))
        #expect(table.real(2, epoch: 2) == 8)
        #expect(table.real(collided, epoch: 2) == 2)
        // An inherited handle the child lets go frees its value for the child's module.
        #expect(table.release(1))
        #expect(table.issue(real: 1, epoch: 2) == 1)
        // Objects: the translated real handle is exposed as the same value each time.
        let object = try #require(table.expose(real: 3, epoch: 2, aux: 9))
        #expect(object != 3 && object & HandleTable.reservedBit != 0)
        #expect(table.expose(real: 3, epoch: 2, aux: 9) == object)
    }

    @Test func aGrandchildKeepsItsParentsValuesAndMovesItsOwnCollisions() throws {
        let table = HandleTable()
        #expect(table.issue(real: 1, epoch: 1) == 1)
        table.remapsCollisions = true
        let child = try #require(table.issue(real: 1, epoch: 2))
        #expect(table.rebind(1, real: 2, epoch: 2))
        // The grandchild's module issues 1 again, and even the child's reserved value.
        let grandchild = try #require(table.issue(real: 1, epoch: 3))
        let odd = try #require(table.issue(real: child, epoch: 3))
        #expect(Set([1, child, grandchild, odd]).count == 4)
        #expect(grandchild & HandleTable.reservedBit != 0 && odd & HandleTable.reservedBit != 0)
        #expect(table.real(grandchild, epoch: 3) == 1)
        #expect(table.real(odd, epoch: 3) == child)
        #expect(table.view.lookupAnyEpoch(1)?.epoch == 2)
        #expect(table.view.lookupAnyEpoch(child)?.epoch == 2)
    }

    @Test func releaseAllTakesOnlyTheMatchingHandles() throws {
        let table = HandleTable()
        #expect(table.issue(real: 1, epoch: 1, aux: 1) == 1)
        #expect(table.issue(real: 2, epoch: 1, aux: 2) == 2)
        #expect(table.releaseAll { _, aux in aux == 1 } == [1])
        #expect(table.real(1, epoch: 1) == nil)
        #expect(table.real(2, epoch: 1) == 2)
        #expect(table.liveCount == 1)
        #expect(table.entries().map(\.exposed) == [2])
    }

    @Test func manyHandlesGrowTheIndexAndSurviveRemovalInAnyOrder() throws {
        let table = HandleTable()
        // Sequential values, addresses and values that share their low bits.
        var values: [UInt] = Array(1...2000)
        values += (0..<500).map { 0x7f00_0000_0000 + UInt($0) * 0x40 }
        values += (1..<500).map { (UInt($0) << 40) | 0x10 }
        for value in values { #expect(table.issue(real: value, epoch: 1, aux: value & 0xff) == value) }
        var generator = SystemRandomNumberGenerator()
        var live = Set(values)
        for value in values.shuffled(using: &generator) {
            #expect(table.release(value))
            live.remove(value)
            if live.count % 97 == 0 {
                for other in live { #expect(table.real(other, epoch: 1) == other) }
                #expect(table.real(value, epoch: 1) == nil)
            }
        }
        #expect(table.liveCount == 0)
    }

    @Test func lookupsRunWhileAnotherThreadIssuesAndReleases() throws {
        let table = HandleTable()
        let stable: [UInt] = (1...64).map { $0 * 3 }
        for value in stable { #expect(table.issue(real: value, epoch: 1) == value) }
        let reader = Reader(table: table, handles: stable)
        var threads = [pthread_t](repeating: pthread_t(), count: 2)
        for i in threads.indices {
            pthread_create(&threads[i], nil, { raw in
                let reader = Unmanaged<Reader>.fromOpaque(raw!).takeUnretainedValue()
                var wrong = 0
                for round in 0..<200_000 {
                    let handle = reader.handles[round % reader.handles.count]
                    if reader.table.real(handle, epoch: 1) != handle { wrong += 1 }
                }
                reader.add(wrong)
                return nil
            }, Unmanaged.passUnretained(reader).toOpaque())
        }
        // Values next to the stable ones, so removals shift entries past them; growth too.
        for round in 0..<20_000 {
            let value = UInt(round % 500) * 3 + 1
            if table.issue(real: value, epoch: 1) != nil, round % 3 != 0 { table.release(value) }
        }
        for thread in threads { pthread_join(thread, nil) }
        #expect(reader.wrong == 0)
        for value in stable { #expect(table.real(value, epoch: 1) == value) }
    }
}

final class Reader: @unchecked Sendable {
    let table: HandleTable
    let handles: [UInt]
    private let lock = ForkSafeLock()
    private(set) var wrong = 0
    init(table: HandleTable, handles: [UInt]) {
        self.table = table
        self.handles = handles
    }

    func add(_ count: Int) { lock.withLock { wrong += count } }
}
