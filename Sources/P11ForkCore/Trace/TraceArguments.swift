import CPKCS11

/// How each kind of PKCS#11 argument appears in a trace line. Handles are the application's
/// values; at level `full` the real value follows where it differs (a translating child). Buffers appear as lengths only,
/// PINs not at all (docs/DESIGN.md "Secrets").
extension TraceLine {
    mutating func session(_ name: StaticString, _ handle: CK_SESSION_HANDLE) {
        key(name)
        symbol { line in
            line.appendHex(handle)
            if line.full, HandleValues.translated, let real = Sessions.lookup(handle)?.real, real != handle {
                line.append(" real "); line.appendHex(real)
            }
        }
    }

    mutating func slot(_ name: StaticString, _ slot: CK_SLOT_ID) {
        key(name)
        symbol { line in
            line.appendHex(slot)
            if line.full, Slots.translating, let real = Recovery.translatedSlot(slot), real != slot {
                line.append(" real "); line.appendHex(real)
            }
        }
    }

    mutating func object(_ name: StaticString, _ handle: CK_OBJECT_HANDLE) {
        key(name)
        symbol { line in
            line.appendHex(handle)
            if line.full, HandleValues.translated, let real = Objects.view.real(handle, epoch: Core.epoch), real != handle {
                line.append(" real "); line.appendHex(real)
            }
        }
    }

    /// An object handle the call returned (already the application's when the call succeeded).
    mutating func newObject(_ name: StaticString, _ pointer: UnsafeMutablePointer<CK_OBJECT_HANDLE>?, _ rv: CK_RV) {
        key(name)
        guard let pointer else { return null() }
        if rv == CKR_OK { symbol { $0.appendHex(pointer.pointee) } } else { symbol { $0.append("-") } }
    }

    mutating func null() {
        if json { append("null") } else { append("NULL") }
    }

    mutating func mechanism(_ name: StaticString, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?) {
        key(name)
        guard let mechanism else { return null() }
        let type = mechanism.pointee.mechanism
        if json {
            append("{\"type\":"); self.name(mechanismName(type), orHex: type)
            append(",\"param.len\":"); appendDecimal(mechanism.pointee.ulParameterLen); append("}")
        } else {
            if let known = mechanismName(type) { append(known) } else { appendHex(type) }
            if mechanism.pointee.pParameter != nil || mechanism.pointee.ulParameterLen != 0 {
                append("(param.len="); appendDecimal(mechanism.pointee.ulParameterLen); append(")")
            }
        }
    }

    mutating func mechanismType(_ name: StaticString, _ type: CK_MECHANISM_TYPE) {
        key(name)
        self.name(mechanismName(type), orHex: type)
    }

    /// Input data, parameters, the length of a caller-sized output: the length only.
    mutating func length(_ name: StaticString, _ pointer: UnsafeMutableRawPointer?, _ length: CK_ULONG) {
        key(name)
        if json {
            if pointer == nil { append("null") } else { appendDecimal(length) }
        } else {
            append(pointer == nil ? "NULL/len " : "len ")
            appendDecimal(length)
        }
    }

    mutating func length<T>(_ name: StaticString, _ pointer: UnsafeMutablePointer<T>?, _ length: CK_ULONG) {
        self.length(name, UnsafeMutableRawPointer(pointer), length)
    }

    /// A PIN or other secret: neither its value nor its length.
    mutating func secret(_ name: StaticString, _ pointer: UnsafeMutablePointer<CK_UTF8CHAR>?) {
        key(name)
        if pointer == nil { null() } else { symbol { $0.append("hidden") } }
    }

