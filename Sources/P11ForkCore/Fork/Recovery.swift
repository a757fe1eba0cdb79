import CPKCS11
import Glibc

/// Recovery in a forked child (docs/DESIGN.md "Recovery in the child"): lazily, only for what the
/// child uses, under one lock while the child's other threads wait.
///
/// 1. The module: on the child's first call that needs it (ForkDetection.adoptChild), with the
///    configured ModuleStrategy. Until then no call reaches the inherited copy.
/// 2.–4. Slots, sessions and objects: when a stale handle (issued before the fork) is first
///    used, from what Records kept: slots matched by token identity, sessions re-opened with
///    their flags and the login replayed, objects re-found by their recorded identity.
enum Recovery {
    nonisolated(unsafe) static var lock: ForkSafeLock!
    /// True in a child whose real module is still the inherited, initialised copy: it is
    /// replaced before any call may reach it, and the teardown calls act on p11fork alone.
    nonisolated(unsafe) static var moduleInherited = false
    /// The recovered module is initialised but the application has not called C_Initialize in
    /// this process: its C_Initialize (the old rule for children) then answers CKR_OK.
    nonisolated(unsafe) static var initializationUnclaimed = false
    // Guarded by `lock`.
    nonisolated(unsafe) static var slotsMatchedEpoch: UInt = 1
    /// Set while a token the application used was not found in this module: matched again when due.
    nonisolated(unsafe) static var slotRetry: RetrySchedule?
    nonisolated(unsafe) static var searchSessions: [CK_SLOT_ID: CK_SESSION_HANDLE] = [:]
    nonisolated(unsafe) static var lost: Set<CK_OBJECT_HANDLE> = []

    static func install() { lock = ForkDetection.register(ForkSafeLock(recursive: true)) }

    /// In a new process, once (called by ForkDetection with the other threads waiting).
    static func enterChild() {
        HandleValues.enterChild()
        Logins.enterChild()
        ProtectedMemory.enterChild()
        searchSessions = [:]
        lost = []
        initializationUnclaimed = false
        moduleInherited = Core.appInitialized && Core.module != nil
        moduleRetry = nil
        slotRetry = nil
        TreeLock.givenUpOn = 0
    }

    /// Set while a failed recovery of the module waits to be tried again (`Core.unusable` holds
    /// what the calls answer until then).
    nonisolated(unsafe) static var moduleRetry: RetrySchedule?

    /// True while this child has no working module yet but is to get one: a call that needs the
    /// module goes through ForkDetection.adopt, which calls recoverModule.
    static var moduleToRecover: Bool { moduleInherited || moduleRetry != nil }

    /// Replaces the inherited module by one this child may use (ForkDetection, with the child's
    /// other threads waiting): at the first call that needs it and, after a failure, at the first
    /// call once the retry is due (RetrySchedule).
    static func recoverModule() {
        guard let inherited = Core.module else { return }
        if let retry = moduleRetry {
            guard retry.isDue else { return }
            Trace.event(.fork, "trying again to get a working module (\(retry.nextTry), \(ModuleRecovery.strategy.rawValue) strategy)")
        } else {
            guard moduleInherited else { return }
        }
        moduleInherited = false
        let started = Clock.monotonicNanoseconds()
        // One process of the tree at a time: a module's initialisation reads what another
        // process's may be writing (TreeLock).
        switch TreeLock.withLock("initialising the module", { ModuleRecovery.recover(inherited) }) {
        case .success(let module):
            let tries = moduleRetry.map { ", \($0.nextTry)" } ?? ""
            moduleRetry = nil
            Core.unusable = nil
            Core.module = module
            Core.functions = module.functions
            // Every inherited handle is now stale: each is recovered when first used.
            Core.epoch &+= 1
            Core.slotEpoch &+= 1
            lock.withLock { startSlotTranslation() }
            initializationUnclaimed = true
            Trace.event(.fork, "module ready in the child (\(ModuleRecovery.strategy.rawValue) strategy\(tries), \(Format.milliseconds(since: started)))",
                        .step(.moduleReady, .ok, since: started, strategy: ModuleRecovery.strategy))
        case .failure(let why):
            // No call reaches a module until the next try, so none can hammer the HSM; the next
            // try comes later and later (RetrySchedule).
            let answer = answer(forFailedInitialization: why.rv)
            Core.functions = nil
            Core.unusable = answer
            var retry = moduleRetry ?? RetrySchedule()
            let attempt = retry.nextTry
            let delay = retry.failed()
            moduleRetry = retry
            Trace.event(.error, "no working module in this child (\(attempt)): \(why.message); every call answers \(Format.name(answer)) without calling the module until the next try, at a call \(delay) from now or later. Choose another strategy with P11FORK_STRATEGY (\(ModuleStrategy.allCases.filter { $0 != .auto }.map(\.rawValue).joined(separator: ", ")))",
                        .step(.moduleReady, .failed, since: started, strategy: ModuleRecovery.strategy))
        }
    }

