import CPKCS11
import Glibc

/// Logins kept for replay in a child (docs/DESIGN.md "Recovery in the child", step 3).
///
/// A successful C_Login (user or SO) keeps its PIN in a `Secret`; C_Logout, C_Finalize, the
/// close of the token's last session and a failed replay wipe it. A PIN that fails on replay
/// is never tried again: p11fork must never lock a token out.
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
        /// Logged in by the parent; replay is switched off, so not here.
        case skipped
    }

    // Guarded by Records.lock.
    nonisolated(unsafe) static var kept: [CK_SLOT_ID: Kept] = [:]
    nonisolated(unsafe) static var states: [CK_SLOT_ID: State] = [:]
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

    /// Makes sure `slot` is logged in as the parent was, through `session` of this process's
    /// module: at most one replay per slot per process. Returns the replay's failure, if any.
    static func ensure(slot: CK_SLOT_ID, session: CK_SESSION_HANDLE,
                       functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) -> CK_RV {
        let (state, k) = Records.lock.withLock { (states[slot], kept[slot]) }
        switch state {
        case .failed(let rv): return rv
        case .pending: break
        default: return CK_RV(CKR_OK)
        }
        guard let k else { return CK_RV(CKR_OK) }
        let user = userTypeName(k.userType).map { "\($0)" } ?? "user type \(k.userType)"
        let started = Clock.monotonicNanoseconds()
        var rv = login(k, session: session, functions: functions)
        // Only CKR_GENERAL_ERROR is tried again, twice: SoftHSM answers it while another process
        // rewrites its token file, without judging the PIN. Any other failure is final: a verdict
        // on the PIN, and a token that is locked, gone or failing (CKR_DEVICE_ERROR, ...), where a
        // retry would only send the PIN again.
        var attempts = 1
        while rv == CKR_GENERAL_ERROR && attempts < 3 {
            usleep(UInt32(10_000 << attempts))
            rv = login(k, session: session, functions: functions)
            attempts += 1
        }
        let took = Recovery.milliseconds(since: started)
        let how = k.pin == nil ? "protected-path " : ""
        if rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN {
            Records.lock.withLock { states[slot] = .done(k.userType) }
            Trace.event(.fork, "login replayed: \(how)\(user) on slot 0x\(String(slot, radix: 16)) (\(took))")
            return CK_RV(CKR_OK)
        }
        // Never tried again, whatever the reason: wipe the PIN so it cannot be.
        Records.lock.withLock {
            states[slot] = .failed(rv)
            kept[slot] = nil
        }
        k.pin?.wipe()
        k.username?.wipe()
        let name = returnCodeName(rv).map { "\($0)" } ?? "0x\(String(rv, radix: 16))"
        let tries = attempts > 1 ? " \(attempts) times" : ""
        Trace.event(.error, "login replay failed: \(how)\(user) on slot 0x\(String(slot, radix: 16)) answered \(name)\(tries); the kept PIN is wiped and will not be tried again (\(took))")
        return rv
    }

    private static func login(_ k: Kept, session: CK_SESSION_HANDLE, functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) -> CK_RV {
        if let username = k.username, let loginUser = functions.pointee.C_LoginUser {
            return loginUser(session, k.userType, k.pin?.bytes, CK_ULONG(k.pin?.count ?? 0), username.bytes, CK_ULONG(username.count))
        }
        guard let login = functions.pointee.C_Login else { return CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
        return login(session, k.userType, k.pin?.bytes, CK_ULONG(k.pin?.count ?? 0))
    }
}
