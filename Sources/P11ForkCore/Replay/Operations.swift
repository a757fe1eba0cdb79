import CPKCS11
import Glibc
import Synchronization

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

/// What was recorded about one operation in progress, to start it again in a child and feed
/// it what the parent fed it.
final class OperationRecord {
    enum Part {
        case data(Int)
        case key(CK_OBJECT_HANDLE)
    }

    let kind: OperationKind
    let mechanism: KeptMechanism?
    let key: CK_OBJECT_HANDLE
    let template: KeptTemplate?
    /// The signature C_VerifySignatureInit was given (3.2).
    let signature: KeptBytes?
    var parts: [Part] = []
    /// The data parts, one after the other.
    var data: KeptBytes?
    /// Handles a search already returned (virtual).
    var found: [CK_OBJECT_HANDLE] = []
    /// The PIN of a context-specific login made for this operation.
    var contextPIN: Secret?
    /// A multi-part message (3.0 C_*MessageBegin) was begun and not ended.
    var inMessage = false
    /// Why this operation cannot be carried into a child; nil while it can.
    var notReplayable: String?
    /// Bytes taken from ReplayBudget, and the part of them taken by fed data and found handles.
    var reserved = 0
    var fedBytes = 0

    init(kind: OperationKind, mechanism: KeptMechanism?, key: CK_OBJECT_HANDLE, template: KeptTemplate?, signature: KeptBytes? = nil) {
        self.kind = kind
        self.mechanism = mechanism
        self.key = key
        self.template = template
        self.signature = signature
    }

    /// The same init again (under Records.lock): what was fed is wiped and given back to the
    /// budget; the buffers stay for the next updates.
    func restart() {
        ReplayBudget.releaseLocked(fedBytes)
        reserved -= fedBytes
        fedBytes = 0
        data?.clear()
        parts.removeAll(keepingCapacity: true)
        found.removeAll(keepingCapacity: true)
        contextPIN?.wipe()
        contextPIN = nil
        inMessage = false
        if notReplayable != nil {
            // It stopped being kept (the bound, C_SetOperationState): its mechanism still is.
            notReplayable = nil
        }
    }

    func discard() {
        contextPIN?.wipe()
        contextPIN = nil
        data = nil
    }
}

/// Operations in progress, recorded in the parent so that a child can continue them (docs/DESIGN.md
/// "Recovery in the child", step 6): the init call (mechanism deep-copied, key), the data fed
/// to updates (bounded by ReplayBudget), the handles a search returned, a context-specific login.
///
/// What the signing path pays: the init call keeps its mechanism (a small allocation, a lock);
/// a single-part C_Sign only clears a bit in the session's state word; updates copy their data.
/// A child replays the operations of a session when it re-opens the session.
enum Operations {
    /// What is recorded for one session (changed in place, under Records.lock).
    final class SessionOperations {
        var list = [OperationRecord?](repeating: nil, count: OperationKind.allCases.count)
        /// The operation that most recently took a key (for C_Login(CKU_CONTEXT_SPECIFIC)).
        var lastKeyed: OperationKind?
        /// In a child: search results still to hand out.
        var foundQueue: [CK_OBJECT_HANDLE]?
    }

    // Guarded by Records.lock.
    nonisolated(unsafe) static var records: [CK_SESSION_HANDLE: SessionOperations] = [:]

    private static func recordLocked(_ session: CK_SESSION_HANDLE, _ kind: OperationKind) -> OperationRecord? {
        records[session]?.list[kind.rawValue]
    }

    // MARK: recording (in every process; the fast paths are inlined into the forwarders)

    /// After a C_*Init. A NULL mechanism that succeeds ends the operation (PKCS#11 3.0).
    @inline(__always)
    static func started(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                        key: CK_OBJECT_HANDLE, _ rv: CK_RV) {
        guard rv == CKR_OK else { return }
        if mechanism == nil { return end(kind, session) }
        begin(kind, session, mechanism: mechanism, key: key, template: nil, count: 0)
    }

    /// After C_VerifySignatureInit (3.2): the signature is kept with the operation.
    static func started(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                        key: CK_OBJECT_HANDLE, _ rv: CK_RV, signature: UnsafeMutablePointer<CK_BYTE>?, _ length: CK_ULONG) {
        guard rv == CKR_OK else { return }
        if mechanism == nil { return end(kind, session) }
        begin(kind, session, mechanism: mechanism, key: key, template: nil, count: 0, signature: signature, signatureLength: length)
    }

    /// After C_FindObjectsInit.
    static func searchStarted(_ session: CK_SESSION_HANDLE, _ template: UnsafeMutablePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG, _ rv: CK_RV) {
        guard rv == CKR_OK else { return }
        begin(.find, session, mechanism: nil, key: 0, template: template, count: count)
    }

