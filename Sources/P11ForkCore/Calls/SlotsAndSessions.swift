import CPKCS11

// Slot and session management (PKCS#11 2.40 sections 5.5 and 5.6): the calls that hand out or
// take back slot IDs and session handles, so they cannot be plain forwarders.
extension Custom {
    static let C_GetSlotList: CK_C_GetSlotList = { tokenPresent, pSlotList, pulCount in
        let call = Call(.C_GetSlotList)
        let countIn = call.isTraced ? pulCount?.pointee : nil
        guard let function = call.functions?.pointee.C_GetSlotList else { return call.unavailable() }
        let rv = function(tokenPresent, pSlotList, pulCount)
        if rv == CKR_OK, let pSlotList, let pulCount {
            if Slots.translating {
                for i in 0..<Int(pulCount.pointee) { pSlotList[i] = Slots.expose(real: pSlotList[i]) }
            }
            Records.noteSlots(UnsafeBufferPointer(start: pSlotList, count: Int(pulCount.pointee)))
        }
        if call.isTraced {
            var line = call.line()
            line.key("tokenPresent")
            line.append(tokenPresent != 0 ? "true" : "false")
            line.output("slots", pSlotList, in: countIn, out: pulCount, rv)
            call.finish(rv, &line)
        }
        return rv
    }

    /// What the generated C_GetTokenInfo does with an answer (`@ok` in codegen/pkcs11-functions.txt):
    /// the token's identity is how a child finds this slot again.
    static func tokenNoted(_ slotID: CK_SLOT_ID, _ pInfo: UnsafeMutablePointer<CK_TOKEN_INFO>?) {
        if let pInfo { Records.noteToken(slotID, TokenIdentity(pInfo.pointee)) }
    }

