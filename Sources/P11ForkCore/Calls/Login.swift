import CPKCS11

// Login calls (PKCS#11 2.40 section 5.6, 3.0 C_LoginUser): forwarded, and the login kept for
// replay in a forked child (Fork/Logins.swift).
extension Custom {
    static let C_Login: CK_C_Login = { hSession, userType, pPin, ulPinLen in
        let call = Call(.C_Login)
        guard let function = call.functions?.pointee.C_Login else { return call.unavailable() }
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        var rv = failure != CKR_OK ? failure : function(realSession, userType, pPin, ulPinLen)
        if let slot = Sessions.lookup(hSession)?.slot {
            rv = loggedIn(rv, slot: slot, userType: userType) {
                Logins.keep(slot: slot, userType: userType, pin: pPin, pinLength: ulPinLen)
            }
        }
        // A context-specific login belongs to the operation in progress: replayed with it.
        if rv == CKR_OK && userType == CKU_CONTEXT_SPECIFIC && Logins.replayEnabled {
            Operations.contextLogin(hSession, pin: pPin, length: ulPinLen)
        }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.user("user", userType)
            line.secret("pin", pPin)
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_LoginUser: CK_C_LoginUser = { hSession, userType, pPin, ulPinLen, pUsername, ulUsernameLen in
        let call = Call(.C_LoginUser)
        guard let function = call.functions?.pointee.C_LoginUser else { return call.unavailable() }
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        var rv = failure != CKR_OK ? failure : function(realSession, userType, pPin, ulPinLen, pUsername, ulUsernameLen)
        if let slot = Sessions.lookup(hSession)?.slot {
            rv = loggedIn(rv, slot: slot, userType: userType) {
                Logins.keep(slot: slot, userType: userType, pin: pPin, pinLength: ulPinLen,
                            username: pUsername, usernameLength: ulUsernameLen)
            }
        }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.user("user", userType)
            line.secret("pin", pPin)
            line.length("username", pUsername, ulUsernameLen)
            call.finish(rv, &line)
        }
        return rv
    }

    /// After a login: keep it for replay; in a child where p11fork already replayed the same
    /// login, the application's own login (the old rule) is answered CKR_OK.
    private static func loggedIn(_ rv: CK_RV, slot: CK_SLOT_ID, userType: CK_USER_TYPE, keep: () -> Void) -> CK_RV {
        // A context-specific login belongs to one operation, not to the token: not kept.
        guard userType == CKU_USER || userType == CKU_SO else { return rv }
        if rv == CKR_OK {
            keep()
            return rv
        }
        if rv == CKR_USER_ALREADY_LOGGED_IN, ForkDetection.generation > 0, Logins.state(slot) == .done(userType) {
            Trace.event(.fork, "C_Login in the child: already logged in as the parent was (replayed by p11fork): answered CKR_OK")
            return CK_RV(CKR_OK)
        }
        return rv
    }

    static let C_Logout: CK_C_Logout = { hSession in
        let call = Call(.C_Logout)
        var rv: CK_RV
        let slot = Sessions.view.lookupAnyEpoch(hSession)?.aux
        if Recovery.moduleInherited || (slot != nil && Sessions.isStale(hSession) && !loggedInHere(slot!)) {
            // A child logging out of what it inherited: only its own view changes; the parent
            // (and a server-side session it may share) is left alone.
            if let slot { Logins.forget(slots: [slot]) }
            rv = slot != nil ? CK_RV(CKR_OK) : Recovery.answerForUnknownSession
        } else if let function = call.functions?.pointee.C_Logout {
            var failure = CK_RV(CKR_OK)
            let realSession = Sessions.real(hSession, &failure)
            rv = failure != CKR_OK ? failure : function(realSession)
            if rv == CKR_OK, let slot { Logins.forget(slots: [slot]) }
        } else {
            return call.unavailable()
        }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            call.finish(rv, &line)
        }
        return rv
    }

    private static func loggedInHere(_ slot: CK_SLOT_ID) -> Bool {
        if case .done = Logins.state(slot) { return true }
        return false
    }

    /// What the generated C_SetPIN does once the PIN changed (`@ok` in codegen/pkcs11-functions.txt):
    /// the PIN of the logged-in user is now `pNewPin`, and a child must replay that one.
    static func pinChanged(_ hSession: CK_SESSION_HANDLE, _ pNewPin: UnsafeMutablePointer<CK_UTF8CHAR>?, _ ulNewLen: CK_ULONG) {
        if let slot = Sessions.lookup(hSession)?.slot { Logins.pinChanged(slot: slot, to: pNewPin, length: ulNewLen) }
    }
}
