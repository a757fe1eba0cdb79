import CPKCS11
import Glibc

/// Logins kept for replay in a child (docs/DESIGN.md "Recovery in the child", step 3).
///
/// A successful C_Login (user or SO) keeps its PIN in a `Secret`; C_Logout, C_Finalize, the
/// close of the token's last session and a replay that fails for good wipe it. A replay the
/// module answers with a verdict on the PIN (or with a code that might be one) is never tried
/// again: p11fork must never lock a token out. One it answers without judging the PIN (the token
/// unreadable or failing for a moment) is tried again later, with the PIN kept (`mayTryAgain`).
enum Logins {
    struct Kept {
        let userType: CK_USER_TYPE
        /// nil: a protected-authentication-path login (NULL PIN), replayed as such.
        let pin: Secret?
        /// For C_LoginUser (PKCS#11 3.0).
        let username: Secret?
    }

    /// Where a slot's login stands in this process.
    enum State: Equatable {
        /// Inherited from the parent, not yet replayed here.
        case pending
        /// Logged in here (replayed, or by the application itself).
        case done(CK_USER_TYPE)
        /// Replay failed with this code; not tried again.
        case failed(CK_RV)
        /// Replay failed with this code, which is no verdict on the PIN: tried again when due.
        case waiting(CK_RV, RetrySchedule)
        /// Logged in by the parent; replay is switched off, so not here.
        case skipped
    }

    // Guarded by Records.lock.
    nonisolated(unsafe) static var kept: [CK_SLOT_ID: Kept] = [:]
    nonisolated(unsafe) static var states: [CK_SLOT_ID: State] = [:]
    /// Slots whose login the broker holds for this process (it is served by the broker, and the
    /// login is in place there): no PIN is kept for them here, nor in this process's children.
    nonisolated(unsafe) static var heldByBroker: Set<CK_SLOT_ID> = []
    nonisolated(unsafe) static var replayEnabled = true

    static func keep(slot: CK_SLOT_ID, userType: CK_USER_TYPE, pin: UnsafeMutablePointer<CK_UTF8CHAR>?, pinLength: CK_ULONG,
                     username: UnsafeMutablePointer<CK_UTF8CHAR>? = nil, usernameLength: CK_ULONG = 0) {
        // With replay off nothing is kept, only the fact of the login.
        let new: Kept? = replayEnabled
            ? Kept(userType: userType, pin: pin == nil ? nil : Secret(copying: pin, count: Int(pinLength)),
                   username: username == nil ? nil : Secret(copying: username, count: Int(usernameLength)))
            : nil
        let previous = Records.lock.withLock { () -> Kept? in
            let previous = kept[slot]
            kept[slot] = new
            states[slot] = .done(userType)
            return previous
        }
        previous?.pin?.wipe()
        previous?.username?.wipe()
    }

    /// The application changed the PIN of the user it is logged in as: replay the new one.
    static func pinChanged(slot: CK_SLOT_ID, to pin: UnsafeMutablePointer<CK_UTF8CHAR>?, length: CK_ULONG) {
        guard let current = Records.lock.withLock({ kept[slot] }), current.pin != nil else { return }
        keep(slot: slot, userType: current.userType, pin: pin, pinLength: length, username: current.username?.bytes,
             usernameLength: CK_ULONG(current.username?.count ?? 0))
    }

    static func forget(slots: some Sequence<CK_SLOT_ID>) {
        let gone = Records.lock.withLock { () -> [Kept] in
            var gone: [Kept] = []
            for slot in slots {
                if let k = kept.removeValue(forKey: slot) { gone.append(k) }
                states[slot] = nil
                heldByBroker.remove(slot)
            }
            return gone
        }
        for k in gone {
            k.pin?.wipe()
            k.username?.wipe()
        }
    }

    static func forgetAll() {
        forget(slots: Records.lock.withLock { Array(kept.keys) + Array(states.keys) })
    }

    static func state(_ slot: CK_SLOT_ID) -> State? {
        Records.lock.withLock { states[slot] }
    }

