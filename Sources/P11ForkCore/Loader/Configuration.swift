import Glibc

/// p11fork's settings, read once when the module is loaded (DESIGN.md "Configuration"): from the
/// environment, and from the `key = value` file named by P11FORK_CONFIG. A variable that is set
/// wins over the same key in the file. Daemons scrub their workers' environment, so nothing is
/// read again later.
struct Configuration: Equatable, Sendable {
    /// Path of the real module and where it was named (for messages).
    var modulePath: String
    var moduleSource: String
    var trace: TraceDestination?
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

    /// Reads the configuration; on a problem, the one-line message that names it and the fix.
    static func load(environment: [String: String],
                            readFile: (String) -> Result<String, ConfigurationProblem> = Self.readFile)
        -> Result<Configuration, ConfigurationProblem> {
        var settings: [String: (value: String, source: String)] = [:]
        if let path = environment["P11FORK_CONFIG"], !path.isEmpty {
            let text: String
            switch readFile(path) {
            case .success(let contents): text = contents
            case .failure(let problem): return .failure(problem)
            }
            switch parse(text, path: path) {
            case .success(let fromFile): settings = fromFile
            case .failure(let problem): return .failure(problem)
            }
        }
        for (key, variable) in keys {
            if let value = environment[variable], !value.isEmpty { settings[key] = (value, variable) }
        }

        guard let module = settings["module"] else {
            return .failure(ConfigurationProblem(
                "P11FORK_MODULE is not set: set it to the path of the real PKCS#11 module (for example P11FORK_MODULE=/usr/lib/softhsm/libsofthsm2.so), or put 'module = PATH' in a file named by P11FORK_CONFIG"))
        }
        var configuration = Configuration(modulePath: module.value, moduleSource: module.source, trace: nil,
                                          traceLevel: .calls, traceFormat: .text)
        if let trace = settings["trace"] {
            configuration.trace = trace.value == "stderr" ? .standardError : .file(template: trace.value)
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
                let choices = ModuleStrategy.allCases.map(\.rawValue).joined(separator: ", ")
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

    static func readFile(_ path: String) -> Result<String, ConfigurationProblem> {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let reason = String(cString: strerror(errno))
            return .failure(ConfigurationProblem(
                "P11FORK_CONFIG=\(path): cannot read the file (\(reason)): create it, or unset P11FORK_CONFIG"))
        }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            bytes.append(contentsOf: chunk[0..<n])
            if bytes.count > 1 << 20 {
                return .failure(ConfigurationProblem("P11FORK_CONFIG=\(path): the file is larger than 1 MiB: is it the right file?"))
            }
        }
        return .success(String(decoding: bytes, as: UTF8.self))
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
