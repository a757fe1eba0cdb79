import CPKCS11
import Glibc

/// p11fork's process-wide state: the real module's functions, the handle epoch, the function
/// lists and interfaces p11fork offers. Set up once, when the module is first asked for its
/// function list (that is, right after the application loads it); the settings and the real
/// module then too when the environment names the module, else at the first C_Initialize.
enum Core {
    /// The real module's functions; nil when it could not be loaded (see `loadProblem`).
    nonisolated(unsafe) static var functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>?
    /// Session and object handles are valid in the epoch they were issued in; C_Finalize and a
    /// child's new module start a new one.
    nonisolated(unsafe) static var epoch: UInt = 1
    /// Slot IDs outlive C_Finalize; only a child's new module starts a new slot epoch.
    nonisolated(unsafe) static var slotEpoch: UInt = 1
    /// True between the application's successful C_Initialize and its C_Finalize.
    nonisolated(unsafe) static var appInitialized = false
    /// Set in a child that could not get a working module: what every call answers.
    nonisolated(unsafe) static var unusable: CK_RV?
    nonisolated(unsafe) static var module: RealModule?
    nonisolated(unsafe) static var configuration: Configuration?
    /// Why the real module is not there: reported by C_Initialize.
    nonisolated(unsafe) static var loadProblem: ConfigurationProblem?

    /// The lists and interfaces handed to the application.
    nonisolated(unsafe) static var list32: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>!
    nonisolated(unsafe) static var list30: UnsafeMutablePointer<CK_FUNCTION_LIST_3_0>!
    nonisolated(unsafe) static var list240: UnsafeMutablePointer<CK_FUNCTION_LIST>!
    nonisolated(unsafe) static var interfaces: UnsafeMutablePointer<CK_INTERFACE>!
    nonisolated(unsafe) static var interfaceCount = 0

    private static let loaded: Bool = {
        InputTrust.secureExecution = CPKCS11_secure_execution() != 0
        let (environment, ignored) = InputTrust.settingsEnvironment(Configuration.currentEnvironment(),
                                                                    secure: InputTrust.secureExecution)
        if !ignored.isEmpty {
            let message = InputTrust.ignoredMessage(ignored) + "\n"
            Trace.write(2, message, message.utf8.count)
        }
        load(environment: environment)
        return true
    }()

    /// Loads everything on first use; thread-safe, once per process.
    @inline(__always)
    static func ensureLoaded() { _ = loaded }

    private static func load(environment: [String: String]) {
        ForkDetection.install()
        FinalizeGate.install()
        // Locks are made outermost first: the fork handlers take them in this order (Recovery's
        // lock is held while Records' and the tables' are taken, never the other way round).
        settleLock = ForkDetection.register(ForkSafeLock())
        Recovery.install()
        Records.install()
        SessionNotifications.install()
        installHandleTables()
        // Innermost: taken by the calls a recovery replays into p11-kit's client.
        RPCMechanisms.install(lock: ForkDetection.register(ForkSafeLock()))
        ProtectedMemory.install()
        ModuleRecovery.snapshotEnvironment()

        if Configuration.environmentNamesModule(environment) {
            apply(Configuration.load(environment: environment))
        } else {
            // The settings may come with C_Initialize (pReserved): read them there.
            pendingEnvironment = environment
        }
        buildLists()
        initializeGlobals()
        // Tracing is set up now: calls may take the fast path unless they are to be timed.
        ProcessMark.refresh()
    }

    /// The environment kept for reading the settings at the first C_Initialize; nil once read
    /// (or when they were read at load).
    nonisolated(unsafe) private static var pendingEnvironment: [String: String]?
    /// Held only while the settings are read, at the first C_Initialize (a fork waits for it:
    /// the child never inherits it held).
    nonisolated(unsafe) private static var settleLock: ForkSafeLock!

    /// At C_Initialize: reads the settings if they were left for it, with p11fork's pReserved
    /// string when there is one. Returns whether the pReserved is p11fork's (then the real
    /// module must not see it) and whether the settings were read now (tracing may have begun).
    static func settle(reserved: UnsafeRawPointer?) -> (claimed: Bool, settledNow: Bool) {
        let claimed = reserved.flatMap(Configuration.claimedReserved)
        return settleLock.withLock { settleLocked(claimed) }
    }

    private static func settleLocked(_ claimed: Result<String, ConfigurationProblem>?) -> (claimed: Bool, settledNow: Bool) {
        guard let environment = pendingEnvironment else {
            if claimed != nil, configuration != nil, !noticedUnusedReserved {
                noticedUnusedReserved = true
                Trace.event(.fork, "C_Initialize: the p11fork settings in pReserved are not used: the environment named the module (\(configuration!.moduleSource))")
            }
            return (claimed != nil, false)
        }
        pendingEnvironment = nil
        switch claimed {
        case .failure(let problem)?: apply(.failure(problem))
        case .success(let text)?: apply(Configuration.load(environment: environment, reserved: text))
        case nil: apply(Configuration.load(environment: environment))
        }
        ProcessMark.refresh()
        return (claimed != nil, true)
    }
    nonisolated(unsafe) private static var noticedUnusedReserved = false

