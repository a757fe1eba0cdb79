import CPKCS11
import Glibc
import Synchronization

// Operations in a child: the parent's operations in progress started again on the re-opened
// session, and a carried-over search handed out from p11fork's list.
extension Operations {
    /// In a child, when `virtual` has been re-opened as `real` (and logged in): starts again every
    /// operation the parent had in progress on it. Under Recovery.lock.
    static func replay(_ virtual: CK_SESSION_HANDLE, real: CK_SESSION_HANDLE, _ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) {
        guard let entry = Sessions.view.entry(virtual) else { return }
        let state = entry.pointee.state.load(ordering: .relaxed)
        var carried: UInt = 0
        for kind in OperationKind.allCases where state & kind.active != 0 {
            let started = Clock.monotonicNanoseconds()
            let record = Records.lock.withLock { recordLocked(virtual, kind) }
            let outcome = record.map { replay($0, virtual, real, functions) } ?? .failure("nothing was recorded about it")
            switch outcome {
            case .success(let summary):
                carried |= kind.active | (state & (kind.recording | kind.fed))
                if kind == .find { carried |= OperationKind.findQueued }
                Trace.event(.fork, "operation \(kind.initName) on session 0x\(Format.hex(virtual)) carried into the child: \(summary) (\(Format.milliseconds(since: started)))",
                            .step(.operation, .ok, since: started))
            case .failure(let why):
                // Not carried: what the parent fed it is wiped in this child now.
                Records.lock.withLock {
                    guard let operations = records[virtual], let record = operations.list[kind.rawValue] else { return }
                    drop(record)
                    operations.list[kind.rawValue] = nil
                }
                Trace.event(.fork, "operation \(kind.initName) on session 0x\(Format.hex(virtual)) is not carried into the child: \(why); the calls that continue it get CKR_OPERATION_NOT_INITIALIZED",
                            .step(.operation, .lost, since: started))
            }
        }
        entry.pointee.state.store(carried, ordering: .relaxed)
    }

    private enum Outcome {
        case success(String)
        case failure(String)
    }

