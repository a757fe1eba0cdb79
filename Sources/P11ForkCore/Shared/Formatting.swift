import CPKCS11

/// How trace messages write numbers, durations and return codes: every layer writes them alike.
enum Format {
    /// "2.3 ms" since `start` (a `Clock.monotonicNanoseconds()` value).
    static func milliseconds(since start: UInt64) -> String {
        let tenths = (Clock.monotonicNanoseconds() &- start) / 100_000
        return "\(tenths / 10).\(tenths % 10) ms"
    }

    /// A return code by its name, or in hex when it has none.
    static func name(_ rv: CK_RV) -> String {
        returnCodeName(rv).map { "\($0)" } ?? "0x\(String(rv, radix: 16))"
    }

    /// Hex digits, without "0x".
    static func hex(_ value: UInt) -> String { String(value, radix: 16) }
}
