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
        text.withUTF8Buffer { for byte in $0 { append(byte) } }
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
        var seconds = now.tv_sec
        var parts = tm()
        gmtime_r(&seconds, &parts)
        var stamp = [CChar](repeating: 0, count: 32)
        _ = strftime(&stamp, 32, "%Y-%m-%dT%H:%M:%S", &parts)
        let micros = UInt(now.tv_nsec / 1000)
        if json {
            append("{\"time\":\"")
        }
        stamp.withUnsafeBytes { raw in
            for byte in raw where byte != 0 { append(byte) }
        }
        append(UInt8(ascii: "."))
        var divisor: UInt = 100_000
        while divisor > 0 { append(UInt8(ascii: "0") + UInt8((micros / divisor) % 10)); divisor /= 10 }
        append(UInt8(ascii: "Z"))
        if json {
            append("\",\"pid\":"); appendDecimal(UInt(ForkDetection.pid))
            append(",\"tid\":"); appendDecimal(UInt(CPKCS11_gettid()))
        } else {
            append(" p11fork["); appendDecimal(UInt(ForkDetection.pid))
            append(UInt8(ascii: "/")); appendDecimal(UInt(CPKCS11_gettid())); append("] ")
        }
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
