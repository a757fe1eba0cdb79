import Glibc
import Vocabulary

/// p11fork's settings, read once per process (docs/DESIGN.md "Configuration"; README "Configuration").
/// Where they come from, and which source wins: README "Configuration" (stated once, in
/// codegen/vocabulary.txt, and generated there and into include/p11fork.h).
/// When the environment names the module (P11FORK_MODULE or P11FORK_CONFIG) the settings are read
/// when the library is loaded and a pReserved string is not consulted; otherwise they are read at
/// the first C_Initialize (Core.settle). Daemons scrub their workers' environment, so nothing is
/// read again later.
/// Under AT_SECURE the P11FORK_* variables are not seen at all, and files are read only when
/// nobody else could have changed them (InputTrust; docs/SECURITY.md).
struct Configuration: Equatable, Sendable {
    /// Path of the real module and where it was named (for messages).
    var modulePath: String
    var moduleSource: String
    var trace: TraceDestination?
    /// Where the trace was named (for messages).
    var traceSource = "P11FORK_TRACE"
    var traceLevel: TraceLevel
    var traceFormat: TraceFormat
    /// How a child gets a working module (ModuleStrategy).
    var strategy: ModuleStrategy = .auto
    /// Whether a child replays the parent's login with the kept PIN.
    var loginReplay = true
    /// Bytes kept for replaying session objects and operations in a child (ReplayBudget).
    var replayLimit = ReplayBudget.defaultLimit

    /// The keys a configuration file may hold, and the variable each mirrors.
    static let keys: [(key: String, variable: String)] = [
        ("module", "P11FORK_MODULE"), ("trace", "P11FORK_TRACE"),
        ("trace_level", "P11FORK_TRACE_LEVEL"), ("trace_format", "P11FORK_TRACE_FORMAT"),
        ("strategy", "P11FORK_STRATEGY"), ("login_replay", "P11FORK_LOGIN_REPLAY"),
        ("replay_limit", "P11FORK_REPLAY_LIMIT"),
    ]

    /// The file read when nothing else names the module.
    static let systemFile = "/etc/p11fork.conf"
    /// A C_Initialize pReserved string starting with this holds p11fork's settings.
    static let reservedPrefix = "p11fork:"

    typealias Settings = [String: (value: String, source: String)]

    /// True when the environment names the module, so that the settings can be read at load.
    static func environmentNamesModule(_ environment: [String: String]) -> Bool {
        ["P11FORK_MODULE", "P11FORK_CONFIG"].contains { !(environment[$0] ?? "").isEmpty }
    }

    /// Reads the configuration; on a problem, the one-line message that names it and the fix.
    /// `reserved`: the pReserved string given to C_Initialize, when it starts with `p11fork:`.
    static func load(environment: [String: String], reserved: String? = nil,
                     readFile: (String) -> Result<String, FileProblem> = Self.readFile)
        -> Result<Configuration, ConfigurationProblem> {
        var settings: Settings = [:]
        // Lowest first: each layer overwrites what the one below set.
        if let path = environment["P11FORK_CONFIG"], !path.isEmpty {
            switch readSettings(path, readFile, label: "P11FORK_CONFIG=\(path)", unreadable: { "cannot read the file (\($0)): create it, or unset P11FORK_CONFIG" }) {
            case .success(let fromFile): settings.merge(fromFile) { $1 }
            case .failure(let problem): return .failure(problem)
            }
        }
        if let reserved {
            switch parseReserved(reserved) {
            case .success(let (inline, config)):
                if let config {
                    switch readSettings(config, readFile, label: "pReserved config=\(config)", unreadable: { "cannot read the file (\($0)): create it, or change the p11fork: settings given to C_Initialize (p11-kit: x-init-reserved)" }) {
                    case .success(let fromFile): settings.merge(fromFile) { $1 }
                    case .failure(let problem): return .failure(problem)
                    }
                }
                settings.merge(inline) { $1 }
            case .failure(let problem): return .failure(problem)
            }
        }
        for (key, variable) in keys {
            if let value = environment[variable], !value.isEmpty { settings[key] = (value, variable) }
        }
        if settings["module"] == nil {
            // The host's default, only when nothing more specific names the module; it fills gaps.
            switch readFile(systemFile) {
            case .success(let text):
                switch parse(text, path: systemFile) {
                case .success(let fromFile): settings.merge(fromFile) { current, _ in current }
                case .failure(let problem): return .failure(problem)
                }
            case .failure(let problem) where problem.refused:
                return .failure(ConfigurationProblem("\(systemFile): \(problem.reason)"))
            case .failure(let problem) where !problem.missing:
                return .failure(ConfigurationProblem("\(systemFile): cannot read the file (\(problem.reason)): make it readable, or remove it"))
            case .failure: break
            }
        }
        return make(settings)
    }

