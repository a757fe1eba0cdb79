import CPKCS11
import Glibc

/// The out-of-process strategy: the child runs the real module in a helper that inherited
/// nothing (`p11-kit server`, started afresh with exec) and talks to it through p11-kit's RPC
/// client module. For module stacks that can neither be loaded twice in one process nor
/// re-initialised in a child (GLib and D-Bus, network-HSM clients with threads: tpm2-pkcs11).
/// Only the child pays: a helper start, and a round trip per call.
enum OutOfProcess {
    static let server = "/usr/bin/p11-kit"
    static let client = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"

    static var isAvailable: Bool { access(server, X_OK) == 0 && access(client, R_OK) == 0 }

    /// Starts a helper serving `module` on a private socket and loads the RPC client for it.
    /// The helper ends when this process does (it waits on a pipe only this process holds).
    static func start(serving realPath: String, environment: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?,
                      initArguments: UnsafeMutablePointer<CK_C_INITIALIZE_ARGS>?) -> Result<RealModule, RecoveryFailure> {
        guard isAvailable else {
            return .failure(RecoveryFailure("the out-of-process strategy needs \(server) and \(client) (Debian packages p11-kit and p11-kit-modules)"))
        }
        var template = Array("/tmp/p11fork-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else {
            return .failure(RecoveryFailure("no private folder for the helper's socket: \(String(cString: strerror(errno)))"))
        }
        let folder = String(cString: made)
        let socket = folder + "/socket"

        // The helper's stdin is a pipe whose other end only this process holds: when this
        // process ends, `read` returns and the shell stops the server.
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else {
            return .failure(RecoveryFailure("pipe failed: \(String(cString: strerror(errno)))"))
        }
        // Neither end may leak into programs this process executes later.
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        let script = "\"$0\" server -f -n \"$1\" --provider \"$2\" pkcs11: >/dev/null 2>&1 & server=$!; read _; kill $server; wait"
        let arguments = ["/bin/sh", "-c", script, server, socket, realPath]
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_adddup2(&actions, fds[0], 0)
        defer { posix_spawn_file_actions_destroy(&actions) }
        let pid: pid_t
        let spawned = Spawn.start("/bin/sh", arguments, actions: &actions, environment: environment)
        close(fds[0])
        switch spawned {
        case .success(let started): pid = started
        case .failure(let error):
            close(fds[1])
            return .failure(RecoveryFailure("starting the helper failed: \(error.message)"))
        }
        helper = (pid, fds[1])

        // Wait (at most 10 s) for the helper to listen.
        var waited = 0
        while access(socket, F_OK) != 0 {
            if waited >= 10_000 { return .failure(RecoveryFailure("the helper (p11-kit server) did not listen on \(socket) within 10 s")) }
            usleep(5_000)
            waited += 5
        }

        // p11-kit's client reads its server's address from the environment when it initialises.
        setenv("P11_KIT_SERVER_ADDRESS", "unix:path=\(socket)", 1)
        defer { unsetenv("P11_KIT_SERVER_ADDRESS") }
        var loaded: RealModule
        switch RealModule.load(path: client, source: "out-of-process client") {
        case .success(let module):
            loaded = module
            loaded.servedModulePath = realPath
        case .failure(let problem): return .failure(RecoveryFailure("loading p11-kit's RPC client failed: \(problem.message)"))
        }
        // Mechanisms p11-kit's client refuses, which p11fork completes (RPCMechanisms).
        RPCMechanisms.interpose(loaded.functions)
        ModuleRecovery.announceInitialize("the module run by the helper")
        let rv = loaded.functions.pointee.C_Initialize?(initArguments) ?? CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
        guard rv == CKR_OK else {
            return .failure(RecoveryFailure("the module run by the helper answered C_Initialize with \(Format.name(rv))", rv: rv))
        }
        return .success(loaded)
    }

    /// The helper of this process (pid, the pipe end that keeps it alive).
    nonisolated(unsafe) static var helper: (pid: pid_t, keepAlive: Int32)?
}
