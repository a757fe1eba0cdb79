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

/// A deep copy of a CK_MECHANISM: the parameter structure and every buffer it points to, in
/// protected memory; object handles in it are kept virtual and made real when it is used.
final class KeptMechanism: @unchecked Sendable {
    let type: CK_MECHANISM_TYPE
    let parameterLength: CK_ULONG
    /// The parameter structure (pointers zeroed), or nil without a parameter.
    private let parameter: KeptBytes?
    /// Buffers the structure points to, by the offset of the pointer field.
    private let buffers: [(offset: Int, data: KeptBytes?)]
    /// Offsets of object handle fields.
    private let handleOffsets: [Int]
    let byteCount: Int

    private init(type: CK_MECHANISM_TYPE, parameterLength: CK_ULONG, parameter: KeptBytes?,
                 buffers: [(offset: Int, data: KeptBytes?)], handleOffsets: [Int], byteCount: Int) {
        self.type = type
        self.parameterLength = parameterLength
        self.parameter = parameter
        self.buffers = buffers
        self.handleOffsets = handleOffsets
        self.byteCount = byteCount
    }

    enum Copy {
        case kept(KeptMechanism)
        /// Why the mechanism cannot be replayed (for the trace).
        case notReplayable(String)
    }

    /// Copies a mechanism the real module accepted.
    static func copy(_ mechanism: UnsafePointer<CK_MECHANISM>?) -> Copy {
        guard let mechanism else { return .notReplayable("no mechanism was given") }
        let type = mechanism.pointee.mechanism
        let length = mechanism.pointee.ulParameterLen
        guard let source = mechanism.pointee.pParameter, length > 0 else {
            return .kept(KeptMechanism(type: type, parameterLength: length, parameter: nil, buffers: [], handleOffsets: [], byteCount: 0))
        }
        func described() -> String { mechanismName(type).map { "\($0)" } ?? "mechanism 0x\(String(type, radix: 16))" }
        guard length <= 65536, let parameter = KeptBytes(copying: source, count: Int(length)) else {
            return .notReplayable("the parameter of \(described()) could not be kept")
        }
        switch ParameterLayout.of(type) {
        case .flat:
            return .kept(KeptMechanism(type: type, parameterLength: length, parameter: parameter, buffers: [], handleOffsets: [], byteCount: Int(length)))
        case .unknown:
            return .notReplayable("p11fork does not know the parameter structure of \(described())")
        case .structure(let fields):
            guard Int(length) == ParameterLayout.size(fields) else {
                return .notReplayable("the parameter of \(described()) has \(length) bytes, not the \(ParameterLayout.size(fields)) of its structure")
            }
            let offsets = ParameterLayout.offsets(fields)
            var buffers: [(offset: Int, data: KeptBytes?)] = []
            var handles: [Int] = []
            var byteCount = Int(length)
            for (index, field) in fields.enumerated() {
                switch field {
                case .pointer(let lengthIndex):
                    let pointer = source.load(fromByteOffset: offsets[index], as: UnsafeRawPointer?.self)
                    let count = Int(source.load(fromByteOffset: offsets[lengthIndex], as: CK_ULONG.self))
                    (parameter.start + offsets[index]).storeBytes(of: nil, as: UnsafeRawPointer?.self)
                    guard let pointer, count > 0 else {
                        buffers.append((offsets[index], nil))
                        continue
                    }
                    guard count <= 65536, let data = KeptBytes(copying: pointer, count: count) else {
                        return .notReplayable("the parameter of \(described()) could not be kept")
                    }
                    byteCount += count
                    buffers.append((offsets[index], data))
                case .handle:
                    handles.append(offsets[index])
                case .word, .bytes:
                    break
                }
            }
            return .kept(KeptMechanism(type: type, parameterLength: length, parameter: parameter, buffers: buffers,
                                       handleOffsets: handles, byteCount: byteCount))
        }
    }

