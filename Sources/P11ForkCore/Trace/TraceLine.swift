import CPKCS11
import Glibc
import Synchronization

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

    /// Whether `buffer` is this thread's own line buffer (no allocation) or a heap one (a line
    /// built while another is: never on the call path, but allowed).
    private let borrowed: Bool

    init(json: Bool) {
        if let own = CPKCS11_trace_buffer_take() {
            buffer = own.assumingMemoryBound(to: UInt8.self)
            borrowed = true
        } else {
            buffer = .allocate(capacity: Self.capacity)
            borrowed = false
        }
        self.json = json
        full = Trace.level >= .full
    }

    deinit {
        if borrowed { CPKCS11_trace_buffer_give_back() } else { buffer.deallocate() }
    }

    // MARK: raw appending

    mutating func append(_ byte: UInt8) {
        guard count < limit else { truncated = true; return }
        buffer[count] = byte
        count += 1
    }

    /// Two bytes with one bounds check (separators, "0x"): cheaper than a short StaticString.
    @inline(__always)
    mutating func append(_ first: UInt8, _ second: UInt8) {
        guard count + 2 <= limit else { truncated = true; return }
        buffer[count] = first
        buffer[count + 1] = second
        count += 2
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

    private static let digitPairs: StaticString =
        "00010203040506070809101112131415161718192021222324252627282930313233343536373839404142434445464748495051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899"

    /// `value` (0...99) as two digits.
    @inline(__always)
    mutating func appendTwoDigits(_ value: Int) {
        guard count + 2 <= limit else { truncated = true; return }
        let pair = Self.digitPairs.utf8Start + 2 * (value % 100)
        buffer[count] = pair[0]
        buffer[count + 1] = pair[1]
        count += 2
    }

    /// `value` in decimal, zero-padded to `width` digits (an even width up to 8).
    mutating func appendPadded(_ value: Int, width: Int) {
        var divisor = 1
        for _ in 0..<(width / 2 - 1) { divisor *= 100 }
        while divisor > 0 {
            appendTwoDigits(value / divisor % 100)
            divisor /= 100
        }
    }

    /// A Swift string (event messages); literals go to the StaticString overload.
    mutating func appendString(_ text: String) {
        var text = text
        text.withUTF8 { for byte in $0 { append(byte) } }
    }

    mutating func appendDecimal(_ value: UInt) {
        var digits = 1
        var rest = value
        while rest >= 10 { rest /= 10; digits += 1 }
        guard count + digits <= limit else { truncated = true; return }
        var value = value
        var at = count + digits
        repeat {
            at -= 1
            buffer[at] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: value % 10)
            value /= 10
        } while value > 0
        count += digits
    }

    mutating func appendSigned(_ value: Int) {
        if value < 0 { append(UInt8(ascii: "-")); appendDecimal(value.magnitude) } else { appendDecimal(UInt(value)) }
    }

    mutating func appendHex(_ value: UInt) {
        append(UInt8(ascii: "0"), UInt8(ascii: "x"))
        let digits: StaticString = "0123456789abcdef"
        var shift = value == 0 ? 0 : (UInt.bitWidth - 1 - value.leadingZeroBitCount) & ~3
        while shift >= 0 {
            append(digits.utf8Start[Int((value >> UInt(shift)) & 0xF)])
            shift -= 4
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
        if fields > 0 { if json { append(UInt8(ascii: ",")) } else { append(UInt8(ascii: ","), UInt8(ascii: " ")) } }
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
    /// `time pid tid` part shared by calls and events. A thread's own line buffer keeps, after
    /// the line, what the header of its last line was made of: the part up to the second and the
    /// part after the microseconds are copied from there while the second, the pid and the
    /// format stay the same (most lines of a busy thread).
    mutating func header() {
        let now = Clock.wallClock()
        let second = Int(now.tv_sec)
        let pid = Int(ForkDetection.pid)
        let cache = borrowed ? UnsafeMutableRawPointer(buffer + Self.capacity) : nil
        if let cache, cache.load(as: Int.self) == second, cache.load(fromByteOffset: 8, as: Int.self) == pid,
           cache.load(fromByteOffset: 16, as: Int.self) == (json ? 1 : 0) {
            copyCached(cache + HeaderCache.first, length: cache.load(fromByteOffset: 24, as: Int.self))
            appendMicroseconds(now)
            copyCached(cache + HeaderCache.second, length: cache.load(fromByteOffset: 32, as: Int.self))
            return
        }
        let start = count
        if json { append("{\"time\":\"") }
        let date = Self.date(second)
        appendTwoDigits(date.year / 100); appendTwoDigits(date.year); append(UInt8(ascii: "-"))
        appendTwoDigits(date.month); append(UInt8(ascii: "-"))
        appendTwoDigits(date.day); append(UInt8(ascii: "T"))
        appendTwoDigits(date.secondOfDay / 3600); append(UInt8(ascii: ":"))
        appendTwoDigits(date.secondOfDay / 60 % 60); append(UInt8(ascii: ":"))
        appendTwoDigits(date.secondOfDay % 60); append(UInt8(ascii: "."))
        let firstLength = count - start
        appendMicroseconds(now)
        let secondStart = count
        append(UInt8(ascii: "Z"))
        let tid = UInt(CPKCS11_cached_tid(pid))
        if json {
            append("\",\"pid\":"); appendDecimal(UInt(pid))
            append(",\"tid\":"); appendDecimal(tid)
        } else {
            append(" p11fork["); appendDecimal(UInt(pid))
            append(UInt8(ascii: "/")); appendDecimal(tid); append("] ")
        }
        let secondLength = count - secondStart
        guard let cache, !truncated, firstLength <= HeaderCache.room, secondLength <= HeaderCache.room else { return }
        (cache + HeaderCache.first).copyMemory(from: buffer + start, byteCount: firstLength)
        (cache + HeaderCache.second).copyMemory(from: buffer + secondStart, byteCount: secondLength)
        cache.storeBytes(of: firstLength, toByteOffset: 24, as: Int.self)
        cache.storeBytes(of: secondLength, toByteOffset: 32, as: Int.self)
        cache.storeBytes(of: second, as: Int.self)
        cache.storeBytes(of: pid, toByteOffset: 8, as: Int.self)
        cache.storeBytes(of: json ? 1 : 0, toByteOffset: 16, as: Int.self)
    }

    /// Where the header cache keeps its parts, after the line (CPKCS11_trace_buffer_take gives
    /// `capacity + HeaderCache.size` bytes): second, pid, format, the two lengths, the two parts.
    enum HeaderCache {
        static let first = 40
        static let room = 104
        static let second = first + room
        static let size = second + room
    }

    private mutating func copyCached(_ from: UnsafeMutableRawPointer, length: Int) {
        guard count + length <= limit else { truncated = true; return }
        (buffer + count).update(from: from.assumingMemoryBound(to: UInt8.self), count: length)
        count += length
    }

    /// Six digits, with one bounds check and the pairs split without a modulo each.
    private mutating func appendMicroseconds(_ now: timespec) {
        guard count + 6 <= limit else { truncated = true; return }
        let micro = Int(truncatingIfNeeded: now.tv_nsec) / 1000
        let high = micro / 10_000
        let rest = micro - high * 10_000
        let middle = rest / 100
        let low = rest - middle * 100
        let pairs = Self.digitPairs.utf8Start
        for (offset, pair) in [high, middle, low].enumerated() {
            buffer[count + 2 * offset] = pairs[2 * pair]
            buffer[count + 2 * offset + 1] = pairs[2 * pair + 1]
        }
        count += 6
    }

    /// UTC date and second of the day for epoch seconds (the days-to-civil-date algorithm
    /// published by H. Hinnant); strftime cost a thousand instructions a line.
    /// The civil date of the last day asked for, packed in one word (day number << 24 | year
    /// << 9 | month << 5 | day), so that threads share it without a lock: one division a line.
    static let lastDay = Atomic<Int>(-1)

    static func date(_ seconds: Int) -> (year: Int, month: Int, day: Int, secondOfDay: Int) {
        let days = seconds >= 0 ? seconds / 86_400 : (seconds - 86_399) / 86_400
        let secondOfDay = seconds - days * 86_400
        let cached = lastDay.load(ordering: .relaxed)
        if cached >= 0, cached >> 24 == days {
            return ((cached >> 9) & 0x7FFF, (cached >> 5) & 0xF, cached & 0x1F, secondOfDay)
        }
        let civil = civil(seconds)
        if days >= 0 && civil.year >= 0 && civil.year < 10_000 {
            lastDay.store(days << 24 | civil.year << 9 | civil.month << 5 | civil.day, ordering: .relaxed)
        }
        return civil
    }

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
            append(UInt8(ascii: ")"), UInt8(ascii: " ")); append(UInt8(ascii: "="), UInt8(ascii: " "))
            if let name { append(name) } else { appendHex(rv) }
            append(UInt8(ascii: " ")); appendDecimal(UInt(tenths / 10)); append(UInt8(ascii: "."))
            appendDecimal(UInt(tenths % 10)); append(UInt8(ascii: "u"), UInt8(ascii: "s")); append(UInt8(ascii: "\n"))
        }
    }

    mutating func eventBody(kind: String, message: String, fields: EventFields? = nil) {
        limit = Self.capacity - 8
        if json {
            append(",\"event\":\"" as StaticString); appendString(kind); append("\",\"message\":" as StaticString); appendQuoted(message)
            if let fields { appendString(fields.json) }
            append("}\n" as StaticString)
        } else {
            appendString(kind); append(": " as StaticString); appendString(message); append(UInt8(ascii: "\n"))
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
