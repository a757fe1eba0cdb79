import Foundation

/// Colour, only for a terminal that has not asked for none (NO_COLOR): the trace report's, and the doctor's.
public struct Style {
    public let enabled: Bool

    public init(enabled: Bool) { self.enabled = enabled }

    public static func forStandardOutput() -> Style {
        Style(enabled: isatty(1) == 1 && ProcessInfo.processInfo.environment["NO_COLOR"] == nil
              && ProcessInfo.processInfo.environment["TERM"] != "dumb")
    }

    public func red(_ text: String) -> String { wrap(text, "1;31") }
    public func green(_ text: String) -> String { wrap(text, "32") }
    public func cyan(_ text: String) -> String { wrap(text, "36") }
    public func bold(_ text: String) -> String { wrap(text, "1") }
    public func dim(_ text: String) -> String { wrap(text, "2") }

    private func wrap(_ text: String, _ code: String) -> String {
        enabled ? "\u{1B}[\(code)m\(text)\u{1B}[0m" : text
    }
}
