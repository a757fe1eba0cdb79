import CPKCS11

/// How much room a call that returns bytes gets (PKCS#11 v2.40 section 5.2, "Conventions
/// for functions returning output in a variable-length buffer").
public enum OutputSpace: Sendable {
    /// A NULL buffer: the module reports the length it needs and keeps the operation active.
    case lengthQuery
    /// A buffer of exactly this many bytes (too few gives CKR_BUFFER_TOO_SMALL).
    case capacity(Int)
    /// Asks for the length first, then calls again with that much room (two calls).
    case fit
}

/// The return code and bytes of a call that returns a variable-length output. `length` is
/// what the module wrote to the length argument; `bytes` are the output when the call succeeded.
public struct Output: Sendable, Equatable {
    public let rv: CK_RV
    public let length: CK_ULONG
    public let bytes: [UInt8]
}

/// Makes a call that follows the variable-length output convention with the given space.
func produce(_ space: OutputSpace,
             _ call: (UnsafeMutablePointer<CK_BYTE>?, UnsafeMutablePointer<CK_ULONG>) -> CK_RV) -> Output {
    switch space {
    case .lengthQuery:
        var length: CK_ULONG = 0
        let rv = call(nil, &length)
        return Output(rv: rv, length: length, bytes: [])
    case .capacity(let capacity):
        var buffer = [UInt8](repeating: 0, count: max(capacity, 1))
        var length = CK_ULONG(capacity)
        let rv = buffer.withUnsafeMutableBufferPointer { call($0.baseAddress, &length) }
        let bytes = rv == CKR_OK ? Array(buffer.prefix(min(Int(clamping: length), capacity))) : []
        return Output(rv: rv, length: length, bytes: bytes)
    case .fit:
        let query = produce(.lengthQuery, call)
        guard query.rv == CKR_OK else { return query }
        return produce(.capacity(Int(clamping: query.length)), call)
    }
}

/// Makes a call with input bytes (a valid pointer even for no bytes).
func withInput<Result>(_ bytes: [UInt8], _ body: (UnsafeMutablePointer<CK_BYTE>, CK_ULONG) -> Result) -> Result {
    var copy = bytes.isEmpty ? [0] : bytes
    return copy.withUnsafeMutableBufferPointer { body($0.baseAddress!, CK_ULONG(bytes.count)) }
}

/// The text of a fixed-width, blank-padded PKCS#11 field (labels, manufacturer IDs).
public func paddedText<Field>(_ field: Field) -> String {
    let bytes = withUnsafeBytes(of: field) { Array($0) }
    return String(decoding: bytes, as: UTF8.self)
}