    /// Reads and parses one settings file; the message starts with `label`, and `unreadable`
    /// makes the rest from the reason.
    private static func readSettings(_ path: String, _ readFile: (String) -> Result<String, FileProblem>, label: String,
                                     unreadable: (String) -> String) -> Result<Settings, ConfigurationProblem> {
        switch readFile(path) {
        case .success(let text): return parse(text, path: path)
        case .failure(let problem) where problem.refused: return .failure(ConfigurationProblem("\(label): \(problem.reason)"))
        case .failure(let problem): return .failure(ConfigurationProblem("\(label): \(unreadable(problem.reason))"))
        }
    }

    /// The configuration the settings describe.
    private static func make(_ settings: Settings) -> Result<Configuration, ConfigurationProblem> {
        guard let module = settings["module"] else {
            return .failure(ConfigurationProblem(
                "P11FORK_MODULE is not set: set it to the path of the real PKCS#11 module (for example P11FORK_MODULE=/usr/lib/softhsm/libsofthsm2.so), put 'module = PATH' in a file named by P11FORK_CONFIG or in \(systemFile), or give C_Initialize 'p11fork: module=PATH' as pReserved (p11-kit: x-init-reserved)"))
        }
        var configuration = Configuration(modulePath: module.value, moduleSource: module.source, trace: nil,
                                          traceLevel: .calls, traceFormat: .text)
        if let trace = settings["trace"] {
            configuration.trace = trace.value == "stderr" ? .standardError : .file(template: trace.value)
            configuration.traceSource = trace.source
        }
        if let level = settings["trace_level"] {
            guard let parsed = TraceLevel(name: level.value) else {
                return .failure(ConfigurationProblem(
                    "\(level.source): '\(level.value)' is not a trace level: use error, fork, calls or full"))
            }
            configuration.traceLevel = parsed
        }
        if let format = settings["trace_format"] {
            switch format.value {
            case "text": configuration.traceFormat = .text
            case "json": configuration.traceFormat = .json
            default:
                return .failure(ConfigurationProblem(
                    "\(format.source): '\(format.value)' is not a trace format: use text or json"))
            }
        }
        if let strategy = settings["strategy"] {
            guard let parsed = ModuleStrategy(rawValue: strategy.value) else {
                let choices = ModuleStrategy.listed
                return .failure(ConfigurationProblem(
                    "\(strategy.source): '\(strategy.value)' is not a strategy: use \(choices)"))
            }
            configuration.strategy = parsed
        }
        if let replay = settings["login_replay"] {
            switch replay.value {
            case "on", "yes", "true", "1": configuration.loginReplay = true
            case "off", "no", "false", "0": configuration.loginReplay = false
            default:
                return .failure(ConfigurationProblem("\(replay.source): '\(replay.value)' is not on or off"))
            }
        }
        if let limit = settings["replay_limit"] {
            guard let bytes = parseByteCount(limit.value) else {
                return .failure(ConfigurationProblem(
                    "\(limit.source): '\(limit.value)' is not a number of bytes: use for example 1048576, 1024k or 1m (0 keeps nothing for replay)"))
            }
            configuration.replayLimit = bytes
        }
        return .success(configuration)
    }

