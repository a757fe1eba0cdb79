import CPKCS11

/// One attribute of a template: its type and its value as the bytes PKCS#11 sees.
public struct Attribute: Sendable, Equatable {
    public let type: CK_ATTRIBUTE_TYPE
    public let value: [UInt8]

    public init(_ type: CK_ATTRIBUTE_TYPE, bytes: [UInt8]) {
        self.type = type
        self.value = bytes
    }

    /// A `CK_BBOOL` (one byte, CK_TRUE or CK_FALSE).
    public init(_ type: CK_ATTRIBUTE_TYPE, bool: Bool) {
        self.init(type, bytes: [bool ? 1 : 0])
    }

    /// A `CK_ULONG` in native byte order (classes, key types, lengths, bit counts).
    public init(_ type: CK_ATTRIBUTE_TYPE, ulong: CK_ULONG) {
        self.init(type, bytes: withUnsafeBytes(of: ulong) { Array($0) })
    }

    /// A UTF-8 string without terminator (labels).
    public init(_ type: CK_ATTRIBUTE_TYPE, string: String) {
        self.init(type, bytes: Array(string.utf8))
    }
}

/// Reads a `CK_ULONG` attribute value; nil when the bytes are not one.
public func ulongValue(_ bytes: [UInt8]) -> CK_ULONG? {
    guard bytes.count == MemoryLayout<CK_ULONG>.size else { return nil }
    return bytes.withUnsafeBytes { $0.loadUnaligned(as: CK_ULONG.self) }
}

/// Runs `body` with a `CK_ATTRIBUTE` array whose values point at copies of the attributes'
/// bytes; everything is freed when `body` returns. An empty template is a valid pointer with
/// count 0.
public func withTemplate<Result>(_ attributes: [Attribute],
                                 _ body: (UnsafeMutablePointer<CK_ATTRIBUTE>, CK_ULONG) -> Result) -> Result {
    let array = UnsafeMutablePointer<CK_ATTRIBUTE>.allocate(capacity: max(attributes.count, 1))
    var values: [UnsafeMutableRawPointer] = []
    defer {
        values.forEach { $0.deallocate() }
        array.deallocate()
    }
    for (index, attribute) in attributes.enumerated() {
        let value = UnsafeMutableRawPointer.allocate(byteCount: max(attribute.value.count, 1), alignment: 16)
        values.append(value)
        attribute.value.withUnsafeBytes { bytes in
            if let base = bytes.baseAddress { value.copyMemory(from: base, byteCount: bytes.count) }
        }
        array[index] = CK_ATTRIBUTE(type: attribute.type, pValue: value, ulValueLen: CK_ULONG(attribute.value.count))
    }
    return body(array, CK_ULONG(attributes.count))
}

/// One attribute asked for by `C_GetAttributeValue`: `capacity` nil sends a NULL `pValue`
/// (the length query); otherwise a buffer of exactly that many bytes.
public struct AttributeRequest: Sendable {
    public let type: CK_ATTRIBUTE_TYPE
    public let capacity: Int?

    public init(_ type: CK_ATTRIBUTE_TYPE, capacity: Int?) {
        self.type = type
        self.capacity = capacity
    }
}

/// What `C_GetAttributeValue` left in one template entry: the length it wrote
/// (`ckUnavailableInformation` for sensitive, invalid or too-small entries) and the value
/// when a buffer was given and the length fits in it.
public struct AttributeResult: Sendable, Equatable {
    public let type: CK_ATTRIBUTE_TYPE
    public let length: CK_ULONG
    public let value: [UInt8]?

    public var isUnavailable: Bool { length == ckUnavailableInformation }
}

/// A mechanism with its parameter as bytes (a copy of the parameter structure).
public struct Mechanism: Sendable {
    public let type: CK_MECHANISM_TYPE
    public let parameter: [UInt8]

    public init(_ type: CK_MECHANISM_TYPE, parameter: [UInt8] = []) {
        self.type = type
        self.parameter = parameter
    }

    /// The bytes of a parameter structure; it must hold no pointer other than NULL.
    public init<Parameter>(_ type: CK_MECHANISM_TYPE, structure: Parameter) {
        self.init(type, parameter: withUnsafeBytes(of: structure) { Array($0) })
    }

    /// `CKM_RSA_PKCS_PSS` and the hash-and-sign PSS mechanisms.
    public static func rsaPSS(_ type: CK_MECHANISM_TYPE = CK_MECHANISM_TYPE(CKM_RSA_PKCS_PSS),
                              hash: CK_MECHANISM_TYPE, mgf: CK_RSA_PKCS_MGF_TYPE, saltLength: CK_ULONG) -> Mechanism {
        Mechanism(type, structure: CK_RSA_PKCS_PSS_PARAMS(hashAlg: hash, mgf: mgf, sLen: saltLength))
    }

    /// `CKM_RSA_PKCS_OAEP` with no label (source data).
    public static func rsaOAEP(hash: CK_MECHANISM_TYPE, mgf: CK_RSA_PKCS_MGF_TYPE) -> Mechanism {
        Mechanism(CK_MECHANISM_TYPE(CKM_RSA_PKCS_OAEP),
                  structure: CK_RSA_PKCS_OAEP_PARAMS(hashAlg: hash, mgf: mgf, source: CK_RSA_PKCS_OAEP_SOURCE_TYPE(CKZ_DATA_SPECIFIED),
                                                     pSourceData: nil, ulSourceDataLen: 0))
    }
}

/// Runs `body` with a `CK_MECHANISM` pointing at a copy of the parameter (NULL when empty).
public func withMechanism<Result>(_ mechanism: Mechanism, _ body: (UnsafeMutablePointer<CK_MECHANISM>) -> Result) -> Result {
    var parameter: UnsafeMutableRawPointer?
    if !mechanism.parameter.isEmpty {
        let copy = UnsafeMutableRawPointer.allocate(byteCount: mechanism.parameter.count, alignment: 16)
        mechanism.parameter.withUnsafeBytes { copy.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        parameter = copy
    }
    defer { parameter?.deallocate() }
    var ckMechanism = CK_MECHANISM(mechanism: mechanism.type, pParameter: parameter,
                                   ulParameterLen: CK_ULONG(mechanism.parameter.count))
    return body(&ckMechanism)
}