    /// What every call of a child gets when its module's C_Initialize failed: that code when any
    /// function may answer it (PKCS#11 2.40 section 5.1: universal and device codes), else
    /// CKR_DEVICE_ERROR (a C_Sign answering CKR_CRYPTOKI_ALREADY_INITIALIZED would mislead).
    static func answer(forFailedInitialization rv: CK_RV?) -> CK_RV {
        switch rv {
        case CK_RV(CKR_GENERAL_ERROR), CK_RV(CKR_HOST_MEMORY), CK_RV(CKR_FUNCTION_FAILED), CK_RV(CKR_DEVICE_ERROR),
             CK_RV(CKR_DEVICE_MEMORY), CK_RV(CKR_DEVICE_REMOVED):
            return rv!
        default:
            return CK_RV(CKR_DEVICE_ERROR)
        }
    }

    /// What resolving an inherited handle gave: the real handle and the failure so far. Returned
    /// by value, so that the forwarders' `failure` never has its address taken (the fast path then
    /// keeps it in a register, with no stack protector).
    struct Resolution {
        let real: UInt
        let failure: CK_RV
    }

    @inline(never)
    static func resolveSlot(_ virtual: CK_SLOT_ID, after failure: CK_RV) -> Resolution {
        var failure = failure
        let real = slot(virtual, &failure)
        return Resolution(real: real, failure: failure)
    }

    @inline(never)
    static func resolveSession(_ virtual: CK_SESSION_HANDLE, after failure: CK_RV) -> Resolution {
        var failure = failure
        let real = session(virtual, &failure)
        return Resolution(real: real, failure: failure)
    }

    @inline(never)
    static func resolveObject(_ virtual: CK_OBJECT_HANDLE, after failure: CK_RV) -> Resolution {
        var failure = failure
        let real = object(virtual, &failure)
        return Resolution(real: real, failure: failure)
    }

    // MARK: slots

    // The translation of the application's slot IDs to this module's (docs/FORK.md "Handles in
    // the child"), made once per module, after its replacement. Guarded by `lock`.
    /// The application's slot ID -> this module's.
    nonisolated(unsafe) static var slotToReal: [CK_SLOT_ID: CK_SLOT_ID] = [:]
    /// This module's slot ID -> the application's.
    nonisolated(unsafe) static var slotFromReal: [CK_SLOT_ID: CK_SLOT_ID] = [:]
    /// The parent's module's slot ID for an application slot, where it was not the same value.
    nonisolated(unsafe) static var parentSlots: [CK_SLOT_ID: CK_SLOT_ID] = [:]

    /// At the replacement of the module: the parent's translation becomes what this one starts from.
    private static func startSlotTranslation() {
        slotRetry = nil
        parentSlots = Slots.translating ? parentSlots.merging(slotToReal) { $1 } : [:]
        slotToReal = [:]
        slotFromReal = [:]
        Slots.translating = true
    }

    static func slot(_ slot: CK_SLOT_ID, _ failure: inout CK_RV) -> CK_SLOT_ID {
        guard failure == CKR_OK else { return Slots.invalidReal }
        return lock.withLock { slotLocked(slot) }
    }

    private static func slotLocked(_ slot: CK_SLOT_ID) -> CK_SLOT_ID {
        matchSlotsLocked()
        if let real = slotToReal[slot] { return real }
        // A token the application used that this module does not have: an unknown slot here.
        if Records.token(slot) != nil { return Slots.invalidReal }
        // A slot the application never looked into: the parent's number, if this module has it
        // and it does not hold another application slot's token.
        let candidate = parentSlots[slot] ?? slot
        guard slotFromReal[candidate] == nil, Core.functions.map(Slots.all)?.contains(candidate) == true else { return Slots.invalidReal }
        bind(slot, to: candidate)
        return candidate
    }

