import CPKCS11

/// What tells a token apart in a child, where slot numbers may differ: label, manufacturer,
/// model and serial number from CK_TOKEN_INFO (docs/DESIGN.md "Handles").
struct TokenIdentity: Hashable {
    let label: [UInt8]
    let manufacturer: [UInt8]
    let model: [UInt8]
    let serial: [UInt8]

    init(_ info: CK_TOKEN_INFO) {
        var info = info
        label = withUnsafeBytes(of: &info.label) { Array($0) }
        manufacturer = withUnsafeBytes(of: &info.manufacturerID) { Array($0) }
        model = withUnsafeBytes(of: &info.model) { Array($0) }
        serial = withUnsafeBytes(of: &info.serialNumber) { Array($0) }
    }

    /// The label without its blank padding, for trace lines.
    var labelText: String {
        var end = label.count
        while end > 0 && (label[end - 1] == 0x20 || label[end - 1] == 0) { end -= 1 }
        return String(decoding: label[0..<end], as: UTF8.self)
    }

    /// The identity of the token in `slot` of a module, if it has one.
    static func read(_ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>, slot: CK_SLOT_ID) -> TokenIdentity? {
        var info = CK_TOKEN_INFO()
        guard functions.pointee.C_GetTokenInfo?(slot, &info) == CKR_OK else { return nil }
        return TokenIdentity(info)
    }
}

/// What p11fork records about an object when its handle is first handed out, so that a child
/// can find the same object again without asking the parent's (gone) state anything: class,
/// CKA_ID, CKA_LABEL, key type, token flag, CKA_UNIQUE_ID where the module has it, and a
/// fingerprint of public attributes that tells look-alikes apart (two keys with one label).
/// Secret values are never read: the fingerprint uses only public attributes.
struct ObjectIdentity: Hashable {
    var objectClass: CK_OBJECT_CLASS?
    var keyType: CK_KEY_TYPE?
    var isTokenObject = false
    var id: [UInt8]?
    var label: [UInt8]?
    var uniqueID: [UInt8]?
    /// FNV-1a over the public attributes of the class (see `fingerprintAttributes`).
    var fingerprint: UInt64 = 0

    static let uniqueIDAttribute = CK_ATTRIBUTE_TYPE(0x4) // CKA_UNIQUE_ID (PKCS#11 3.0)

    /// Public attributes that distinguish objects of a class; never key material.
    static func fingerprintAttributes(_ objectClass: CK_OBJECT_CLASS?) -> [CK_ATTRIBUTE_TYPE] {
        switch objectClass {
        case CK_OBJECT_CLASS(CKO_PRIVATE_KEY):
            return [CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_EC_PARAMS, CKA_EC_POINT].map { CK_ATTRIBUTE_TYPE($0) }
        case CK_OBJECT_CLASS(CKO_PUBLIC_KEY):
            return [CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_EC_PARAMS, CKA_EC_POINT, CKA_VALUE].map { CK_ATTRIBUTE_TYPE($0) }
        case CK_OBJECT_CLASS(CKO_CERTIFICATE):
            return [CKA_VALUE, CKA_SUBJECT, CKA_ISSUER, CKA_SERIAL_NUMBER].map { CK_ATTRIBUTE_TYPE($0) }
        case CK_OBJECT_CLASS(CKO_SECRET_KEY):
            return [CKA_CHECK_VALUE, CKA_VALUE_LEN].map { CK_ATTRIBUTE_TYPE($0) }
        case CK_OBJECT_CLASS(CKO_DATA):
            return [CKA_APPLICATION, CKA_OBJECT_ID].map { CK_ATTRIBUTE_TYPE($0) }
        default:
            return []
        }
    }

    /// Reads the identity of `object` through `session` of a module (three C_GetAttributeValue
    /// calls). Nil when the object cannot be read at all.
    static func read(_ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>, session: CK_SESSION_HANDLE,
                     object: CK_OBJECT_HANDLE) -> ObjectIdentity? {
        guard let getAttributes = functions.pointee.C_GetAttributeValue else { return nil }
        var identity = ObjectIdentity()

