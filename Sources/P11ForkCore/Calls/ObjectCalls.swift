import CPKCS11

// Object calls that hand out or take back object handles in ways a forwarder cannot express
// (PKCS#11 2.40 sections 5.7 and 5.14).
extension Custom {
    static let C_FindObjects: CK_C_FindObjects = { hSession, phObject, ulMaxObjectCount, pulObjectCount in
        let call = Call(.C_FindObjects)
        guard let function = Core.functions?.pointee.C_FindObjects else { return call.unavailable() }
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        let rv = failure != CKR_OK ? failure : function(realSession, phObject, ulMaxObjectCount, pulObjectCount)
        if rv == CKR_OK, let phObject, let pulObjectCount {
            for i in 0..<Int(min(pulObjectCount.pointee, ulMaxObjectCount)) {
                phObject[i] = Objects.expose(real: phObject[i], session: hSession)
            }
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

    static let C_DestroyObject: CK_C_DestroyObject = { hSession, hObject in
        let call = Call(.C_DestroyObject)
        guard let function = Core.functions?.pointee.C_DestroyObject else { return call.unavailable() }
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        let realObject = Objects.real(hObject, &failure)
        let rv = failure != CKR_OK ? failure : function(realSession, realObject)
        if rv == CKR_OK {
            Objects.table.release(hObject)
            Records.forgetObject(hObject)
        }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.object("object", hObject)
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_DeriveKey: CK_C_DeriveKey = { hSession, pMechanism, hBaseKey, pTemplate, ulAttributeCount, phKey in
        let call = Call(.C_DeriveKey)
        guard let function = Core.functions?.pointee.C_DeriveKey else { return call.unavailable() }
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        let realBaseKey = Objects.real(hBaseKey, &failure)
        let rv = failure != CKR_OK ? failure : MechanismHandles.withRealHandles(pMechanism) { mechanism in
            function(realSession, mechanism, realBaseKey, pTemplate, ulAttributeCount, phKey)
        }
        if rv == CKR_OK, let phKey { phKey.pointee = Objects.expose(real: phKey.pointee, session: hSession) }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.mechanism("mechanism", pMechanism)
            line.object("baseKey", hBaseKey)
            line.template("template", pTemplate, ulAttributeCount, valuesShown: true)
            line.newObject("key", phKey, rv)
            call.finish(rv, &line)
        }
        return rv
    }
}

/// Mechanism parameters that carry object handles must reach the real module with real ones.
enum MechanismHandles {
    static func withRealHandles(_ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                                _ body: (UnsafeMutablePointer<CK_MECHANISM>?) -> CK_RV) -> CK_RV {
        guard let mechanism else { return body(nil) }
        switch mechanism.pointee.mechanism {
        case CK_MECHANISM_TYPE(CKM_CONCATENATE_BASE_AND_KEY):
            // The parameter is the handle of the key to append (PKCS#11 2.40 current mechanisms 2.43.2).
            guard let parameter = mechanism.pointee.pParameter,
                  mechanism.pointee.ulParameterLen == CK_ULONG(MemoryLayout<CK_OBJECT_HANDLE>.size)
            else { return body(mechanism) }
            var failure = CK_RV(CKR_OK)
            var realKey = Objects.real(parameter.loadUnaligned(as: CK_OBJECT_HANDLE.self), &failure)
            return withUnsafeMutableBytes(of: &realKey) { bytes in
                var copy = mechanism.pointee
                copy.pParameter = bytes.baseAddress
                return body(&copy)
            }
        case CK_MECHANISM_TYPE(CKM_ECMQV_DERIVE), CK_MECHANISM_TYPE(CKM_X9_42_DH_HYBRID_DERIVE),
             CK_MECHANISM_TYPE(CKM_X9_42_MQV_DERIVE), CK_MECHANISM_TYPE(CKM_SSL3_KEY_AND_MAC_DERIVE),
             CK_MECHANISM_TYPE(CKM_TLS_KEY_AND_MAC_DERIVE):
            Trace.event(.error, "\(mechanismName(mechanism.pointee.mechanism).map { "\($0)" } ?? "mechanism") carries object handles in its parameter, which p11fork does not translate yet: the module will see p11fork's virtual handles")
            return body(mechanism)
        default:
            return body(mechanism)
        }
    }
}
