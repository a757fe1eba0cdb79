import CPKCS11
import Glibc

/// Builds one trace line in a fixed buffer, as text or as one JSON object, and writes it with a
/// single write(2). Values are chosen by what they are: handles and flags by name, buffers by
/// length, PINs never, attribute values only when they cannot be secret (TraceAttributes).
struct TraceLine: ~Copyable {
    static let capacity = 4096
    private let buffer: UnsafeMutablePointer<UInt8>
    private var count = 0
    private var fields = 0
    /// Field values stop here so that the end of the line always fits.
    private var limit = capacity - 160
    private var truncated = false
    let json: Bool
    let full: Bool

    init(json: Bool) {
        buffer = .allocate(capacity: Self.capacity)
        self.json = json
        full = Trace.level >= .full
    }

    deinit { buffer.deallocate() }

    // MARK: raw appending

    mutating func append(_ byte: UInt8) {
        guard count < limit else { truncated = true; return }
        buffer[count] = byte
        count += 1
    }

    mutating func append(_ text: StaticString) {
        let length = text.utf8CodeUnitCount
        guard count + length <= limit else {
            text.withUTF8Buffer { for byte in $0 { append(byte) } }
            return
        }
        (buffer + count).update(from: text.utf8Start, count: length)
        count += length
    }

    /// `value` in decimal, zero-padded to `width` digits.
    mutating func appendPadded(_ value: Int, width: Int) {
        var divisor = 1
        for _ in 1..<width { divisor *= 10 }
        while divisor > 0 {
            append(UInt8(ascii: "0") + UInt8((value / divisor) % 10))
            divisor /= 10
        }
    }

    mutating func append(_ text: String) {
        var text = text
        text.withUTF8 { for byte in $0 { append(byte) } }
    }

    mutating func appendDecimal(_ value: UInt) {
        if value >= 10 { appendDecimal(value / 10) }
        append(UInt8(ascii: "0") + UInt8(value % 10))
    }

    mutating func appendSigned(_ value: Int) {
        if value < 0 { append(UInt8(ascii: "-")); appendDecimal(value.magnitude) } else { appendDecimal(UInt(value)) }
    }

    mutating func appendHex(_ value: UInt) {
        append("0x")
        var started = false
        for shift in stride(from: 60, through: 0, by: -4) {
            let nibble = UInt8((value >> UInt(shift)) & 0xF)
            if nibble != 0 || started || shift == 0 {
                started = true
                append(nibble < 10 ? UInt8(ascii: "0") + nibble : UInt8(ascii: "a") + nibble - 10)
            }
        }
    }

    mutating func appendHexBytes(_ bytes: UnsafeRawBufferPointer, limit: Int = 64) {
        let digits: StaticString = "0123456789abcdef"
        for byte in bytes.prefix(limit) {
            append(digits.utf8Start[Int(byte >> 4)])
            append(digits.utf8Start[Int(byte & 0xF)])
        }
        if bytes.count > limit { append("…") }
    }

    /// A string value: quoted and escaped in JSON, quoted with escapes in text.
    mutating func appendQuoted(_ bytes: UnsafeRawBufferPointer) {
        append(UInt8(ascii: "\""))
        for byte in bytes.prefix(256) {
            switch byte {
            case UInt8(ascii: "\""), UInt8(ascii: "\\"):
                append(UInt8(ascii: "\\")); append(byte)
            case 0x20..<0x7F:
                append(byte)
            default:
                append(json ? "\\u00" : "\\x")
                let digits: StaticString = "0123456789abcdef"
                append(digits.utf8Start[Int(byte >> 4)])
                append(digits.utf8Start[Int(byte & 0xF)])
            }
        }
        append(UInt8(ascii: "\""))
    }

    mutating func appendQuoted(_ text: String) {
        var text = text
        text.withUTF8 { appendQuoted(UnsafeRawBufferPointer($0)) }
    }

    /// Starts a field: `, key=` in text, `,"key":` in JSON.
    mutating func key(_ name: StaticString) {
        if fields > 0 { append(json ? "," : ", ") }
        fields += 1
        if json { append(UInt8(ascii: "\"")); append(name); append("\":") } else { append(name); append(UInt8(ascii: "=")) }
    }

    /// A symbolic value (a name or a hex number): quoted in JSON only.
    mutating func symbol(_ body: (inout TraceLine) -> Void) {
        if json { append(UInt8(ascii: "\"")) }
        body(&self)
        if json { append(UInt8(ascii: "\"")) }
    }

