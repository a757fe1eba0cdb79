import Testing
import Glibc
@testable import P11ForkCore

@Suite struct HandleTableTests {
    @Test func issuedHandleStartsAtTheTableOffsetAndMapsToTheRealHandle() throws {
        let table = HandleTable(base: 0x5E00_0000)
        let virtual = try #require(table.issue(real: 7, epoch: 1, aux: 42))
        #expect(virtual == 0x5E00_0001)
        #expect(table.real(virtual, epoch: 1) == 7)
        #expect(table.lookup(virtual, epoch: 1)?.aux == 42)
    }

    @Test func unknownAndRealValuesFindNothing() throws {
        let table = HandleTable(base: 0x5E00_0000)
        _ = try #require(table.issue(real: 1, epoch: 1))
        // A real handle passed by mistake, the invalid handle, a value past the issued ones.
        #expect(table.real(1, epoch: 1) == nil)
        #expect(table.real(0, epoch: 1) == nil)
        #expect(table.real(0x5E00_0002, epoch: 1) == nil)
        #expect(table.real(UInt.max, epoch: 1) == nil)
    }

    @Test func handleOfAnEarlierEpochIsStale() throws {
        let table = HandleTable(base: 0x0B00_0000)
        let virtual = try #require(table.issue(real: 9, epoch: 1))
        #expect(table.real(virtual, epoch: 2) == nil)
    }

    @Test func releasedHandleIsGoneAndItsIndexComesBackWithANewGeneration() throws {
        let table = HandleTable(base: 0x5E00_0000)
        let first = try #require(table.issue(real: 1, epoch: 1))
        #expect(table.release(first))
        #expect(table.real(first, epoch: 1) == nil)
        #expect(!table.release(first))
        let second = try #require(table.issue(real: 2, epoch: 1))
        #expect(second != first)
        #expect(UInt32(truncatingIfNeeded: second) == UInt32(truncatingIfNeeded: first))
        #expect(table.real(first, epoch: 1) == nil)
        #expect(table.real(second, epoch: 1) == 2)
    }

    @Test func exposingTheSameRealHandleTwiceGivesTheSameVirtualHandle() throws {
        let table = HandleTable(base: 0x0B00_0000)
        let a = try #require(table.expose(real: 5, epoch: 1, aux: 1))
        let b = try #require(table.expose(real: 5, epoch: 1, aux: 1))
        let otherSlot = try #require(table.expose(real: 5, epoch: 1, aux: 2))
        #expect(a == b)
        #expect(otherSlot != a)
        // After the epoch changes the old mapping is not reused.
        let later = try #require(table.expose(real: 5, epoch: 2, aux: 1))
        #expect(later != a)
    }

    @Test func releaseAllTakesOnlyTheMatchingHandles() throws {
        let table = HandleTable(base: 0x5E00_0000)
        let onSlot1 = try #require(table.issue(real: 1, epoch: 1, aux: 1))
        let onSlot2 = try #require(table.issue(real: 2, epoch: 1, aux: 2))
        let released = table.releaseAll { _, aux in aux == 1 }
        #expect(released == [onSlot1])
        #expect(table.real(onSlot1, epoch: 1) == nil)
        #expect(table.real(onSlot2, epoch: 1) == 2)
        #expect(table.liveCount == 1)
    }

    @Test func handlesBeyondOneChunkWork() throws {
        let table = HandleTable(base: 0x0B00_0000)
        var handles: [UInt] = []
        for real in 1...3000 { handles.append(try #require(table.issue(real: UInt(real), epoch: 1))) }
        for (i, virtual) in handles.enumerated() { #expect(table.real(virtual, epoch: 1) == UInt(i + 1)) }
    }

    @Test func lookupsRunWhileAnotherThreadIssuesAndReleases() throws {
        let table = HandleTable(base: 0x5E00_0000)
        let stable = try #require(table.issue(real: 77, epoch: 1))
        let reader = Reader(table: table, handle: stable)
        var thread = pthread_t()
        pthread_create(&thread, nil, { raw in
            let reader = Unmanaged<Reader>.fromOpaque(raw!).takeUnretainedValue()
            for _ in 0..<200_000 where reader.table.real(reader.handle, epoch: 1) != 77 { reader.wrong += 1 }
            return nil
        }, Unmanaged.passUnretained(reader).toOpaque())
        for i in 0..<5_000 {
            if let h = table.issue(real: UInt(i + 1000), epoch: 1) { table.release(h) }
        }
        pthread_join(thread, nil)
        #expect(reader.wrong == 0)
        #expect(table.real(stable, epoch: 1) == 77)
    }
}

final class Reader: @unchecked Sendable {
    let table: HandleTable
    let handle: UInt
    var wrong = 0
    init(table: HandleTable, handle: UInt) {
        self.table = table
        self.handle = handle
    }
}