    /// The application's slot ID for one this module reports: the inherited slot holding the
    /// same token, else the same value, else (that value names another token for the
    /// application) a value no application slot has.
    static func applicationSlot(real: CK_SLOT_ID) -> CK_SLOT_ID {
        lock.withLock {
            matchSlotsLocked()
            if let known = slotFromReal[real] { return known }
            var slot = real
            if slotToReal[slot] != nil || Records.token(slot) != nil {
                slot = CK_SLOT_ID(Slots.freshBase)
                while slotToReal[slot] != nil || Records.token(slot) != nil { slot += 1 }
                Trace.event(.fork, "slot 0x\(Format.hex(real)) of this module is shown as slot 0x\(Format.hex(slot)): its own number names another token for the application")
            }
            bind(slot, to: real)
            return slot
        }
    }

    private static func bind(_ slot: CK_SLOT_ID, to real: CK_SLOT_ID) {
        slotToReal[slot] = real
        slotFromReal[real] = slot
    }

    /// Real slot ID for the trace (a full trace in a translating child); nil when not translated.
    static func translatedSlot(_ slot: CK_SLOT_ID) -> CK_SLOT_ID? {
        lock.withLock { slotToReal[slot] }
    }

    /// Before exposing real slot IDs of a recovered module: match the inherited slots first.
    static func matchSlots() {
        guard slotsMatchedEpoch != Core.slotEpoch || slotRetry != nil else { return }
        lock.withLock { matchSlotsLocked() }
    }

    /// Finds each slot whose token the application used in this module by the token's identity
    /// (or, for a slot whose token was never seen, by the parent's slot ID). Once per module.
    private static func matchSlotsLocked() {
        let retryDue = slotRetry?.isDue == true
        guard slotsMatchedEpoch != Core.slotEpoch || retryDue, Core.functions != nil else { return }
        slotsMatchedEpoch = Core.slotEpoch
        let started = Clock.monotonicNanoseconds()
        let attempt = slotRetry.map { " (\($0.nextTry))" } ?? ""
        // A try after one that missed a token: the module still holds what it read then.
        if retryDue && moduleIsUntouched() { _ = initializeAgain(after: 1) }
        var (matched, missing, absent) = matchSlotsOnce()
        // A module may not show, right after its initialisation, a token the parent used: SoftHSM's
        // file store, read while another process logs in, loses tokens (seen with pool workers
        // starting together, also without p11fork). While this child has opened nothing on the
        // module yet, initialising it again is safe; a few tries, spaced out.
        var tries = 0
        while !missing.isEmpty && tries < 4 && moduleIsUntouched() {
            tries += 1
            guard initializeAgain(after: tries) else { break }
            (matched, missing, absent) = matchSlotsOnce()
        }
        let notFound = missing.isEmpty ? "" : "; not found: token \(missing.joined(separator: ", "))"
        // A slot the module still lists without its token: the token was removed (no retry helps).
        let removed = absent.isEmpty ? "" : "; no token present in the slot of token \(absent.joined(separator: ", ")) (removed?): its calls answer what the module answers for an empty slot"
        let retried = tries > 0 ? ", after initialising the module again \(tries) time(s)" : ""
        let moved = slotToReal.filter { $0.key != $0.value }.sorted { $0.key < $1.key }
            .map { "0x\(Format.hex($0.key)) is 0x\(Format.hex($0.value))" }
        let renumbered = moved.isEmpty ? "" : "; renumbered by this module: slot \(moved.joined(separator: ", "))"
        // Still missing while nothing is open on the module: not final, the slots are matched
        // again (the module initialised again first) at a call once due (RetrySchedule).
        var next = ""
        if !missing.isEmpty && moduleIsUntouched() {
            var retry = slotRetry ?? RetrySchedule()
            next = "; matched again at a call \(retry.failed()) from now or later"
            slotRetry = retry
        } else {
            slotRetry = nil
        }
        Trace.event(missing.isEmpty && absent.isEmpty ? .fork : .error,
                    "slots matched by token identity\(attempt): \(matched) of \(matched + missing.count + absent.count)\(renumbered)\(notFound)\(removed)\(retried)\(next) (\(Format.milliseconds(since: started)))",
                    .step(.slots, missing.isEmpty && absent.isEmpty ? .ok : .failed, since: started))
    }

