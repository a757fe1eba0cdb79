import CPKCS11
import Glibc
import Vocabulary

/// How much p11fork writes (docs/DESIGN.md "Tracing"). Each level includes the ones before it.
enum TraceLevel: UInt8, Comparable, Sendable, CaseIterable {
    case off = 0
    /// p11fork's own problems: configuration, loading, what could not be recovered.
    case error
    /// Plus fork events and each recovery step with its timing.
    case fork
    /// Plus every call: function, arguments in short form, return code by name, duration.
    case calls
    /// Plus templates (non-sensitive values only), mechanism parameter lengths, real handles.
    case full

    static func < (a: TraceLevel, b: TraceLevel) -> Bool { a.rawValue < b.rawValue }

    init?(name: String) {
        switch name {
        case "error": self = .error
        case "fork": self = .fork
        case "calls": self = .calls
        case "full": self = .full
        default: return nil
        }
    }

    var name: String {
        switch self {
        case .off: return "off"
        case .error: return "error"
        case .fork: return "fork"
        case .calls: return "calls"
        case .full: return "full"
        }
    }
}

enum TraceFormat: Sendable, Equatable {
    case text, json
}

/// Where trace lines go: standard error or a file (`%p` in its name becomes the pid).
enum TraceDestination: Sendable, Equatable {
    case standardError
    case file(template: String)
}

/// The trace writer. Off by default; when off, a call pays one load and one branch.
/// Every line is written with a single write(2) on an O_APPEND descriptor, so lines from a
/// parent and its children sharing one file never interleave.
enum Trace {
    nonisolated(unsafe) static var level: TraceLevel = .off
    nonisolated(unsafe) static var format: TraceFormat = .text
    nonisolated(unsafe) static var fd: Int32 = -1
    nonisolated(unsafe) static var destination: TraceDestination?

    /// Where the destination was named (for messages).
    nonisolated(unsafe) static var source = "P11FORK_TRACE"

    /// Opens the destination. A file that cannot be opened is a configuration problem: returns
    /// its message. A file refused because someone else could have planted it (openFile) is not:
    /// one line on stderr, and no trace (docs/SECURITY.md "Trace files").
    static func configure(_ destination: TraceDestination?, level: TraceLevel, format: TraceFormat, source: String) -> String? {
        guard let destination, level != .off else { return nil }
        self.format = format
        self.destination = destination
        self.source = source
        switch destination {
        case .standardError:
            fd = 2
        case .file(let template):
            let path = expand(template, pid: getpid())
            switch openFile(path, exclusive: template.contains("%p")) {
            case .success(let opened):
                fd = opened
            case .failure(.refused(let reason)):
                refused(template, path, reason, where: "")
                return nil
            case .failure(.failed(let reason)):
                return "\(source)=\(template): cannot open the trace file (\(reason)): name a writable file, or use \(source == "P11FORK_TRACE" ? "P11FORK_TRACE=stderr" : "trace=stderr")"
            }
        }
        self.level = level
        return nil
    }

    static func expand(_ template: String, pid: pid_t) -> String {
        template.replacing("%p", with: String(pid))
    }

    /// In a new child: a file named with `%p` is made anew under the child's pid. Where the
    /// child cannot create it (a worker that switched to a user who may not write there), its
    /// lines go on in the file inherited from the parent, which was checked when it was opened.
    static func adoptChild() {
        guard case .file(let template) = destination, template.contains("%p"), level != .off else { return }
        let path = expand(template, pid: getpid())
        switch openFile(path, exclusive: true) {
        case .success(let opened):
            let inherited = fd
            fd = opened
            close(inherited)
        case .failure(.refused(let reason)):
            // The inherited descriptor stays open: another thread of the child may be writing to it.
            level = .off
            refused(template, path, reason, where: " in this child")
        case .failure(.failed(let reason)):
            event(.fork, "cannot create this child's trace file \(path) (\(reason); the child runs as \(InputTrust.userName(geteuid()))): its lines go on in the parent's file")
        }
    }

    private static func refused(_ template: String, _ path: String, _ reason: String, where place: String) {
        let named = template == path ? "" : " (\(path))"
        let message = "p11fork: \(source)=\(template)\(named): refused the trace file\(place): \(reason); nothing is traced\n"
        write(2, message, message.utf8.count)
    }

    enum OpenProblem: Error, Equatable {
        /// The file is not one p11fork would write to.
        case refused(String)
        /// It could not be opened (the reason, from errno).
        case failed(String)
    }

    /// Opens a trace file for appending, never one someone else could have planted: not through a
    /// symbolic link, only a regular file owned by the effective user with one name; with
    /// `exclusive` (names with `%p`), only a file this call creates. A FIFO or a device is refused
    /// without being opened (opening one may wait, or act).
    static func openFile(_ path: String, exclusive: Bool) -> Result<Int32, OpenProblem> {
        var status = stat()
        if lstat(path, &status) == 0, let reason = refusal(status, exclusive: exclusive) {
            return .failure(.refused(reason))
        }
        let flags = O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | (exclusive ? O_EXCL : 0)
        let opened = open(path, flags, 0o600)
        guard opened >= 0 else {
            let error = errno
            // The file changed since lstat: read what it is now.
            if [ELOOP, EEXIST, ENXIO].contains(error), lstat(path, &status) == 0,
               let reason = refusal(status, exclusive: exclusive) {
                return .failure(.refused(reason))
            }
            return .failure(.failed(String(cString: strerror(error))))
        }
        // What was opened is what is checked: the name may have changed since lstat.
        if fstat(opened, &status) == 0, let reason = refusal(status, exclusive: false) {
            close(opened)
            return .failure(.refused(reason))
        }
        _ = fcntl(opened, F_SETFL, fcntl(opened, F_GETFL) & ~O_NONBLOCK)
        return .success(opened)
    }

