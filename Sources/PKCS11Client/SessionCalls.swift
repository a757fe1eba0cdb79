import CPKCS11

// Session management functions (PKCS#11 v2.40 section 5.6).
extension Module {
    /// `C_OpenSession` without notification callback. `flags` usually holds CKF_SERIAL_SESSION.
    public func openSession(_ slot: CK_SLOT_ID, flags: CK_FLAGS) -> (rv: CK_RV, session: CK_SESSION_HANDLE) {
        var session: CK_SESSION_HANDLE = 0
        let rv = entry(\.C_OpenSession, "C_OpenSession")(slot, flags, nil, nil, &session)
        return (rv, session)
    }

    public func closeSession(_ session: CK_SESSION_HANDLE) -> CK_RV {
        entry(\.C_CloseSession, "C_CloseSession")(session)
    }

    public func closeAllSessions(_ slot: CK_SLOT_ID) -> CK_RV {
        entry(\.C_CloseAllSessions, "C_CloseAllSessions")(slot)
    }

    public func sessionInfo(_ session: CK_SESSION_HANDLE) -> (rv: CK_RV, info: CK_SESSION_INFO) {
        var info = CK_SESSION_INFO()
        let rv = entry(\.C_GetSessionInfo, "C_GetSessionInfo")(session, &info)
        return (rv, info)
    }

    /// `C_Login` with a PIN (nil: a NULL PIN, for a protected authentication path).
    public func login(_ session: CK_SESSION_HANDLE, userType: CK_USER_TYPE = CK_USER_TYPE(CKU_USER), pin: String?) -> CK_RV {
        let function = entry(\.C_Login, "C_Login")
        guard let pin else { return function(session, userType, nil, 0) }
        return withInput(Array(pin.utf8)) { function(session, userType, $0, $1) }
    }

    public func logout(_ session: CK_SESSION_HANDLE) -> CK_RV {
        entry(\.C_Logout, "C_Logout")(session)
    }
}
