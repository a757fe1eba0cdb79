import CPKCS11
import Testing
@testable import P11ForkCore

/// Records (Fork/Records.swift): what the parent writes down as it hands out handles, for a child
/// to rebuild what it uses. Each test starts from empty records, on slots no other test uses.
@Suite(.serialized) struct RecordsTests {
    init() {
        CoreTestState.installRecords()
        Records.forgetSessionsAndObjects()
        Records.lock.withLock {
            Records.tokens.removeAll()
            Records.knownSlots.removeAll()
        }
    }

    private func token(_ text: String) -> TokenIdentity {
        var info = CK_TOKEN_INFO()
        FakeModule.setLabel(&info, text)
        return TokenIdentity(info)
    }

    /// Closing sessions answers the slots left with no open session (whose login is gone), and
    /// forgets only the sessions closed.
    @Test func closingSessionsNamesTheSlotsLeftWithoutOne() {
        Records.noteSession(0x5e00_0101, slot: 7, flags: CK_FLAGS(CKF_SERIAL_SESSION))
        Records.noteSession(0x5e00_0102, slot: 7, flags: CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION))
        Records.noteSession(0x5e00_0103, slot: 9, flags: CK_FLAGS(CKF_SERIAL_SESSION))
        #expect(Records.session(0x5e00_0102)?.slot == 7)
        #expect(Records.session(0x5e00_0102)?.flags == CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION))

        #expect(Records.forgetSessions([0x5e00_0101, 0x5e00_0103]) == [9])
        #expect(Records.session(0x5e00_0101) == nil)
        #expect(Records.session(0x5e00_0103) == nil)
        #expect(Records.session(0x5e00_0102)?.slot == 7)
        #expect(Records.forgetSessions([0x5e00_0102]) == [7])
        #expect(Records.forgetSessions([0x5e00_0999]) == [])
        #expect(Records.counts.sessions == 0)
    }

    /// Objects are found by identity, every handle of one identity (a child gives a re-found
    /// object its inherited handle back); a forgotten handle leaves the others.
    @Test func objectsAreFoundByIdentityUntilForgotten() {
        let key = ObjectIdentity(objectClass: CK_OBJECT_CLASS(CKO_PRIVATE_KEY), keyType: CK_KEY_TYPE(CKK_RSA), isTokenObject: true,
                                 id: [1], label: Array("signing".utf8), fingerprint: 42)
        var other = key
        other.id = [2]
        Records.noteObject(0x0b00_0001, key)
        Records.noteObject(0x0b00_0002, key)
        Records.noteObject(0x0b00_0003, other)
        #expect(Records.objects(with: key) == [0x0b00_0001, 0x0b00_0002])
        #expect(Records.object(0x0b00_0003) == other)

        Records.forgetObject(0x0b00_0001)
        #expect(Records.object(0x0b00_0001) == nil)
        #expect(Records.objects(with: key) == [0x0b00_0002])
        Records.forgetObject(0x0b00_0002)
        #expect(Records.objects(with: key) == [])
        #expect(Records.lock.withLock { Records.objectsByIdentity[key] } == nil)
        Records.forgetObject(0x0b00_0777)
        #expect(Records.objects(with: other) == [0x0b00_0003])
    }

    /// A slot is known from a slot list the application was given, from its token's identity,
    /// or from a session opened on it; never otherwise.
    @Test func slotsAreKnownFromListsTokensAndSessions() {
        [CK_SLOT_ID(3), 4].withUnsafeBufferPointer { Records.noteSlots($0) }
        Records.noteToken(11, token("known-by-token"))
        Records.noteSession(0x5e00_0201, slot: 12, flags: CK_FLAGS(CKF_SERIAL_SESSION))
        for slot: CK_SLOT_ID in [3, 4, 11, 12] { #expect(Records.knowsSlot(slot)) }
        #expect(!Records.knowsSlot(5))
        #expect(Records.token(11)?.labelText == "known-by-token")
        #expect(Records.token(12) == nil)
    }

    /// C_Finalize forgets sessions and objects; the token identities stay (slots outlive it).
    @Test func finalizeForgetsSessionsAndObjectsButNotTokens() {
        Records.noteToken(21, token("stays"))
        Records.noteSession(0x5e00_0301, slot: 21, flags: CK_FLAGS(CKF_SERIAL_SESSION))
        Records.noteObject(0x0b00_0301, ObjectIdentity(objectClass: CK_OBJECT_CLASS(CKO_CERTIFICATE), label: Array("c".utf8)))
        #expect(Records.counts == (sessions: 1, objects: 1, tokens: 1))
        Records.forgetSessionsAndObjects()
        #expect(Records.counts == (sessions: 0, objects: 0, tokens: 1))
        #expect(Records.token(21)?.labelText == "stays")
        #expect(Records.knowsSlot(21))
    }

    /// After the application's C_Initialize: the module's description, every slot it lists, and
    /// the token behind each slot that has one.
    @Test func moduleIsNotedWithEverySlotAndItsToken() {
        let saved = Records.moduleInfo
        defer { Records.moduleInfo = saved }
        let module = FakeModule.make()
        defer { module.deallocate() }
        Records.noteModule(module)
        #expect(Records.moduleInfo?.libraryVersion.major == 7)
        #expect(Records.knowsSlot(1) && Records.knowsSlot(5))
        #expect(Records.token(1) == nil)
        #expect(Records.token(5)?.labelText == "fake-token")
        #expect(Records.allTokens().count == 1)
    }
}