    /// Takes a configuration (or its problem): tracing, the knobs, the real module.
    private static func apply(_ result: Result<Configuration, ConfigurationProblem>) {
        switch result {
        case .failure(let problem):
            loadProblem = problem
        case .success(let configuration):
            self.configuration = configuration
            ModuleRecovery.strategy = configuration.strategy
            Logins.replayEnabled = configuration.loginReplay
            ReplayBudget.limit = configuration.replayLimit
            if let problem = Trace.configure(configuration.trace, level: configuration.traceLevel,
                                             format: configuration.traceFormat, source: configuration.traceSource) {
                loadProblem = ConfigurationProblem(problem)
                break
            }
            // Before the module loads: the handler must run after the module's own exit handlers.
            FinalizeGate.closeAtExit()
            switch RealModule.load(path: configuration.modulePath, source: configuration.moduleSource) {
            case .failure(let problem):
                loadProblem = problem
            case .success(let module):
                self.module = module
                functions = module.functions
                Trace.event(.fork, "loaded \(module.path) (\(module.offers32 ? "PKCS#11 3.2 interface" : module.offers30 ? "PKCS#11 3.0 interface" : "PKCS#11 2.x function list")); fork detection by \(ProcessMark.wipedByKernel ? "MADV_WIPEONFORK page" : "pthread_atfork handler")", .preparation)
                Trace.event(.fork, "the module was named by \(configuration.moduleSource)", .preparation)
            }
        }
        if let loadProblem { Trace.event(.error, loadProblem.message) }
    }

    /// Runs the initialiser of every lazily made global now, while no other thread can be inside
    /// p11fork: a Swift global whose initialiser another thread is running at the moment of a fork
    /// never finishes in the child, and the child's first use of it waits forever (measured:
    /// docs/RELIABILITY.md "Concurrency"). The fork handlers' locks do not cover the globals used
    /// outside them. A global added to P11ForkCore with an initialiser that is not a constant
    /// belongs here.
    private static func initializeGlobals() {
        keep(Configuration.keys, RealModule.ownHandle as Any, SessionNotifications.relays, SessionNotifications.trampoline,
             Recovery.searchSessions, Recovery.lost, Logins.kept, Logins.states, Records.tokens, Records.sessions,
             Records.objects, Records.objectsByIdentity, Records.knownSlots, Recovery.slotToReal, Recovery.slotFromReal,
             Recovery.parentSlots, Records.moduleInfo as Any, Operations.records, AsyncOperations.pending, SessionObjects.recipes,
             KeptTemplate.nestedTypes, ProtectedMemory.sizes, ProtectedMemory.free, ProtectedMemory.regions,
             ParameterLayout.flatMechanisms, ParameterLayout.stringData, ParameterLayout.structures,
             MechanismHandles.handleCarriers, CK_FLAGS.sessionFlagNames, CK_FLAGS.initializeFlagNames,
             CK_FLAGS.waitFlagNames, TraceLine.HeaderCache.size, TraceLine.lastDay.load(ordering: .relaxed))
    }

    /// Opaque to the optimiser, so that reading a global for its initialiser is not dropped.
    @inline(never)
    private static func keep(_ values: Any...) { _ = values.count }

    private static func buildLists() {
        list32 = .allocate(capacity: 1)
        UnsafeMutableRawPointer(list32).initializeMemory(as: UInt8.self, repeating: 0,
                                                         count: MemoryLayout<CK_FUNCTION_LIST_3_2>.size)
        fillFunctionList(list32)
        list32.pointee.version = CK_VERSION(major: 3, minor: 2)
        // The 3.0 and 2.40 lists are the beginning of the 3.2 one.
        list30 = .allocate(capacity: 1)
        UnsafeMutableRawPointer(list30).copyMemory(from: list32, byteCount: MemoryLayout<CK_FUNCTION_LIST_3_0>.size)
        list30.pointee.version = CK_VERSION(major: 3, minor: 0)
        list240 = .allocate(capacity: 1)
        UnsafeMutableRawPointer(list240).copyMemory(from: list32, byteCount: MemoryLayout<CK_FUNCTION_LIST>.size)
        list240.pointee.version = CK_VERSION(major: 2, minor: 40)

        let name = strdup("PKCS 11")!.withMemoryRebound(to: CK_UTF8CHAR.self, capacity: 8) { $0 }
        interfaces = .allocate(capacity: 3)
        interfaceCount = 0
        // p11fork keeps the fork-safe promise (PKCS#11 3.0 section 5.4; README "What a child
        // gets") whatever the real module is, so every interface carries CKF_INTERFACE_FORK_SAFE.
        // The 3.0 one is offered over a 2.x module too: its 3.0-only functions then answer
        // CKR_FUNCTION_NOT_SUPPORTED, as a module may. The 3.2 one only over a module that
        // offers 3.2 when p11fork loads it (docs/FORK.md "PKCS#11 3.0 and 3.2"), newest first.
        let forkSafe = CK_FLAGS(CKF_INTERFACE_FORK_SAFE)
        var offered: [UnsafeMutableRawPointer] = [UnsafeMutableRawPointer(list30), UnsafeMutableRawPointer(list240)]
        if module?.offers32 == true { offered.insert(UnsafeMutableRawPointer(list32), at: 0) }
        for list in offered {
            interfaces[interfaceCount] = CK_INTERFACE(pInterfaceName: name, pFunctionList: list, flags: forkSafe)
            interfaceCount += 1
        }
    }
}

extension Core {
    // The handle tables, and what the other layers keep about sessions and objects, begin and
    // end together.
    static func installHandleTables() {
        Sessions.table = HandleTable(lock: ForkDetection.register(ForkSafeLock()))
        Objects.table = HandleTable(lock: ForkDetection.register(ForkSafeLock()))
        Sessions.view = Sessions.table.view
        Objects.view = Objects.table.view
    }

    /// After C_Finalize: every session and object handle of this life of the module is gone.
    static func forgetSessionsAndObjects() {
        epoch &+= 1
        Sessions.table.releaseAll { _, _ in true }
        Objects.table.releaseAll { _, _ in true }
        SessionNotifications.removeAll()
        Records.forgetSessionsAndObjects()
        Logins.forgetAll()
    }
}
