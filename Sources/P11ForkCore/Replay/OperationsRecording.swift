import CPKCS11
import Glibc
import Synchronization

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

    /// The record of `kind` on `session`. Under Records.lock.
    static func recordLocked(_ session: CK_SESSION_HANDLE, _ kind: OperationKind) -> OperationRecord? {
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

    /// Gives back what `record` holds (its budget, its data). Under Records.lock.
    static func drop(_ record: OperationRecord) {
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
}
