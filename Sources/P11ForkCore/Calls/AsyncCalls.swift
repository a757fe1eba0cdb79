import CPKCS11
import Glibc

// The asynchronous-operation calls of PKCS#11 3.2 (section 5.21): forwarded with the real
// session, and answered by p11fork in a child for an operation its parent began
// (Replay/AsyncOperations.swift).
extension Custom {
    static let C_AsyncComplete: CK_C_AsyncComplete = { hSession, pFunctionName, pResult in
        let call = Call(.C_AsyncComplete)
        guard let function = call.functions?.pointee.C_AsyncComplete else { return call.unavailable() }
        let name = functionName(pFunctionName)
        let rv = asking("C_AsyncComplete", hSession, name) { realSession in
            let rv = function(realSession, pFunctionName, pResult)
            // The result's object handles are the module's: made the application's like any new object.
            if rv == CKR_OK, let pResult {
                for handle in [\CK_ASYNC_DATA.hObject, \CK_ASYNC_DATA.hAdditionalObject] where pResult.pointee[keyPath: handle] != 0 {
                    pResult.pointee[keyPath: handle] = Objects.expose(real: pResult.pointee[keyPath: handle], session: hSession)
                }
            }
            if let name { AsyncOperations.completed(name, hSession, rv) }
            return rv
        }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.functionName(pFunctionName)
            line.pointer("result", pResult)
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_AsyncGetID: CK_C_AsyncGetID = { hSession, pFunctionName, pulID in
        let call = Call(.C_AsyncGetID)
        guard let function = call.functions?.pointee.C_AsyncGetID else { return call.unavailable() }
        let name = functionName(pFunctionName)
        let rv = asking("C_AsyncGetID", hSession, name) { realSession in
            let rv = function(realSession, pFunctionName, pulID)
            if rv == CKR_OK, let name, let pulID { AsyncOperations.identified(name, hSession, pulID.pointee) }
            return rv
        }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.functionName(pFunctionName)
            line.key("id")
            if rv == CKR_OK, let pulID { line.symbol { $0.appendDecimal(UInt(pulID.pointee)) } } else { line.null() }
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_AsyncJoin: CK_C_AsyncJoin = { hSession, pFunctionName, ulID, pData, ulData in
        let call = Call(.C_AsyncJoin)
        guard let function = call.functions?.pointee.C_AsyncJoin else { return call.unavailable() }
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        let rv: CK_RV
        if failure != CKR_OK {
            rv = failure
        } else if let parents = AsyncOperations.inherited(id: ulID) {
            rv = AsyncOperations.refused("C_AsyncJoin", functionName(pFunctionName) ?? parents, hSession, CK_RV(CKR_SAVED_STATE_INVALID))
        } else {
            rv = function(realSession, pFunctionName, ulID, pData, ulData)
            if let name = functionName(pFunctionName) { AsyncOperations.completed(name, hSession, rv == CKR_OK ? CK_RV(CKR_PENDING) : rv) }
        }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.functionName(pFunctionName)
            line.number("id", ulID)
            line.length("data", pData, ulData)
            call.finish(rv, &line)
        }
        return rv
    }

    /// C_AsyncComplete and C_AsyncGetID: the session made real; about an operation the parent
    /// began, CKR_OPERATION_NOT_INITIALIZED without asking the module; else `forward`.
    private static func asking(_ function: String, _ hSession: CK_SESSION_HANDLE, _ name: String?,
                               forward: (CK_SESSION_HANDLE) -> CK_RV) -> CK_RV {
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        if failure != CKR_OK { return failure }
        if let name, AsyncOperations.inherited(hSession, name) != nil {
            return AsyncOperations.refused(function, name, hSession, CK_RV(CKR_OPERATION_NOT_INITIALIZED))
        }
        return forward(realSession)
    }

    /// The function a C_Async* call names (a NUL-terminated UTF-8 string), or nil.
    private static func functionName(_ pointer: UnsafeMutablePointer<CK_UTF8CHAR>?) -> String? {
        pointer.map { String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self)) }
    }
}

extension TraceLine {
    /// The function name a C_Async* call names, quoted (at most 64 bytes of it).
    mutating func functionName(_ pointer: UnsafeMutablePointer<CK_UTF8CHAR>?) {
        key("function")
        guard let pointer else { return null() }
        appendQuoted(UnsafeRawBufferPointer(start: pointer, count: min(64, strlen(UnsafeRawPointer(pointer).assumingMemoryBound(to: CChar.self)))))
    }
}
