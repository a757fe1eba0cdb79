import Glibc

/// Starts a program for p11fork (the broker, the out-of-process helper) with `posix_spawn`:
/// with no signal blocked and every signal at its default, whatever the application did to its
/// own (a blocked or ignored SIGTERM would keep the program alive after this process ends), and
/// with the descriptors `actions` names. Returns the pid, or the `errno` of the failure.
enum Spawn {
    static func start(_ program: String, _ arguments: [String], actions: inout posix_spawn_file_actions_t,
                      environment: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Result<pid_t, SpawnError> {
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t(), all = sigset_t()
        sigemptyset(&none)
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var argv = arguments.map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var pid: pid_t = 0
        let rv = posix_spawn(&pid, program, &actions, &attributes, &argv, environment ?? environ)
        return rv == 0 ? .success(pid) : .failure(SpawnError(code: rv))
    }

    struct SpawnError: Error {
        let code: Int32
        var message: String { String(cString: strerror(code)) }
    }
}