    /// In a new child: inherited logins are pending replay; their memory is locked again.
    static func enterChild() {
        let notReplayed = Records.lock.withLock { () -> Int in
            var notReplayed = 0
            for (slot, state) in states {
                if let k = kept[slot] {
                    states[slot] = .pending
                    k.pin?.lock()
                    k.username?.lock()
                } else if heldByBroker.contains(slot) {
                    // Still the broker's: this child is served by it too (its module is the
                    // broker's client), and finds the login in place.
                } else if case .done = state {
                    states[slot] = .skipped
                    notReplayed += 1
                }
            }
            return notReplayed
        }
        if notReplayed > 0 {
            Trace.event(.fork, "login replay is off: \(notReplayed) login(s) of the parent will not be replayed in this child")
        }
    }

    /// What a failed replay answers until the application logs in, or until its next try: nil
    /// when the slot's login is not a failed replay.
    static func failure(_ slot: CK_SLOT_ID) -> CK_RV? {
        switch state(slot) {
        case .failed(let rv)?, .waiting(let rv, _)?: rv
        default: nil
        }
    }

    /// The failure of a replay whose next try is not due yet (nil otherwise).
    static func failureUntilDue(_ slot: CK_SLOT_ID) -> CK_RV? {
        guard case .waiting(let rv, let schedule)? = state(slot), !schedule.isDue else { return nil }
        return rv
    }

    /// Answers of C_Login that are no verdict on the PIN: the token was unreadable, gone or
    /// failing when the replay was made (SoftHSM answers CKR_USER_PIN_NOT_INITIALIZED when it read
    /// its token file while another process rewrote it). A replay that got one is tried again
    /// later (RetrySchedule). Any other answer is final: the PIN verdicts (CKR_PIN_INCORRECT,
    /// CKR_PIN_INVALID, CKR_PIN_LEN_RANGE, CKR_PIN_EXPIRED, CKR_PIN_LOCKED), and every code p11fork
    /// cannot tell from one (a vendor's own, ...): an HSM locks a PIN after a few wrong tries.
    static func mayTryAgain(_ rv: CK_RV) -> Bool {
        switch rv {
        case CK_RV(CKR_USER_PIN_NOT_INITIALIZED), CK_RV(CKR_TOKEN_NOT_PRESENT), CK_RV(CKR_TOKEN_NOT_RECOGNIZED),
             CK_RV(CKR_DEVICE_ERROR), CK_RV(CKR_DEVICE_MEMORY), CK_RV(CKR_DEVICE_REMOVED), CK_RV(CKR_GENERAL_ERROR),
             CK_RV(CKR_FUNCTION_FAILED), CK_RV(CKR_HOST_MEMORY), CK_RV(CKR_SESSION_CLOSED), CK_RV(CKR_SESSION_HANDLE_INVALID):
            true
        default:
            false
        }
    }