/// Makes, once, the lock the Records and Logins tests need, without loading the whole core. It
/// is not registered with the fork handlers (no test here forks), so that suites running side by
/// side never change their list at once.
enum CoreTestState {
    private static let records: Void = { if Records.lock == nil { Records.lock = ForkSafeLock() } }()
    static func installRecords() { _ = records }
}

/// A module with two slots (1, empty; 5, with the token "fake-token") and a C_Login whose
/// answers a test sets, recording what it was sent.
enum FakeModule {
    /// C_Login's answers, in order; the last one is given again once the others are used.
    nonisolated(unsafe) static var loginAnswers: [CK_RV] = []
    /// What C_Login was sent: the user type and the PIN (nil: a protected-path login).
    nonisolated(unsafe) static var logins: [(user: CK_USER_TYPE, pin: String?)] = []

    /// A token label as CK_TOKEN_INFO has it: blank-padded.
    static func setLabel(_ info: inout CK_TOKEN_INFO, _ text: String) {
        withUnsafeMutableBytes(of: &info.label) { label in
            for i in label.indices { label[i] = 0x20 }
            for (i, byte) in text.utf8.prefix(label.count).enumerated() { label[i] = byte }
        }
    }

    static func make() -> UnsafeMutablePointer<CK_FUNCTION_LIST_3_2> {
        let list = UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>.allocate(capacity: 1)
        list.initialize(to: CK_FUNCTION_LIST_3_2())
        list.pointee.C_GetInfo = { info in
            info?.pointee = CK_INFO()
            info?.pointee.libraryVersion.major = 7
            return CK_RV(CKR_OK)
        }
        list.pointee.C_GetSlotList = { _, slots, count in
            guard let count else { return CK_RV(CKR_ARGUMENTS_BAD) }
            if let slots {
                guard count.pointee >= 2 else { count.pointee = 2; return CK_RV(CKR_BUFFER_TOO_SMALL) }
                slots[0] = 1
                slots[1] = 5
            }
            count.pointee = 2
            return CK_RV(CKR_OK)
        }
        list.pointee.C_GetTokenInfo = { slot, info in
            guard slot == 5, let info else { return CK_RV(CKR_TOKEN_NOT_PRESENT) }
            info.pointee = CK_TOKEN_INFO()
            FakeModule.setLabel(&info.pointee, "fake-token")
            return CK_RV(CKR_OK)
        }
        list.pointee.C_Login = { _, user, pin, length in
            FakeModule.logins.append((user, pin.map { String(decoding: UnsafeBufferPointer(start: $0, count: Int(length)), as: UTF8.self) }))
            guard let answer = FakeModule.loginAnswers.first else { return CK_RV(CKR_OK) }
            if FakeModule.loginAnswers.count > 1 { FakeModule.loginAnswers.removeFirst() }
            return answer
        }
        return list
    }
}