    /// After a call that ends an operation unless it only asked for a length or was given too
    /// small a buffer (single-part calls, C_*Final; C_Verify* always end it).
    @inline(__always)
    static func finished(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ rv: CK_RV, lengthQuery: Bool) {
        if rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && lengthQuery) { return }
        end(kind, session)
    }

    /// After a C_*Update (or the half of a dual-function update that feeds `kind`).
    @inline(__always)
    static func fed(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ rv: CK_RV, _ data: UnsafeRawPointer?,
                    _ count: CK_ULONG, lengthQuery: Bool) {
        if rv == CKR_OK {
            guard !lengthQuery, let entry = Sessions.view.entry(session),
                  entry.pointee.state.load(ordering: .relaxed) & kind.recording != 0 else { return }
            keep(kind, session, .data(Int(count)), data)
        } else if rv != CKR_BUFFER_TOO_SMALL {
            end(kind, session)
        }
    }

    /// After C_DigestKey.
    static func fedKey(_ session: CK_SESSION_HANDLE, _ key: CK_OBJECT_HANDLE, _ rv: CK_RV) {
        if rv == CKR_OK {
            guard let entry = Sessions.view.entry(session),
                  entry.pointee.state.load(ordering: .relaxed) & OperationKind.digest.recording != 0 else { return }
            keep(.digest, session, .key(key), nil)
        } else {
            end(.digest, session)
        }
    }

    @inline(__always)
    static func end(_ kind: OperationKind, _ session: CK_SESSION_HANDLE) {
        guard let entry = Sessions.view.entry(session) else { return }
        let state = entry.pointee.state.load(ordering: .relaxed)
        if _slowPath(state & kind.active != 0) {
            entry.pointee.state.bitwiseAnd(~(kind.active | kind.recording | kind.fed), ordering: .relaxed)
            if state & kind.fed != 0 { wipeFed(kind, session) }
        }
    }

    /// An operation that was fed data ended: the data (and a context-specific PIN) is wiped now,
    /// not when the session closes; its mechanism and buffers stay for the next init.
    @inline(never)
    private static func wipeFed(_ kind: OperationKind, _ session: CK_SESSION_HANDLE) {
        Records.lock.withLock { recordLocked(session, kind)?.restart() }
    }

    @inline(never)
    private static func begin(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                              key: CK_OBJECT_HANDLE, template: UnsafeMutablePointer<CK_ATTRIBUTE>?, count: CK_ULONG,
                              signature: UnsafeMutablePointer<CK_BYTE>? = nil, signatureLength: CK_ULONG = 0) {
        guard let entry = Sessions.view.entry(session), !ReplayBudget.isOff else { return }
        // The common case on a signing path: the same init again on a session whose last one of
        // this kind was never fed anything. The record is kept as it is.
        // Its fed data is wiped and its buffers are kept: no allocation in a steady state.
        // (Not for a verification given its signature: that signature is new each time.)
        if kind != .find, kind != .verifySignature, let mechanism, Records.lock.withLock({ () -> Bool in
            guard let operations = records[session], let old = operations.list[kind.rawValue], old.key == key,
                  old.mechanism?.isSame(as: mechanism) == true else { return false }
            old.restart()
            if key != 0 { operations.lastKeyed = kind }
            return true
        }) {
            entry.pointee.state.bitwiseOr(kind.active | kind.recording, ordering: .relaxed)
            return
        }
        var why: String?
        var kept: KeptMechanism?
        var keptTemplate: KeptTemplate?
        if kind == .find {
            keptTemplate = KeptTemplate.copy(template, count)
            if keptTemplate == nil { why = "its search template could not be kept" }
        } else {
            switch KeptMechanism.copy(mechanism) {
            case .kept(let copy): kept = copy
            case .notReplayable(let reason): why = reason
            }
        }
        var keptSignature: KeptBytes?
        if kind == .verifySignature, why == nil, signatureLength > 0 {
            keptSignature = KeptBytes(copying: signature, count: Int(signatureLength))
            if keptSignature == nil { why = "no memory was left to keep its signature" }
        }
        let record = OperationRecord(kind: kind, mechanism: kept, key: key, template: keptTemplate, signature: keptSignature)
        record.notReplayable = why
        let size = (kept?.byteCount ?? 0) + (keptTemplate?.byteCount ?? 0) + (keptSignature?.count ?? 0)
        let replayable = Records.lock.withLock { () -> Bool in
            let operations = records[session] ?? SessionOperations()
            if records[session] == nil { records[session] = operations }
            if let old = operations.list[kind.rawValue] { drop(old) }
            if why == nil {
                if ReplayBudget.reserveLocked(size) {
                    record.reserved = size
                } else {
                    record.notReplayable = overLimit
                }
            }
            operations.list[kind.rawValue] = record
            if key != 0 { operations.lastKeyed = kind }
            return record.notReplayable == nil
        }
        if !replayable { record.discard() }
        entry.pointee.state.bitwiseOr(kind.active | (replayable ? kind.recording : 0), ordering: .relaxed)
    }

    @inline(never)
    private static func keep(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ part: OperationRecord.Part, _ bytes: UnsafeRawPointer?) {
        let keeping = Records.lock.withLock { () -> Bool in
            guard let record = recordLocked(session, kind), record.notReplayable == nil else { return false }
            if case .data(let count) = part, count > 0 {
                guard let bytes, ReplayBudget.reserveLocked(count) else {
                    record.notReplayable = overLimit
                    ReplayBudget.releaseLocked(record.fedBytes)
                    record.reserved -= record.fedBytes
                    record.fedBytes = 0
                    record.data?.clear()
                    record.parts.removeAll()
                    record.contextPIN?.wipe()
                    record.contextPIN = nil
                    return false
                }
                record.reserved += count
                record.fedBytes += count
                let held = record.data?.count ?? 0
                if record.data?.append(bytes, count: count) != true {
                    guard let grown = KeptBytes(copying: record.data?.start, count: held, capacity: max(256, 2 * (held + count))) else {
                        record.notReplayable = "no memory was left to keep its data"
                        record.discard()
                        return false
                    }
                    _ = grown.append(bytes, count: count)
                    record.data = grown
                }
            }
            record.parts.append(part)
            return true
        }
        guard let entry = Sessions.view.entry(session) else { return }
        entry.pointee.state.bitwiseOr(keeping ? kind.fed : 0, ordering: .relaxed)
        if !keeping { entry.pointee.state.bitwiseAnd(~kind.recording, ordering: .relaxed) }
    }

    private static var overLimit: String {
        "p11fork's replay memory (P11FORK_REPLAY_LIMIT, \(ReplayBudget.limit) bytes) was full"
    }

    /// After C_FindObjects in any process: the handles returned, so that a child skips them.
    static func noteFound(_ session: CK_SESSION_HANDLE, _ handles: UnsafeMutablePointer<CK_OBJECT_HANDLE>, _ count: Int) {
        guard count > 0, let entry = Sessions.view.entry(session),
              entry.pointee.state.load(ordering: .relaxed) & OperationKind.find.recording != 0 else { return }
        let keeping = Records.lock.withLock { () -> Bool in
            guard let record = recordLocked(session, .find), record.notReplayable == nil else { return false }
            guard ReplayBudget.reserveLocked(count * 8) else {
                record.notReplayable = overLimit
                return false
            }
            record.reserved += count * 8
            record.fedBytes += count * 8
            record.found.append(contentsOf: UnsafeBufferPointer(start: handles, count: count))
            return true
        }
        if !keeping { entry.pointee.state.bitwiseAnd(~OperationKind.find.recording, ordering: .relaxed) }
    }

    /// After C_Login(CKU_CONTEXT_SPECIFIC): the PIN belongs to the operation that took a key last.
    static func contextLogin(_ session: CK_SESSION_HANDLE, pin: UnsafeMutablePointer<CK_UTF8CHAR>?, length: CK_ULONG) {
        guard !ReplayBudget.isOff, let entry = Sessions.view.entry(session) else { return }
        let state = entry.pointee.state.load(ordering: .relaxed)
        let secret = pin.flatMap { Secret(copying: $0, count: Int(length)) }
        let (previous, kind) = Records.lock.withLock { () -> (Secret?, OperationKind?) in
            guard let kind = records[session]?.lastKeyed, state & kind.active != 0,
                  let record = recordLocked(session, kind) else { return (secret, nil) }
            let previous = record.contextPIN
            record.contextPIN = secret
            return (previous, kind)
        }
        previous?.wipe()
        if let kind { entry.pointee.state.bitwiseOr(kind.fed, ordering: .relaxed) }
    }

    /// After C_*MessageBegin / C_*MessageNext (3.0): whether a multi-part message is open.
    static func message(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, open: Bool, _ rv: CK_RV) {
        guard rv == CKR_OK, let entry = Sessions.view.entry(session),
              entry.pointee.state.load(ordering: .relaxed) & kind.active != 0 else { return }
        Records.lock.withLock { recordLocked(session, kind)?.inMessage = open }
    }

    /// After C_SessionCancel (3.0).
    static func cancelled(_ session: CK_SESSION_HANDLE, _ flags: CK_FLAGS, _ rv: CK_RV) {
        guard rv == CKR_OK else { return }
        for kind in OperationKind.allCases where flags & kind.cancelFlag != 0 { end(kind, session) }
    }

    /// After C_SetOperationState: the session's state is now the module's own, not what p11fork saw.
    static func stateSet(_ session: CK_SESSION_HANDLE, _ rv: CK_RV) {
        guard rv == CKR_OK, let entry = Sessions.view.entry(session) else { return }
        Records.lock.withLock {
            for record in records[session]?.list ?? [] {
                guard let record else { continue }
                record.notReplayable = "its state was replaced by C_SetOperationState, which p11fork cannot replay"
                record.discard()
            }
        }
        var recording: UInt = 0
        for kind in OperationKind.allCases { recording |= kind.recording }
        entry.pointee.state.bitwiseAnd(~recording, ordering: .relaxed)
    }

    /// Sessions closed (or C_Finalize): their records go. Under Records.lock.
    static func forgetLocked(_ sessions: some Sequence<CK_SESSION_HANDLE>) {
        for session in sessions {
            for record in records.removeValue(forKey: session)?.list ?? [] { if let record { drop(record) } }
        }
    }

    static func forgetAllLocked() { forgetLocked(Array(records.keys)) }

    private static func drop(_ record: OperationRecord) {
        ReplayBudget.releaseLocked(record.reserved)
        record.reserved = 0
        record.discard()
    }

    /// Gives back what records of operations that have ended still hold. Under Records.lock.
    static func collectEndedLocked() {
        for (session, operations) in records {
            let state = Sessions.view.entry(session)?.pointee.state.load(ordering: .relaxed) ?? 0
            for (index, record) in operations.list.enumerated() {
                guard let record, state & OperationKind.allCases[index].active == 0 else { continue }
                drop(record)
                operations.list[index] = nil
            }
        }
    }

    // MARK: in a child

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
                Trace.event(.fork, "operation \(kind.initName) on session 0x\(Recovery.hex(virtual)) carried into the child: \(summary) (\(Recovery.milliseconds(since: started)))")
            case .failure(let why):
                // Not carried: what the parent fed it is wiped in this child now.
                Records.lock.withLock {
                    guard let operations = records[virtual], let record = operations.list[kind.rawValue] else { return }
                    drop(record)
                    operations.list[kind.rawValue] = nil
                }
                Trace.event(.fork, "operation \(kind.initName) on session 0x\(Recovery.hex(virtual)) is not carried into the child: \(why); the calls that continue it get CKR_OPERATION_NOT_INITIALIZED")
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
            guard let resolved = resolve(record.key) else { return .failure("its key 0x\(Recovery.hex(record.key)) is lost in this child") }
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
        guard rv == CKR_OK else { return .failure("\(record.kind.initName) answered \(Recovery.name(rv))") }
        var summary = "\(record.kind.initName) (\(mechanism.name)\(record.key != 0 ? ", key 0x\(Recovery.hex(record.key))" : ""))"
        if let pin = record.contextPIN {
            let rv = functions.pointee.C_Login?(real, CK_USER_TYPE(CKU_CONTEXT_SPECIFIC), pin.bytes, CK_ULONG(pin.count)) ?? notSupported
            guard rv == CKR_OK else { return .failure("the context-specific login answered \(Recovery.name(rv))") }
            summary += ", context-specific login"
        }
        var offset = 0
        var bytes = 0
        for part in record.parts {
            let rv: CK_RV
            switch part {
            case .key(let key):
                guard let realKey = resolve(key) else { return .failure("the key 0x\(Recovery.hex(key)) it digested is lost in this child") }
                rv = functions.pointee.C_DigestKey?(real, realKey) ?? notSupported
            case .data(let count):
                let data = record.data.map { $0.pointer + offset }
                rv = update(record.kind, real, data, count, functions)
                offset += count
                bytes += count
            }
            guard rv == CKR_OK else { return .failure("replaying its data answered \(Recovery.name(rv))") }
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
        guard rv == CKR_OK else { return .failure("C_FindObjectsInit answered \(Recovery.name(rv))") }
        var reals: [CK_OBJECT_HANDLE] = []
        var batch = [CK_OBJECT_HANDLE](repeating: 0, count: 64)
        while true {
            var count: CK_ULONG = 0
            let rv = findObjects(real, &batch, 64, &count)
            guard rv == CKR_OK else {
                _ = finalFind(real)
                return .failure("C_FindObjects answered \(Recovery.name(rv))")
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
