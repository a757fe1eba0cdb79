import CPKCS11
import Glibc

/// The lane (docs/FORK.md "The lane"): memory a child served by the broker shares with it, which
/// carries the calls of a worker's signing path and of its recovery in about a microsecond,
/// where a round trip over p11-kit's RPC costs a process wake-up on each side (tens of µs).
///
/// It sits in p11fork's copy of p11-kit's client function list, below the handle translation,
/// as RPCMechanisms does: both channels reach one module in the broker, with the same sessions,
/// so each call takes the lane when its arguments are of a kind the lane carries, and the RPC
/// otherwise (a mechanism parameter with pointers inside, an attribute holding attributes, a
/// missing pointer the module must judge, a buffer larger than the lane). The broker checks the
/// same rules and closes a lane that breaks them (Sources/Broker/lane.c). The threads of a child
/// take the lane one at a time, as p11-kit's client takes its connection: a thread that found it
/// taken and went over the RPC instead would meet the mechanisms the RPC does not carry.
enum Lane {
    /// The operations, numbered as in Sources/Broker/lane.c.
    private enum Operation: UInt {
        case getSessionInfo = 1, signInit, verifyInit, sign, signUpdate, signFinal, verify
        case findObjectsInit, findObjects, findObjectsFinal, getAttributeValue
        case getSlotList, getSlotInfo, getTokenInfo, openSession, closeSession, generateRandom, getMechanismInfo
    }

    /// This process's region; nil when it has none (the broker serves it over the RPC alone).
    nonisolated(unsafe) private static var region: UnsafeMutableRawPointer?
    nonisolated(unsafe) private static var data: UnsafeMutableRawPointer?
    private static let capacity = Int(CPKCS11_lane_capacity())
    /// One call at a time. Held across the broker's answer, never across a call of this process's
    /// module (there is none: the module is the broker's), so it cannot be taken again below.
    private static let lock = ForkSafeLock()
    /// The client's own functions.
    nonisolated(unsafe) private static var client = CK_FUNCTION_LIST_3_2()
    nonisolated(unsafe) private static var forkHandlerInstalled = false
    /// An output buffer may use at most this much of the lane (a request and a reply share it).
    private static var largestOutput: UInt { UInt(capacity / 2) }

    /// Whether this process's calls go over the lane (they reach the module itself: an answer
    /// is the module's, not p11-kit's client's).
    static var isActive: Bool { data != nil }

    // MARK: setting up, in a child that connects to the broker

    /// Makes this process's region; returns its descriptor for the broker, or -1 (the child is
    /// then served over the RPC alone, as before the lane).
    static func make() -> Int32 {
        if let old = region { munmap(old, Int(capacity) + 64) }
        region = nil
        data = nil
        var mapped: UnsafeMutableRawPointer?
        let fd = CPKCS11_lane_make(&mapped)
        guard fd >= 0, let mapped else { return -1 }
        if !forkHandlerInstalled {
            forkHandlerInstalled = true
            // The region is not mapped in a forked child (MADV_DONTFORK): it forgets it, and makes
            // its own when it connects.
            pthread_atfork(nil, nil, { Lane.forgetInChild() })
        }
        region = mapped
        data = CPKCS11_lane_data(mapped)
        return fd
    }

    private static func forgetInChild() {
        region = nil
        data = nil
        lock.reinitializeAfterFork()
    }

    /// Puts the lane's functions into `functions` (the client's list, before RPCMechanisms').
    static func interpose(_ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) {
        guard region != nil else { return }
        client = functions.pointee
        functions.pointee.C_GetSessionInfo = getSessionInfo
        functions.pointee.C_SignInit = signInit
        functions.pointee.C_VerifyInit = verifyInit
        functions.pointee.C_Sign = sign
        functions.pointee.C_SignUpdate = signUpdate
        functions.pointee.C_SignFinal = signFinal
        functions.pointee.C_Verify = verify
        functions.pointee.C_FindObjectsInit = findObjectsInit
        functions.pointee.C_FindObjects = findObjects
        functions.pointee.C_FindObjectsFinal = findObjectsFinal
        functions.pointee.C_GetAttributeValue = getAttributeValue
        functions.pointee.C_GetSlotList = getSlotList
        functions.pointee.C_GetSlotInfo = getSlotInfo
        functions.pointee.C_GetTokenInfo = getTokenInfo
        functions.pointee.C_GetMechanismInfo = getMechanismInfo
        functions.pointee.C_OpenSession = openSession
        functions.pointee.C_CloseSession = closeSession
        functions.pointee.C_GenerateRandom = generateRandom
    }

