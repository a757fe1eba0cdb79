import ArgumentParser
import DoctorScenarios
import Foundation
import ProviderScenario

/// `p11fork doctor-helper` (hidden): one scenario against one module, in a process the doctor
/// started and watches. The PIN comes on standard input. The work is done in C
/// (Sources/p11fork-cli/DoctorScenarios); nothing of Swift runs in the children it forks.
struct DoctorHelperCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor-helper",
        abstract: "Runs one doctor scenario (used by 'p11fork doctor'; the PIN is read from standard input).",
        shouldDisplay: false
    )

    @Option var module: String
    @Option var scenario: String
    @Option var token: String?
    @Option var serial: String?
    @Option(name: .customLong("key-label")) var keyLabel: String?
    @Option(name: .customLong("key-id"), help: "hex") var keyID: String?
    @Option(name: .customLong("key-class")) var keyClass: String?
    @Option var timeout: Int = 15
    @Option var workers: Int = 4
    /// The user the children of worker-switches-user become.
    @Option(name: .customLong("worker-user")) var workerUser: String = "nobody"
    /// pkcs11-provider's module, for the provider-workers scenario.
    @Option var provider: String?

    func run() throws {
        if scenario == DoctorScenario.providerWorkers.rawValue { try runThroughProvider() }
        // Kept alive until the process exits: the C side holds pointers into them.
        let strings: [UnsafeMutablePointer<CChar>?] = [module, scenario, token, serial, keyLabel, workerUser].map { $0.flatMap { strdup($0) } }
        let id = try keyID.map(Self.bytes(hex:))
        let idBuffer = id.map { bytes -> UnsafeMutablePointer<UInt8> in
            let buffer = UnsafeMutablePointer<UInt8>.allocate(capacity: max(bytes.count, 1))
            buffer.initialize(from: bytes, count: bytes.count)
            return buffer
        }
        var options = doctor_options()
        options.module = UnsafePointer(strings[0]!)
        options.token_label = strings[2].map { UnsafePointer($0) }
        options.token_serial = strings[3].map { UnsafePointer($0) }
        options.key_label = strings[4].map { UnsafePointer($0) }
        options.key_id = idBuffer.map { UnsafePointer($0) }
        options.key_id_length = id?.count ?? 0
        switch keyClass {
        case "private": options.key_class = Int32(DOCTOR_KEY_PRIVATE)
        case "secret": options.key_class = Int32(DOCTOR_KEY_SECRET)
        default: options.key_class = Int32(DOCTOR_KEY_ANY)
        }
        options.child_timeout = Int32(max(timeout, 1))
        options.workers = Int32(min(max(workers, 1), 16))
        options.worker_user = strings[5].map { UnsafePointer($0) }
        let status = doctor_run(&options, strings[1]!, 0)
        Foundation.exit(status)
    }

    /// The provider-workers scenario: pkcs11-provider with `module` as its PKCS#11 module, set up
    /// by a configuration file in a private folder (the PIN in a file there, which the provider
    /// needs again in each worker), removed before the process ends.
    func runThroughProvider() throws -> Never {
        guard let provider else {
            print("result: error usage --provider is missing")
            Foundation.exit(4)
        }
        if keyClass == "secret" {
            print("result: n/a pkcs11-provider signs with private keys; this key is a secret key")
            Foundation.exit(3)
        }
        let pin = String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self)
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("p11fork-doctor-provider-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o700])
        let pinFile = folder.appendingPathComponent("pin").path
        guard FileManager.default.createFile(atPath: pinFile, contents: Data((pin + "\n").utf8), attributes: [.posixPermissions: 0o600]) else {
            print("result: error setup cannot write in \(folder.path)")
            Foundation.exit(4)
        }
        // OpenSSL's configuration expands $ and backslashes in values.
        let value = { (text: String) in text.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "$", with: "\\$") }
        let configuration = [
            "openssl_conf = openssl_init", "[openssl_init]", "providers = provider_section",
            "[provider_section]", "default = default_section", "pkcs11 = pkcs11_section",
            "[default_section]", "activate = 1",
            "[pkcs11_section]", "module = \(value(provider))", "pkcs11-module-path = \(value(module))",
            "pkcs11-module-token-pin = file:\(value(pinFile))", "activate = 1", "",
        ].joined(separator: "\n")
        let configurationFile = folder.appendingPathComponent("openssl.cnf")
        try configuration.write(to: configurationFile, atomically: true, encoding: .utf8)
        setenv("OPENSSL_CONF", configurationFile.path, 1)
        var attributes: [String] = []
        if let token { attributes.append("token=\(Self.percentEncoded(Array(token.utf8)))") }
        if let serial { attributes.append("serial=\(Self.percentEncoded(Array(serial.utf8)))") }
        if let keyLabel { attributes.append("object=\(Self.percentEncoded(Array(keyLabel.utf8)))") }
        if let keyID { attributes.append("id=" + Self.percentEncoded(try Self.bytes(hex: keyID), all: true)) }
        let uri = strdup("pkcs11:" + (attributes + ["type=private"]).joined(separator: ";"))!
        var options = provider_scenario_options(uri: uri, workers: Int32(min(max(workers, 1), 16)), signatures: 2,
                                                seconds: Int32(max(timeout, 1)), stagger_ms: 200, before_fork: nil)
        let status = provider_scenario_run(&options)
        try? FileManager.default.removeItem(at: folder)
        Foundation.exit(status)
    }

    /// A PKCS#11 URI attribute value (RFC 7512): all bytes, or all but unreserved characters, as %XX.
    static func percentEncoded(_ bytes: [UInt8], all: Bool = false) -> String {
        bytes.map { byte -> String in
            let unreserved = (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x30 && byte <= 0x39)
                || [0x2D, 0x2E, 0x5F, 0x7E].contains(byte)
            return unreserved && !all ? String(UnicodeScalar(byte)) : String(format: "%%%02X", byte)
        }.joined()
    }

    static func bytes(hex: String) throws -> [UInt8] {
        let digits = Array(hex.utf8)
        guard digits.count % 2 == 0 else { throw UsageError("--key-id: an even number of hex digits") }
        return try stride(from: 0, to: digits.count, by: 2).map { index in
            guard let byte = UInt8(String(decoding: digits[index...index + 1], as: UTF8.self), radix: 16) else {
                throw UsageError("--key-id: hex digits only")
            }
            return byte
        }
    }
}