    /// Finalizes and initialises the child's module again, after a pause that grows with `attempt`,
    /// one process of the tree at a time: only while the module is untouched.
    private static func initializeAgain(after attempt: Int) -> Bool {
        usleep(UInt32(5_000 << attempt))
        guard let functions = Core.functions else { return false }
        return TreeLock.withLock("initialising the module again") {
            functions.pointee.C_Finalize?(nil) == CKR_OK && functions.pointee.C_Initialize?(ModuleRecovery.initArguments) == CKR_OK
        }
    }

    /// True while the child has no session of its own on its module (so it may re-initialise it).
    private static func moduleIsUntouched() -> Bool {
        searchSessions.isEmpty && !Sessions.table.entries().contains { $0.epoch == Core.epoch }
    }

    /// One pass over the module's slots; returns how many slots with a recorded token matched, the
    /// labels of the tokens not found, and those whose slot is still there but empty (bound to that slot).
    private static func matchSlotsOnce() -> (matched: Int, missing: [String], absent: [String]) {
        guard let functions = Core.functions else { return (0, [], []) }
        slotToReal = [:]
        slotFromReal = [:]
        let reals = Slots.all(functions)
        var byIdentity: [TokenIdentity: CK_SLOT_ID] = [:]
        for real in reals {
            if let identity = TokenIdentity.read(functions, slot: real), byIdentity[identity] == nil {
                byIdentity[identity] = real
            }
        }
        var matched = 0
        var missing: [String] = []
        var absent: [String] = []
        for (slot, identity) in Records.allTokens().sorted(by: { $0.key < $1.key }) {
            let parentReal = parentSlots[slot] ?? slot
            if let real = byIdentity[identity], slotFromReal[real] == nil {
                bind(slot, to: real)
                matched += 1
            } else if reals.contains(parentReal), slotFromReal[parentReal] == nil, !tokenPresent(functions, slot: parentReal) {
                bind(slot, to: parentReal)
                absent.append("'\(identity.labelText)'")
            } else {
                missing.append("'\(identity.labelText)'")
            }
        }
        return (matched, missing, absent)
    }

    private static func tokenPresent(_ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>, slot: CK_SLOT_ID) -> Bool {
        var info = CK_SLOT_INFO()
        guard functions.pointee.C_GetSlotInfo?(slot, &info) == CKR_OK else { return true }
        return info.flags & CK_FLAGS(CKF_TOKEN_PRESENT) != 0
    }

    // MARK: sessions

