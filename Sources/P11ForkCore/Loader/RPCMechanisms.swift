import CPKCS11
import Glibc

/// The hash-and-sign ECDSA mechanisms p11-kit's RPC client refuses, in a child whose module is
/// that client (the broker, or a helper): p11-kit 0.24 sends only the mechanisms on a list of its
/// own, which has `CKM_ECDSA` and `CKM_ECDSA_SHA1` but not `CKM_ECDSA_SHA224` … `CKM_ECDSA_SHA512`;
/// for those its `C_SignInit` answers `CKR_MECHANISM_INVALID` without asking the module. A
/// consumer that chose the mechanism from the module's list in the parent (pkcs11-provider, for
/// TLS with an EC key) then fails in every such child (docs/FORK.md "The broker").
///
/// When the client refuses one of them (no parameter), p11fork starts the operation with
/// `CKM_ECDSA` on the same key, hashes the data itself (SHA2) and has the module sign or verify
/// the digest in one `C_Sign` / `C_Verify`: the same signature (ECDSA over the hash), the same
/// answers, one round trip at the end instead of one per part. Interposed on p11fork's own copy
/// of the client's function list, below the handle translation: the sessions here are the
/// client's. Nothing changes where the client carries the mechanism (a newer p11-kit).
enum RPCMechanisms {
    private struct Translation {
        let verify: Bool
        var hasher: SHA2
    }

    /// Guards `translations` and `told`; held for no call into the module.
    nonisolated(unsafe) private static var lock = ForkSafeLock()
    nonisolated(unsafe) private static var translations: [CK_SESSION_HANDLE: Translation] = [:]
    /// The client's own functions.
    nonisolated(unsafe) private static var client = CK_FUNCTION_LIST_3_2()
    nonisolated(unsafe) private static var told: Set<CK_MECHANISM_TYPE> = []

    static func install() { lock = ForkDetection.register(ForkSafeLock()) }

    /// Puts the shims into `functions`, the copy of p11-kit's client list p11fork just loaded
    /// (before its C_Initialize). State from an earlier client (a parent's) is dropped. Called by
    /// a child's module recovery, while its other threads wait and the tree lock may be held:
    /// without the lock (no p11fork lock is taken under the tree lock; docs/DESIGN.md).
    static func interpose(_ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) {
        translations = [:]
        told = []
        client = functions.pointee
        functions.pointee.C_SignInit = signInit
        functions.pointee.C_Sign = sign
        functions.pointee.C_SignUpdate = signUpdate
        functions.pointee.C_SignFinal = signFinal
        functions.pointee.C_VerifyInit = verifyInit
        functions.pointee.C_Verify = verify
        functions.pointee.C_VerifyUpdate = verifyUpdate
        functions.pointee.C_VerifyFinal = verifyFinal
        functions.pointee.C_CloseSession = closeSession
        functions.pointee.C_CloseAllSessions = closeAllSessions
        functions.pointee.C_Finalize = finalize
    }

    static func hash(for mechanism: CK_MECHANISM_TYPE) -> SHA2.Variant? {
        switch mechanism {
        case CK_MECHANISM_TYPE(CKM_ECDSA_SHA224): .sha224
        case CK_MECHANISM_TYPE(CKM_ECDSA_SHA256): .sha256
        case CK_MECHANISM_TYPE(CKM_ECDSA_SHA384): .sha384
        case CK_MECHANISM_TYPE(CKM_ECDSA_SHA512): .sha512
        default: nil
        }
    }

    private static func translation(_ session: CK_SESSION_HANDLE, verify: Bool) -> Translation? {
        lock.withLock { translations[session].flatMap { $0.verify == verify ? $0 : nil } }
    }

    private static func end(_ session: CK_SESSION_HANDLE) {
        lock.withLock { translations[session] = nil }
    }

