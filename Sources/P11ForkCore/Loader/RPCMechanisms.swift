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
    /// A session's signing or verifying operation (a session may have one of each).
    private struct Operation: Hashable {
        let session: CK_SESSION_HANDLE
        let verify: Bool
    }

    /// Guards `translations` and `told`; held for no call into the module.
    nonisolated(unsafe) private static var lock = ForkSafeLock()
    /// The translated operations, each with the hash of what it was given so far.
    nonisolated(unsafe) private static var translations: [Operation: SHA2] = [:]
    /// The client's own functions.
    nonisolated(unsafe) private static var client = CK_FUNCTION_LIST_3_2()
    nonisolated(unsafe) private static var told: Set<CK_MECHANISM_TYPE> = []

    /// At load: the lock, which Core.swift has registered with the fork handlers.
    static func install(lock registered: ForkSafeLock) { lock = registered }

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

    private static func translation(_ session: CK_SESSION_HANDLE, verify: Bool) -> SHA2? {
        lock.withLock { translations[Operation(session: session, verify: verify)] }
    }

    private static func end(_ session: CK_SESSION_HANDLE, verify: Bool) {
        lock.withLock { translations[Operation(session: session, verify: verify)] = nil }
    }

    /// Ends both of the session's operations (the session is closed).
    private static func endAll(_ session: CK_SESSION_HANDLE) {
        lock.withLock {
            translations[Operation(session: session, verify: false)] = nil
            translations[Operation(session: session, verify: true)] = nil
        }
    }

    /// Whether an answer ends the operation (PKCS#11 2.40 section 5.2: all but a length query
    /// and CKR_BUFFER_TOO_SMALL do).
    private static func ends(_ rv: CK_RV, output: UnsafeMutablePointer<CK_BYTE>?) -> Bool {
        !(rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && output == nil))
    }

    private static func start(verify: Bool, _ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                              _ key: CK_OBJECT_HANDLE) -> CK_RV {
        guard let original = verify ? client.C_VerifyInit : client.C_SignInit else { return CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
        let rv = original(session, mechanism, key)
        // Another operation started (or, with no mechanism, the one in progress cancelled): no
        // translation. A refusal (CKR_OPERATION_ACTIVE …) leaves the one in progress as it was.
        if rv == CKR_OK { end(session, verify: verify) }
        // Over the lane the mechanism reached the module, and a refusal is the module's own.
        guard rv == CKR_MECHANISM_INVALID, !Lane.isActive, let mechanism, mechanism.pointee.pParameter == nil, mechanism.pointee.ulParameterLen == 0,
              let variant = hash(for: mechanism.pointee.mechanism) else { return rv }
        var raw = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_ECDSA), pParameter: nil, ulParameterLen: 0)
        let rawRV = original(session, &raw, key)
        guard rawRV == CKR_OK else { return rawRV }
        let first = lock.withLock {
            translations[Operation(session: session, verify: verify)] = SHA2(variant)
            return told.insert(mechanism.pointee.mechanism).inserted
        }
        if first {
            let name = mechanismName(mechanism.pointee.mechanism).map { "\($0)" } ?? "0x\(String(mechanism.pointee.mechanism, radix: 16))"
            Trace.event(.fork, "\(name) is not carried by p11-kit's RPC client: this process hashes the data (\(variant.name)) and the module signs or verifies the digest with CKM_ECDSA")
        }
        return rawRV
    }

    /// The digest of one-part data; nil for a length without data (CKR_ARGUMENTS_BAD).
    private static func digest(_ variant: SHA2.Variant, _ data: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> [CK_BYTE]? {
        guard data != nil || length == 0 else { return nil }
        var hasher = SHA2(variant)
        hasher.update(UnsafeRawBufferPointer(start: data, count: Int(length)))
        return hasher.finish()
    }

    private static func feed(verify: Bool, _ session: CK_SESSION_HANDLE, _ part: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) -> CK_RV? {
        let operation = Operation(session: session, verify: verify)
        return lock.withLock {
            guard var hasher = translations[operation] else { return nil }
            guard part != nil || length == 0 else {
                translations[operation] = nil
                return CK_RV(CKR_ARGUMENTS_BAD)
            }
            hasher.update(UnsafeRawBufferPointer(start: part, count: Int(length)))
            translations[operation] = hasher
            return CK_RV(CKR_OK)
        }
    }

    private static let signInit: CK_C_SignInit = { session, mechanism, key in start(verify: false, session, mechanism, key) }
    private static let verifyInit: CK_C_VerifyInit = { session, mechanism, key in start(verify: true, session, mechanism, key) }

    private static let sign: CK_C_Sign = { session, data, dataLength, signature, signatureLength in
        guard let original = client.C_Sign else { return CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
        guard let hasher = translation(session, verify: false) else { return original(session, data, dataLength, signature, signatureLength) }
        return signDigest(original, session, digest(hasher.variant, data, dataLength), signature, signatureLength)
    }

    /// The module signs the digest (`C_Sign` after its `C_SignInit` with CKM_ECDSA).
    private static func signDigest(_ original: CK_C_Sign, _ session: CK_SESSION_HANDLE, _ digest: [CK_BYTE]?,
                                   _ signature: UnsafeMutablePointer<CK_BYTE>?, _ signatureLength: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
        guard var hash = digest else {
            end(session, verify: false)
            return CK_RV(CKR_ARGUMENTS_BAD)
        }
        let rv = original(session, &hash, CK_ULONG(hash.count), signature, signatureLength)
        if ends(rv, output: signature) { end(session, verify: false) }
        return rv
    }

    private static let signUpdate: CK_C_SignUpdate = { session, part, length in
        feed(verify: false, session, part, length) ?? (client.C_SignUpdate?(session, part, length) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED))
    }

    private static let signFinal: CK_C_SignFinal = { session, signature, signatureLength in
        guard let hasher = translation(session, verify: false) else {
            return client.C_SignFinal?(session, signature, signatureLength) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
        }
        guard let original = client.C_Sign else { return CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
        return signDigest(original, session, hasher.finish(), signature, signatureLength)
    }

    private static let verify: CK_C_Verify = { session, data, dataLength, signature, signatureLength in
        guard let original = client.C_Verify else { return CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
        guard let hasher = translation(session, verify: true) else { return original(session, data, dataLength, signature, signatureLength) }
        return verifyDigest(original, session, digest(hasher.variant, data, dataLength), signature, signatureLength)
    }

    /// The module verifies the signature of the digest (`C_Verify` always ends the operation).
    private static func verifyDigest(_ original: CK_C_Verify, _ session: CK_SESSION_HANDLE, _ digest: [CK_BYTE]?,
                                     _ signature: UnsafeMutablePointer<CK_BYTE>?, _ signatureLength: CK_ULONG) -> CK_RV {
        end(session, verify: true)
        guard var hash = digest else { return CK_RV(CKR_ARGUMENTS_BAD) }
        return original(session, &hash, CK_ULONG(hash.count), signature, signatureLength)
    }

    private static let verifyUpdate: CK_C_VerifyUpdate = { session, part, length in
        feed(verify: true, session, part, length) ?? (client.C_VerifyUpdate?(session, part, length) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED))
    }

    private static let verifyFinal: CK_C_VerifyFinal = { session, signature, signatureLength in
        guard let hasher = translation(session, verify: true) else {
            return client.C_VerifyFinal?(session, signature, signatureLength) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
        }
        guard let original = client.C_Verify else { return CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
        return verifyDigest(original, session, hasher.finish(), signature, signatureLength)
    }

    private static let closeSession: CK_C_CloseSession = { session in
        endAll(session)
        return client.C_CloseSession?(session) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
    }

    /// Ends the translated operations of the slot's sessions (the client tells each one's slot).
    private static let closeAllSessions: CK_C_CloseAllSessions = { slot in
        let sessions = Set(lock.withLock { translations.keys.map(\.session) })
        for session in sessions {
            var info = CK_SESSION_INFO()
            let rv = client.C_GetSessionInfo?(session, &info) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
            if rv != CKR_OK || info.slotID == slot { endAll(session) }
        }
        return client.C_CloseAllSessions?(slot) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
    }

    private static let finalize: CK_C_Finalize = { reserved in
        lock.withLock { translations = [:] }
        return client.C_Finalize?(reserved) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
    }
}