    private static func replay(_ record: OperationRecord, _ virtual: CK_SESSION_HANDLE, _ real: CK_SESSION_HANDLE,
                               _ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) -> Outcome {
        if let why = record.notReplayable { return .failure(why) }
        if record.kind == .find { return replaySearch(record, virtual, real, functions) }
        guard let mechanism = record.mechanism else { return .failure("nothing was recorded about its mechanism") }
        func resolve(_ object: CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE? {
            var failure = CK_RV(CKR_OK)
            let real = Recovery.object(object, &failure)
            return failure == CKR_OK && real != CK_OBJECT_HANDLE(CK_INVALID_HANDLE) ? real : nil
        }
        var realKey = CK_OBJECT_HANDLE(CK_INVALID_HANDLE)
        if record.key != 0 {
            guard let resolved = resolve(record.key) else { return .failure("its key 0x\(Format.hex(record.key)) is lost in this child") }
            realKey = resolved
        }
        let rv = mechanism.withMechanism(resolve: resolve) { pointer -> CK_RV in
            switch record.kind {
            case .encrypt: functions.pointee.C_EncryptInit?(real, pointer, realKey) ?? notSupported
            case .decrypt: functions.pointee.C_DecryptInit?(real, pointer, realKey) ?? notSupported
            case .digest: functions.pointee.C_DigestInit?(real, pointer) ?? notSupported
            case .sign: functions.pointee.C_SignInit?(real, pointer, realKey) ?? notSupported
            case .verify: functions.pointee.C_VerifyInit?(real, pointer, realKey) ?? notSupported
            case .signRecover: functions.pointee.C_SignRecoverInit?(real, pointer, realKey) ?? notSupported
            case .verifyRecover: functions.pointee.C_VerifyRecoverInit?(real, pointer, realKey) ?? notSupported
            case .messageEncrypt: functions.pointee.C_MessageEncryptInit?(real, pointer, realKey) ?? notSupported
            case .messageDecrypt: functions.pointee.C_MessageDecryptInit?(real, pointer, realKey) ?? notSupported
            case .messageSign: functions.pointee.C_MessageSignInit?(real, pointer, realKey) ?? notSupported
            case .messageVerify: functions.pointee.C_MessageVerifyInit?(real, pointer, realKey) ?? notSupported
            case .verifySignature:
                functions.pointee.C_VerifySignatureInit?(real, pointer, realKey, record.signature?.pointer,
                                                         CK_ULONG(record.signature?.count ?? 0)) ?? notSupported
            case .find: notSupported
            }
        }
        guard let rv else { return .failure("a key named in its \(mechanism.name) parameter is lost in this child") }
        guard rv == CKR_OK else { return .failure("\(record.kind.initName) answered \(Format.name(rv))") }
        var summary = "\(record.kind.initName) (\(mechanism.name)\(record.key != 0 ? ", key 0x\(Format.hex(record.key))" : ""))"
        if let pin = record.contextPIN {
            let rv = functions.pointee.C_Login?(real, CK_USER_TYPE(CKU_CONTEXT_SPECIFIC), pin.bytes, CK_ULONG(pin.count)) ?? notSupported
            guard rv == CKR_OK else { return .failure("the context-specific login answered \(Format.name(rv))") }
            summary += ", context-specific login"
        }
        var offset = 0
        var bytes = 0
        for part in record.parts {
            let rv: CK_RV
            switch part {
            case .key(let key):
                guard let realKey = resolve(key) else { return .failure("the key 0x\(Format.hex(key)) it digested is lost in this child") }
                rv = functions.pointee.C_DigestKey?(real, realKey) ?? notSupported
            case .data(let count):
                let data = record.data.map { $0.pointer + offset }
                rv = update(record.kind, real, data, count, functions)
                offset += count
                bytes += count
            }
            guard rv == CKR_OK else { return .failure("replaying its data answered \(Format.name(rv))") }
        }
        if !record.parts.isEmpty { summary += " and \(record.parts.count) update(s) of \(bytes) bytes" }
        summary += " replayed"
        if record.inMessage { summary += "; the message the parent had begun is not carried (the child's C_*MessageNext gets the module's answer)" }
        return .success(summary)
    }

    private static let notSupported = CK_RV(CKR_FUNCTION_NOT_SUPPORTED)

    /// Feeds one recorded part again; what an encryption or decryption gives back was already
    /// given to the parent, and is wiped.
    private static func update(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ data: UnsafeMutablePointer<UInt8>?, _ count: Int,
                               _ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) -> CK_RV {
        switch kind {
        case .digest: return functions.pointee.C_DigestUpdate?(session, data, CK_ULONG(count)) ?? notSupported
        case .sign: return functions.pointee.C_SignUpdate?(session, data, CK_ULONG(count)) ?? notSupported
        case .verify: return functions.pointee.C_VerifyUpdate?(session, data, CK_ULONG(count)) ?? notSupported
        case .verifySignature: return functions.pointee.C_VerifySignatureUpdate?(session, data, CK_ULONG(count)) ?? notSupported
        case .encrypt, .decrypt:
            guard let function = kind == .encrypt ? functions.pointee.C_EncryptUpdate : functions.pointee.C_DecryptUpdate else { return notSupported }
            var capacity = count + 256
            while true {
                let output = UnsafeMutablePointer<UInt8>.allocate(capacity: capacity)
                defer {
                    explicit_bzero(output, capacity)
                    output.deallocate()
                }
                var length = CK_ULONG(capacity)
                let rv = function(session, data, CK_ULONG(count), output, &length)
                guard rv == CKR_BUFFER_TOO_SMALL, Int(length) > capacity else { return rv }
                capacity = Int(length)
            }
        default:
            return CK_RV(CKR_OPERATION_NOT_INITIALIZED)
        }
    }

    /// A search: run again to its end in the child; what the parent was already given is left
    /// out, the rest is handed out by C_FindObjects from p11fork's list.
    private static func replaySearch(_ record: OperationRecord, _ virtual: CK_SESSION_HANDLE, _ real: CK_SESSION_HANDLE,
                                     _ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) -> Outcome {
        guard let template = record.template, let initFind = functions.pointee.C_FindObjectsInit,
              let findObjects = functions.pointee.C_FindObjects, let finalFind = functions.pointee.C_FindObjectsFinal
        else { return .failure("nothing was recorded about its template") }
        SessionObjects.remakeAll()
        let rv = template.withTemplate { initFind(real, $0, $1) }
        guard rv == CKR_OK else { return .failure("C_FindObjectsInit answered \(Format.name(rv))") }
        var reals: [CK_OBJECT_HANDLE] = []
        var batch = [CK_OBJECT_HANDLE](repeating: 0, count: 64)
        while true {
            var count: CK_ULONG = 0
            let rv = findObjects(real, &batch, 64, &count)
            guard rv == CKR_OK else {
                _ = finalFind(real)
                return .failure("C_FindObjects answered \(Format.name(rv))")
            }
            if count == 0 { break }
            reals += batch.prefix(Int(count))
        }
        _ = finalFind(real)
        let given = Set(record.found)
        var rest: [CK_OBJECT_HANDLE] = []
        for object in reals {
            let exposed = Objects.expose(real: object, session: virtual)
            if !given.contains(exposed) { rest.append(exposed) }
        }
        Records.lock.withLock { records[virtual]?.foundQueue = rest }
        return .success("C_FindObjectsInit replayed; \(reals.count) match(es), \(reals.count - rest.count) already returned to the parent, \(rest.count) left")
    }

    /// In a child whose search was carried over: the next handles, or nil when `session` has none.
    static func nextFound(_ session: CK_SESSION_HANDLE, into handles: UnsafeMutablePointer<CK_OBJECT_HANDLE>?,
                          max: CK_ULONG, count: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV? {
        guard let entry = Sessions.view.entry(session),
              entry.pointee.state.load(ordering: .relaxed) & OperationKind.findQueued != 0 else { return nil }
        guard let handles, let count else { return CK_RV(CKR_ARGUMENTS_BAD) }
        let taken = Records.lock.withLock { () -> [CK_OBJECT_HANDLE] in
            guard let operations = records[session], var queue = operations.foundQueue else { return [] }
            let taken = Array(queue.prefix(Int(max)))
            queue.removeFirst(taken.count)
            operations.foundQueue = queue
            return taken
        }
        for (i, handle) in taken.enumerated() { handles[i] = handle }
        count.pointee = CK_ULONG(taken.count)
        return CK_RV(CKR_OK)
    }

    /// In a child whose search was carried over: C_FindObjectsFinal ends it here (the module's
    /// own search already ended). Nil when `session` has no such search.
    static func finishFound(_ session: CK_SESSION_HANDLE) -> CK_RV? {
        guard let entry = Sessions.view.entry(session),
              entry.pointee.state.load(ordering: .relaxed) & OperationKind.findQueued != 0 else { return nil }
        Records.lock.withLock { records[session]?.foundQueue = nil }
        entry.pointee.state.bitwiseAnd(~(OperationKind.findQueued | OperationKind.find.active | OperationKind.find.recording), ordering: .relaxed)
        return CK_RV(CKR_OK)
    }

    /// True while a carried-over search is open on `session` (C_FindObjectsInit then answers
    /// CKR_OPERATION_ACTIVE, as the module would).
    static func searchQueued(_ session: CK_SESSION_HANDLE) -> Bool {
        guard let entry = Sessions.view.entry(session) else { return false }
        return entry.pointee.state.load(ordering: .relaxed) & OperationKind.findQueued != 0
    }
}