    /// Whether an answer ends the operation (PKCS#11 2.40 section 5.2: all but a length query
    /// and CKR_BUFFER_TOO_SMALL do).
    private static func ends(_ rv: CK_RV, output: UnsafeMutablePointer<CK_BYTE>?) -> Bool {
        !(rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && output == nil))
    }

    private static func start(verify: Bool, _ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                              _ key: CK_OBJECT_HANDLE) -> CK_RV {
        guard let original = verify ? client.C_VerifyInit : client.C_SignInit else { return CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
        end(session)
        let rv = original(session, mechanism, key)
        guard rv == CKR_MECHANISM_INVALID, let mechanism, mechanism.pointee.pParameter == nil, mechanism.pointee.ulParameterLen == 0,
              let variant = hash(for: mechanism.pointee.mechanism) else { return rv }
        var raw = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_ECDSA), pParameter: nil, ulParameterLen: 0)
        let rawRV = original(session, &raw, key)
        guard rawRV == CKR_OK else { return rawRV }
        let first = lock.withLock {
            translations[session] = Translation(verify: verify, hasher: SHA2(variant))
            return told.insert(mechanism.pointee.mechanism).inserted
        }
        if first {
            let name = mechanismName(mechanism.pointee.mechanism).map { "\($0)" } ?? "0x\(String(mechanism.pointee.mechanism, radix: 16))"
            Trace.event(.fork, "\(name) is not carried by p11-kit's RPC client: this process hashes the data (\(variant.name)) and the module signs or verifies the digest with CKM_ECDSA")
        }
        return rawRV
    }

    private static func digest(_ hasher: SHA2, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> [CK_BYTE] {
        var hasher = hasher
        hasher.update(UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : Int(length)))
        return hasher.finish()
    }

    private static func feed(verify: Bool, _ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> CK_RV? {
        lock.withLock {
            guard var translation = translations[session], translation.verify == verify else { return nil }
            guard part != nil || length == 0 else {
                translations[session] = nil
                return CK_RV(CKR_ARGUMENTS_BAD)
            }
            translation.hasher.update(UnsafeRawBufferPointer(start: part, count: Int(length)))
            translations[session] = translation
            return CK_RV(CKR_OK)
        }
    }

    private static let signInit: CK_C_SignInit = { session, mechanism, key in start(verify: false, session, mechanism, key) }
    private static let verifyInit: CK_C_VerifyInit = { session, mechanism, key in start(verify: true, session, mechanism, key) }

    private static let sign: CK_C_Sign = { session, data, dataLength, signature, signatureLength in
        guard let original = client.C_Sign else { return CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
        guard let translation = translation(session, verify: false) else { return original(session, data, dataLength, signature, signatureLength) }
        return signDigest(original, session, digest(SHA2(translation.hasher.variant), data, dataLength), signature, signatureLength)
    }

    /// The module signs the digest (`C_Sign` after its `C_SignInit` with CKM_ECDSA).
    private static func signDigest(_ original: CK_C_Sign, _ session: CK_SESSION_HANDLE, _ digest: [CK_BYTE],
                                   _ signature: UnsafeMutablePointer<CK_BYTE>?, _ signatureLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
        var hash = digest
        let rv = original(session, &hash, CK_ULONG(hash.count), signature, signatureLength)
        if ends(rv, output: signature) { end(session) }
        return rv
    }

    private static let signUpdate: CK_C_SignUpdate = { session, part, length in
        feed(verify: false, session, part, length) ?? (client.C_SignUpdate?(session, part, length) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED))
    }

    private static let signFinal: CK_C_SignFinal = { session, signature, signatureLength in
        guard let translation = translation(session, verify: false) else {
            return client.C_SignFinal?(session, signature, signatureLength) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
        }
        guard let original = client.C_Sign else { return CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
        return signDigest(original, session, translation.hasher.finish(), signature, signatureLength)
    }

    private static let verify: CK_C_Verify = { session, data, dataLength, signature, signatureLength in
        guard let original = client.C_Verify else { return CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
        guard let translation = translation(session, verify: true) else { return original(session, data, dataLength, signature, signatureLength) }
        return verifyDigest(original, session, digest(SHA2(translation.hasher.variant), data, dataLength), signature, signatureLength)
    }

    /// The module verifies the signature of the digest (`C_Verify` always ends the operation).
    private static func verifyDigest(_ original: CK_C_Verify, _ session: CK_SESSION_HANDLE, _ digest: [CK_BYTE],
                                     _ signature: UnsafeMutablePointer<CK_BYTE>?, _ signatureLength: CK_ULONG) -> CK_RV {
        end(session)
        var hash = digest
        return original(session, &hash, CK_ULONG(hash.count), signature, signatureLength)
    }

    private static let verifyUpdate: CK_C_VerifyUpdate = { session, part, length in
        feed(verify: true, session, part, length) ?? (client.C_VerifyUpdate?(session, part, length) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED))
    }

    private static let verifyFinal: CK_C_VerifyFinal = { session, signature, signatureLength in
        guard let translation = translation(session, verify: true) else {
            return client.C_VerifyFinal?(session, signature, signatureLength) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
        }
        guard let original = client.C_Verify else { return CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
        return verifyDigest(original, session, translation.hasher.finish(), signature, signatureLength)
    }

    private static let closeSession: CK_C_CloseSession = { session in
        end(session)
        return client.C_CloseSession?(session) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
    }

    /// Ends the translated operations of the slot's sessions (the client tells each one's slot).
    private static let closeAllSessions: CK_C_CloseAllSessions = { slot in
        let sessions = lock.withLock { Array(translations.keys) }
        for session in sessions {
            var info = CK_SESSION_INFO()
            let rv = client.C_GetSessionInfo?(session, &info) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
            if rv != CKR_OK || info.slotID == slot { end(session) }
        }
        return client.C_CloseAllSessions?(slot) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
    }

    private static let finalize: CK_C_Finalize = { reserved in
        lock.withLock { translations = [:] }
        return client.C_Finalize?(reserved) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
    }
}