    // MARK: one call

    /// A word of the message: a CK_ULONG, as the broker (built for the same machine) reads it.
    private static let word = MemoryLayout<UInt>.size

    /// `length` rounded up to whole words.
    private static func padded(_ length: Int) -> Int { (length + word - 1) / word * word }

    private struct Writer {
        var at: UnsafeMutableRawPointer
        let end: UnsafeMutableRawPointer
        var fits = true

        mutating func word(_ value: UInt) {
            guard end - at >= Lane.word else { fits = false; return }
            at.storeBytes(of: value, as: UInt.self)
            at += Lane.word
        }

        mutating func bytes(_ pointer: UnsafeRawPointer?, _ length: UInt) {
            word(length)
            guard fits, length <= UInt(Int.max / 2) else { fits = false; return }
            let padded = Lane.padded(Int(length))
            guard end - at >= padded else { fits = false; return }
            if length > 0, let pointer { at.copyMemory(from: pointer, byteCount: Int(length)) }
            at += padded
        }
    }

    private struct Reader {
        var at: UnsafeRawPointer
        let end: UnsafeRawPointer

        mutating func word() -> UInt {
            guard end - at >= Lane.word else { return 0 }
            let value = at.loadUnaligned(as: UInt.self)
            at += Lane.word
            return value
        }

        /// A byte string: where its bytes are, and how many.
        mutating func bytes() -> (UnsafeRawPointer, Int) {
            let length = min(Int(clamping: word()), end - at)
            let start = at
            at += min(Lane.padded(length), end - at)
            return (start, length)
        }

        mutating func copy(into destination: UnsafeMutableRawPointer?, atMost room: Int) {
            let (start, length) = bytes()
            if let destination, length <= room { destination.copyMemory(from: start, byteCount: length) }
        }
    }

    /// Writes a request with `encode` and waits for the reply, which `decode` reads while the
    /// lane is still this thread's. Returns nil when the call must go over the RPC instead.
    @inline(__always)
    private static func call(_ operation: Operation, _ encode: (inout Writer) -> Void, _ decode: (CK_RV, inout Reader) -> Void) -> CK_RV? {
        guard self.data != nil else { return nil }
        lock.lock()
        defer { lock.unlock() }
        guard let data else { return nil }
        var writer = Writer(at: data, end: data + capacity)
        writer.word(operation.rawValue)
        encode(&writer)
        guard writer.fits, let region else { return nil }
        let length = CPKCS11_lane_call(region, UInt32(data.distance(to: writer.at)), Broker.channel)
        if length == -1 {
            // The broker closed the lane: this call was not made; this and later calls use the RPC.
            Trace.event(.fork, "the broker closed this process's lane: its calls go over p11-kit's RPC from now on")
            self.data = nil
            return nil
        }
        guard length >= Lane.word else {
            self.data = nil
            Broker.noticeEnd(seen: true)
            return CK_RV(CKR_DEVICE_ERROR)
        }
        var reader = Reader(at: UnsafeRawPointer(data), end: UnsafeRawPointer(data + length))
        let rv = CK_RV(reader.word())
        decode(rv, &reader)
        return rv
    }

