import Foundation
import Synchronization
import Testing
@testable import P11ForkCore

/// FinalizeGate (Calls/FinalizeGate.swift) on its own: refusing calls while the library is not
/// initialised, C_Finalize waiting for a call in flight, a call that arrives during C_Finalize
/// waiting for it and then getting the answer the finalization left, a child's reset. Each test
/// makes the gate afresh; a step that should end but hangs ends the test, failed, after a bound
/// (going on would wait on the gate it left closed).
@Suite(.serialized) struct FinalizeGateTests {
    /// A value threads share.
    final class Shared: Sendable {
        let value: Atomic<Int>
        init(_ value: Int) { self.value = Atomic(value) }
        var now: Int { value.load(ordering: .sequentiallyConsistent) }
        func set(_ new: Int) { value.store(new, ordering: .sequentiallyConsistent) }
    }

    /// Runs `body` on a thread of its own: true when it returned within `seconds`.
    private func finishes(within seconds: Double, _ body: @escaping @Sendable () -> Void) -> Bool {
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            body()
            done.signal()
        }
        return done.wait(timeout: .now() + seconds) == .success
    }

    /// A fresh gate in the state an application that called C_Initialize (`initialized`) or
    /// not leaves it in.
    private func freshGate(initialized: Bool) {
        FinalizeGate.install()
        Core.appInitialized = initialized
        if initialized { FinalizeGate.whileClosed {} }
    }

    @Test func beforeCInitializeACallIsRefusedAndNotCounted() throws {
        let saved = Core.appInitialized
        defer { Core.appInitialized = saved }
        freshGate(initialized: false)
        let (_, admitted) = FinalizeGate.enter()
        #expect(!admitted)
        // Had the refused call stayed counted, a C_Initialize would wait for it for ever.
        try #require(finishes(within: 5) { FinalizeGate.whileClosed { Core.appInitialized = true } })
        let (counter, admittedNow) = FinalizeGate.enter()
        #expect(admittedNow)
        FinalizeGate.leave(counter)
    }

    @Test func cFinalizeWaitsForTheCallInFlight() throws {
        let saved = Core.appInitialized
        defer { Core.appInitialized = saved }
        freshGate(initialized: true)
        let entered = DispatchSemaphore(value: 0)
        let callEnded = Shared(0)
        Thread.detachNewThread {
            let (counter, admitted) = FinalizeGate.enter()
            entered.signal()
            guard admitted else { return }
            Thread.sleep(forTimeInterval: 0.3)
            callEnded.set(1)
            FinalizeGate.leave(counter)
        }
        #expect(entered.wait(timeout: .now() + 5) == .success)
        let endedBeforeFinalize = Shared(-1)
        try #require(finishes(within: 5) {
            FinalizeGate.whileClosed {
                endedBeforeFinalize.set(callEnded.now)
                Core.appInitialized = false
            }
        })
        #expect(endedBeforeFinalize.now == 1, "C_Finalize ran while a call was in flight")
    }

    @Test(arguments: [true, false])
    func aCallDuringCFinalizeWaitsAndGetsWhatItLeft(initializedAfter: Bool) throws {
        let saved = Core.appInitialized
        defer { Core.appInitialized = saved }
        freshGate(initialized: true)
        let passed = Shared(0)  // 0: still waiting; 1: admitted; 2: refused
        let callReturned = DispatchSemaphore(value: 0)
        let passedWhileClosed = Shared(-1)
        try #require(finishes(within: 5) {
            FinalizeGate.whileClosed {
                Thread.detachNewThread {
                    let (counter, admitted) = FinalizeGate.enter()
                    passed.set(admitted ? 1 : 2)
                    if admitted { FinalizeGate.leave(counter) }
                    callReturned.signal()
                }
                Thread.sleep(forTimeInterval: 0.3)
                passedWhileClosed.set(passed.now)
                Core.appInitialized = initializedAfter
            }
        })
        #expect(passedWhileClosed.now == 0, "a call went on while the gate was closed")
        #expect(callReturned.wait(timeout: .now() + 5) == .success)
        #expect(passed.now == (initializedAfter ? 1 : 2))
    }

    @Test func aChildForgetsTheCallsOfThreadsItDoesNotHave() throws {
        let saved = Core.appInitialized
        defer { Core.appInitialized = saved }
        freshGate(initialized: true)
        // A call in flight at the fork, on a thread the child does not have: it never leaves.
        let (_, admitted) = FinalizeGate.enter()
        #expect(admitted)
        FinalizeGate.resetInChild()
        try #require(finishes(within: 5) { FinalizeGate.whileClosed {} })
        let (counter, admittedInChild) = FinalizeGate.enter()
        #expect(admittedInChild)
        FinalizeGate.leave(counter)
    }
}
