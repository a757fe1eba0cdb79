import CPKCS11

/// Which attribute values a trace may show. Only attributes that can never hold key material
/// or other secrets are shown, and only in input templates; everything else (CKA_VALUE, private
/// exponents, primes, anything unknown or vendor-defined) appears as its length.
enum TraceAttributes {
    enum Shape { case boolean, number, objectClass, keyType, mechanism, text, bytes }

    static func shape(of type: CK_ATTRIBUTE_TYPE) -> Shape? {
        switch type {
        case CKA_TOKEN, CKA_PRIVATE, CKA_MODIFIABLE, CKA_COPYABLE,
             CKA_DESTROYABLE, CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_ENCRYPT,
             CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_SIGN_RECOVER,
             CKA_VERIFY, CKA_VERIFY_RECOVER, CKA_DERIVE, CKA_LOCAL,
             CKA_NEVER_EXTRACTABLE, CKA_ALWAYS_SENSITIVE, CKA_ALWAYS_AUTHENTICATE,
             CKA_WRAP_WITH_TRUSTED, CKA_TRUSTED:
            return .boolean
        case CKA_MODULUS_BITS, CKA_VALUE_LEN, CKA_VALUE_BITS, CKA_PRIME_BITS,
             CKA_CERTIFICATE_TYPE, CKA_CERTIFICATE_CATEGORY:
            return .number
        case CKA_CLASS: return .objectClass
        case CKA_KEY_TYPE: return .keyType
        case CKA_KEY_GEN_MECHANISM: return .mechanism
        case CKA_LABEL, CKA_APPLICATION, CKA_URL: return .text
        case CKA_ID, CKA_EC_PARAMS, CKA_PUBLIC_EXPONENT, CKA_SUBJECT,
             CKA_ISSUER, CKA_SERIAL_NUMBER, CKA_OBJECT_ID:
            return .bytes
        default:
            return nil
        }
    }

    static func append(_ attribute: CK_ATTRIBUTE, to line: inout TraceLine, valueShown: Bool) {
        let type = attribute.type
        let length = attribute.ulValueLen
        if line.json { line.append("{\"type\":") }
        line.name(attributeName(type), orHex: type)
        let value = attribute.pValue.map { UnsafeRawBufferPointer(start: $0, count: Int(min(length, 1 << 20))) }
        let unavailable = length == CK_ULONG(bitPattern: -1)
        if valueShown, !unavailable, let value, let shape = shape(of: type) {
            line.append(line.json ? ",\"value\":" : "=")
            appendValue(value, shape: shape, to: &line)
        } else {
            line.append(line.json ? ",\"len\":" : "(len ")
            if unavailable { line.append("-1") } else { line.appendDecimal(length) }
            if !line.json { line.append(")") }
        }
        if line.json { line.append("}") }
    }

    private static func appendValue(_ value: UnsafeRawBufferPointer, shape: Shape, to line: inout TraceLine) {
        func ulong() -> CK_ULONG? {
            value.count == MemoryLayout<CK_ULONG>.size ? value.loadUnaligned(as: CK_ULONG.self) : nil
        }
        switch shape {
        case .boolean:
            if value.count == 1 { line.append(value[0] != 0 ? "true" : "false") } else { line.append("null") }
        case .number:
            if let n = ulong() { line.appendDecimal(n) } else { line.append("null") }
        case .objectClass:
            if let n = ulong() { line.name(objectClassName(n), orHex: n) } else { line.append("null") }
        case .keyType:
            if let n = ulong() { line.name(keyTypeName(n), orHex: n) } else { line.append("null") }
        case .mechanism:
            if let n = ulong() { line.name(mechanismName(n), orHex: n) } else { line.append("null") }
        case .text:
            line.appendQuoted(value)
        case .bytes:
            line.symbol { $0.appendHexBytes(value) }
        }
    }
}