    /// A mechanism the lane carries: no parameter, or the flat RSA-PSS one (the broker's rule).
    private static func carried(_ mechanism: CK_MECHANISM) -> Bool {
        if mechanism.ulParameterLen == 0 { return true }
        guard mechanism.pParameter != nil, mechanism.ulParameterLen == UInt(MemoryLayout<CK_RSA_PKCS_PSS_PARAMS>.size) else { return false }
        switch mechanism.mechanism {
        case CK_MECHANISM_TYPE(CKM_RSA_PKCS_PSS), CK_MECHANISM_TYPE(CKM_SHA1_RSA_PKCS_PSS), CK_MECHANISM_TYPE(CKM_SHA224_RSA_PKCS_PSS),
             CK_MECHANISM_TYPE(CKM_SHA256_RSA_PKCS_PSS), CK_MECHANISM_TYPE(CKM_SHA384_RSA_PKCS_PSS), CK_MECHANISM_TYPE(CKM_SHA512_RSA_PKCS_PSS):
            return true
        default:
            return false
        }
    }

    /// Attributes holding attributes (pointers inside) never take the lane.
    private static let arrayAttribute: UInt = 0x4000_0000

    /// An output buffer and its in/out length, as the lane sends it: whether there is a buffer,
    /// and its capacity (nil when it is larger than the lane carries).
    private static func output(_ buffer: UnsafeMutableRawPointer?, _ length: UInt) -> (present: UInt, capacity: UInt)? {
        if buffer == nil { return (0, 0) }
        return length <= largestOutput ? (1, length) : nil
    }

    /// Reads a produced output (length, carried count, bytes) into the caller's buffer and length.
    private static func produced(_ rv: CK_RV, _ reader: inout Reader, _ buffer: UnsafeMutableRawPointer?, _ length: UnsafeMutablePointer<CK_ULONG>, capacity: UInt) {
        let made = reader.word()
        if rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL { length.pointee = made }
        if rv == CKR_OK { reader.copy(into: buffer, atMost: Int(capacity)) }
    }

    // MARK: the functions

    private static let getSessionInfo: CK_C_GetSessionInfo = { session, info in
        guard let info else { return client.C_GetSessionInfo!(session, info) }
        return call(.getSessionInfo, { $0.word(session) }) { rv, reply in
            guard rv == CKR_OK else { return }
            info.pointee.slotID = reply.word()
            info.pointee.state = reply.word()
            info.pointee.flags = reply.word()
            info.pointee.ulDeviceError = reply.word()
        } ?? client.C_GetSessionInfo!(session, info)
    }

    private static func start(_ operation: Operation, _ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?, _ key: CK_OBJECT_HANDLE) -> CK_RV? {
        guard let mechanism, carried(mechanism.pointee) else { return nil }
        return call(operation, {
            $0.word(session)
            $0.word(mechanism.pointee.mechanism)
            $0.word(key)
            $0.bytes(mechanism.pointee.pParameter, mechanism.pointee.ulParameterLen)
        }) { _, _ in }
    }

    private static let signInit: CK_C_SignInit = { session, mechanism, key in
        start(.signInit, session, mechanism, key) ?? client.C_SignInit!(session, mechanism, key)
    }

    private static let verifyInit: CK_C_VerifyInit = { session, mechanism, key in
        start(.verifyInit, session, mechanism, key) ?? client.C_VerifyInit!(session, mechanism, key)
    }

    private static let sign: CK_C_Sign = { session, data, dataLength, signature, signatureLength in
        guard let signatureLength, data != nil || dataLength == 0, dataLength <= largestOutput,
              let out = output(signature, signatureLength.pointee) else { return client.C_Sign!(session, data, dataLength, signature, signatureLength) }
        return call(.sign, {
            $0.word(session)
            $0.bytes(data, dataLength)
            $0.word(out.present)
            $0.word(out.capacity)
        }) { rv, reply in produced(rv, &reply, signature, signatureLength, capacity: out.capacity) }
            ?? client.C_Sign!(session, data, dataLength, signature, signatureLength)
    }

