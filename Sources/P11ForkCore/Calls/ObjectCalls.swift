import CPKCS11

// The search, which a child may have to continue (PKCS#11 2.40 section 5.7), and what the
// generated C_DestroyObject does afterwards. The calls that make or change objects are generated
// (`@created`, `@ok` in codegen/pkcs11-functions.txt; Replay/SessionObjects.swift).
extension Custom {
    /// What the generated C_DestroyObject does once the module destroyed the object (`@ok` in
    /// codegen/pkcs11-functions.txt): the handle, and what was kept to find or make it again, go.
    static func objectDestroyed(_ hObject: CK_OBJECT_HANDLE) {
        Objects.table.release(hObject)
        Records.forgetObject(hObject)
        SessionObjects.forget(hObject)
    }

    // MARK: searching (a search the parent began is continued in a child: Replay/OperationsReplay.swift)

    static let C_FindObjectsInit: CK_C_FindObjectsInit = { hSession, pTemplate, ulCount in
        let call = Call(.C_FindObjectsInit)
        guard let function = call.functions?.pointee.C_FindObjectsInit else { return call.unavailable() }
        SessionObjects.remakeAll()
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        let rv = failure != CKR_OK ? failure
            : Operations.searchQueued(hSession) ? CK_RV(CKR_OPERATION_ACTIVE) : function(realSession, pTemplate, ulCount)
        Operations.searchStarted(hSession, pTemplate, ulCount, rv)
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.template("template", pTemplate, ulCount, valuesShown: true)
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_FindObjects: CK_C_FindObjects = { hSession, phObject, ulMaxObjectCount, pulObjectCount in
        let call = Call(.C_FindObjects)
        guard let function = call.functions?.pointee.C_FindObjects else { return call.unavailable() }
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        var rv: CK_RV
        if failure != CKR_OK {
            rv = failure
        } else if let carried = Operations.nextFound(hSession, into: phObject, max: ulMaxObjectCount, count: pulObjectCount) {
            rv = carried
        } else {
            rv = function(realSession, phObject, ulMaxObjectCount, pulObjectCount)
            if rv == CKR_OK, let phObject, let pulObjectCount {
                for i in 0..<Int(min(pulObjectCount.pointee, ulMaxObjectCount)) {
                    phObject[i] = Objects.expose(real: phObject[i], session: hSession)
                }
            }
        }
        if rv == CKR_OK, let phObject, let pulObjectCount {
            Operations.noteFound(hSession, phObject, Int(min(pulObjectCount.pointee, ulMaxObjectCount)))
        } else if rv != CKR_OK {
            Operations.end(.find, hSession)
        }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.number("max", ulMaxObjectCount)
            line.key("found")
            if rv == CKR_OK, let phObject, let pulObjectCount {
                line.append(UInt8(ascii: "["))
                for i in 0..<Int(min(pulObjectCount.pointee, ulMaxObjectCount, 32)) {
                    if i > 0 { line.append(line.json ? "," : " ") }
                    line.symbol { $0.appendHex(phObject[i]) }
                }
                if pulObjectCount.pointee > 32 { line.append(line.json ? ",\"…\"" : " …") }
                line.append(UInt8(ascii: "]"))
            } else {
                line.null()
            }
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_FindObjectsFinal: CK_C_FindObjectsFinal = { hSession in
        let call = Call(.C_FindObjectsFinal)
        guard let function = call.functions?.pointee.C_FindObjectsFinal else { return call.unavailable() }
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        let rv = failure != CKR_OK ? failure : Operations.finishFound(hSession) ?? function(realSession)
        Operations.finished(.find, hSession, rv, lengthQuery: false)
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            call.finish(rv, &line)
        }
        return rv
    }
}
