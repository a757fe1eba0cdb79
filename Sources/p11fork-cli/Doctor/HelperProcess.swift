import Foundation
import Glibc

/// One run of the doctor's helper (this executable, hidden subcommand), watched from outside.
///
/// The helper runs in a process group of its own, so that it and every process it forked can be
/// killed together; its output goes to files, not pipes, so that a grandchild that keeps a
/// descriptor open (a helper process a module started) cannot make the doctor wait; the PIN goes
/// through a pipe on its standard input, never on a command line or in the environment.
struct HelperProcess {
    enum Ending: Equatable {
        case exited(Int32)
        case signaled(Int32)
        /// Killed by the doctor after the deadline.
        case timedOut(seconds: Int)
    }

    struct Run {
        let ending: Ending
        let stdout: String
        let stderr: String

        /// The "name: value" lines the helper printed (the last of each name).
        var fields: [String: String] {
            var fields: [String: String] = [:]
            for line in stdout.split(separator: "\n") {
                guard let colon = line.firstIndex(of: ":") else { continue }
                let value = line[line.index(after: colon)...]
                fields[String(line[..<colon])] = String(value.hasPrefix(" ") ? value.dropFirst() : value)
            }
            return fields
        }
    }

    let executable: String
    let workDirectory: URL

    func run(_ arguments: [String], environment: [String: String], input: String, timeout: Int) throws -> Run {
        let name = UUID().uuidString
        let outPath = workDirectory.appendingPathComponent("\(name).out").path
        let errPath = workDirectory.appendingPathComponent("\(name).err").path
        defer {
            unlink(outPath)
            unlink(errPath)
        }
        var inputPipe: [Int32] = [0, 0]
        guard pipe(&inputPipe) == 0 else { throw CommandFailure("cannot make a pipe: \(String(cString: strerror(errno)))") }
        // Neither end may leak into another helper started later.
        _ = fcntl(inputPipe[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(inputPipe[1], F_SETFD, FD_CLOEXEC)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, inputPipe[0], 0)
        posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, errPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGALRM, SIGPIPE, SIGCHLD, SIGTERM, SIGINT] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigmask(&attributes, &noSignals)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, executable, &actions, &attributes, argv, envp)
        close(inputPipe[0])
        guard spawned == 0 else {
            close(inputPipe[1])
            throw CommandFailure("cannot start \(executable): \(String(cString: strerror(spawned)))")
        }
        // Short enough for the pipe's buffer: this write never blocks.
        var bytes = Array(input.utf8)
        _ = write(inputPipe[1], &bytes, bytes.count)
        for index in bytes.indices { bytes[index] = 0 }
        close(inputPipe[1])

        let ending = wait(for: pid, timeout: timeout)
        // Whatever the helper left behind (a hung grandchild, a module's helper) goes with it.
        kill(-pid, SIGKILL)
        let stdout = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
        let stderr = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
        return Run(ending: ending, stdout: stdout, stderr: stderr)
    }

    private func wait(for pid: pid_t, timeout: Int) -> Ending {
        let deadline = Date().addingTimeInterval(TimeInterval(timeout))
        var status: Int32 = 0
        while true {
            let done = waitpid(pid, &status, WNOHANG)
            if done == pid { break }
            if done < 0 && errno != EINTR { return .exited(-1) }
            if Date() > deadline {
                kill(-pid, SIGKILL)
                while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
                return .timedOut(seconds: timeout)
            }
            usleep(20_000)
        }
        // WIFEXITED / WTERMSIG, which Swift does not import as functions.
        let signal = status & 0x7F
        return signal == 0 ? .exited((status >> 8) & 0xFF) : .signaled(signal)
    }
}
