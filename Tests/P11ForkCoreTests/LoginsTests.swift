import CPKCS11
import Testing
@testable import P11ForkCore

/// Logins (Fork/Logins.swift): the PINs kept for replay in a child and the replay itself, against
/// a fake module whose C_Login answers what each test says (docs/DESIGN.md "Recovery in the
/// child", step 3). Which answers are final is pinned by RecoveryRetryTests.
@Suite(.serialized) struct LoginsTests {
    let slot: CK_SLOT_ID = 0x71
    let user = CK_USER_TYPE(CKU_USER)

    init() {
        CoreTestState.installRecords()
        Logins.forgetAll()
        Logins.replayEnabled = true
        FakeModule.loginAnswers = []
        FakeModule.logins = []
    }

    private func keep(_ pin: String?, as userType: CK_USER_TYPE = CK_USER_TYPE(CKU_USER)) {
        guard let pin else {
            Logins.keep(slot: slot, userType: userType, pin: nil, pinLength: 0)
            return
        }
        var bytes = Array(pin.utf8)
        bytes.withUnsafeMutableBufferPointer { Logins.keep(slot: slot, userType: userType, pin: $0.baseAddress, pinLength: CK_ULONG($0.count)) }
    }

    private func keptSecret() -> Secret? { Records.lock.withLock { Logins.kept[slot]?.pin } }

    private func keptPin() -> String? {
        guard let secret = keptSecret(), let bytes = secret.bytes else { return nil }
        return String(decoding: UnsafeBufferPointer(start: bytes, count: secret.count), as: UTF8.self)
    }

    /// One `Logins.ensure` through a fresh fake module.
    private func ensure(now: Bool = false) -> CK_RV {
        let module = FakeModule.make()
        defer { module.deallocate() }
        return Logins.ensure(slot: slot, session: 1, functions: module, now: now)
    }

    /// A login is kept and is done in this process; in a child it is pending, replayed once
    /// with the same user and PIN, then done.
    @Test func keptLoginIsReplayedOnceInAChild() {
        keep("1234")
        #expect(Logins.state(slot) == .done(user))
        #expect(ensure() == CKR_OK)
        #expect(FakeModule.logins.isEmpty, "the process that logged in replays nothing")

        Logins.enterChild()
        #expect(Logins.state(slot) == .pending)
        #expect(ensure() == CKR_OK)
        #expect(Logins.state(slot) == .done(user))
        #expect(ensure() == CKR_OK)
        #expect(FakeModule.logins.map(\.user) == [user])
        #expect(FakeModule.logins.map(\.pin) == ["1234"])
    }

    /// A verdict on the PIN is final: the PIN is wiped, and no later call, even one that asks
    /// for an immediate try, sends it again.
    @Test func pinVerdictIsFinalAndWipesThePin() throws {
        keep("1234")
        let secret = try #require(keptSecret())
        Logins.enterChild()
        FakeModule.loginAnswers = [CK_RV(CKR_PIN_INCORRECT)]
        #expect(ensure() == CKR_PIN_INCORRECT)
        #expect(Logins.state(slot) == .failed(CK_RV(CKR_PIN_INCORRECT)))
        #expect(secret.isWiped)
        #expect(keptSecret() == nil)
        #expect(ensure(now: true) == CKR_PIN_INCORRECT)
        #expect(FakeModule.logins.count == 1)
        #expect(Logins.failure(slot) == CKR_PIN_INCORRECT)
        #expect(Logins.failureUntilDue(slot) == nil, "a final failure has no next try")
    }

    /// An answer that is no verdict on the PIN keeps the PIN: calls before the next try is due
    /// answer the failure without reaching the module; an immediate try sends the same PIN.
    @Test func answerWithoutVerdictIsTriedAgainWithTheKeptPin() {
        keep("1234")
        Logins.enterChild()
        FakeModule.loginAnswers = [CK_RV(CKR_DEVICE_ERROR), CK_RV(CKR_OK)]
        #expect(ensure() == CKR_DEVICE_ERROR)
        guard case .waiting(let rv, _)? = Logins.state(slot) else {
            Issue.record("not waiting: \(String(describing: Logins.state(slot)))")
            return
        }
        #expect(rv == CKR_DEVICE_ERROR)
        #expect(Logins.failureUntilDue(slot) == CKR_DEVICE_ERROR)
        #expect(keptPin() == "1234")
        #expect(ensure() == CKR_DEVICE_ERROR)
        #expect(FakeModule.logins.count == 1, "not due yet: the module is not asked")
        #expect(ensure(now: true) == CKR_OK)
        #expect(FakeModule.logins.map(\.pin) == ["1234", "1234"])
        #expect(Logins.state(slot) == .done(user))
        #expect(Logins.failure(slot) == nil)
    }

