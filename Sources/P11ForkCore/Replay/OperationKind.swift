import CPKCS11

/// The kinds of operation one session can have in progress at the same time.
enum OperationKind: Int, CaseIterable {
    case encrypt, decrypt, digest, sign, verify, signRecover, verifyRecover, find
    case messageEncrypt, messageDecrypt, messageSign, messageVerify
    /// PKCS#11 3.2: a verification given its signature at C_VerifySignatureInit.
    case verifySignature

    /// In the session's state word: the operation is in progress...
    @inline(__always) var active: UInt { 1 << UInt(rawValue) }
    /// ... and what is fed to it is being kept.
    @inline(__always) var recording: UInt { 1 << UInt(rawValue + 16) }
    /// ... and p11fork holds data fed to it (or a context-specific PIN), wiped when it ends.
    @inline(__always) var fed: UInt { 1 << UInt(rawValue + 32) }
    /// A search carried into a child is answered from p11fork's list (Operations.nextFound).
    static let findQueued: UInt = 1 << 31

    /// The session-info flag C_SessionCancel names the operation by.
    var cancelFlag: CK_FLAGS {
        switch self {
        case .encrypt: CK_FLAGS(CKF_ENCRYPT)
        case .decrypt: CK_FLAGS(CKF_DECRYPT)
        case .digest: CK_FLAGS(CKF_DIGEST)
        case .sign: CK_FLAGS(CKF_SIGN)
        case .verify: CK_FLAGS(CKF_VERIFY)
        case .signRecover: CK_FLAGS(CKF_SIGN_RECOVER)
        case .verifyRecover: CK_FLAGS(CKF_VERIFY_RECOVER)
        case .find: CK_FLAGS(CKF_FIND_OBJECTS)
        case .messageEncrypt: CK_FLAGS(CKF_MESSAGE_ENCRYPT)
        case .messageDecrypt: CK_FLAGS(CKF_MESSAGE_DECRYPT)
        case .messageSign: CK_FLAGS(CKF_MESSAGE_SIGN)
        case .messageVerify: CK_FLAGS(CKF_MESSAGE_VERIFY)
        case .verifySignature: CK_FLAGS(CKF_VERIFY)
        }
    }

    /// The call that starts it (for trace lines).
    var initName: String {
        switch self {
        case .encrypt: "C_EncryptInit"
        case .decrypt: "C_DecryptInit"
        case .digest: "C_DigestInit"
        case .sign: "C_SignInit"
        case .verify: "C_VerifyInit"
        case .signRecover: "C_SignRecoverInit"
        case .verifyRecover: "C_VerifyRecoverInit"
        case .find: "C_FindObjectsInit"
        case .messageEncrypt: "C_MessageEncryptInit"
        case .messageDecrypt: "C_MessageDecryptInit"
        case .messageSign: "C_MessageSignInit"
        case .messageVerify: "C_MessageVerifyInit"
        case .verifySignature: "C_VerifySignatureInit"
        }
    }
}
