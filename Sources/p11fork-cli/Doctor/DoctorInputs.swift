import Foundation

/// Where the doctor's PIN comes from: exactly one of --pin, --pin-env, --pin-file.
enum PINSource {
    case value(String)
    case environment(String)
    case file(String)

    /// The values given to --pin on a command line (to hide them even from argument errors).
    static func valuesOfPINOptions(in arguments: [String]) -> [String] {
        var values: [String] = []
        for (index, argument) in arguments.enumerated() {
            if argument == "--pin", index + 1 < arguments.count { values.append(arguments[index + 1]) }
            if argument.hasPrefix("--pin=") { values.append(String(argument.dropFirst("--pin=".count))) }
        }
        return values
    }

    static func from(pin: String?, pinEnv: String?, pinFile: String?) throws -> PINSource {
        let given = [pin.map(PINSource.value), pinEnv.map(PINSource.environment), pinFile.map(PINSource.file)].compactMap { $0 }
        guard given.count == 1 else {
            throw UsageError(given.isEmpty
                ? "no PIN: give the user PIN with --pin-env VAR (an environment variable), --pin-file FILE or --pin PIN"
                : "more than one PIN option: give only one of --pin, --pin-env and --pin-file")
        }
        return given[0]
    }

    /// The PIN itself; a file's one trailing newline is not part of it.
    func read() throws -> String {
        switch self {
        case .value(let pin):
            guard !pin.isEmpty else { throw UsageError("--pin is empty: give the token's user PIN") }
            return pin
        case .environment(let name):
            guard let pin = ProcessInfo.processInfo.environment[name] else {
                throw UsageError("--pin-env \(name): the environment variable \(name) is not set: export it, or use --pin-file FILE")
            }
            guard !pin.isEmpty else { throw UsageError("--pin-env \(name): the environment variable \(name) is empty: set it to the user PIN") }
            return pin
        case .file(let path):
            guard let data = FileManager.default.contents(atPath: path) else {
                throw UsageError("--pin-file \(path): cannot read the file: name a readable file holding the user PIN")
            }
            var pin = String(decoding: data, as: UTF8.self)
            if pin.hasSuffix("\r\n") { pin.removeLast(2) } else if pin.hasSuffix("\n") { pin.removeLast() }
            guard !pin.isEmpty else { throw UsageError("--pin-file \(path): the file is empty: put the user PIN in it") }
            return pin
        }
    }
}

/// The parts of a PKCS#11 URI (RFC 7512) the doctor uses to pick a token and a key.
struct PKCS11URI: Equatable {
    var token: String?
    var serial: String?
    var object: String?
    var id: [UInt8]?
    var type: String?

    init(parsing text: String) throws {
        guard text.lowercased().hasPrefix("pkcs11:") else {
            throw UsageError("--uri must start with 'pkcs11:' (for example --uri 'pkcs11:token=mytoken;object=mykey')")
        }
        let body = text.dropFirst("pkcs11:".count)
        let parts = body.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        if parts.count > 1 {
            for attribute in parts[1].split(separator: "&") {
                let name = attribute.split(separator: "=", maxSplits: 1).first.map(String.init) ?? ""
                if name == "pin-value" || name == "pin-source" {
                    throw UsageError("--uri carries a PIN (\(name)): take it out of the URI and give the PIN with --pin-env or --pin-file")
                }
            }
        }
        for attribute in parts[0].split(separator: ";") where !attribute.isEmpty {
            let pair = attribute.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let name = String(pair[0])
            guard pair.count == 2 else { throw UsageError("--uri: '\(name)' has no value: write it as \(name)=VALUE") }
            let value = try Self.percentDecoded(pair[1], attribute: name)
            switch name {
            case "token": token = String(decoding: value, as: UTF8.self)
            case "serial": serial = String(decoding: value, as: UTF8.self)
            case "object": object = String(decoding: value, as: UTF8.self)
            case "id": id = value
            case "type":
                let kind = String(decoding: value, as: UTF8.self)
                guard ["private", "secret-key"].contains(kind) else {
                    throw UsageError("--uri: type=\(kind) cannot sign: use type=private or type=secret-key, or leave type out")
                }
                type = kind
            case "pin-value", "pin-source":
                throw UsageError("--uri carries a PIN (\(name)): take it out of the URI and give the PIN with --pin-env or --pin-file")
            default:
                // Other attributes (manufacturer, model, library-*) do not narrow the choice here.
                continue
            }
        }
    }

    private static func percentDecoded(_ text: Substring, attribute: String) throws -> [UInt8] {
        var bytes: [UInt8] = []
        var iterator = Array(text.utf8).makeIterator()
        while let byte = iterator.next() {
            guard byte == UInt8(ascii: "%") else { bytes.append(byte); continue }
            guard let high = iterator.next(), let low = iterator.next(),
                  let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16) else {
                throw UsageError("--uri: bad percent-encoding in \(attribute)=: write each byte as %XX (two hex digits)")
            }
            bytes.append(value)
        }
        return bytes
    }
}

/// Where libp11fork.so is when --p11fork does not say: beside this executable, in a lib folder
/// beside its folder, in the package's build folders, then the usual install places.
enum ModuleLocator {
    static var executableDirectory: URL {
        URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
    }

    static func defaultP11Fork() -> String? {
        let here = executableDirectory
        let working = URL(fileURLWithPath: FileManager.default.currentDirectoryPath)
        let candidates = [
            here.appendingPathComponent("libp11fork.so"),
            here.deletingLastPathComponent().appendingPathComponent("lib/libp11fork.so"),
            working.appendingPathComponent(".build/release/libp11fork.so"),
            working.appendingPathComponent(".build/debug/libp11fork.so"),
            URL(fileURLWithPath: "/usr/local/lib/libp11fork.so"),
            URL(fileURLWithPath: "/usr/lib/libp11fork.so"),
        ]
        return candidates.map(\.path).first { FileManager.default.isReadableFile(atPath: $0) }
    }

    /// An absolute path, symbolic links kept (a configuration should name what the user named).
    static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return URL(fileURLWithPath: path).standardized.path }
        return URL(fileURLWithPath: FileManager.default.currentDirectoryPath).appendingPathComponent(path).standardized.path
    }
}