    static let C_WaitForSlotEvent: CK_C_WaitForSlotEvent = { flags, pSlot, pReserved in
        let call = Call(.C_WaitForSlotEvent)
        guard let function = call.functions?.pointee.C_WaitForSlotEvent else { return call.unavailable() }
        let rv = function(flags, pSlot, pReserved)
        if rv == CKR_OK, let pSlot { pSlot.pointee = Slots.expose(real: pSlot.pointee) }
        if call.isTraced {
            var line = call.line()
            line.flags("flags", flags, names: CK_FLAGS.waitFlagNames)
            line.key("slot")
            if let pSlot, rv == CKR_OK { line.symbol { $0.appendHex(pSlot.pointee) } } else { line.null() }
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_OpenSession: CK_C_OpenSession = { slotID, flags, pApplication, Notify, phSession in
        let call = Call(.C_OpenSession)
        guard let function = call.functions?.pointee.C_OpenSession else { return call.unavailable() }
        // A notification callback must see the application's session handle: it goes through a relay.
        let relay = Notify.map { SessionNotifications.Relay(notify: $0, application: pApplication) }
        var failure = CK_RV(CKR_OK)
        let realSlot = Slots.real(slotID, &failure)
        var rv: CK_RV
        if failure != CKR_OK {
            rv = failure
        } else if let relay {
            rv = function(realSlot, flags, Unmanaged.passUnretained(relay).toOpaque(),
                          SessionNotifications.trampoline, phSession)
        } else {
            rv = function(realSlot, flags, pApplication, nil, phSession)
        }
        if rv == CKR_OK, let phSession {
            if let exposed = Sessions.table.issue(real: phSession.pointee, epoch: Core.epoch, aux: slotID) {
                if let relay { SessionNotifications.keep(relay, for: exposed) }
                Records.noteSession(exposed, slot: slotID, flags: flags)
                if Records.token(slotID) == nil, let identity = TokenIdentity.read(Core.functions!, slot: realSlot) {
                    Records.noteToken(slotID, identity)
                }
                phSession.pointee = exposed
            } else {
                // Cannot happen before 16 million sessions are open at once; give the session back.
                _ = Core.functions?.pointee.C_CloseSession?(phSession.pointee)
                Trace.event(.error, "session handle table full: C_OpenSession refused")
                rv = CK_RV(CKR_SESSION_COUNT)
            }
        }
        if call.isTraced {
            var line = call.line()
            line.slot("slot", slotID)
            line.flags("flags", flags, names: CK_FLAGS.sessionFlagNames)
            line.key("notify")
            line.symbol { $0.append(Notify != nil ? "yes" : "no") }
            line.key("session")
            if let phSession, rv == CKR_OK { line.symbol { $0.appendHex(phSession.pointee) } } else { line.null() }
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_CloseSession: CK_C_CloseSession = { hSession in
        let call = Call(.C_CloseSession)
        var rv: CK_RV
        if Recovery.moduleInherited || Sessions.isStale(hSession) {
            // A child closing an inherited session it never used: p11fork forgets it; the
            // parent's session (maybe shared with a server) is left alone.
            rv = Sessions.table.release(hSession) ? CK_RV(CKR_OK) : Recovery.answerForUnknownSession
            if rv == CKR_OK { sessionsClosed([hSession]) }
        } else if let function = call.functions?.pointee.C_CloseSession {
            var failure = CK_RV(CKR_OK)
            let realSession = Sessions.real(hSession, &failure)
            rv = failure != CKR_OK ? failure : function(realSession)
            if rv == CKR_OK {
                Sessions.table.release(hSession)
                sessionsClosed([hSession])
            }
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

    static let C_CloseAllSessions: CK_C_CloseAllSessions = { slotID in
        let call = Call(.C_CloseAllSessions)
        var rv: CK_RV
        if Recovery.moduleInherited {
            let known = Records.knowsSlot(slotID)
            rv = known ? CK_RV(CKR_OK) : (Core.appInitialized ? CK_RV(CKR_SLOT_ID_INVALID) : CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED))
        } else if let function = call.functions?.pointee.C_CloseAllSessions {
            // In a child this reaches only the child's own module and sessions.
            var failure = CK_RV(CKR_OK)
            let realSlot = Slots.real(slotID, &failure)
            rv = failure != CKR_OK ? failure : function(realSlot)
        } else {
            return call.unavailable()
        }
        if rv == CKR_OK { sessionsClosed(Sessions.table.releaseAll { _, slot in slot == slotID }) }
        if call.isTraced {
            var line = call.line()
            line.slot("slot", slotID)
            call.finish(rv, &line)
        }
        return rv
    }

    /// Sessions are gone: forget them, and the login of a token whose last session closed
    /// (PKCS#11 logs the application out then).
    private static func sessionsClosed(_ sessions: [CK_SESSION_HANDLE]) {
        for session in sessions { SessionNotifications.forget(session) }
        Logins.forget(slots: Records.forgetSessions(sessions))
    }

    static let C_GetSessionInfo: CK_C_GetSessionInfo = { hSession, pInfo in
        let call = Call(.C_GetSessionInfo)
        guard let function = call.functions?.pointee.C_GetSessionInfo else { return call.unavailable() }
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        let rv = failure != CKR_OK ? failure : function(realSession, pInfo)
        // The module reports its own slot ID: in a translating child, the application knows another.
        if rv == CKR_OK, Slots.translating { applicationSlot(hSession, pInfo) }
        if call.isTraced { traceSessionInfo(call, hSession, pInfo, rv) }
        return rv
    }

    @inline(never)
    private static func applicationSlot(_ hSession: CK_SESSION_HANDLE, _ pInfo: UnsafeMutablePointer<CK_SESSION_INFO>?) {
        if let pInfo, let slot = Sessions.lookup(hSession)?.slot { pInfo.pointee.slotID = slot }
    }

    /// Out of line, so that the call's own frame stays small on the untraced path.
    @inline(never)
    private static func traceSessionInfo(_ call: borrowing Call, _ hSession: CK_SESSION_HANDLE, _ pInfo: UnsafeMutablePointer<CK_SESSION_INFO>?, _ rv: CK_RV) {
        var line = call.line()
        line.session("session", hSession)
        if rv == CKR_OK, let pInfo {
            line.key("state")
            line.name(sessionStateName(pInfo.pointee.state), orHex: pInfo.pointee.state)
            line.flags("flags", pInfo.pointee.flags, names: CK_FLAGS.sessionFlagNames)
        } else {
            line.pointer("info", pInfo)
        }
        call.finish(rv, &line)
    }
}