    mutating func name(_ known: StaticString?, orHex value: UInt) {
        symbol { line in
            if let known { line.append(known) } else { line.appendHex(value) }
        }
    }

    // MARK: line structure

    /// `time pid tid` part shared by calls and events.
    mutating func header() {
        let now = Clock.wallClock()
        if json {
            append("{\"time\":\"")
        }
        let (year, month, day, secondOfDay) = Self.civil(Int(now.tv_sec))
        appendPadded(year, width: 4); append(UInt8(ascii: "-"))
        appendPadded(month, width: 2); append(UInt8(ascii: "-"))
        appendPadded(day, width: 2); append(UInt8(ascii: "T"))
        appendPadded(secondOfDay / 3600, width: 2); append(UInt8(ascii: ":"))
        appendPadded(secondOfDay / 60 % 60, width: 2); append(UInt8(ascii: ":"))
        appendPadded(secondOfDay % 60, width: 2); append(UInt8(ascii: "."))
        appendPadded(Int(now.tv_nsec / 1000), width: 6)
        append(UInt8(ascii: "Z"))
        if json {
            append("\",\"pid\":"); appendDecimal(UInt(ForkDetection.pid))
            append(",\"tid\":"); appendDecimal(UInt(CPKCS11_gettid()))
        } else {
            append(" p11fork["); appendDecimal(UInt(ForkDetection.pid))
            append(UInt8(ascii: "/")); appendDecimal(UInt(CPKCS11_gettid())); append("] ")
        }
    }

    /// UTC date and second of the day for epoch seconds (the days-to-civil-date algorithm
    /// published by H. Hinnant); strftime cost a thousand instructions a line.
    static func civil(_ seconds: Int) -> (year: Int, month: Int, day: Int, secondOfDay: Int) {
        let days = seconds >= 0 ? seconds / 86_400 : (seconds - 86_399) / 86_400
        let secondOfDay = seconds - days * 86_400
        let shifted = days + 719_468
        let era = (shifted >= 0 ? shifted : shifted - 146_096) / 146_097
        let dayOfEra = shifted - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let monthIndex = (5 * dayOfYear + 2) / 153
        let day = dayOfYear - (153 * monthIndex + 2) / 5 + 1
        let month = monthIndex < 10 ? monthIndex + 3 : monthIndex - 9
        return (yearOfEra + era * 400 + (month <= 2 ? 1 : 0), month, day, secondOfDay)
    }

    mutating func beginCall(_ function: Function) {
        if json {
            append(",\"call\":\""); append(function.name); append("\",\"args\":{")
        } else {
            append(function.name); append(UInt8(ascii: "("))
        }
    }

    /// From here on the line's end is written, in the room kept for it.
    private mutating func closing() {
        limit = Self.capacity - 2
        if truncated { append("…") }
    }

    mutating func endCall(_ rv: CK_RV, nanoseconds: UInt64) {
        closing()
        let name = returnCodeName(rv)
        let tenths = (nanoseconds + 50) / 100
        if json {
            append("},\"rv\":")
            self.name(name, orHex: rv)
            append(",\"us\":"); appendDecimal(UInt(tenths / 10)); append(UInt8(ascii: "."))
            appendDecimal(UInt(tenths % 10)); append("}\n")
        } else {
            append(") = ")
            if let name { append(name) } else { appendHex(rv) }
            append(UInt8(ascii: " ")); appendDecimal(UInt(tenths / 10)); append(UInt8(ascii: "."))
            appendDecimal(UInt(tenths % 10)); append("us\n")
        }
    }

    mutating func eventBody(kind: String, message: String) {
        limit = Self.capacity - 8
        if json {
            append(",\"event\":\""); append(kind); append("\",\"message\":"); appendQuoted(message); append("}\n")
        } else {
            append(kind); append(": "); append(message); append(UInt8(ascii: "\n"))
        }
    }

    /// Ends the line (always with a newline, even when cut short) and writes it.
    mutating func write(to fd: Int32) {
        if count == 0 || buffer[count - 1] != UInt8(ascii: "\n") {
            buffer[count] = UInt8(ascii: "\n")
            count += 1
        }
        Trace.write(fd, buffer, count)
    }

    /// The text of the line so far (tests).
    var text: String {
        String(decoding: UnsafeBufferPointer(start: buffer, count: count), as: UTF8.self)
    }
}