    /// Makes sure `slot` is logged in as the parent was, through `session` of this process's
    /// module: one replay per slot per process, and after a failure that is no verdict on the PIN
    /// another at the first call once it is due (`now`: at once). Returns the replay's failure, if
    /// any (before the next try is due, at once, without calling the module).
    static func ensure(slot: CK_SLOT_ID, session: CK_SESSION_HANDLE,
                       functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>, now: Bool = false) -> CK_RV {
        let (state, k) = Records.lock.withLock { (states[slot], kept[slot]) }
        var retry: RetrySchedule?
        switch state {
        case .failed(let rv): return rv
        case .waiting(let rv, let schedule):
            guard now || schedule.isDue else { return rv }
            retry = schedule
        case .pending: break
        default: return CK_RV(CKR_OK)
        }
        guard let k else { return CK_RV(CKR_OK) }
        let user = userTypeName(k.userType).map { "\($0)" } ?? "user type \(k.userType)"
        let how = k.pin == nil ? "protected-path " : ""
        let which = "\(how)\(user) on slot 0x\(String(slot, radix: 16))"
        if let retry { Trace.event(.fork, "login replay tried again (\(retry.nextTry)): \(which)") }
        let started = Clock.monotonicNanoseconds()
        // Served by the broker: the application's login lives there (a session of the broker's
        // own keeps it), so once any child made it, a child sends no PIN.
        let brokerServed = Core.module?.servedByBroker == true
        if brokerServed, isLoggedIn(session, as: k.userType, functions) {
            handToBroker(slot, k)
            Trace.event(.fork, "login in place: \(which) is held by the broker for the application; no PIN sent, and this worker's copy of it is wiped",
                        .step(.login, .ok, since: started))
            return CK_RV(CKR_OK)
        }
        // One process of the tree at a time: SoftHSM rewrites its token file at a login (TreeLock).
        let (rv, attempts) = TreeLock.withLock("login replay") { () -> (CK_RV, Int) in
            var rv = login(k, session: session, functions: functions)
            // CKR_GENERAL_ERROR is tried again at once, twice: SoftHSM answers it while another
            // process rewrites its token file, without judging the PIN.
            var attempts = 1
            while rv == CKR_GENERAL_ERROR && attempts < 3 {
                usleep(UInt32(10_000 << attempts))
                rv = login(k, session: session, functions: functions)
                attempts += 1
            }
            return (rv, attempts)
        }
        let took = Format.milliseconds(since: started)
        let tries = retry.map { ", \($0.nextTry)" } ?? ""
        if rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN {
            Records.lock.withLock { states[slot] = .done(k.userType) }
            if brokerServed { handToBroker(slot, k) }
            let wiped = brokerServed ? "; the broker keeps the login, and this worker's copy of the PIN is wiped" : ""
            Trace.event(.fork, "login replayed: \(which) (\(took)\(tries))\(wiped)", .step(.login, .ok, since: started))
            return CK_RV(CKR_OK)
        }
        let name = Format.name(rv)
        let times = attempts > 1 ? " \(attempts) times" : ""
        if mayTryAgain(rv) {
            // The PIN was not judged: it is kept, and sent again when the next try is due.
            var schedule = retry ?? RetrySchedule()
            let attempt = schedule.nextTry
            let delay = schedule.failed()
            Records.lock.withLock { states[slot] = .waiting(rv, schedule) }
            Trace.event(.error, "login replay failed (\(attempt)): \(which) answered \(name)\(times), no verdict on the PIN; the calls that need the login answer it until the next try, at a call \(delay) from now or later (\(took))", .step(.login, .failed, since: started))
            return rv
        }
        // Never tried again: wipe the PIN so it cannot be.
        Records.lock.withLock {
            states[slot] = .failed(rv)
            kept[slot] = nil
        }
        k.pin?.wipe()
        k.username?.wipe()
        Trace.event(.error, "login replay failed: \(which) answered \(name)\(times)\(tries); the kept PIN is wiped and will not be tried again (\(took))", .step(.login, .failed, since: started))
        return rv
    }

    /// The login of `slot` is the broker's from now on: this process keeps no PIN for it.
    private static func handToBroker(_ slot: CK_SLOT_ID, _ k: Kept) {
        Records.lock.withLock {
            states[slot] = .done(k.userType)
            kept[slot] = nil
            heldByBroker.insert(slot)
        }
        k.pin?.wipe()
        k.username?.wipe()
    }

    /// Whether `session` already works as `userType` (the module's login state, PKCS#11 2.40
    /// section 5.6: CKS_RO_USER_FUNCTIONS / CKS_RW_USER_FUNCTIONS, CKS_RW_SO_FUNCTIONS).
    private static func isLoggedIn(_ session: CK_SESSION_HANDLE, as userType: CK_USER_TYPE,
                                   _ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) -> Bool {
        var info = CK_SESSION_INFO()
        guard functions.pointee.C_GetSessionInfo?(session, &info) == CKR_OK else { return false }
        switch userType {
        case CK_USER_TYPE(CKU_USER): return info.state == CKS_RO_USER_FUNCTIONS || info.state == CKS_RW_USER_FUNCTIONS
        case CK_USER_TYPE(CKU_SO): return info.state == CKS_RW_SO_FUNCTIONS
        default: return false
        }
    }

    private static func login(_ k: Kept, session: CK_SESSION_HANDLE, functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) -> CK_RV {
        if let username = k.username, let loginUser = functions.pointee.C_LoginUser {
            return loginUser(session, k.userType, k.pin?.bytes, CK_ULONG(k.pin?.count ?? 0), username.bytes, CK_ULONG(username.count))
        }
        guard let login = functions.pointee.C_Login else { return CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
        return login(session, k.userType, k.pin?.bytes, CK_ULONG(k.pin?.count ?? 0))
    }
}
