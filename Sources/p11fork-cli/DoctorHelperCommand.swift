import ArgumentParser
import DoctorScenarios
import Foundation

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

    func run() throws {
        // Kept alive until the process exits: the C side holds pointers into them.
        let strings: [UnsafeMutablePointer<CChar>?] = [module, scenario, token, serial, keyLabel].map { $0.flatMap { strdup($0) } }
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
        let status = doctor_run(&options, strings[1]!, 0)
        Foundation.exit(status)
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
