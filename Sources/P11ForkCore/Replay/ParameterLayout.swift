import CPKCS11
import Glibc

/// How a mechanism's parameter is laid out, for the parameters p11fork understands: it must
/// copy them deeply to replay a call in a child (their pointers lead to memory the application
/// may reuse at once), and turn the object handles some of them hold into real ones.
/// A parameter p11fork does not understand is never copied as opaque bytes: the call that used
/// it is reported as not replayable.
enum ParameterLayout {
    /// One machine word of the structure (CK_ULONG, or two CK_BBOOLs with their padding).
    enum Field: Equatable {
        case word
        case bytes(Int)
        /// A pointer whose length is the field at `length`.
        case pointer(length: Int)
        /// An object handle (translated virtual → real).
        case handle
    }

    /// No parameter, or bytes that hold no pointer (IVs, PSS and CTR parameters, MAC lengths).
    case flat
    case structure([Field])
    /// Unknown to p11fork: copied for nothing, replayed never.
    case unknown

    static func of(_ type: CK_MECHANISM_TYPE) -> ParameterLayout {
        if flatMechanisms.contains(type) { return .flat }
        if let fields = structures[type] { return .structure(fields) }
        return .unknown
    }

    static let flatMechanisms: Set<CK_MECHANISM_TYPE> = Set([
        // Digests, signatures and ciphers with no parameter or a plain byte string (IV).
        CKM_SHA_1, CKM_SHA224, CKM_SHA256, CKM_SHA384, CKM_SHA512, CKM_MD5,
        CKM_RSA_PKCS, CKM_RSA_X_509, CKM_SHA1_RSA_PKCS, CKM_SHA224_RSA_PKCS, CKM_SHA256_RSA_PKCS,
        CKM_SHA384_RSA_PKCS, CKM_SHA512_RSA_PKCS, CKM_MD5_RSA_PKCS,
        CKM_RSA_PKCS_PSS, CKM_SHA1_RSA_PKCS_PSS, CKM_SHA224_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS_PSS,
        CKM_SHA384_RSA_PKCS_PSS, CKM_SHA512_RSA_PKCS_PSS,
        CKM_ECDSA, CKM_ECDSA_SHA1, CKM_ECDSA_SHA224, CKM_ECDSA_SHA256, CKM_ECDSA_SHA384, CKM_ECDSA_SHA512,
        CKM_DSA, CKM_DSA_SHA1, CKM_EDDSA,
        CKM_SHA_1_HMAC, CKM_SHA224_HMAC, CKM_SHA256_HMAC, CKM_SHA384_HMAC, CKM_SHA512_HMAC, CKM_MD5_HMAC,
        CKM_SHA_1_HMAC_GENERAL, CKM_SHA224_HMAC_GENERAL, CKM_SHA256_HMAC_GENERAL, CKM_SHA384_HMAC_GENERAL,
        CKM_SHA512_HMAC_GENERAL,
        CKM_AES_ECB, CKM_AES_CBC, CKM_AES_CBC_PAD, CKM_AES_CTR, CKM_AES_CTS, CKM_AES_OFB,
        CKM_AES_CFB8, CKM_AES_CFB64, CKM_AES_CFB128, CKM_AES_MAC, CKM_AES_MAC_GENERAL,
        CKM_AES_CMAC, CKM_AES_CMAC_GENERAL, CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD, 0x210B /* CKM_AES_KEY_WRAP_KWP */,
        CKM_DES3_ECB, CKM_DES3_CBC, CKM_DES3_CBC_PAD, CKM_DES3_MAC, CKM_DES3_MAC_GENERAL, CKM_DES3_CMAC,
        CKM_DES_ECB, CKM_DES_CBC, CKM_DES_CBC_PAD,
        // Derivations whose parameter is a plain structure, or none.
        CKM_EXTRACT_KEY_FROM_KEY, CKM_SHA1_KEY_DERIVATION, CKM_SHA224_KEY_DERIVATION,
        CKM_SHA256_KEY_DERIVATION, CKM_SHA384_KEY_DERIVATION, CKM_SHA512_KEY_DERIVATION,
    ].map { CK_MECHANISM_TYPE($0) })

