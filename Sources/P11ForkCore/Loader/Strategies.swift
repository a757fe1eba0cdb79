import CPKCS11
import Glibc
import Vocabulary

/// How a child gets a working real module (docs/DESIGN.md "Recovery in the child", step 1).
/// docs/DESIGN.md "Modules across fork" shows no single way works for every module. The names
/// are the shared vocabulary's (codegen/vocabulary.txt):
/// - `auto`: a fresh private copy, which never touches what the child inherited, wherever the
///   child can run the module itself; the broker where it cannot (GLib stacks: a second GLib in
///   one process crashes; openCryptoki; a child that switched user and misses the tokens; a copy
///   that cannot be loaded); re-initialising in place only where neither can be had.
///   Re-initialising in place first would be cheaper, but it runs the inherited copy's code,
///   which hangs when another thread of the parent held one of its locks at the fork (measured:
///   SoftHSM with reset_on_fork, a parent with two signing threads).
/// - `reinitialize`: call the inherited module's C_Initialize again: for modules that detect
///   fork themselves (SoftHSM with reset_on_fork, p11-kit's proxy, openCryptoki).
/// - `fresh-copy`: load a fresh copy of the module in a new link-map namespace (dlmopen) and
///   initialise it; the inherited copy is left alone. For modules that keep their state across
///   fork (SoftHSM's default mode, network-HSM clients).
/// - `out-of-process`: run the module in a helper process that inherited nothing (`p11-kit
///   server`) and talk to it through p11-kit's RPC client (OutOfProcess.swift).
/// - `broker`: have the broker run the module: a process the application started before its
///   first fork, with the application's rights (Broker.swift).
typealias ModuleStrategy = StrategyName

struct RecoveryFailure: Error {
    let message: String
    /// What the real module's C_Initialize answered, when that is what failed.
    let rv: CK_RV?
    init(_ message: String, rv: CK_RV? = nil) {
        self.message = message
        self.rv = rv
    }
}

enum ModuleRecovery {
    /// The application's C_Initialize arguments, kept for the child's initialisation
    /// (nil when it passed NULL).
    nonisolated(unsafe) static var initArguments: UnsafeMutablePointer<CK_C_INITIALIZE_ARGS>?
    /// The environment as it was when p11fork loaded: a fresh copy is initialised with it,
    /// because daemons scrub their workers' environment (SOFTHSM2_CONF and the like).
    nonisolated(unsafe) static var loadEnvironment: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
    nonisolated(unsafe) static var strategy = ModuleStrategy.auto

    static func keepInitArguments(_ arguments: UnsafeMutableRawPointer?) {
        guard let arguments else {
            // The copy kept from an earlier C_Initialize with arguments goes (found by the fuzzer).
            initArguments?.deallocate()
            initArguments = nil
            return
        }
        if initArguments == nil { initArguments = .allocate(capacity: 1) }
        initArguments!.pointee = arguments.assumingMemoryBound(to: CK_C_INITIALIZE_ARGS.self).pointee
    }

