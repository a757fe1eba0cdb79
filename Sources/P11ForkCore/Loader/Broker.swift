import CPKCS11
import Glibc

/// The broker (docs/FORK.md "The broker"): a process the application starts just before its
/// first fork, which therefore has the application's rights, and which runs the real module for
/// any descendant that cannot run it itself (a worker that switched to `www-data`, a module stack
/// that cannot be loaded twice). A child reaches it only through the channel it inherited: one
/// end of a socketpair the application made, never a path another process could open.
///
/// The wire is p11-kit's RPC protocol: the broker serves it with `p11_kit_remote_serve_module`,
/// the child talks it through p11-kit's client module (the choice: docs/FORK.md "The broker").
enum Broker {
    /// This process tree's end of the channel (close-on-exec, inherited by forked children).
    nonisolated(unsafe) static var channel: Int32 = -1
    /// The broker's pid, for trace lines.
    nonisolated(unsafe) static var pid: pid_t = 0
    /// The credentials of the process that started the broker: a child compares its own.
    nonisolated(unsafe) static var starter: Credentials?
    /// The process that started the broker: the only one that starts another when it dies.
    nonisolated(unsafe) static var starterPid: pid_t = 0
    /// Why no broker runs, when one was wanted (for the trace and the advice).
    nonisolated(unsafe) static var unavailable: String?
    /// True in a child whose module runs in the broker: its calls take the slow path, which
    /// notices the broker's end (ProcessMark.adoptedMark).
    nonisolated(unsafe) static var servesThisProcess = false
    nonisolated(unsafe) static var goneTraced = false
    nonisolated(unsafe) static var callsSinceCheck: UInt = 0

    /// On the slow path of a call in a child the broker serves: says once that the broker has
    /// ended. Its calls answer what p11-kit's client answers for a lost server; no other broker
    /// is started for this child (it would have the child's rights, not the application's).
    /// `seen`: the caller saw the broker gone itself (the lane).
    static func noticeEnd(seen: Bool = false) {
        // The guard's flag on every call; the channel (a system call) on one call in 64, for an
        // application that ignores SIGPIPE itself.
        guard !goneTraced else { return }
        callsSinceCheck &+= 1
        guard seen || CPKCS11_broker_gone() != 0 || (callsSinceCheck & 63 == 1 && !isRunning) else { return }
        goneTraced = true
        Trace.event(.error, "the broker (pid \(pid)) has ended: this child's calls answer p11-kit's client's error for a lost server (CKR_DEVICE_ERROR) from now on; the process that started the broker starts another at its next fork, for new children")
    }

    struct Credentials: Equatable {
        var uid: uid_t, euid: uid_t, gid: gid_t, egid: gid_t
        var groups: [gid_t]

        static var current: Credentials {
            var groups = [gid_t](repeating: 0, count: 256)
            let count = getgroups(Int32(groups.count), &groups)
            return Credentials(uid: getuid(), euid: geteuid(), gid: getgid(), egid: getegid(),
                               groups: count > 0 ? Array(groups[0..<Int(count)]).sorted() : [])
        }
    }