    static let stringData: [Field] = [.pointer(length: 1), .word]
    static let structures: [CK_MECHANISM_TYPE: [Field]] = {
        var table: [CK_MECHANISM_TYPE: [Field]] = [:]
        // CK_RSA_PKCS_OAEP_PARAMS: hashAlg, mgf, source, pSourceData, ulSourceDataLen.
        table[CK_MECHANISM_TYPE(CKM_RSA_PKCS_OAEP)] = [.word, .word, .word, .pointer(length: 4), .word]
        // CK_GCM_PARAMS: pIv, ulIvLen, ulIvBits, pAAD, ulAADLen, ulTagBits.
        table[CK_MECHANISM_TYPE(CKM_AES_GCM)] = [.pointer(length: 1), .word, .word, .pointer(length: 4), .word, .word]
        // CK_CCM_PARAMS: ulDataLen, pNonce, ulNonceLen, pAAD, ulAADLen, ulMACLen.
        table[CK_MECHANISM_TYPE(CKM_AES_CCM)] = [.word, .pointer(length: 2), .word, .pointer(length: 4), .word, .word]
        // CK_ECDH1_DERIVE_PARAMS: kdf, ulSharedDataLen, pSharedData, ulPublicDataLen, pPublicData.
        for type in [CKM_ECDH1_DERIVE, CKM_ECDH1_COFACTOR_DERIVE] {
            table[CK_MECHANISM_TYPE(type)] = [.word, .word, .pointer(length: 1), .word, .pointer(length: 3)]
        }
        // CK_KEY_DERIVATION_STRING_DATA: pData, ulLen.
        for type in [CKM_CONCATENATE_BASE_AND_DATA, CKM_CONCATENATE_DATA_AND_BASE, CKM_XOR_BASE_AND_DATA,
                     CKM_AES_ECB_ENCRYPT_DATA, CKM_DES3_ECB_ENCRYPT_DATA, CKM_DES_ECB_ENCRYPT_DATA] {
            table[CK_MECHANISM_TYPE(type)] = stringData
        }
        // CK_AES_CBC_ENCRYPT_DATA_PARAMS / CK_DES_CBC_ENCRYPT_DATA_PARAMS: iv, pData, length.
        table[CK_MECHANISM_TYPE(CKM_AES_CBC_ENCRYPT_DATA)] = [.bytes(16), .pointer(length: 2), .word]
        for type in [CKM_DES3_CBC_ENCRYPT_DATA, CKM_DES_CBC_ENCRYPT_DATA] {
            table[CK_MECHANISM_TYPE(type)] = [.bytes(8), .pointer(length: 2), .word]
        }
        // The handle of the key to append (current mechanisms 2.43.2).
        table[CK_MECHANISM_TYPE(CKM_CONCATENATE_BASE_AND_KEY)] = [.handle]
        // CK_HKDF_PARAMS (3.0): bExtract, bExpand (+ padding), prfHashMechanism, ulSaltType,
        // pSalt, ulSaltLen, hSaltKey, pInfo, ulInfoLen.
        for type: CK_MECHANISM_TYPE in [0x402A /* CKM_HKDF_DERIVE */, 0x402B /* CKM_HKDF_DATA */] {
            table[type] = [.bytes(8), .word, .word, .pointer(length: 4), .word, .handle, .pointer(length: 7), .word]
        }
        return table
    }()

    static func size(_ fields: [Field]) -> Int {
        fields.reduce(0) { total, field in
            if case .bytes(let count) = field { return total + count }
            return total + 8
        }
    }

    /// Offsets of the object handle fields.
    static func handleOffsets(_ fields: [Field]) -> [Int] {
        zip(fields, offsets(fields)).compactMap { $0.0 == .handle ? $0.1 : nil }
    }

    /// Turns the object handles at `offsets` of a parameter structure into real ones, in place;
    /// CK_INVALID_HANDLE stays. False (structure partly translated) when `resolve` has none.
    static func resolveHandles(in structure: UnsafeMutableRawPointer, at offsets: [Int],
                               _ resolve: (CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE?) -> Bool {
        for offset in offsets {
            let virtual = structure.load(fromByteOffset: offset, as: CK_OBJECT_HANDLE.self)
            if virtual == CK_OBJECT_HANDLE(CK_INVALID_HANDLE) { continue }
            guard let real = resolve(virtual) else { return false }
            structure.storeBytes(of: real, toByteOffset: offset, as: CK_OBJECT_HANDLE.self)
        }
        return true
    }

    static func offsets(_ fields: [Field]) -> [Int] {
        var offsets: [Int] = []
        var offset = 0
        for field in fields {
            offsets.append(offset)
            if case .bytes(let count) = field { offset += count } else { offset += 8 }
        }
        return offsets
    }
}