    static func snapshotEnvironment() {
        var count = 0
        while environ[count] != nil { count += 1 }
        let copy = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: count + 1)
        for i in 0..<count { copy[i] = strdup(environ[i]!) }
        copy[count] = nil
        loadEnvironment = copy
    }

    /// Makes a real module this child may use. The inherited copy is never finalized, closed or
    /// unloaded. Returns the module, or the trace message saying why there is none.
    static func recover(_ inherited: RealModule) -> Result<RealModule, RecoveryFailure> {
        // A child of a child that talks to a helper gets a connection of its own.
        if inherited.isHelperClient { return inherited.servedByBroker ? broker(inherited) : outOfProcess(inherited) }
        switch strategy {
        case .reinitialize:
            return reinitialize(inherited)
        case .freshCopy:
            return freshCopy(of: inherited)
        case .outOfProcess:
            return outOfProcess(inherited)
        case .broker:
            return broker(inherited)
        case .auto:
            return automatic(inherited)
        }
    }

    /// What the `auto` choice is made from, in a child.
    struct AutomaticFacts: Equatable {
        /// The module's stack loads GLib, which cannot be loaded twice in one process.
        var loadsGLib = false
        /// The module is openCryptoki's, a copy of which crashes in glibc in a child.
        var isOpenCryptoki = false
        /// A broker serves this process tree.
        var brokerRuns = false
        /// p11-kit's server, for a helper process, is installed (asked only for a GLib stack).
        var helperAvailable = false
        /// The child's rights are not those of the process that started the broker.
        var rightsChanged = false
    }

    /// What `auto` tries first (docs/FORK.md "A working module in the child (strategies)"): a copy in the child wherever
    /// the child can run the module itself, with no cost per call; the broker where it cannot.
    /// `.freshCopy` is followed by `copyMustShowTokens` and `brokerAfterFailedCopy`. Pure: the
    /// unit tests (StrategyDecisionTests) feed it every case.
    static func automaticFirstChoice(_ facts: AutomaticFacts) -> ModuleStrategy {
        if facts.loadsGLib {
            return facts.brokerRuns ? .broker : facts.helperAvailable ? .outOfProcess : .reinitialize
        }
        return facts.brokerRuns && facts.isOpenCryptoki ? .broker : .freshCopy
    }

    /// Whether a copy that initialised is kept only if it shows the parent's tokens: a copy runs
    /// with the child's rights, and where they are not the parent's and do not reach the parent's
    /// tokens (a token folder only root reads), the broker does. (With the parent's rights, a
    /// token the copy misses is gone: recovery says so.)
    static func copyMustShowTokens(_ facts: AutomaticFacts) -> Bool {
        facts.brokerRuns && facts.rightsChanged
    }

    /// Whether the broker is tried after the copy failed, before re-initialising in place: where
    /// the copy could not be had at all (`copyAnswered` false: a chain of forks fills the static
    /// TLS block) or failed with rights that are not the parent's. A copy whose C_Initialize
    /// fails with the parent's rights says something about the module itself.
    static func brokerAfterFailedCopy(_ facts: AutomaticFacts, copyAnswered: Bool) -> Bool {
        facts.brokerRuns && (!copyAnswered || facts.rightsChanged)
    }

    /// The `auto` choice, made by `automaticFirstChoice`, `copyMustShowTokens` and
    /// `brokerAfterFailedCopy`, carried out with its trace lines.
    private static func automatic(_ inherited: RealModule) -> Result<RealModule, RecoveryFailure> {
        let brokerRuns = Broker.isRunning
        let change = Broker.credentialChange()
        if let change, !brokerRuns {
            Trace.event(.fork, "\(change), and no broker runs (\(Broker.unavailable ?? "none was started")): recovering with the child's rights, which may not reach the token")
        }
        let facts = AutomaticFacts(loadsGLib: inherited.loadsGLib, isOpenCryptoki: isOpenCryptoki(inherited), brokerRuns: brokerRuns,
                                   helperAvailable: inherited.loadsGLib && !brokerRuns && OutOfProcess.isAvailable,
                                   rightsChanged: change != nil)
        switch automaticFirstChoice(facts) {
        case .broker where facts.loadsGLib:
            Trace.event(.fork, "the module's stack loads GLib, which cannot be loaded twice in one process\(change.map { " (\($0))" } ?? ""): the broker runs it for this child", .decision(.broker))
            return broker(inherited)
        case .broker:
            Trace.event(.fork, "openCryptoki's module cannot be copied into a child: the broker runs it for this child", .decision(.broker))
            return broker(inherited)
        case .reinitialize:
            Trace.event(.fork, "the module's stack loads GLib, which cannot be loaded twice in one process, and p11-kit's server is not installed: re-initialising in place", .decision(.reinitialize))
            return reinitialize(inherited)
        case .outOfProcess:
            Trace.event(.fork, "the module's stack loads GLib, which cannot be loaded twice in one process: running it in a helper process", .decision(.outOfProcess))
            return outOfProcess(inherited)
        case .freshCopy, .auto:
            break
        }
        let copy = freshCopy(of: inherited)
        if case .success(let module) = copy {
            guard copyMustShowTokens(facts) else { return copy }
            let missing = missingTokens(module)
            guard !missing.isEmpty else {
                if let change { Trace.event(.fork, "\(change), but the copy in the child finds the parent's tokens: the child keeps it", .decision(.freshCopy)) }
                return copy
            }
            Trace.event(.fork, "\(change ?? ""), and the copy in the child does not find the parent's token(s) \(missing.joined(separator: ", ")): the broker, which has the parent's rights, runs the module for this child", .decision(.broker))
            _ = module.functions.pointee.C_Finalize?(nil)
            return broker(inherited)
        }
        guard case .failure(let why) = copy else { return copy }
        if brokerAfterFailedCopy(facts, copyAnswered: why.rv != nil) {
            Trace.event(.fork, "\(why.message)\(change.map { " (\($0))" } ?? ""): the broker runs the module for this child instead", .decision(.broker))
            let served = broker(inherited)
            guard case .failure(let again) = served else { return served }
            Trace.event(.fork, "\(again.message): re-initialising the inherited module in place instead", .decision(.reinitialize))
        } else {
            Trace.event(.fork, "\(why.message): re-initialising the inherited module in place instead", .decision(.reinitialize))
        }
        let inPlace = reinitialize(inherited)
        guard case .failure(let again) = inPlace else { return inPlace }
        // The clean copy's answer says more than the inherited copy's (often "already initialised").
        return .failure(RecoveryFailure(again.message, rv: why.rv ?? again.rv))
    }

    /// The labels of the parent's tokens that `module` does not show (by token identity).
    private static func missingTokens(_ module: RealModule) -> [String] {
        let functions = module.functions
        var count: CK_ULONG = 0
        var found = Set<TokenIdentity>()
        if functions.pointee.C_GetSlotList?(CK_BBOOL(CK_TRUE), nil, &count) == CKR_OK, count > 0 {
            var slots = [CK_SLOT_ID](repeating: 0, count: Int(count))
            if functions.pointee.C_GetSlotList?(CK_BBOOL(CK_TRUE), &slots, &count) == CKR_OK {
                for slot in slots.prefix(Int(count)) {
                    if let identity = TokenIdentity.read(functions, slot: slot) { found.insert(identity) }
                }
            }
        }
        return Records.allTokens().values.filter { !found.contains($0) }.map { "'\($0.labelText)'" }.sorted()
    }

    /// openCryptoki's library: a copy of it crashes in glibc in a child; its daemon serves a
    /// re-initialised or brokered module.
    private static func isOpenCryptoki(_ module: RealModule) -> Bool {
        module.path.contains("libopencryptoki")
    }

    private static func broker(_ module: RealModule) -> Result<RealModule, RecoveryFailure> {
        let started = Clock.monotonicNanoseconds()
        let result = Broker.connect(serving: module.servedModulePath ?? module.path, initArguments: initArguments)
        if case .success = result {
            Trace.event(.fork, "module served by the broker (pid \(Broker.pid)) (\(Format.milliseconds(since: started)))",
                        .step(.module, .ok, since: started, strategy: .broker))
        }
        return result
    }

    /// Called by the pthread_atfork prepare handler: the process that initialised the module
    /// starts the broker before its first fork, so that it has this process's rights and every
    /// child inherits the channel to it.
    static func prepareBrokerBeforeFork() {
        guard strategy == .auto || strategy == .broker, Core.appInitialized, !Recovery.moduleInherited,
              let module = Core.module, !module.isHelperClient || module.servedByBroker else { return }
        Broker.startIfNeeded(modulePath: module.servedModulePath ?? module.path, environment: loadEnvironment)
    }

    private static func outOfProcess(_ module: RealModule) -> Result<RealModule, RecoveryFailure> {
        let started = Clock.monotonicNanoseconds()
        let result = OutOfProcess.start(serving: module.servedModulePath ?? module.path, environment: loadEnvironment,
                                        initArguments: initArguments)
        if case .success = result {
            let pid = OutOfProcess.helper.map { String($0.pid) } ?? "?"
            Trace.event(.fork, "module running in a helper process (p11-kit server, pid \(pid)) (\(Format.milliseconds(since: started)))",
                        .step(.module, .ok, since: started, strategy: .outOfProcess))
        }
        return result
    }

    private static func reinitialize(_ module: RealModule) -> Result<RealModule, RecoveryFailure> {
        let started = Clock.monotonicNanoseconds()
        announceInitialize("the inherited module, in place")
        let rv = module.functions.pointee.C_Initialize?(initArguments) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
        if rv == CKR_OK {
            Trace.event(.fork, "module re-initialised in place (\(Format.milliseconds(since: started)))", .step(.module, .ok, since: started, strategy: .reinitialize))
            return .success(module)
        }
        return .failure(RecoveryFailure("re-initialising the module in place answered \(Format.name(rv))", rv: rv))
    }

    /// A copy loaded ahead of the fork, never initialised, for a child to initialise. Loading it
    /// in the child instead would give the threads the child already runs a libc of the copy
    /// that they were not started with: such a thread crashed in malloc when it exited (seen with
    /// four threads of a child signing at once). Threads made after the load are fine, and every
    /// thread of a child but the one that forked is made after the fork.
    nonisolated(unsafe) static var spare: RealModule?

    /// Whether this configuration wants copies (so that a spare is worth loading).
    static func usesCopies(_ module: RealModule) -> Bool {
        usesCopies(strategy, isHelperClient: module.isHelperClient, loadsGLib: module.loadsGLib, isOpenCryptoki: isOpenCryptoki(module))
    }

    /// The same from the facts alone (pure, for the unit tests).
    static func usesCopies(_ strategy: ModuleStrategy, isHelperClient: Bool, loadsGLib: Bool, isOpenCryptoki: Bool) -> Bool {
        !isHelperClient && (strategy == .freshCopy || (strategy == .auto && !loadsGLib && !isOpenCryptoki))
    }

    /// Called by the pthread_atfork prepare handler: a process that uses its module gets a spare
    /// just before its first fork, so a process that never forks never loads one. A fork that
    /// skips atfork handlers leaves the child to load a copy itself.
    static func prepareSpareBeforeFork() {
        guard Core.appInitialized, !Recovery.moduleInherited, let module = Core.module else { return }
        prepareSpare(for: module)
    }

    /// Loads the spare copy for this process's future children, if the strategy wants one and
    /// there is none.
    static func prepareSpare(for module: RealModule) {
        guard spare == nil, usesCopies(module) else { return }
        let started = Clock.monotonicNanoseconds()
        switch loadCopy(of: module) {
        case .success(let copy):
            spare = copy
            Trace.event(.fork, "spare copy of the module loaded for children to use (\(Format.milliseconds(since: started)))", .preparation)
        case .failure(let problem):
            Trace.event(.fork, "no spare copy of the module for children (\(problem.message)); a child will load one itself", .preparation)
        }
    }

    private static func loadCopy(of module: RealModule) -> Result<RealModule, ConfigurationProblem> {
        // The copy reads its settings from the environment p11fork was loaded with.
        let current = loadEnvironment.map { CPKCS11_swap_environ($0) }
        defer { if let current { _ = CPKCS11_swap_environ(current) } }
        let loaded = RealModule.load(path: module.path, source: "fresh copy", privateCopy: true)
        if case .success(let copy) = loaded {
            separateThreadKeys(copy.handle)
            tellCopyItIsMultiThreaded(copy.handle)
        }
        return loaded
    }

    private static func freshCopy(of module: RealModule) -> Result<RealModule, RecoveryFailure> {
        let started = Clock.monotonicNanoseconds()
        let copy: RealModule
        if let spare {
            copy = spare
            self.spare = nil
        } else {
            switch loadCopy(of: module) {
            case .success(let loaded): copy = loaded
            case .failure(let problem): return .failure(RecoveryFailure("loading a fresh copy of the module failed: \(problem.message)"))
            }
        }
        // Keys the process made since the copy was loaded must not be shared with it either.
        separateThreadKeys(copy.handle)
        // From now on every thread sets up the copy's libc before its first call into it.
        CPKCS11_use_copy(dlsym(copy.handle, "__ctype_init"))
        CPKCS11_enter_copy()
        let current = loadEnvironment.map { CPKCS11_swap_environ($0) }
        announceInitialize("the fresh copy of the module")
        let rv = copy.functions.pointee.C_Initialize?(initArguments) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
        if let current { _ = CPKCS11_swap_environ(current) }
        guard rv == CKR_OK else {
            spare = copy  // Not initialised: the child's next try (Recovery.moduleRetry) uses it, rather than loading another.
            return .failure(RecoveryFailure("the fresh copy of the module answered C_Initialize with \(Format.name(rv))", rv: rv))
        }
        Trace.event(.fork, "fresh private copy of the module initialised (\(Format.milliseconds(since: started)))",
                    .step(.module, .ok, since: started, strategy: .freshCopy))
        return .success(copy)
    }

    /// Written before the real module's C_Initialize in a child: p11fork cannot interrupt a module
    /// that never answers, so the trace shows where the child waits.
    static func announceInitialize(_ which: String) {
        Trace.event(.fork, "calling C_Initialize of \(which) (the trace says when it answers; nothing after this line means the module has not answered)")
    }

    /// The copy's libc was started in a process that may already run several threads, and its
    /// `__libc_single_threaded` says it does not: its malloc then skips locking, and threads of
    /// the child calling the copy at once corrupted its heap (seen: "double free or corruption").
    private static func tellCopyItIsMultiThreaded(_ handle: UnsafeMutableRawPointer) {
        guard let flag = dlsym(handle, "__libc_single_threaded") else { return }
        flag.assumingMemoryBound(to: CChar.self).pointee = 0
    }

    /// A copy in a new link-map namespace brings its own libc, whose pthread key numbers start
    /// again at 0 while every thread's key-value slots are shared with the first libc: the
    /// copy's first keys would read and overwrite the values of keys the process already uses
    /// (seen: OpenSSL in the copy crashed on a value stored by the Swift runtime). So the copy's
    /// libc first creates, and never uses, every key number the process has in use plus a margin
    /// for keys the process makes later.
    private static func separateThreadKeys(_ handle: UnsafeMutableRawPointer) {
        typealias KeyCreate = @convention(c) (UnsafeMutablePointer<pthread_key_t>?, (@convention(c) (UnsafeMutableRawPointer?) -> Void)?) -> Int32
        guard let symbol = dlsym(handle, "pthread_key_create") else { return }
        let create = unsafeBitCast(symbol, to: KeyCreate.self)
        var probe = pthread_key_t()
        guard pthread_key_create(&probe, nil) == 0 else { return }
        pthread_key_delete(probe)
        let limit = probe + 64
        var key = pthread_key_t()
        var burned = 0
        while create(&key, nil) == 0 {
            burned += 1
            if key >= limit { break }
        }
        Trace.event(.fork, "copy of the module: \(burned) thread-key numbers reserved in its libc (the process uses keys below \(probe))", .preparation)
    }
}