        // Fixed-size attributes first.
        let fixed = UnsafeMutableRawPointer.allocate(byteCount: 24, alignment: 8)
        defer { fixed.deallocate() }
        fixed.initializeMemory(as: UInt8.self, repeating: 0, count: 24)
        var template = [
            CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_CLASS), pValue: fixed, ulValueLen: 8),
            CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_KEY_TYPE), pValue: fixed + 8, ulValueLen: 8),
            CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_TOKEN), pValue: fixed + 16, ulValueLen: 1),
        ]
        guard usable(getAttributes(session, object, &template, 3)) else { return nil }
        identity.objectClass = template[0].ulValueLen == 8 ? fixed.load(as: CK_ULONG.self) : nil
        identity.keyType = template[1].ulValueLen == 8 ? (fixed + 8).load(as: CK_ULONG.self) : nil
        identity.isTokenObject = template[2].ulValueLen == 1 && (fixed + 16).load(as: UInt8.self) != 0

        // Then the variable-length ones: lengths, then values.
        let fingerprintTypes = fingerprintAttributes(identity.objectClass)
        let types = [CK_ATTRIBUTE_TYPE(CKA_ID), CK_ATTRIBUTE_TYPE(CKA_LABEL), uniqueIDAttribute] + fingerprintTypes
        template = types.map { CK_ATTRIBUTE(type: $0, pValue: nil, ulValueLen: 0) }
        guard usable(getAttributes(session, object, &template, CK_ULONG(template.count))) else { return identity }
        let unavailable = CK_ULONG.max
        let buffers: [UnsafeMutableRawPointer?] = template.map { attribute in
            attribute.ulValueLen == unavailable || attribute.ulValueLen > 65536 || attribute.ulValueLen == 0
                ? nil : UnsafeMutableRawPointer.allocate(byteCount: Int(attribute.ulValueLen), alignment: 8)
        }
        defer { for buffer in buffers { buffer?.deallocate() } }
        var wanted: [CK_ATTRIBUTE] = []
        var wantedIndex: [Int] = []
        for i in template.indices where buffers[i] != nil {
            wanted.append(CK_ATTRIBUTE(type: template[i].type, pValue: buffers[i], ulValueLen: template[i].ulValueLen))
            wantedIndex.append(i)
        }
        var values = [[UInt8]?](repeating: nil, count: template.count)
        for i in template.indices where template[i].ulValueLen == 0 { values[i] = [] }
        if !wanted.isEmpty, usable(getAttributes(session, object, &wanted, CK_ULONG(wanted.count))) {
            for (k, i) in wantedIndex.enumerated() where wanted[k].ulValueLen != unavailable {
                values[i] = Array(UnsafeRawBufferPointer(start: buffers[i], count: Int(wanted[k].ulValueLen)))
            }
        }
        identity.id = values[0]
        identity.label = values[1]
        identity.uniqueID = values[2]
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for (offset, type) in fingerprintTypes.enumerated() {
            guard let value = values[3 + offset] else { continue }
            for byte in withUnsafeBytes(of: type.littleEndian, Array.init) + withUnsafeBytes(of: UInt64(value.count).littleEndian, Array.init) + value {
                hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01B3
            }
        }
        identity.fingerprint = hash
        return identity
    }

    /// C_GetAttributeValue answers that still fill in the attributes they can.
    private static func usable(_ rv: CK_RV) -> Bool {
        rv == CKR_OK || rv == CKR_ATTRIBUTE_SENSITIVE || rv == CKR_ATTRIBUTE_TYPE_INVALID || rv == CKR_BUFFER_TOO_SMALL
    }

    /// A short description for trace lines: class, label, ID (no values of any kind).
    var summary: String {
        var parts: [String] = []
        if let objectClass { parts.append(objectClassName(objectClass).map { "\($0)" } ?? "class 0x\(String(objectClass, radix: 16))") }
        if let label, !label.isEmpty { parts.append("label \"\(String(decoding: label, as: UTF8.self))\"") }
        if let id, !id.isEmpty { parts.append("id \(id.map { String($0, radix: 16) }.joined())") }
        parts.append(isTokenObject ? "token object" : "session object")
        return parts.joined(separator: ", ")
    }

    /// Calls `body` with a search template for this identity (class, token, ID, label, key type, unique ID).
    func withSearchTemplate<T>(_ body: (UnsafeMutablePointer<CK_ATTRIBUTE>, CK_ULONG) -> T) -> T {
        var storage: [[UInt8]] = []
        var types: [CK_ATTRIBUTE_TYPE] = []
        func add(_ type: CK_ULONG, _ bytes: [UInt8]) {
            types.append(CK_ATTRIBUTE_TYPE(type))
            storage.append(bytes)
        }
        if let objectClass { add(CK_ULONG(CKA_CLASS), withUnsafeBytes(of: objectClass, Array.init)) }
        add(CK_ULONG(CKA_TOKEN), [isTokenObject ? 1 : 0])
        if let keyType { add(CK_ULONG(CKA_KEY_TYPE), withUnsafeBytes(of: keyType, Array.init)) }
        if let id { add(CK_ULONG(CKA_ID), id) }
        if let label { add(CK_ULONG(CKA_LABEL), label) }
        if let uniqueID { add(Self.uniqueIDAttribute, uniqueID) }
        return withTemplate(types: types, values: storage, body)
    }
}

/// Builds a CK_ATTRIBUTE array over Swift byte arrays for the duration of `body`.
func withTemplate<T>(types: [CK_ATTRIBUTE_TYPE], values: [[UInt8]],
                     _ body: (UnsafeMutablePointer<CK_ATTRIBUTE>, CK_ULONG) -> T) -> T {
    let total = values.reduce(0) { $0 + $1.count }
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: max(total, 1), alignment: 8)
    defer { buffer.deallocate() }
    var template: [CK_ATTRIBUTE] = []
    var offset = 0
    for (type, value) in zip(types, values) {
        if !value.isEmpty { value.withUnsafeBytes { (buffer + offset).copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
        template.append(CK_ATTRIBUTE(type: type, pValue: value.isEmpty ? nil : buffer + offset, ulValueLen: CK_ULONG(value.count)))
        offset += value.count
    }
    return template.withUnsafeMutableBufferPointer { body($0.baseAddress!, CK_ULONG($0.count)) }
}
