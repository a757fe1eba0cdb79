import Foundation

/// A test's "directly" half: the real module alone, expected to fail or hang. It is bounded by
/// what it needs to show (a child that hangs shows it within seconds; the drivers' own alarms
/// are shorter), never by minutes, and how it ended is printed, so that a log shows what the
/// comparison stood on.
enum Baseline {
    static let timeout: TimeInterval = 60

    /// The bound for a run: `through`'s own when it goes through p11fork, else the baseline's.
    static func timeout(through: Bool, else throughTimeout: TimeInterval) -> TimeInterval {
        through ? throughTimeout : timeout
    }

    /// Prints how a direct run ended ("directly, forkcheck storm: exit status 1"); returns it.
    @discardableResult
    static func note(_ what: String, _ result: ProcessResult, through: Bool) -> ProcessResult {
        if !through { print("directly, \(what): \(result.ending)") }
        return result
    }
}