    /// CKR_GENERAL_ERROR (SoftHSM while another process rewrites its token file) is tried again
    /// at once, up to three sends in all.
    @Test func generalErrorIsSentAgainAtOnceUpToThreeTimes() {
        keep("1234")
        Logins.enterChild()
        FakeModule.loginAnswers = [CK_RV(CKR_GENERAL_ERROR), CK_RV(CKR_GENERAL_ERROR), CK_RV(CKR_OK)]
        #expect(ensure() == CKR_OK)
        #expect(FakeModule.logins.count == 3)

        Logins.forgetAll()
        FakeModule.logins = []
        keep("1234")
        Logins.enterChild()
        FakeModule.loginAnswers = [CK_RV(CKR_GENERAL_ERROR)]
        #expect(ensure() == CKR_GENERAL_ERROR)
        #expect(FakeModule.logins.count == 3)
        #expect(Logins.failureUntilDue(slot) == CKR_GENERAL_ERROR, "no verdict on the PIN: waiting for the next try")
    }

    /// A protected-authentication-path login (NULL PIN) is replayed as such.
    @Test func protectedPathLoginIsReplayedWithoutAPin() {
        keep(nil)
        Logins.enterChild()
        #expect(ensure() == CKR_OK)
        #expect(FakeModule.logins.count == 1)
        #expect(FakeModule.logins.first?.pin == nil)
    }

    /// With replay off nothing is kept, only the fact of the login: a child skips it.
    @Test func replayOffKeepsNoPin() {
        Logins.replayEnabled = false
        defer { Logins.replayEnabled = true }
        keep("1234")
        #expect(keptSecret() == nil)
        #expect(Logins.state(slot) == .done(user))
        Logins.enterChild()
        #expect(Logins.state(slot) == .skipped)
        #expect(ensure() == CKR_OK)
        #expect(FakeModule.logins.isEmpty)
    }

    /// A second login replaces the kept PIN and wipes the first; C_SetPIN of the logged-in user
    /// replaces it with the new PIN, for the same user type.
    @Test func newLoginOrPinReplacesAndWipesTheOld() throws {
        keep("1111", as: CK_USER_TYPE(CKU_SO))
        let first = try #require(keptSecret())
        keep("2222", as: CK_USER_TYPE(CKU_SO))
        #expect(first.isWiped)
        #expect(keptPin() == "2222")

        let second = try #require(keptSecret())
        var new = Array("9999".utf8)
        new.withUnsafeMutableBufferPointer { Logins.pinChanged(slot: slot, to: $0.baseAddress, length: CK_ULONG($0.count)) }
        #expect(second.isWiped)
        #expect(keptPin() == "9999")
        #expect(Logins.state(slot) == .done(CK_USER_TYPE(CKU_SO)))
    }

    /// C_SetPIN changes nothing where no PIN is kept: no login, or a protected-path one.
    @Test func pinChangeWithoutAKeptPinKeepsNothing() {
        var new = Array("9999".utf8)
        new.withUnsafeMutableBufferPointer { Logins.pinChanged(slot: slot, to: $0.baseAddress, length: CK_ULONG($0.count)) }
        #expect(keptSecret() == nil)
        #expect(Logins.state(slot) == nil)
        keep(nil)
        new.withUnsafeMutableBufferPointer { Logins.pinChanged(slot: slot, to: $0.baseAddress, length: CK_ULONG($0.count)) }
        #expect(keptSecret() == nil)
    }

    /// C_Logout, the last session's close and C_Finalize forget the login and wipe its PIN.
    @Test func forgettingALoginWipesItsPin() throws {
        keep("1234")
        let secret = try #require(keptSecret())
        Logins.forget(slots: [slot])
        #expect(secret.isWiped)
        #expect(keptSecret() == nil)
        #expect(Logins.state(slot) == nil)
        Logins.enterChild()
        #expect(ensure() == CKR_OK)
        #expect(FakeModule.logins.isEmpty)
    }
}
