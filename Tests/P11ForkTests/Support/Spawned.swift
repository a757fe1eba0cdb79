import Foundation

/// A program the tests start, with `posix_spawn` rather than Foundation's `Process`, so that every
/// wait is bounded and owned here: the program runs in a process group of its own (a timeout
/// kills the whole group), with no signal blocked or ignored (a test runner's threads block most
/// signals, and a spawned program inherits that mask: a Python pool's workers then never receive
/// the SIGTERM its terminate() sends), and the test reaps it with `waitpid` on its own pid.
/// Foundation's `Process` was seen holding a whole CI run past its limit after a timeout, in a
/// wait no deadline reached; nothing here waits without one.
final class Spawned {
    let pid: pid_t
    /// The test's ends of the program's standard input and output (-1 when not piped).
    private(set) var input: Int32
    private(set) var output: Int32
    private(set) var errors: Int32
    private var reaped: (status: Int32, signaled: Bool)?

    enum Stream { case pipe, null }

    init(_ executable: String, _ arguments: [String], environment: [String: String],
         input inputMode: Stream = .pipe, output outputMode: Stream = .pipe, errors errorsMode: Stream = .pipe) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        var ours: [Int32] = [-1, -1, -1]
        var theirs: [Int32] = []
        defer { theirs.forEach { close($0) } }
        for (fd, mode) in [(Int32(0), inputMode), (1, outputMode), (2, errorsMode)] {
            switch mode {
            case .null:
                posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0)
            case .pipe:
                var ends: [Int32] = [-1, -1]
                guard pipe(&ends) == 0 else { throw TestFailure("pipe: \(String(cString: strerror(errno)))") }
                ends.forEach { _ = fcntl($0, F_SETFD, FD_CLOEXEC) }
                let (mine, child) = fd == 0 ? (ends[1], ends[0]) : (ends[0], ends[1])
                ours[Int(fd)] = mine
                theirs.append(child)
                posix_spawn_file_actions_adddup2(&actions, child, fd)
            }
        }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t(), all = sigset_t()
        sigemptyset(&none)
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        var spawned: pid_t = 0
        let rv = posix_spawnp(&spawned, executable, &actions, &attributes, argv, envp)
        guard rv == 0 else {
            ours.filter { $0 >= 0 }.forEach { close($0) }
            throw TestFailure("cannot start \(executable): \(String(cString: strerror(rv)))")
        }
        pid = spawned
        (input, output, errors) = (ours[0], ours[1], ours[2])
    }

    deinit {
        [input, output, errors].filter { $0 >= 0 }.forEach { close($0) }
        if reaped == nil { Foundation.kill(-pid, SIGKILL); Foundation.kill(pid, SIGKILL); _ = reap(within: 5) }
    }

    /// Writes `text` to the program's standard input (a short text: it fits the pipe).
    func write(_ text: String) {
        guard input >= 0 else { return }
        let bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes[done...].withUnsafeBytes { Glibc.write(input, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return }
            done += n
        }
    }

    func closeInput() {
        if input >= 0 { close(input); input = -1 }
    }

    /// Kills the program's whole process group.
    func kill() {
        Foundation.kill(-pid, SIGKILL)
        Foundation.kill(pid, SIGKILL)
    }

    /// Whether the program has ended (reaping it if so).
    var hasEnded: Bool {
        if reaped != nil { return true }
        var status: Int32 = 0
        let rv = waitpid(pid, &status, WNOHANG)
        if rv == pid { reaped = Self.decode(status) } else if rv < 0 && errno == ECHILD { reaped = (-1, false) }
        return reaped != nil
    }

    /// Waits at most `seconds` for the program to end; its exit status, or the signal that ended
    /// it, or nil if it is still running.
    @discardableResult
    func reap(within seconds: Double) -> (status: Int32, signaled: Bool)? {
        let deadline = Date().addingTimeInterval(seconds)
        while !hasEnded && Date() < deadline { usleep(10_000) }
        return reaped
    }

    /// Reads one line from the program's standard output, waiting at most `seconds`; nil at the
    /// end of the output or past the deadline.
    private var pending: [UInt8] = []
    func line(within seconds: Double) -> String? {
        let deadline = Date().addingTimeInterval(seconds)
        while true {
            if let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let text = String(decoding: pending[..<newline], as: UTF8.self)
                pending.removeSubrange(...newline)
                return text
            }
            let left = deadline.timeIntervalSinceNow
            guard output >= 0, left > 0 else { return nil }
            var entry = pollfd(fd: output, events: Int16(POLLIN), revents: 0)
            guard poll(&entry, 1, Int32(min(left, 1) * 1000)) >= 0 || errno == EINTR else { return nil }
            if entry.revents != 0 {
                guard Self.readSome(output, into: &pending) else { close(output); output = -1; continue }
            }
        }
    }

    /// Collects standard output and error until the program ends, killing its process group at
    /// `deadline`. Output a descendant in another process group keeps open (a daemon the program
    /// started) is read for at most `drain` seconds after the program ends; a program that does
    /// not go away even when killed is given up on after `drain` seconds more.
    func collect(until deadline: Date, drain: Double = 5) -> (stdout: [UInt8], stderr: [UInt8], timedOut: Bool) {
        var collected: [[UInt8]] = [[], []]
        var streams = [output, errors]
        var timedOut = false
        var endedAt: Date?
        var killedAt: Date?
        while true {
            if endedAt == nil && hasEnded { endedAt = Date() }
            if let endedAt, streams.allSatisfy({ $0 < 0 }) || Date().timeIntervalSince(endedAt) > drain { break }
            if endedAt == nil {
                if let killedAt {
                    if Date().timeIntervalSince(killedAt) > drain { break }
                } else if Date() > deadline {
                    timedOut = true
                    kill()
                    killedAt = Date()
                }
            }
            var entries = streams.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            _ = poll(&entries, nfds_t(entries.count), 20)
            for index in entries.indices where streams[index] >= 0 && entries[index].revents != 0 {
                if !Self.readSome(streams[index], into: &collected[index]) {
                    close(streams[index])
                    streams[index] = -1
                }
            }
        }
        for fd in streams where fd >= 0 { close(fd) }
        (output, errors) = (-1, -1)
        return (collected[0], collected[1], timedOut)
    }

    var status: (status: Int32, signaled: Bool)? { reaped }

    /// Appends what is there to read; false at the end of the stream.
    private static func readSome(_ fd: Int32, into buffer: inout [UInt8]) -> Bool {
        var chunk = [UInt8](repeating: 0, count: 65536)
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { return errno == EINTR || errno == EAGAIN }
        guard n > 0 else { return false }
        buffer.append(contentsOf: chunk[..<n])
        return true
    }

    private static func decode(_ status: Int32) -> (Int32, Bool) {
        let signal = status & 0x7f
        return signal == 0 ? ((status >> 8) & 0xff, false) : (signal, true)
    }
}