    static func session(_ virtual: CK_SESSION_HANDLE, _ failure: inout CK_RV) -> CK_SESSION_HANDLE {
        let invalid = CK_SESSION_HANDLE(CK_INVALID_HANDLE)
        guard failure == CKR_OK, Sessions.view.lookupAnyEpoch(virtual) != nil else { return invalid }
        return lock.withLock {
            if let real = Sessions.view.real(virtual, epoch: Core.epoch) { return real }
            guard let record = Records.session(virtual), let functions = Core.functions,
                  let openSession = functions.pointee.C_OpenSession else { return invalid }
            // The slot's login replay failed and its next try is not due: the call answers that
            // failure without reaching the module.
            if let rv = Logins.failureUntilDue(record.slot) {
                failure = rv
                return invalid
            }
            let started = Clock.monotonicNanoseconds()
            let realSlot = slotLocked(record.slot)
            var real = invalid
            let rv = openSession(realSlot, record.flags, nil, nil, &real)
            guard rv == CKR_OK else {
                // A token gone from its slot: for a call on a session, the device was removed.
                let gone = rv == CKR_TOKEN_NOT_PRESENT || rv == CKR_SLOT_ID_INVALID
                failure = gone ? CK_RV(CKR_DEVICE_REMOVED) : rv
                let answered = gone ? "; the call answers CKR_DEVICE_REMOVED" : ""
                Trace.event(.error, "session 0x\(Format.hex(virtual)) could not be re-opened on slot 0x\(Format.hex(record.slot)): C_OpenSession answered \(Format.name(rv))\(answered)", .step(.session, .failed, since: started))
                return invalid
            }
            var reopened: String {
                "session 0x\(Format.hex(virtual)) re-opened on slot 0x\(Format.hex(record.slot)) (real session 0x\(Format.hex(real)), \(Format.milliseconds(since: started)))"
            }
            var login = Logins.ensure(slot: record.slot, session: real, functions: functions)
            // A module that read the token while another process rewrote it answers from what it
            // read until it reads it again (SoftHSM: CKR_USER_PIN_NOT_INITIALIZED for as long as it
            // is initialised). While this child has nothing else open on it, it is initialised
            // again and the replay tried again at once, twice at most.
            var again = 0
            while login != CKR_OK, again < 2, case .waiting? = Logins.state(record.slot), moduleIsUntouched() {
                again += 1
                _ = functions.pointee.C_CloseSession?(real)
                real = invalid
                guard initializeAgain(after: again) else { break }
                Trace.event(.fork, "module initialised again for another try of the login replay (the token may have been read while another process rewrote it)")
                slotsMatchedEpoch = 0
                let opened = openSession(slotLocked(record.slot), record.flags, nil, nil, &real)
                guard opened == CKR_OK else {
                    real = invalid
                    login = opened
                    break
                }
                login = Logins.ensure(slot: record.slot, session: real, functions: functions, now: true)
            }
            if login != CKR_OK { failure = login }
            if real == invalid {
                Trace.event(.error, "session 0x\(Format.hex(virtual)) could not be re-opened after initialising the module again (\(Format.name(login))); the call answers it", .step(.session, .failed, since: started))
                return invalid
            }
            if login != CKR_OK, case .waiting? = Logins.state(record.slot) {
                // The replay is tried again later: so is the session, which then gets the login.
                _ = functions.pointee.C_CloseSession?(real)
                Trace.event(.fork, "\(reopened); closed again until the login replay's next try")
                return invalid
            }
            Sessions.table.rebind(virtual, real: real, epoch: Core.epoch)
            Trace.event(.fork, reopened, .step(.session, .ok, since: started))
            // The operations the parent had in progress on it (step 6).
            if login == CKR_OK { Operations.replay(virtual, real: real, functions) }
            return real
        }
    }

    // MARK: objects

    static func object(_ virtual: CK_OBJECT_HANDLE, _ failure: inout CK_RV) -> CK_OBJECT_HANDLE {
        let invalid = CK_OBJECT_HANDLE(CK_INVALID_HANDLE)
        guard failure == CKR_OK, let bound = Objects.view.lookupAnyEpoch(virtual) else { return invalid }
        return lock.withLock {
            if let real = Objects.view.real(virtual, epoch: Core.epoch) { return real }
            guard !lost.contains(virtual), let functions = Core.functions else { return invalid }
            let started = Clock.monotonicNanoseconds()
            func lose(_ why: String) -> CK_OBJECT_HANDLE {
                lost.insert(virtual)
                Trace.event(.fork, "object 0x\(Format.hex(virtual)) is lost in this child: \(why)", .step(.object, .lost, since: started))
                return invalid
            }
            guard let identity = Records.object(virtual) else { return lose("nothing was recorded about it") }
            guard identity.isTokenObject else {
                // A session object of the parent: made again from how it was made (step 5).
                guard let recipe = SessionObjects.recipe(virtual) else {
                    return lose("it is a session object of the parent (\(identity.summary)) and nothing was kept to make it again")
                }
                switch SessionObjects.remake(virtual, recipe, functions, &failure) {
                case .lost(let why):
                    return lose("it is a session object of the parent (\(identity.summary)): \(why)")
                case .already(let real):
                    return real
                case .remade(let real, let how):
                    Objects.table.rebind(virtual, real: real, epoch: Core.epoch)
                    Trace.event(.fork, "object 0x\(Format.hex(virtual)) made again (\(identity.summary); \(how); real object 0x\(Format.hex(real)), \(Format.milliseconds(since: started)))",
                                .step(.object, .ok, since: started))
                    return real
                }
            }
            let session = searchSessionLocked(bound.aux, functions, &failure)
            guard failure == CKR_OK, session != invalid else { return invalid }
            let candidates = find(identity, session: session, functions)
            let matches = candidates.filter { ObjectIdentity.read(functions, session: session, object: $0) == identity }
            guard let chosen = matches.first else {
                // Not visible because the login could not be replayed: not lost, and the call
                // answers the replay's verdict (CKR_PIN_LOCKED, ...) until the application logs in.
                if let rv = Logins.failure(bound.aux) {
                    failure = rv
                    Trace.event(.error, "object 0x\(Format.hex(virtual)) not re-found (\(identity.summary)): the login replay on slot 0x\(Format.hex(bound.aux)) failed; answered \(Format.name(rv))", .step(.object, .failed, since: started))
                    return invalid
                }
                return lose("no object on the token matches it (\(identity.summary); \(candidates.count) with the same class, ID and label)")
            }
            Objects.table.rebind(virtual, real: chosen, epoch: Core.epoch)
            let alike = matches.count > 1 ? "; \(matches.count) identical objects, the first taken" : ""
            Trace.event(.fork, "object 0x\(Format.hex(virtual)) re-found (\(identity.summary); real object 0x\(Format.hex(chosen)), \(candidates.count) candidate(s)\(alike), \(Format.milliseconds(since: started)))",
                        .step(.object, .ok, since: started))
            return chosen
        }
    }