    /// Calls `body` with the mechanism rebuilt, its object handles turned into real ones by
    /// `resolve` (nil when a handle cannot be resolved: `body` is not called).
    func withMechanism<T>(resolve: (CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE?,
                          _ body: (UnsafeMutablePointer<CK_MECHANISM>) -> T) -> T? {
        guard let parameter else {
            var mechanism = CK_MECHANISM(mechanism: type, pParameter: nil, ulParameterLen: parameterLength)
            return body(&mechanism)
        }
        let structure = UnsafeMutableRawPointer.allocate(byteCount: Int(parameterLength), alignment: 8)
        defer {
            explicit_bzero(structure, Int(parameterLength))
            structure.deallocate()
        }
        structure.copyMemory(from: parameter.start, byteCount: Int(parameterLength))
        for (offset, data) in buffers {
            structure.storeBytes(of: data.map { UnsafeRawPointer($0.start) }, toByteOffset: offset, as: UnsafeRawPointer?.self)
        }
        guard ParameterLayout.resolveHandles(in: structure, at: handleOffsets, resolve) else { return nil }
        var mechanism = CK_MECHANISM(mechanism: type, pParameter: structure, ulParameterLen: parameterLength)
        return body(&mechanism)
    }

    /// True when `mechanism` is this one again: the same type and no parameter, or the same flat
    /// parameter bytes (structures with pointers are never taken as the same).
    func isSame(as mechanism: UnsafePointer<CK_MECHANISM>) -> Bool {
        guard mechanism.pointee.mechanism == type, mechanism.pointee.ulParameterLen == parameterLength,
              buffers.isEmpty, handleOffsets.isEmpty else { return false }
        guard let parameter else { return mechanism.pointee.pParameter == nil || parameterLength == 0 }
        guard let other = mechanism.pointee.pParameter else { return false }
        return memcmp(parameter.start, other, Int(parameterLength)) == 0
    }

    var name: String { mechanismName(type).map { "\($0)" } ?? "mechanism 0x\(String(type, radix: 16))" }
}

/// Mechanism parameters that carry object handles must reach the real module with real ones.
enum MechanismHandles {
    static func withRealHandles(_ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                                _ body: (UnsafeMutablePointer<CK_MECHANISM>?) -> CK_RV) -> CK_RV {
        guard let mechanism, let parameter = mechanism.pointee.pParameter else { return body(mechanism) }
        let type = mechanism.pointee.mechanism
        switch ParameterLayout.of(type) {
        case .structure(let fields) where fields.contains(.handle):
            guard Int(mechanism.pointee.ulParameterLen) == ParameterLayout.size(fields) else { return body(mechanism) }
            let length = Int(mechanism.pointee.ulParameterLen)
            let copy = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 8)
            defer { copy.deallocate() }
            copy.copyMemory(from: parameter, byteCount: length)
            // A handle that is not p11fork's becomes one the module refuses (its own answer).
            _ = ParameterLayout.resolveHandles(in: copy, at: ParameterLayout.handleOffsets(fields)) { virtual in
                var failure = CK_RV(CKR_OK)
                return Objects.real(virtual, &failure)
            }
            var translated = mechanism.pointee
            translated.pParameter = copy
            return body(&translated)
        case .unknown where handleCarriers.contains(type):
            Trace.event(.error, "\(mechanismName(type).map { "\($0)" } ?? "mechanism") carries object handles in its parameter, which p11fork does not translate yet: the module will see p11fork's virtual handles")
            return body(mechanism)
        default:
            return body(mechanism)
        }
    }

    static let handleCarriers: Set<CK_MECHANISM_TYPE> = Set([
        CKM_ECMQV_DERIVE, CKM_X9_42_DH_HYBRID_DERIVE, CKM_X9_42_MQV_DERIVE, CKM_SSL3_KEY_AND_MAC_DERIVE,
        CKM_TLS_KEY_AND_MAC_DERIVE,
    ].map { CK_MECHANISM_TYPE($0) })
}
