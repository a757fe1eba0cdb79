import CPKCS11

// Encryption, decryption, message digesting, signing and verifying
// (PKCS#11 v2.40 sections 5.8 to 5.11). Each `…Init` is separate so its return code can be
// compared on its own; the outputs follow `OutputSpace`.
extension Module {
    public func encryptInit(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, _ key: CK_OBJECT_HANDLE) -> CK_RV {
        withMechanism(mechanism) { entry(\.C_EncryptInit, "C_EncryptInit")(session, $0, key) }
    }

    public func encrypt(_ session: CK_SESSION_HANDLE, _ data: [UInt8], _ space: OutputSpace = .fit) -> Output {
        let function = entry(\.C_Encrypt, "C_Encrypt")
        return withInput(data) { input, inputLength in produce(space) { function(session, input, inputLength, $0, $1) } }
    }

    public func encryptUpdate(_ session: CK_SESSION_HANDLE, _ part: [UInt8], _ space: OutputSpace = .fit) -> Output {
        let function = entry(\.C_EncryptUpdate, "C_EncryptUpdate")
        return withInput(part) { input, inputLength in produce(space) { function(session, input, inputLength, $0, $1) } }
    }

    public func encryptFinal(_ session: CK_SESSION_HANDLE, _ space: OutputSpace = .fit) -> Output {
        let function = entry(\.C_EncryptFinal, "C_EncryptFinal")
        return produce(space) { function(session, $0, $1) }
    }

    public func decryptInit(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, _ key: CK_OBJECT_HANDLE) -> CK_RV {
        withMechanism(mechanism) { entry(\.C_DecryptInit, "C_DecryptInit")(session, $0, key) }
    }

    public func decrypt(_ session: CK_SESSION_HANDLE, _ data: [UInt8], _ space: OutputSpace = .fit) -> Output {
        let function = entry(\.C_Decrypt, "C_Decrypt")
        return withInput(data) { input, inputLength in produce(space) { function(session, input, inputLength, $0, $1) } }
    }

    public func decryptUpdate(_ session: CK_SESSION_HANDLE, _ part: [UInt8], _ space: OutputSpace = .fit) -> Output {
        let function = entry(\.C_DecryptUpdate, "C_DecryptUpdate")
        return withInput(part) { input, inputLength in produce(space) { function(session, input, inputLength, $0, $1) } }
    }

    public func decryptFinal(_ session: CK_SESSION_HANDLE, _ space: OutputSpace = .fit) -> Output {
        let function = entry(\.C_DecryptFinal, "C_DecryptFinal")
        return produce(space) { function(session, $0, $1) }
    }

    public func digestInit(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism) -> CK_RV {
        withMechanism(mechanism) { entry(\.C_DigestInit, "C_DigestInit")(session, $0) }
    }

    public func digest(_ session: CK_SESSION_HANDLE, _ data: [UInt8], _ space: OutputSpace = .fit) -> Output {
        let function = entry(\.C_Digest, "C_Digest")
        return withInput(data) { input, inputLength in produce(space) { function(session, input, inputLength, $0, $1) } }
    }

    public func digestUpdate(_ session: CK_SESSION_HANDLE, _ part: [UInt8]) -> CK_RV {
        withInput(part) { entry(\.C_DigestUpdate, "C_DigestUpdate")(session, $0, $1) }
    }

    public func digestKey(_ session: CK_SESSION_HANDLE, _ key: CK_OBJECT_HANDLE) -> CK_RV {
        entry(\.C_DigestKey, "C_DigestKey")(session, key)
    }

    public func digestFinal(_ session: CK_SESSION_HANDLE, _ space: OutputSpace = .fit) -> Output {
        let function = entry(\.C_DigestFinal, "C_DigestFinal")
        return produce(space) { function(session, $0, $1) }
    }

    public func signInit(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, _ key: CK_OBJECT_HANDLE) -> CK_RV {
        withMechanism(mechanism) { entry(\.C_SignInit, "C_SignInit")(session, $0, key) }
    }

    public func sign(_ session: CK_SESSION_HANDLE, _ data: [UInt8], _ space: OutputSpace = .fit) -> Output {
        let function = entry(\.C_Sign, "C_Sign")
        return withInput(data) { input, inputLength in produce(space) { function(session, input, inputLength, $0, $1) } }
    }

    public func signUpdate(_ session: CK_SESSION_HANDLE, _ part: [UInt8]) -> CK_RV {
        withInput(part) { entry(\.C_SignUpdate, "C_SignUpdate")(session, $0, $1) }
    }

    public func signFinal(_ session: CK_SESSION_HANDLE, _ space: OutputSpace = .fit) -> Output {
        let function = entry(\.C_SignFinal, "C_SignFinal")
        return produce(space) { function(session, $0, $1) }
    }

    public func verifyInit(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, _ key: CK_OBJECT_HANDLE) -> CK_RV {
        withMechanism(mechanism) { entry(\.C_VerifyInit, "C_VerifyInit")(session, $0, key) }
    }

    public func verify(_ session: CK_SESSION_HANDLE, _ data: [UInt8], signature: [UInt8]) -> CK_RV {
        let function = entry(\.C_Verify, "C_Verify")
        return withInput(data) { input, inputLength in
            withInput(signature) { function(session, input, inputLength, $0, $1) }
        }
    }

    public func verifyUpdate(_ session: CK_SESSION_HANDLE, _ part: [UInt8]) -> CK_RV {
        withInput(part) { entry(\.C_VerifyUpdate, "C_VerifyUpdate")(session, $0, $1) }
    }

    public func verifyFinal(_ session: CK_SESSION_HANDLE, signature: [UInt8]) -> CK_RV {
        withInput(signature) { entry(\.C_VerifyFinal, "C_VerifyFinal")(session, $0, $1) }
    }
}