    /// The inherited handle of an object this child just came across by itself (C_FindObjects,
    /// ...), so that it keeps the handle the parent had: the same identity, on the same slot.
    static func inheritedHandle(for identity: ObjectIdentity, slot: CK_SLOT_ID) -> CK_OBJECT_HANDLE? {
        guard identity.isTokenObject else { return nil }
        return Records.objects(with: identity).first { virtual in
            guard let bound = Objects.view.lookupAnyEpoch(virtual) else { return false }
            return bound.aux == slot && bound.epoch != Core.epoch
        }
    }

    /// A session of this child's own on `slot`, logged in as the parent was, to search with.
    private static func searchSessionLocked(_ slot: CK_SLOT_ID, _ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>,
                                            _ failure: inout CK_RV) -> CK_SESSION_HANDLE {
        if let session = searchSessions[slot] {
            // A login replay that failed may be due for its next try (its answer comes with the
            // search: public objects are found without the login).
            _ = Logins.ensure(slot: slot, session: session, functions: functions)
            return session
        }
        guard let openSession = functions.pointee.C_OpenSession else { return 0 }
        let realSlot = slotLocked(slot)
        var session = CK_SESSION_HANDLE(CK_INVALID_HANDLE)
        var rv = openSession(realSlot, CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), nil, nil, &session)
        if rv != CKR_OK { rv = openSession(realSlot, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, &session) }
        guard rv == CKR_OK else {
            failure = rv
            Trace.event(.error, "no session could be opened on slot 0x\(Format.hex(slot)) to re-find objects: C_OpenSession answered \(Format.name(rv))")
            return 0
        }
        searchSessions[slot] = session
        let login = Logins.ensure(slot: slot, session: session, functions: functions)
        if login != CKR_OK { failure = login }
        return session
    }

    private static func find(_ identity: ObjectIdentity, session: CK_SESSION_HANDLE,
                             _ functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) -> [CK_OBJECT_HANDLE] {
        guard let initFind = functions.pointee.C_FindObjectsInit, let findObjects = functions.pointee.C_FindObjects,
              let finalFind = functions.pointee.C_FindObjectsFinal else { return [] }
        let started = identity.withSearchTemplate { template, count in initFind(session, template, count) }
        guard started == CKR_OK else { return [] }
        var found: [CK_OBJECT_HANDLE] = []
        var batch = [CK_OBJECT_HANDLE](repeating: 0, count: 16)
        while found.count < 256 {
            var count: CK_ULONG = 0
            guard findObjects(session, &batch, 16, &count) == CKR_OK, count > 0 else { break }
            found += batch.prefix(Int(count))
        }
        _ = finalFind(session)
        return found
    }

    /// What the module would answer for a session handle it never issued, without asking it
    /// (a child must not call its inherited copy).
    static var answerForUnknownSession: CK_RV {
        Core.appInitialized ? CK_RV(CKR_SESSION_HANDLE_INVALID) : CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED)
    }

}

extension Function {
    /// Calls that must not make a child replace its inherited module: they need no module, or
    /// in a child that has not recovered one they act on p11fork's own state alone.
    var leavesModuleAlone: Bool {
        switch self {
        case .C_Finalize, .C_CloseSession, .C_CloseAllSessions, .C_Logout,
             .C_GetFunctionList, .C_GetInterfaceList, .C_GetInterface:
            return true
        default:
            return false
        }
    }
}
