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
    // `count` never passes `capacity`, so the primitives add without overflow checks.

    mutating func append(_ byte: UInt8) {
        guard count < limit else { truncated = true; return }
        buffer[count] = byte
        count &+= 1
    }

    /// Two bytes with one bounds check (separators, "0x"): cheaper than a short StaticString.
    @inline(__always)
    mutating func append(_ first: UInt8, _ second: UInt8) {
        guard count &+ 2 <= limit else { truncated = true; return }
        buffer[count] = first
        buffer[count &+ 1] = second
        count &+= 2
    }

    /// Inlined: at a call site with a literal, the copy becomes a few moves of known length
    /// (out of line, a literal cost about 45 instructions with its memmove).
    @inline(__always)
    mutating func append(_ text: StaticString) {
        let length = text.utf8CodeUnitCount
        guard count &+ length <= limit else { return appendCut(text) }
        Self.copy(text.utf8Start, to: buffer + count, length)
        count &+= length
    }

    /// A name of up to 32 bytes (most of them: functions, return codes, flags) without a call to
    /// memmove: two overlapping loads and stores of a width that covers it.
    @inline(__always)
    private static func copy(_ from: UnsafePointer<UInt8>, to: UnsafeMutablePointer<UInt8>, _ length: Int) {
        let source = UnsafeRawPointer(from)
        let target = UnsafeMutableRawPointer(to)
        switch length {
        case 16...32:
            let head = source.loadUnaligned(as: SIMD16<UInt8>.self)
            let tail = source.loadUnaligned(fromByteOffset: length - 16, as: SIMD16<UInt8>.self)
            target.storeBytes(of: head, as: SIMD16<UInt8>.self)
            target.storeBytes(of: tail, toByteOffset: length - 16, as: SIMD16<UInt8>.self)
        case 8..<16:
            let head = source.loadUnaligned(as: UInt64.self)
            let tail = source.loadUnaligned(fromByteOffset: length - 8, as: UInt64.self)
            target.storeBytes(of: head, as: UInt64.self)
            target.storeBytes(of: tail, toByteOffset: length - 8, as: UInt64.self)
        case 4..<8:
            let head = source.loadUnaligned(as: UInt32.self)
            let tail = source.loadUnaligned(fromByteOffset: length - 4, as: UInt32.self)
            target.storeBytes(of: head, as: UInt32.self)
            target.storeBytes(of: tail, toByteOffset: length - 4, as: UInt32.self)
        case 0..<4:
            for i in 0..<length { to[i] = from[i] }
        default:
            to.update(from: from, count: length)
        }
    }

    /// What fits of a literal that does not.
    @inline(never)
    private mutating func appendCut(_ text: StaticString) {
        text.withUTF8Buffer { for byte in $0 { append(byte) } }
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
        if value < 100 { return appendSmallDecimal(value) }
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

    /// 0...99: one or two digits with one bounds check (durations, counts, lengths).
    @inline(__always)
    private mutating func appendSmallDecimal(_ value: UInt) {
        guard count + (value < 10 ? 1 : 2) <= limit else { truncated = true; return }
        if value < 10 {
            buffer[count] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: value)
            count += 1
        } else {
            let pair = Self.digitPairs.utf8Start + 2 * Int(value)
            buffer[count] = pair[0]
            buffer[count + 1] = pair[1]
            count += 2
        }
    }

    mutating func appendSigned(_ value: Int) {
        if value < 0 { append(UInt8(ascii: "-")); appendDecimal(value.magnitude) } else { appendDecimal(UInt(value)) }
    }

    /// `0x` and the digits, with one bounds check for all. Up to 32 bits (handles, slot IDs, most
    /// flags and codes), the eight digits are made at once in one word: each nibble spread to a
    /// byte, then turned into its ASCII digit without a branch; the word is stored whole (the
    /// bytes past the number are written over by what follows, or left past the line's end).
    mutating func appendHex(_ value: UInt) {
        let digits = value == 0 ? 1 : (UInt.bitWidth - value.leadingZeroBitCount + 3) / 4
        if value >> 32 == 0, count + 10 <= limit {
            var spread = UInt64(value)
            spread = (spread & 0xFFFF_0000) << 16 | (spread & 0xFFFF)
            spread = (spread & 0x0000_FF00_0000_FF00) << 8 | (spread & 0x0000_00FF_0000_00FF)
            spread = (spread & 0x00F0_00F0_00F0_00F0) << 4 | (spread & 0x000F_000F_000F_000F)
            // Byte i holds nibble i; 0x27 more for 10...15 takes '0' + n to 'a' + n - 10.
            let letters = ((spread &+ 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101
            let text = spread &+ 0x3030_3030_3030_3030 &+ letters &* 0x27
            buffer[count] = UInt8(ascii: "0")
            buffer[count + 1] = UInt8(ascii: "x")
            // Most significant digit first in memory, the leading zeros shifted out.
            let word = text.byteSwapped >> UInt64(8 * (8 - digits))
            UnsafeMutableRawPointer(buffer + count + 2).storeBytes(of: word.littleEndian, as: UInt64.self)
            count += 2 + digits
            return
        }
        guard count + 2 + digits <= limit else { return appendHexCut(value) }
        buffer[count] = UInt8(ascii: "0")
        buffer[count + 1] = UInt8(ascii: "x")
        let table = Self.hexDigits.utf8Start
        var rest = value
        var at = count + 2 + digits
        repeat {
            at -= 1
            buffer[at] = table[Int(rest & 0xF)]
            rest >>= 4
        } while rest != 0
        count += 2 + digits
    }

    private static let hexDigits: StaticString = "0123456789abcdef"

    /// What fits of a hex number that does not, digit by digit from the first.
    @inline(never)
    private mutating func appendHexCut(_ value: UInt) {
        append(UInt8(ascii: "0"), UInt8(ascii: "x"))
        var shift = value == 0 ? 0 : (UInt.bitWidth - 1 - value.leadingZeroBitCount) & ~3
        while shift >= 0 {
            append(Self.hexDigits.utf8Start[Int((value >> UInt(shift)) & 0xF)])
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

    /// Starts a field: `, key=` in text, `,"key":` in JSON. Inlined, so that the name is a literal
    /// where it is copied.
    @inline(__always)
    mutating func key(_ name: StaticString) {
        if fields > 0 { if json { append(UInt8(ascii: ",")) } else { append(UInt8(ascii: ","), UInt8(ascii: " ")) } }
        fields &+= 1
        if json { append(UInt8(ascii: "\"")); append(name); append("\":") } else { append(name); append(UInt8(ascii: "=")) }
    }

    /// A symbolic value (a name or a hex number): quoted in JSON only.
    @inline(__always)
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

    /// `time pid tid` part shared by calls and events. A thread's own line buffer keeps, after
    /// the line, the header of its last line: while the second, the pid and the format stay the
    /// same (most lines of a busy thread), it is copied whole and only its microseconds are
    /// written anew.
    mutating func header() {
        let now = Clock.wallClock()
        let second = Int(now.tv_sec)
        let pid = Int(ForkDetection.pid)
        let cache = borrowed ? UnsafeMutableRawPointer(buffer + Self.capacity) : nil
        if let cache, cache.load(as: Int.self) == second, cache.load(fromByteOffset: 8, as: Int.self) == pid,
           cache.load(fromByteOffset: 16, as: Int.self) == (json ? 1 : 0) {
            let length = cache.load(fromByteOffset: 24, as: Int.self)
            guard count + length <= limit else { truncated = true; return }
            let start = count
            (buffer + count).update(from: (cache + HeaderCache.text).assumingMemoryBound(to: UInt8.self), count: length)
            count = start + cache.load(fromByteOffset: 32, as: Int.self)
            appendMicroseconds(now)
            count = start + length
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
        let microseconds = count - start
        appendMicroseconds(now)
        append(UInt8(ascii: "Z"))
        let tid = UInt(CPKCS11_cached_tid(pid))
        if json {
            append("\",\"pid\":"); appendDecimal(UInt(pid))
            append(",\"tid\":"); appendDecimal(tid)
        } else {
            append(" p11fork["); appendDecimal(UInt(pid))
            append(UInt8(ascii: "/")); appendDecimal(tid); append("] ")
        }
        let length = count - start
        guard let cache, !truncated, length <= HeaderCache.room else { return }
        (cache + HeaderCache.text).copyMemory(from: buffer + start, byteCount: length)
        cache.storeBytes(of: second, as: Int.self)
        cache.storeBytes(of: pid, toByteOffset: 8, as: Int.self)
        cache.storeBytes(of: json ? 1 : 0, toByteOffset: 16, as: Int.self)
        cache.storeBytes(of: length, toByteOffset: 24, as: Int.self)
        cache.storeBytes(of: microseconds, toByteOffset: 32, as: Int.self)
    }

    /// Where the header cache keeps its parts, after the line (CPKCS11_trace_buffer_take gives
    /// `capacity + HeaderCache.size` bytes): second, pid, format, the header's length, where its
    /// microseconds are, then the header itself.
    enum HeaderCache {
        static let text = 40
        static let room = 208
        static let size = text + room
    }

    /// Six digits, with one bounds check and the pairs split without a modulo each.
    @inline(__always)
    private mutating func appendMicroseconds(_ now: timespec) {
        guard count + 6 <= limit else { truncated = true; return }
        // 0...999_999 whatever the clock says, so that no step below can overflow or index out.
        let micro = Int(truncatingIfNeeded: UInt(truncatingIfNeeded: now.tv_nsec) / 1000 % 1_000_000)
        let high = micro / 10_000
        let rest = micro &- high &* 10_000
        let middle = rest / 100
        let low = rest &- middle &* 100
        let pairs = Self.digitPairs.utf8Start
        let at = buffer + count
        at[0] = pairs[2 &* high]; at[1] = pairs[2 &* high &+ 1]
        at[2] = pairs[2 &* middle]; at[3] = pairs[2 &* middle &+ 1]
        at[4] = pairs[2 &* low]; at[5] = pairs[2 &* low &+ 1]
        count &+= 6
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
            append(",\"us\":"); appendTenths(tenths); append("}\n")
        } else {
            append(UInt8(ascii: ")"), UInt8(ascii: " ")); append(UInt8(ascii: "="), UInt8(ascii: " "))
            if let name { append(name) } else { appendHex(rv) }
            append(UInt8(ascii: " ")); appendTenths(tenths); append("us\n")
        }
    }

    /// A duration in tenths of a microsecond as `12.3`.
    @inline(__always)
    private mutating func appendTenths(_ tenths: UInt64) {
        appendDecimal(UInt(tenths / 10))
        let digit = UInt8(truncatingIfNeeded: tenths % 10)
        append(UInt8(ascii: "."), UInt8(ascii: "0") &+ digit)
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