    private static let signUpdate: CK_C_SignUpdate = { session, part, length in
        guard part != nil || length == 0, length <= largestOutput else { return client.C_SignUpdate!(session, part, length) }
        return call(.signUpdate, {
            $0.word(session)
            $0.bytes(part, length)
        }) { _, _ in } ?? client.C_SignUpdate!(session, part, length)
    }

    private static let signFinal: CK_C_SignFinal = { session, signature, signatureLength in
        guard let signatureLength, let out = output(signature, signatureLength.pointee) else {
            return client.C_SignFinal!(session, signature, signatureLength)
        }
        return call(.signFinal, {
            $0.word(session)
            $0.word(out.present)
            $0.word(out.capacity)
        }) { rv, reply in produced(rv, &reply, signature, signatureLength, capacity: out.capacity) }
            ?? client.C_SignFinal!(session, signature, signatureLength)
    }

    private static let verify: CK_C_Verify = { session, data, dataLength, signature, signatureLength in
        guard data != nil || dataLength == 0, signature != nil || signatureLength == 0,
              dataLength <= largestOutput, signatureLength <= largestOutput else {
            return client.C_Verify!(session, data, dataLength, signature, signatureLength)
        }
        return call(.verify, {
            $0.word(session)
            $0.bytes(data, dataLength)
            $0.bytes(signature, signatureLength)
        }) { _, _ in } ?? client.C_Verify!(session, data, dataLength, signature, signatureLength)
    }

    private static let findObjectsInit: CK_C_FindObjectsInit = { session, template, count in
        let attributes = UnsafeMutableBufferPointer(start: template, count: template == nil ? 0 : Int(count))
        guard template != nil || count == 0, count <= 256,
              attributes.allSatisfy({ $0.type & arrayAttribute == 0 && ($0.pValue != nil || $0.ulValueLen == 0) }) else {
            return client.C_FindObjectsInit!(session, template, count)
        }
        return call(.findObjectsInit, {
            $0.word(session)
            $0.word(count)
            for attribute in attributes {
                $0.word(attribute.type)
                $0.word(attribute.pValue == nil ? 0 : 1)
                $0.bytes(attribute.pValue, attribute.ulValueLen)
            }
        }) { _, _ in } ?? client.C_FindObjectsInit!(session, template, count)
    }

    private static let findObjects: CK_C_FindObjects = { session, objects, most, found in
        guard let objects, let found, most <= 16384 else { return client.C_FindObjects!(session, objects, most, found) }
        return call(.findObjects, {
            $0.word(session)
            $0.word(most)
        }) { rv, reply in
            guard rv == CKR_OK else { return }
            let count = min(reply.word(), most)
            for i in 0..<Int(count) { objects[i] = reply.word() }
            found.pointee = count
        } ?? client.C_FindObjects!(session, objects, most, found)
    }

    private static let findObjectsFinal: CK_C_FindObjectsFinal = { session in
        call(.findObjectsFinal, { $0.word(session) }) { _, _ in } ?? client.C_FindObjectsFinal!(session)
    }

    private static let getAttributeValue: CK_C_GetAttributeValue = { session, object, template, count in
        let attributes = UnsafeMutableBufferPointer(start: template, count: template == nil ? 0 : Int(count))
        guard template != nil, count <= 256,
              attributes.allSatisfy({ $0.type & arrayAttribute == 0 && ($0.pValue == nil || $0.ulValueLen <= largestOutput) }) else {
            return client.C_GetAttributeValue!(session, object, template, count)
        }
        return call(.getAttributeValue, {
            $0.word(session)
            $0.word(object)
            $0.word(count)
            for attribute in attributes {
                $0.word(attribute.type)
                $0.word(attribute.pValue == nil ? 0 : 1)
                $0.word(attribute.pValue == nil ? 0 : attribute.ulValueLen)
            }
        }) { rv, reply in
            // The lengths and values the module set, for the answers that set them (2.40 5.7).
            guard rv == CKR_OK || rv == CKR_ATTRIBUTE_SENSITIVE || rv == CKR_ATTRIBUTE_TYPE_INVALID || rv == CKR_BUFFER_TOO_SMALL else { return }
            for i in attributes.indices {
                let length = reply.word()
                let written = reply.word() != 0
                let room = Int(clamping: attributes[i].ulValueLen)
                if attributes[i].pValue != nil {
                    // The value's room follows the two words, as large as the caller's buffer.
                    let (start, carried) = (reply.at, Int(clamping: length))
                    if written, carried <= room { attributes[i].pValue!.copyMemory(from: start, byteCount: carried) }
                    reply.at += min(Lane.padded(room), reply.end - reply.at)
                }
                attributes[i].ulValueLen = length
            }
        } ?? client.C_GetAttributeValue!(session, object, template, count)
    }