    /// Why an existing file is not one to trace to, if it is not.
    private static func refusal(_ status: stat, exclusive: Bool) -> String? {
        switch status.st_mode & S_IFMT {
        case S_IFREG: break
        case S_IFLNK: return "it is a symbolic link, which p11fork never follows to write a trace (anyone who could write in its folder may have planted it): name the file itself"
        case S_IFIFO: return "it is a FIFO, not a regular file: name a regular file, or use stderr"
        case S_IFDIR: return "it is a folder: name a file in it"
        default: return "it is a device or a socket, not a regular file: name a regular file, or use stderr"
        }
        if exclusive {
            return "it exists already, and a trace named with %p is always a new file (one made there by someone else could be a trap): remove the old trace files"
        }
        if status.st_uid != geteuid() {
            return "it belongs to \(InputTrust.userName(status.st_uid)), not to this process's user (\(InputTrust.userName(geteuid()))): p11fork appends only to its own user's files; remove it, or name another file"
        }
        if status.st_nlink > 1 {
            return "it has \(status.st_nlink) names (hard links), and another name may be someone else's file: remove it, or name another file"
        }
        return nil
    }

    /// A line about p11fork itself (not a call), written when `level` is enabled. `fields` say
    /// what the event is to programs (JSON lines only): the message is for people.
    static func event(_ eventLevel: TraceLevel, _ message: String, _ fields: EventFields? = nil) {
        guard level >= eventLevel, eventLevel != .off else { return }
        var line = TraceLine(json: format == .json)
        line.header()
        line.eventBody(kind: eventLevel.name, message: message, fields: format == .json ? fields : nil)
        line.write(to: fd)
    }

    /// Writes a whole buffer with as few write(2) calls as the kernel allows (one, for a file).
    static func write(_ fd: Int32, _ bytes: UnsafeRawPointer, _ count: Int) {
        var offset = 0
        while offset < count {
            let written = Glibc.write(fd, bytes + offset, count - offset)
            if written > 0 {
                offset += written
            } else if written < 0 && errno == EINTR {
                continue
            } else {
                return
            }
        }
    }
}

/// Time sources for trace lines.
enum Clock {
    /// Odd, so never 0 (a call's start time of 0 means "not traced"). The reading is in C: see
    /// CPKCS11_monotonic_nanoseconds.
    @inline(__always)
    static func monotonicNanoseconds() -> UInt64 {
        CPKCS11_monotonic_nanoseconds() | 1
    }

    static func wallClock() -> timespec {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return ts
    }
}

/// What a trace line about an event says to programs, in words of the shared vocabulary
/// (codegen/vocabulary.txt): JSON lines carry these as fields beside the message, so that a
/// reader (`p11fork trace`, the doctor) never depends on the message's wording.
struct EventFields {
    let kind: TraceEventKind
    var parent: pid_t?
    var generation: Int?
    var step: RecoveryStep?
    var strategy: StrategyName?
    var outcome: StepOutcome?
    /// The step's duration, from its start to when the fields are made.
    var nanoseconds: UInt64?

    static func forkDetected(parent: pid_t, generation: Int) -> EventFields {
        EventFields(kind: .forkDetected, parent: parent, generation: generation)
    }

    static let preparation = EventFields(kind: .preparation)

    static func decision(_ strategy: StrategyName) -> EventFields {
        EventFields(kind: .decision, strategy: strategy)
    }

    static func step(_ step: RecoveryStep, _ outcome: StepOutcome, since started: UInt64? = nil,
                     strategy: StrategyName? = nil) -> EventFields {
        EventFields(kind: .recoveryStep, step: step, strategy: strategy, outcome: outcome,
                    nanoseconds: started.map { Clock.monotonicNanoseconds() &- $0 })
    }

    /// `,"kind":"…"` and the other fields that are set.
    var json: String {
        var text = ",\"kind\":\"\(kind.rawValue)\""
        if let parent { text += ",\"parent\":\(parent)" }
        if let generation { text += ",\"generation\":\(generation)" }
        if let step { text += ",\"step\":\"\(step.rawValue)\"" }
        if let strategy { text += ",\"strategy\":\"\(strategy.rawValue)\"" }
        if let nanoseconds {
            let microseconds = nanoseconds / 1000
            let fraction = String(microseconds % 1000)
            text += ",\"ms\":\(microseconds / 1000).\(String(repeating: "0", count: 3 - fraction.count))\(fraction)"
        }
        if let outcome { text += ",\"outcome\":\"\(outcome.rawValue)\"" }
        return text
    }
}
