import CPKCS11
import Glibc

/// How much p11fork writes (DESIGN.md "Tracing"). Each level includes the ones before it.
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

    /// Opens the destination; returns a problem message if the file cannot be opened.
    static func configure(_ destination: TraceDestination?, level: TraceLevel, format: TraceFormat) -> String? {
        guard let destination, level != .off else { return nil }
        self.format = format
        self.destination = destination
        switch destination {
        case .standardError:
            fd = 2
        case .file(let template):
            let path = expand(template, pid: getpid())
            let opened = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
            guard opened >= 0 else {
                let reason = String(cString: strerror(errno))
                return "P11FORK_TRACE=\(template): cannot open the trace file (\(reason)): name a writable file, or use P11FORK_TRACE=stderr"
            }
            fd = opened
        }
        self.level = level
        return nil
    }

    static func expand(_ template: String, pid: pid_t) -> String {
        template.replacing("%p", with: String(pid))
    }

    /// In a new child: a file named with `%p` is re-opened under the child's pid.
    static func adoptChild() {
        guard case .file(let template) = destination, template.contains("%p") else { return }
        let opened = open(expand(template, pid: getpid()), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
        if opened >= 0 {
            let inherited = fd
            fd = opened
            close(inherited)
        }
    }

    /// A line about p11fork itself (not a call), written when `level` is enabled.
    static func event(_ eventLevel: TraceLevel, _ message: String) {
        guard level >= eventLevel, eventLevel != .off else { return }
        var line = TraceLine(json: format == .json)
        line.header()
        line.eventBody(kind: eventLevel.name, message: message)
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
    /// Out of line: inlined, its `timespec` would give every entry point a stack protector.
    @inline(never)
    static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec) | 1
    }

    static func wallClock() -> timespec {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return ts
    }
}