    /// The broker's program: beside libp11fork.so (where the build and the install put it).
    static var program: String? {
        guard let image = CPKCS11_image_path(#dsohandle) else { return nil }
        let path = String(cString: image)
        guard let slash = path.lastIndex(of: "/") else { return nil }
        return String(path[..<slash]) + "/p11fork-broker"
    }

    /// How this child's rights differ from those of the process that started the broker, in
    /// words for the trace; nil when they are the same (or no broker was started).
    static func credentialChange() -> String? {
        guard let starter else { return nil }
        let now = Credentials.current
        guard now != starter else { return nil }
        if now.euid != starter.euid || now.uid != starter.uid {
            return "the child runs as uid \(now.euid), the parent as \(starter.euid)"
        }
        if now.egid != starter.egid || now.gid != starter.gid {
            return "the child runs with gid \(now.egid), the parent with \(starter.egid)"
        }
        return "the child's supplementary groups differ from the parent's"
    }

    /// Whether a live broker serves this process tree.
    static var isRunning: Bool {
        guard channel >= 0 else { return false }
        var wait = pollfd(fd: channel, events: Int16(POLLIN), revents: 0)
        // The broker's end closed: it has ended.
        return !(poll(&wait, 1, 0) > 0 && wait.revents & Int16(POLLHUP | POLLERR) != 0)
    }

    // MARK: in the application, before its first fork

    /// Starts the broker for `modulePath` unless one runs. Called by the prepare fork handler, so
    /// that it runs before any child does. A broker that died is replaced at the next fork of
    /// the process that started it; a child never starts one for its parent (it lacks its rights).
    static func startIfNeeded(modulePath: String, environment: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) {
        if channel >= 0 {
            if isRunning || starterPid != getpid() { return }
            Trace.event(.fork, "the broker (pid \(pid)) has ended: starting another one")
            close(channel)
            channel = -1
        }
        let started = Clock.monotonicNanoseconds()
        switch start(modulePath: modulePath, environment: environment) {
        case .success(let brokerPid):
            pid = brokerPid
            starter = .current
            starterPid = getpid()
            unavailable = nil
            Trace.event(.fork, "broker started (pid \(brokerPid)) with this process's rights, for children that cannot run the module themselves (\(Format.milliseconds(since: started)))", .preparation)
        case .failure(let problem):
            unavailable = problem.message
            Trace.event(.fork, "no broker for this process's children: \(problem.message)", .preparation)
        }
    }

    private static func start(modulePath: String, environment: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Result<pid_t, RecoveryFailure> {
        guard let program else { return .failure(RecoveryFailure("p11fork cannot tell where it was loaded from")) }
        guard access(program, X_OK) == 0 else {
            return .failure(RecoveryFailure("\(program) is missing: install p11fork-broker beside libp11fork.so"))
        }
        // It runs with this process's rights: refused when someone else could have changed it.
        if case .failure(let refusal) = InputTrust.checkedPath(program, rules: .current) {
            return .failure(RecoveryFailure("\(program): \(refusal.detail)"))
        }
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            return .failure(RecoveryFailure("socketpair failed: \(String(cString: strerror(errno)))"))
        }
        // Above every descriptor the file actions write to, so that no dup2 overwrites another's source.
        let brokerEnd = fcntl(pair[1], F_DUPFD_CLOEXEC, 10)
        close(pair[1])
        let traceCopy = Trace.fd >= 0 ? fcntl(Trace.fd, F_DUPFD_CLOEXEC, 10) : -1
        defer {
            close(brokerEnd)
            if traceCopy >= 0 { close(traceCopy) }
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for fd in Int32(0)...2 { posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0) }
        posix_spawn_file_actions_adddup2(&actions, brokerEnd, 3)
        // With the broker forced, every child will ask: it initialises the module at once.
        var arguments = [program, "--module", modulePath, "--eager", ModuleRecovery.strategy == .broker ? "yes" : "no"]
        if traceCopy >= 0 {
            // A trace named per process (`%p`): the broker makes its own file, as every process does.
            if case .file(let template) = Trace.destination, template.contains("%p") {
                arguments += ["--trace-file", template]
            } else {
                posix_spawn_file_actions_adddup2(&actions, traceCopy, 4)
            }
            arguments += ["--trace-format", Trace.format == .json ? "json" : "text"]
        }
        let spawned: pid_t
        switch Spawn.start(program, arguments, actions: &actions, environment: environment) {
        case .success(let pid): spawned = pid
        case .failure(let error):
            close(pair[0])
            return .failure(RecoveryFailure("starting \(program) failed: \(error.message)"))
        }
        // The program forks the broker and exits at once, so the broker is nobody's child to reap.
        var status: Int32 = 0
        while waitpid(spawned, &status, 0) < 0 && errno == EINTR {}
        // Its first message says it is ready (it found p11-kit's RPC server).
        var hello = [UInt8](repeating: 0, count: 32)
        var wait = pollfd(fd: pair[0], events: Int16(POLLIN), revents: 0)
        var count = -1
        if poll(&wait, 1, 5_000) > 0 { count = recv(pair[0], &hello, hello.count, 0) }
        let text = count > 0 ? String(decoding: hello[0..<count], as: UTF8.self) : ""
        guard text.hasPrefix("ready "), let brokerPid = pid_t(text.dropFirst(6)) else {
            close(pair[0])
            let why = count < 0 ? "it did not answer within 5 s" : "it cannot serve (p11-kit's library libp11-kit.so.0 is missing?)"
            return .failure(RecoveryFailure("\(program) did not start: \(why)"))
        }
        channel = pair[0]
        return .success(brokerPid)
    }

    // MARK: in a child

    /// Asks the broker for a connection and loads p11-kit's client for it: a module this child
    /// may use, running in the broker with the application's rights.
    static func connect(serving realPath: String, initArguments: UnsafeMutablePointer<CK_C_INITIALIZE_ARGS>?) -> Result<RealModule, RecoveryFailure> {
        guard channel >= 0 else {
            return .failure(RecoveryFailure("no broker serves this process tree (\(unavailable ?? "the process that initialised the module did not fork through fork(), or its strategy does not start one"))"))
        }
        guard access(OutOfProcess.client, R_OK) == 0 else {
            return .failure(RecoveryFailure("the broker needs p11-kit's client \(OutOfProcess.client) (Debian package p11-kit-modules)"))
        }
        // A folder only this child's user may enter, holding the socket for one connection.
        var template = Array("/tmp/p11fork-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else {
            return .failure(RecoveryFailure("no private folder for the connection to the broker: \(String(cString: strerror(errno)))"))
        }
        let folder = String(cString: made)
        let socketPath = folder + "/socket"
        defer {
            unlink(socketPath)
            rmdir(folder)
        }
        let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard listener >= 0 else { return .failure(RecoveryFailure("socket failed: \(String(cString: strerror(errno)))")) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (i, byte) in socketPath.utf8.prefix(buffer.count - 1).enumerated() { buffer[i] = byte }
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(listener, 1) == 0 else {
            close(listener)
            return .failure(RecoveryFailure("cannot listen on \(socketPath): \(String(cString: strerror(errno)))"))
        }
        var answer: [Int32] = [-1, -1]
        guard pipe(&answer) == 0 else {
            close(listener)
            return .failure(RecoveryFailure("pipe failed: \(String(cString: strerror(errno)))"))
        }
        for fd in answer { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        // The lane, when this process can make one (else the RPC alone serves it).
        let lane = Lane.make()
        let fds = lane >= 0 ? [listener, answer[1], lane] : [listener, answer[1]]
        let sent = "connect".withCString { CPKCS11_send_with_fds(channel, $0, 7, fds, Int32(fds.count)) }
        let sendError = errno
        close(listener)
        close(answer[1])
        if lane >= 0 { close(lane) }
        defer { close(answer[0]) }
        guard sent == 7 else {
            return .failure(RecoveryFailure("the broker (pid \(pid)) is gone: \(String(cString: strerror(sendError)))", rv: CK_RV(CKR_DEVICE_ERROR)))
        }
        // While the broker answers, p11-kit's client is loaded; it reads its server's address from
        // the environment as it hands out its function list.
        setenv("P11_KIT_SERVER_ADDRESS", "unix:path=\(socketPath)", 1)
        defer { unsetenv("P11_KIT_SERVER_ADDRESS") }
        let client = RealModule.load(path: OutOfProcess.client, source: "broker client")
        // Its answer: the module's C_Initialize result in the broker, within a bound.
        var wait = pollfd(fd: answer[0], events: Int16(POLLIN), revents: 0)
        var rv: UInt64 = 0
        guard poll(&wait, 1, 10_000) > 0, read(answer[0], &rv, 8) == 8 else {
            return .failure(RecoveryFailure("the broker (pid \(pid)) did not answer within 10 s", rv: CK_RV(CKR_DEVICE_ERROR)))
        }
        guard rv == CKR_OK else {
            return .failure(RecoveryFailure("the module in the broker answered C_Initialize with \(Format.name(CK_RV(rv)))", rv: CK_RV(rv)))
        }
        var loaded: RealModule
        switch client {
        case .success(let module):
            loaded = module
            loaded.servedModulePath = realPath
            loaded.servedByBroker = true
        case .failure(let problem): return .failure(RecoveryFailure("loading p11-kit's RPC client failed: \(problem.message)"))
        }
        // The lane first, under the mechanisms p11-kit's client refuses, which p11fork completes
        // (RPCMechanisms): a mechanism the lane carries reaches the module itself.
        Lane.interpose(loaded.functions)
        RPCMechanisms.interpose(loaded.functions)
        ModuleRecovery.announceInitialize("the module in the broker (pid \(pid))")
        let initialized = loaded.functions.pointee.C_Initialize?(initArguments) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
        guard initialized == CKR_OK else {
            return .failure(RecoveryFailure("the broker's module answered C_Initialize with \(Format.name(initialized))", rv: initialized))
        }
        servesThisProcess = true
        CPKCS11_guard_sigpipe(channel)
        return .success(loaded)
    }
}