    /// "65536", "64k", "1m" (binary units), at most 1 GiB.
    static func parseByteCount(_ text: String) -> Int? {
        var digits = Substring(text.lowercased())
        var unit = 1
        if digits.hasSuffix("k") { unit = 1 << 10; digits = digits.dropLast() }
        else if digits.hasSuffix("m") { unit = 1 << 20; digits = digits.dropLast() }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), digits.count <= 10,
              let number = Int(digits), number * unit <= 1 << 30 else { return nil }
        return number * unit
    }

    /// Parses `key = value` lines; `#` starts a comment; a value may be in double quotes.
    static func parse(_ text: String, path: String) -> Result<[String: (value: String, source: String)], ConfigurationProblem> {
        var settings: [String: (value: String, source: String)] = [:]
        var number = 0
        for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
            number += 1
            var line = Substring(rawLine)
            if let hash = line.firstIndex(of: "#") { line = line[..<hash] }
            let trimmed = line.trimmingSpaces
            if trimmed.isEmpty { continue }
            let source = "\(path) line \(number)"
            guard let equals = trimmed.firstIndex(of: "=") else {
                return .failure(ConfigurationProblem("\(source): expected 'key = value', found '\(trimmed)'"))
            }
            let key = String(trimmed[..<equals].trimmingSpaces)
            var value = trimmed[trimmed.index(after: equals)...].trimmingSpaces
            if value.count >= 2, value.first == "\"", value.last == "\"" { value = value.dropFirst().dropLast() }
            guard keys.contains(where: { $0.key == key }) else {
                let known = keys.map(\.key).joined(separator: ", ")
                return .failure(ConfigurationProblem("\(source): unknown key '\(key)': the keys are \(known)"))
            }
            guard !value.isEmpty else {
                return .failure(ConfigurationProblem("\(source): '\(key)' has no value"))
            }
            settings[key] = (String(value), source)
        }
        return .success(settings)
    }

    /// Reads a settings file of at most 1 MiB, when the process's file rules allow it
    /// (InputTrust; docs/SECURITY.md "Files that give settings or code").
    static func readFile(_ path: String) -> Result<String, FileProblem> {
        readFile(path, rules: .current)
    }

    static func readFile(_ path: String, rules: InputTrust.FileRules) -> Result<String, FileProblem> {
        let resolved: String
        switch InputTrust.checkedPath(path, rules: rules) {
        case .success(let path): resolved = path
        case .failure(let refusal): return .failure(FileProblem(reason: refusal.detail, refused: true))
        }
        // Never waits: a FIFO or a device named as a settings file is refused, not read.
        let fd = open(resolved, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY)
        guard fd >= 0 else {
            let missing = errno == ENOENT
            return .failure(FileProblem(reason: String(cString: strerror(errno)), missing: missing))
        }
        defer { close(fd) }
        var status = stat()
        guard fstat(fd, &status) == 0, status.st_mode & S_IFMT == S_IFREG else {
            return .failure(FileProblem(reason: "not a regular file"))
        }
        if let refusal = InputTrust.checkedOpenFile(status, path: resolved, rules: rules) {
            return .failure(FileProblem(reason: refusal.detail, refused: true))
        }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            bytes.append(contentsOf: chunk[0..<n])
            if bytes.count > 1 << 20 { return .failure(FileProblem(reason: "larger than 1 MiB: is it the right file?")) }
        }
        return .success(String(decoding: bytes, as: UTF8.self))
    }

    /// Parses the settings of a pReserved string: `p11fork:` then `key=value` words separated by
    /// spaces, a value in double quotes when it holds spaces; the keys of the file, and `config`
    /// (a settings file read below the words). Returns the words' settings and that file's path.
    static func parseReserved(_ text: String) -> Result<(Settings, config: String?), ConfigurationProblem> {
        var rest = Substring(text)
        guard rest.hasPrefix(reservedPrefix) else {
            return .failure(ConfigurationProblem("pReserved: p11fork's settings start with '\(reservedPrefix)'"))
        }
        rest = rest.dropFirst(reservedPrefix.count)
        var settings: Settings = [:]
        var config: String?
        let spaces: Set<Character> = [" ", "\t", "\n", "\r"]
        while true {
            rest = rest.drop(while: { spaces.contains($0) })
            guard !rest.isEmpty else { break }
            guard let equals = rest.firstIndex(of: "="),
                  !rest[..<equals].contains(where: { spaces.contains($0) }) else {
                let word = rest.prefix(while: { !spaces.contains($0) })
                return .failure(ConfigurationProblem("pReserved: expected 'key=value', found '\(word)'"))
            }
            let key = String(rest[..<equals])
            rest = rest[rest.index(after: equals)...]
            var value: Substring
            if rest.first == "\"" {
                rest = rest.dropFirst()
                guard let close = rest.firstIndex(of: "\"") else {
                    return .failure(ConfigurationProblem("pReserved \(key): the value has no closing '\"'"))
                }
                value = rest[..<close]
                rest = rest[rest.index(after: close)...]
            } else {
                value = rest.prefix(while: { !spaces.contains($0) })
                rest = rest.dropFirst(value.count)
            }
            guard key == "config" || keys.contains(where: { $0.key == key }) else {
                let known = (keys.map(\.key) + ["config"]).joined(separator: ", ")
                return .failure(ConfigurationProblem("pReserved: unknown key '\(key)': the keys are \(known)"))
            }
            guard !value.isEmpty else { return .failure(ConfigurationProblem("pReserved: '\(key)' has no value")) }
            if key == "config" { config = String(value) } else { settings[key] = (String(value), "pReserved \(key)") }
        }
        return .success((settings, config))
    }

    /// The pReserved of C_Initialize's arguments when it is p11fork's settings string (it starts
    /// with `p11fork:`); nil for anything else, which goes on to the real module unchanged.
    /// Compared byte by byte, so a pointer that is not a string is read no further than it
    /// differs from the prefix.
    static func claimedReserved(_ pointer: UnsafeRawPointer) -> Result<String, ConfigurationProblem>? {
        let text = pointer.assumingMemoryBound(to: CChar.self)
        guard strncmp(text, reservedPrefix, reservedPrefix.utf8.count) == 0 else { return nil }
        let limit = 1 << 16
        let length = strnlen(text, limit)
        guard length < limit else {
            return .failure(ConfigurationProblem("pReserved: the p11fork: settings are longer than 64 KiB: put them in a file and give 'p11fork: config=PATH'"))
        }
        return .success(String(decoding: UnsafeRawBufferPointer(start: pointer, count: length), as: UTF8.self))
    }

    /// The process environment as it is now (read once, at load).
    static func currentEnvironment() -> [String: String] {
        var result: [String: String] = [:]
        var entry = environ
        while let pointer = entry.pointee {
            let pair = String(cString: pointer)
            if let equals = pair.firstIndex(of: "=") {
                result[String(pair[..<equals])] = String(pair[pair.index(after: equals)...])
            }
            entry += 1
        }
        return result
    }
}

/// Why a settings file could not be read; `missing` when it does not exist.
struct FileProblem: Error, Equatable, Sendable {
    let reason: String
    var missing = false
    /// Refused by the file rules (InputTrust): `reason` is the whole refusal and its fix.
    var refused = false
}

/// A configuration or loading problem, as the single line written to stderr.
struct ConfigurationProblem: Error, Equatable, Sendable {
    let message: String
    init(_ message: String) { self.message = message }
}

extension Substring {
    var trimmingSpaces: Substring {
        var s = self
        while let first = s.first, first == " " || first == "\t" || first == "\r" { s = s.dropFirst() }
        while let last = s.last, last == " " || last == "\t" || last == "\r" { s = s.dropLast() }
        return s
    }
}