    private static let getSlotList: CK_C_GetSlotList = { present, list, count in
        guard let count, list == nil || count.pointee <= 16384 else { return client.C_GetSlotList!(present, list, count) }
        let out: (present: UInt, capacity: UInt) = list == nil ? (0, 0) : (1, count.pointee)
        return call(.getSlotList, {
            $0.word(UInt(present))
            $0.word(out.present)
            $0.word(out.capacity)
        }) { rv, reply in
            let slots = reply.word()
            guard rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL else { return }
            count.pointee = slots
            if rv == CKR_OK, let list, slots <= out.capacity {
                for i in 0..<Int(slots) { list[i] = reply.word() }
            }
        } ?? client.C_GetSlotList!(present, list, count)
    }

    private static let getSlotInfo: CK_C_GetSlotInfo = { slot, info in
        guard let info else { return client.C_GetSlotInfo!(slot, info) }
        return call(.getSlotInfo, { $0.word(slot) }) { rv, reply in
            if rv == CKR_OK { reply.copy(into: info, atMost: MemoryLayout<CK_SLOT_INFO>.size) }
        } ?? client.C_GetSlotInfo!(slot, info)
    }

    private static let getTokenInfo: CK_C_GetTokenInfo = { slot, info in
        guard let info else { return client.C_GetTokenInfo!(slot, info) }
        return call(.getTokenInfo, { $0.word(slot) }) { rv, reply in
            if rv == CKR_OK { reply.copy(into: info, atMost: MemoryLayout<CK_TOKEN_INFO>.size) }
        } ?? client.C_GetTokenInfo!(slot, info)
    }

    private static let getMechanismInfo: CK_C_GetMechanismInfo = { slot, type, info in
        guard let info else { return client.C_GetMechanismInfo!(slot, type, info) }
        return call(.getMechanismInfo, {
            $0.word(slot)
            $0.word(type)
        }) { rv, reply in
            guard rv == CKR_OK else { return }
            info.pointee.ulMinKeySize = reply.word()
            info.pointee.ulMaxKeySize = reply.word()
            info.pointee.flags = reply.word()
        } ?? client.C_GetMechanismInfo!(slot, type, info)
    }

    private static let openSession: CK_C_OpenSession = { slot, flags, application, notify, session in
        // A callback cannot cross processes: neither the lane nor p11-kit's client carries one.
        guard let session else { return client.C_OpenSession!(slot, flags, application, notify, session) }
        return call(.openSession, {
            $0.word(slot)
            $0.word(flags)
        }) { rv, reply in
            let opened = reply.word()
            if rv == CKR_OK { session.pointee = opened }
        } ?? client.C_OpenSession!(slot, flags, application, notify, session)
    }

    private static let closeSession: CK_C_CloseSession = { session in
        call(.closeSession, { $0.word(session) }) { _, _ in } ?? client.C_CloseSession!(session)
    }

    private static let generateRandom: CK_C_GenerateRandom = { session, random, length in
        guard let random, length <= largestOutput else { return client.C_GenerateRandom!(session, random, length) }
        return call(.generateRandom, {
            $0.word(session)
            $0.word(length)
        }) { rv, reply in
            if rv == CKR_OK { reply.copy(into: random, atMost: Int(length)) }
        } ?? client.C_GenerateRandom!(session, random, length)
    }
}
