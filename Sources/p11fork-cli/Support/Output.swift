import Foundation
import Synchronization

/// Everything the tool prints goes through here, so that no PIN it was given can ever be printed:
/// not in a table, not in JSON, not in an error message, not in what a module said.
enum Output {
    private static let secrets = Mutex<[String]>([])

    /// Values shorter than 4 characters are not searched for: they would blank out ordinary
    /// letters and digits everywhere (no token takes such a PIN in practice).
    static func hide(_ values: [String]) {
        let values = values.filter { $0.count >= 4 }
        guard !values.isEmpty else { return }
        secrets.withLock { $0.append(contentsOf: values) }
    }

    static func hide(_ value: String) { hide([value]) }

    /// `text` with each secret (as it is, and as JSON would escape it) replaced.
    static func redacted(_ text: String) -> String {
        var text = text
        for secret in secrets.withLock({ $0 }) {
            for form in Set([secret, jsonEscaped(secret)]) {
                text = text.replacingOccurrences(of: form, with: "(hidden)")
            }
        }
        return text
    }

    static func standard(_ text: String) {
        FileHandle.standardOutput.write(Data((redacted(text) + "\n").utf8))
    }

    static func error(_ text: String) {
        FileHandle.standardError.write(Data((redacted(text) + "\n").utf8))
    }

    /// One status line on a terminal's standard error, overwritten by the next (nil: cleared).
    static func status(_ text: String?) {
        FileHandle.standardError.write(Data(("\r\u{1B}[K" + (text.map(redacted) ?? "")).utf8))
    }

    private static func jsonEscaped(_ text: String) -> String {
        guard let data = try? JSONEncoder().encode([text]), let array = String(data: data, encoding: .utf8) else { return text }
        return String(array.dropFirst(2).dropLast(2))
    }
}
