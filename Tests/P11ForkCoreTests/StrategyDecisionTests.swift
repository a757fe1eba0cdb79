import Testing
@testable import P11ForkCore

/// How `auto` chooses a working module for a child (docs/FORK.md "A working module in the child (strategies)";
/// Loader/Strategies.swift), fed the facts it decides from: no module, fork or broker needed.
@Suite struct StrategyDecisionTests {
    typealias Facts = ModuleRecovery.AutomaticFacts

    /// Every combination of the facts.
    static let everyCase: [Facts] = (0..<32).map { bits in
        Facts(loadsGLib: bits & 1 != 0, isOpenCryptoki: bits & 2 != 0, brokerRuns: bits & 4 != 0,
              helperAvailable: bits & 8 != 0, rightsChanged: bits & 16 != 0)
    }

    /// A GLib stack cannot be loaded twice in one process: the broker where it runs (whatever the
    /// child's rights), else p11-kit's server in a helper, else the inherited module in place.
    @Test(arguments: [false, true])
    func glibStackNeverGetsACopy(_ rightsChanged: Bool) {
        #expect(ModuleRecovery.automaticFirstChoice(Facts(loadsGLib: true, brokerRuns: true, helperAvailable: true, rightsChanged: rightsChanged)) == .broker)
        #expect(ModuleRecovery.automaticFirstChoice(Facts(loadsGLib: true, helperAvailable: true, rightsChanged: rightsChanged)) == .outOfProcess)
        #expect(ModuleRecovery.automaticFirstChoice(Facts(loadsGLib: true, rightsChanged: rightsChanged)) == .reinitialize)
    }

    /// openCryptoki's module goes to the broker where one runs; without one, a copy is tried (and
    /// recovery falls back to re-initialising in place when it fails).
    @Test func openCryptokiGoesToTheBrokerWhereOneRuns() {
        #expect(ModuleRecovery.automaticFirstChoice(Facts(isOpenCryptoki: true, brokerRuns: true)) == .broker)
        #expect(ModuleRecovery.automaticFirstChoice(Facts(isOpenCryptoki: true)) == .freshCopy)
    }

    /// Any other module: a private copy first, whether a broker runs or the child switched user
    /// (then the copy must show the parent's tokens, below).
    @Test(arguments: everyCase.filter { !$0.loadsGLib && !$0.isOpenCryptoki })
    func otherModulesGetACopyFirst(_ facts: Facts) {
        #expect(ModuleRecovery.automaticFirstChoice(facts) == .freshCopy)
    }

    /// `auto` always names a way, never itself.
    @Test(arguments: everyCase)
    func firstChoiceIsAWay(_ facts: Facts) {
        #expect(ModuleRecovery.automaticFirstChoice(facts) != .auto)
    }

    /// A copy that initialised is checked for the parent's tokens only where the child's rights
    /// differ and a broker (with the parent's rights) could serve instead.
    @Test(arguments: everyCase)
    func copyIsCheckedForTheParentsTokensOnlyWhenTheBrokerCouldDoBetter(_ facts: Facts) {
        #expect(ModuleRecovery.copyMustShowTokens(facts) == (facts.brokerRuns && facts.rightsChanged))
    }

    /// After a failed copy: the broker where it runs and the copy could not be loaded at all, or
    /// failed with rights that are not the parent's; a copy whose C_Initialize failed with the
    /// parent's rights goes straight to re-initialising in place.
    @Test func brokerAfterAFailedCopy() {
        #expect(ModuleRecovery.brokerAfterFailedCopy(Facts(brokerRuns: true), copyAnswered: false))
        #expect(!ModuleRecovery.brokerAfterFailedCopy(Facts(brokerRuns: true), copyAnswered: true))
        #expect(ModuleRecovery.brokerAfterFailedCopy(Facts(brokerRuns: true, rightsChanged: true), copyAnswered: true))
        for copyAnswered in [false, true] {
            for rightsChanged in [false, true] {
                #expect(!ModuleRecovery.brokerAfterFailedCopy(Facts(rightsChanged: rightsChanged), copyAnswered: copyAnswered))
            }
        }
    }

    /// A spare copy is loaded before a fork only where a child would use one: `fresh-copy`, or
    /// `auto` over a module that is neither a GLib stack nor openCryptoki; never for a module
    /// reached through a helper.
    @Test func spareCopiesOnlyWhereAChildUsesThem() {
        for strategy in ModuleStrategy.allCases {
            #expect(!ModuleRecovery.usesCopies(strategy, isHelperClient: true, loadsGLib: false, isOpenCryptoki: false))
        }
        #expect(ModuleRecovery.usesCopies(.freshCopy, isHelperClient: false, loadsGLib: true, isOpenCryptoki: true))
        #expect(ModuleRecovery.usesCopies(.auto, isHelperClient: false, loadsGLib: false, isOpenCryptoki: false))
        #expect(!ModuleRecovery.usesCopies(.auto, isHelperClient: false, loadsGLib: true, isOpenCryptoki: false))
        #expect(!ModuleRecovery.usesCopies(.auto, isHelperClient: false, loadsGLib: false, isOpenCryptoki: true))
        for strategy in [ModuleStrategy.reinitialize, .outOfProcess, .broker] {
            #expect(!ModuleRecovery.usesCopies(strategy, isHelperClient: false, loadsGLib: false, isOpenCryptoki: false))
        }
    }

    /// Where `auto` loads a spare, every child's first choice is that copy.
    @Test(arguments: everyCase)
    func aSpareIsLoadedOnlyWhereAutoChoosesACopy(_ facts: Facts) {
        if ModuleRecovery.usesCopies(.auto, isHelperClient: false, loadsGLib: facts.loadsGLib, isOpenCryptoki: facts.isOpenCryptoki) {
            #expect(ModuleRecovery.automaticFirstChoice(facts) == .freshCopy)
        }
    }
}
