import CPKCS11

// Key management calls (PKCS#11 2.40 section 5.14; 3.2 adds authenticated unwrapping and key
// encapsulation): they make new objects, which a child can make again when they are session
// objects made by a replayable call (Replay/SessionObjects.swift).
extension Custom {
    static let C_GenerateKey: CK_C_GenerateKey = { hSession, pMechanism, pTemplate, ulCount, phKey in
        let call = Call(.C_GenerateKey)
        guard let function = call.functions?.pointee.C_GenerateKey else { return call.unavailable() }
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        let rv = failure != CKR_OK ? failure : function(realSession, pMechanism, pTemplate, ulCount, phKey)
        if rv == CKR_OK, let phKey {
            phKey.pointee = Objects.expose(real: phKey.pointee, session: hSession)
            SessionObjects.generated(phKey.pointee, session: hSession, by: "C_GenerateKey")
        }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.mechanism("mechanism", pMechanism)
            line.template("template", pTemplate, ulCount, valuesShown: true)
            line.newObject("key", phKey, rv)
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_GenerateKeyPair: CK_C_GenerateKeyPair = { hSession, pMechanism, pPublicKeyTemplate, ulPublicKeyAttributeCount,
                                                          pPrivateKeyTemplate, ulPrivateKeyAttributeCount, phPublicKey, phPrivateKey in
        let call = Call(.C_GenerateKeyPair)
        guard let function = call.functions?.pointee.C_GenerateKeyPair else { return call.unavailable() }
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        let rv = failure != CKR_OK ? failure
            : function(realSession, pMechanism, pPublicKeyTemplate, ulPublicKeyAttributeCount, pPrivateKeyTemplate,
                       ulPrivateKeyAttributeCount, phPublicKey, phPrivateKey)
        if rv == CKR_OK {
            for out in [phPublicKey, phPrivateKey] {
                guard let out else { continue }
                out.pointee = Objects.expose(real: out.pointee, session: hSession)
                SessionObjects.generated(out.pointee, session: hSession, by: "C_GenerateKeyPair")
            }
        }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.mechanism("mechanism", pMechanism)
            line.template("publicKeyTemplate", pPublicKeyTemplate, ulPublicKeyAttributeCount, valuesShown: true)
            line.template("privateKeyTemplate", pPrivateKeyTemplate, ulPrivateKeyAttributeCount, valuesShown: true)
            line.newObject("publicKey", phPublicKey, rv)
            line.newObject("privateKey", phPrivateKey, rv)
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_UnwrapKey: CK_C_UnwrapKey = { hSession, pMechanism, hUnwrappingKey, pWrappedKey, ulWrappedKeyLen, pTemplate, ulAttributeCount, phKey in
        let call = Call(.C_UnwrapKey)
        guard let function = call.functions?.pointee.C_UnwrapKey else { return call.unavailable() }
        let rv = keyFromKey(.C_UnwrapKey, hSession, pMechanism, hUnwrappingKey, phKey) {
            SessionObjects.unwrapped($0, session: hSession, pMechanism, key: hUnwrappingKey, wrapped: pWrappedKey,
                                     ulWrappedKeyLen, pTemplate, ulAttributeCount)
        } call: { session, mechanism, key in
            function(session, mechanism, key, pWrappedKey, ulWrappedKeyLen, pTemplate, ulAttributeCount, phKey)
        }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.mechanism("mechanism", pMechanism)
            line.object("unwrappingKey", hUnwrappingKey)
            line.length("wrappedKey", pWrappedKey, ulWrappedKeyLen)
            line.template("template", pTemplate, ulAttributeCount, valuesShown: true)
            line.newObject("key", phKey, rv)
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_DeriveKey: CK_C_DeriveKey = { hSession, pMechanism, hBaseKey, pTemplate, ulAttributeCount, phKey in
        let call = Call(.C_DeriveKey)
        guard let function = call.functions?.pointee.C_DeriveKey else { return call.unavailable() }
        let rv = keyFromKey(.C_DeriveKey, hSession, pMechanism, hBaseKey, phKey) {
            SessionObjects.derived($0, session: hSession, pMechanism, base: hBaseKey, pTemplate, ulAttributeCount)
        } call: { session, mechanism, key in
            function(session, mechanism, key, pTemplate, ulAttributeCount, phKey)
        }
        if call.isTraced {
            var line = call.line()
            line.keyCall(hSession, pMechanism, "baseKey", hBaseKey, pTemplate, ulAttributeCount)
            line.newObject("key", phKey, rv)
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_UnwrapKeyAuthenticated: CK_C_UnwrapKeyAuthenticated = { hSession, pMechanism, hUnwrappingKey, pWrappedKey, ulWrappedKeyLen,
                                                                        pTemplate, ulAttributeCount, pAssociatedData, ulAssociatedDataLen, phKey in
        let call = Call(.C_UnwrapKeyAuthenticated)
        guard let function = call.functions?.pointee.C_UnwrapKeyAuthenticated else { return call.unavailable() }
        let rv = keyFromKey(.C_UnwrapKeyAuthenticated, hSession, pMechanism, hUnwrappingKey, phKey) {
            SessionObjects.unwrappedAuthenticated($0, session: hSession, pMechanism, key: hUnwrappingKey, wrapped: pWrappedKey,
                                                  ulWrappedKeyLen, pTemplate, ulAttributeCount, associated: pAssociatedData, ulAssociatedDataLen)
        } call: { session, mechanism, key in
            function(session, mechanism, key, pWrappedKey, ulWrappedKeyLen, pTemplate, ulAttributeCount, pAssociatedData, ulAssociatedDataLen, phKey)
        }
        if call.isTraced {
            var line = call.line()
            line.session("session", hSession)
            line.mechanism("mechanism", pMechanism)
            line.object("unwrappingKey", hUnwrappingKey)
            line.length("wrappedKey", pWrappedKey, ulWrappedKeyLen)
            line.template("template", pTemplate, ulAttributeCount, valuesShown: true)
            line.length("associatedData", pAssociatedData, ulAssociatedDataLen)
            line.newObject("key", phKey, rv)
            call.finish(rv, &line)
        }
        return rv
    }

    /// The new key holds a secret the module drew at random: a child cannot make it again
    /// (reported lost there). The ciphertext is traced as lengths only.
    static let C_EncapsulateKey: CK_C_EncapsulateKey = { hSession, pMechanism, hPublicKey, pTemplate, ulAttributeCount,
                                                        pCiphertext, pulCiphertextLen, phKey in
        let call = Call(.C_EncapsulateKey)
        let ciphertextLengthIn = call.isTraced ? pulCiphertextLen?.pointee : nil
        guard let function = call.functions?.pointee.C_EncapsulateKey else { return call.unavailable() }
        // A length query (NULL ciphertext) makes no key.
        let rv = keyFromKey(.C_EncapsulateKey, hSession, pMechanism, hPublicKey, pCiphertext != nil ? phKey : nil) {
            SessionObjects.generated($0, session: hSession, by: "C_EncapsulateKey")
        } call: { session, mechanism, key in
            function(session, mechanism, key, pTemplate, ulAttributeCount, pCiphertext, pulCiphertextLen, phKey)
        }
        if call.isTraced {
            var line = call.line()
            line.keyCall(hSession, pMechanism, "publicKey", hPublicKey, pTemplate, ulAttributeCount)
            line.output("ciphertext", pCiphertext, in: ciphertextLengthIn, out: pulCiphertextLen, rv)
            line.newObject("key", pCiphertext != nil ? phKey : nil, rv)
            call.finish(rv, &line)
        }
        return rv
    }

    /// The same private key and ciphertext give the same key: a child makes it again.
    static let C_DecapsulateKey: CK_C_DecapsulateKey = { hSession, pMechanism, hPrivateKey, pTemplate, ulAttributeCount,
                                                        pCiphertext, ulCiphertextLen, phKey in
        let call = Call(.C_DecapsulateKey)
        guard let function = call.functions?.pointee.C_DecapsulateKey else { return call.unavailable() }
        let rv = keyFromKey(.C_DecapsulateKey, hSession, pMechanism, hPrivateKey, phKey) {
            SessionObjects.decapsulated($0, session: hSession, pMechanism, key: hPrivateKey, pTemplate, ulAttributeCount,
                                        ciphertext: pCiphertext, ulCiphertextLen)
        } call: { session, mechanism, key in
            function(session, mechanism, key, pTemplate, ulAttributeCount, pCiphertext, ulCiphertextLen, phKey)
        }
        if call.isTraced {
            var line = call.line()
            line.keyCall(hSession, pMechanism, "privateKey", hPrivateKey, pTemplate, ulAttributeCount)
            line.length("ciphertext", pCiphertext, ulCiphertextLen)
            line.newObject("key", phKey, rv)
            call.finish(rv, &line)
        }
        return rv
    }

    /// What the calls that make a key with a mechanism and another key share (C_UnwrapKey,
    /// C_DeriveKey; 3.2's C_UnwrapKeyAuthenticated, C_EncapsulateKey, C_DecapsulateKey): the
    /// session, the key and handles in the mechanism parameter made real for `call`; the new key
    /// (when `phKey` is given) exposed and handed to `record`; a CKR_PENDING noted.
    private static func keyFromKey(_ function: Function, _ hSession: CK_SESSION_HANDLE, _ pMechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                                   _ hKey: CK_OBJECT_HANDLE, _ phKey: UnsafeMutablePointer<CK_OBJECT_HANDLE>?,
                                   record: (CK_OBJECT_HANDLE) -> Void,
                                   call: (CK_SESSION_HANDLE, UnsafeMutablePointer<CK_MECHANISM>?, CK_OBJECT_HANDLE) -> CK_RV) -> CK_RV {
        var failure = CK_RV(CKR_OK)
        let realSession = Sessions.real(hSession, &failure)
        let realKey = Objects.real(hKey, &failure)
        let rv = failure != CKR_OK ? failure : MechanismHandles.withRealHandles(pMechanism) { call(realSession, $0, realKey) }
        if rv == CKR_OK, let phKey {
            phKey.pointee = Objects.expose(real: phKey.pointee, session: hSession)
            record(phKey.pointee)
        }
        AsyncOperations.noted(function, hSession, rv)
        return rv
    }
}

extension TraceLine {
    /// How C_DeriveKey, C_EncapsulateKey and C_DecapsulateKey begin their line: the session, the
    /// mechanism, the key they use (named `keyName`), the new key's template.
    mutating func keyCall(_ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?, _ keyName: StaticString,
                          _ key: CK_OBJECT_HANDLE, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG) {
        self.session("session", session)
        self.mechanism("mechanism", mechanism)
        object(keyName, key)
        self.template("template", template, count, valuesShown: true)
    }
}