    /// An output buffer with an in/out length: `NULL/len 0->256` (a length query) or `len 256->256`.
    mutating func output<T>(_ name: StaticString, _ pointer: UnsafeMutablePointer<T>?, in lengthIn: CK_ULONG?,
                            out lengthOut: UnsafeMutablePointer<CK_ULONG>?, _ rv: CK_RV) {
        key(name)
        let after = lengthOut.map { $0.pointee }
        if json {
            append("{\"buffer\":"); if pointer == nil { append("null") } else { append("true") }
            append(",\"len.in\":"); if let lengthIn { appendDecimal(lengthIn) } else { append("null") }
            append(",\"len.out\":"); if let after { appendDecimal(after) } else { append("null") }
            append("}")
        } else {
            if pointer == nil { append("NULL/") }
            append("len ")
            if let lengthIn { appendDecimal(lengthIn) } else { append("NULL") }
            append("->")
            if let after { appendDecimal(after) } else { append("NULL") }
        }
    }

    /// A pointer to an output structure: whether it was given.
    mutating func pointer<T>(_ name: StaticString, _ pointer: UnsafeMutablePointer<T>?) {
        key(name)
        if pointer == nil { null() } else { symbol { $0.append("ptr") } }
    }

    mutating func number(_ name: StaticString, _ value: CK_ULONG) {
        key(name)
        appendDecimal(value)
    }

    mutating func user(_ name: StaticString, _ user: CK_USER_TYPE) {
        key(name)
        self.name(userTypeName(user), orHex: user)
    }

    mutating func flags(_ name: StaticString, _ flags: CK_FLAGS) {
        key(name)
        symbol { $0.appendHex(flags) }
    }

    /// Flags of a known group, by name: `CKF_RW_SESSION|CKF_SERIAL_SESSION`. Inlined where it is
    /// used (three places), so that the field's name is a literal.
    @inline(__always)
    mutating func flags(_ name: StaticString, _ flags: CK_FLAGS, names: [(CK_FLAGS, StaticString)]) {
        key(name)
        if json { append(UInt8(ascii: "\"")) }
        var rest = flags
        var first = true
        for index in names.indices where flags & names[index].0 != 0 {
            if !first { append(UInt8(ascii: "|")) }
            append(names[index].1)
            rest &= ~names[index].0
            first = false
        }
        if rest != 0 || first {
            if !first { append(UInt8(ascii: "|")) }
            appendHex(rest)
        }
        if json { append(UInt8(ascii: "\"")) }
    }

    /// A template. At level `calls` its size; at `full` each attribute by name with its length,
    /// and its value only where TraceAttributes says it cannot be secret.
    mutating func template(_ name: StaticString, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG,
                           valuesShown: Bool) {
        key(name)
        guard let template else { return null() }
        guard full else {
            if json { appendDecimal(count) } else { append(UInt8(ascii: "[")); appendDecimal(count); append(" attributes]") }
            return
        }
        append(UInt8(ascii: "["))
        let shown = Int(min(count, 64))
        for i in 0..<shown {
            if i > 0 { append(json ? "," : ", ") }
            TraceAttributes.append(template[i], to: &self, valueShown: valuesShown)
        }
        if count > 64 { append(json ? ",\"…\"" : ", …") }
        append(UInt8(ascii: "]"))
    }
}

extension CK_FLAGS {
    static let sessionFlagNames: [(CK_FLAGS, StaticString)] = [
        (CK_FLAGS(CKF_RW_SESSION), "CKF_RW_SESSION"), (CK_FLAGS(CKF_SERIAL_SESSION), "CKF_SERIAL_SESSION"),
    ]
    static let initializeFlagNames: [(CK_FLAGS, StaticString)] = [
        (CK_FLAGS(CKF_LIBRARY_CANT_CREATE_OS_THREADS), "CKF_LIBRARY_CANT_CREATE_OS_THREADS"),
        (CK_FLAGS(CKF_OS_LOCKING_OK), "CKF_OS_LOCKING_OK"),
    ]
    static let waitFlagNames: [(CK_FLAGS, StaticString)] = [(CK_FLAGS(CKF_DONT_BLOCK), "CKF_DONT_BLOCK")]
}
