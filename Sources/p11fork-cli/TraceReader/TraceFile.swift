import Foundation
import Vocabulary

/// One line of a p11fork trace: a call (function, arguments, return code, duration) or an event
/// (a level and a message: fork detection, recovery steps, p11fork's own errors).
public struct TraceRecord {
    /// A call's arguments as written: text, or where the JSON object is in the file (rendered
    /// only when shown: a summary of millions of lines never needs them).
    public enum Arguments {
        case text(String)
        case json(Range<Int>)
    }

    public enum Kind {
        case call(function: String, arguments: Arguments, rv: String, microseconds: Double?)
        case event(level: String, message: String)
    }

    /// What a JSON line says an event is, in the shared vocabulary (include/p11fork.h,
    /// P11FORK_TRACE_FORMAT): read from these fields, never from the message's wording. Text
    /// lines have none; a value this reader does not know is left out.
    public struct EventFields {
        public var kind: TraceEventKind?
        public var parent: Int?
        public var generation: Int?
        public var step: RecoveryStep?
        public var strategy: StrategyName?
        public var milliseconds: Double?
        public var outcome: StepOutcome?
    }

    let line: Int
    let time: String
    public let pid: Int
    let tid: Int?
    public let kind: Kind
    public let fields: EventFields?
    /// The fork-detected event's fields, or from a text line "fork detected: this is a child of
    /// pid N (fork generation G)".
    let parentPID: Int?
    let forkGeneration: Int?

    init(line: Int, time: String, pid: Int, tid: Int?, kind: Kind, fields: EventFields? = nil) {
        self.line = line
        self.time = time
        self.pid = pid
        self.tid = tid
        self.kind = kind
        self.fields = fields
        if let fields, fields.kind == .forkDetected {
            parentPID = fields.parent
            forkGeneration = fields.generation
        } else if fields?.kind == nil, case .event(_, let message) = kind, message.hasPrefix("fork detected") {
            parentPID = message.firstMatch(of: /child of pid (\d+)/).flatMap { Int($0.output.1) }
            forkGeneration = message.firstMatch(of: /fork generation (\d+)/).flatMap { Int($0.output.1) }
        } else {
            parentPID = nil
            forkGeneration = nil
        }
    }

    var isError: Bool {
        switch kind {
        case .call(_, _, let rv, _): return rv != "CKR_OK"
        case .event(let level, _): return level == "error"
        }
    }
}

/// A trace file read line by line: JSON lines (P11FORK_TRACE_FORMAT=json) and, as well, text
/// lines; anything else is counted as malformed and skipped.
public struct TraceFile {
    let bytes: [UInt8]
    public let records: [TraceRecord]
    public let malformedLines: [Int]

    public init(text: String) { self.init(bytes: Array(text.utf8)) }

    public init(bytes: [UInt8]) {
        self.bytes = bytes
        var records: [TraceRecord] = []
        var malformed: [Int] = []
        bytes.withUnsafeBufferPointer { buffer in
            var start = 0
            var number = 0
            while start < buffer.count {
                var end = start
                while end < buffer.count && buffer[end] != 0x0A { end += 1 }
                number += 1
                var first = start
                while first < end && (buffer[first] == 0x20 || buffer[first] == 0x09 || buffer[first] == 0x0D) { first += 1 }
                if first < end {
                    let record = buffer[first] == UInt8(ascii: "{")
                        ? Self.parseJSON(buffer, first..<end, line: number)
                        : Self.parseText(String(decoding: buffer[first..<end], as: UTF8.self), line: number)
                    if let record { records.append(record) } else { malformed.append(number) }
                }
                start = end + 1
            }
        }
        self.records = records
        malformedLines = malformed
    }

    /// A call's arguments in short form: `session=0x5e000001, data=32, signature={len.in=1024, len.out=256}`.
    func render(_ arguments: TraceRecord.Arguments) -> String {
        switch arguments {
        case .text(let text): return text
        case .json(let range):
            return bytes.withUnsafeBufferPointer { buffer in
                var scanner = JSONScanner(buffer: buffer, index: range.lowerBound, end: range.upperBound)
                return (try? scanner.value().compact(top: true)) ?? "…"
            }
        }
    }

    // MARK: JSON lines

    /// `{"time":…,"pid":…,"tid":…,"call":…,"args":{…},"rv":…,"us":…}` or `{…,"event":…,"message":…}`.
    static func parseJSON(_ buffer: UnsafeBufferPointer<UInt8>, _ range: Range<Int>, line: Int) -> TraceRecord? {
        var scanner = JSONScanner(buffer: buffer, index: range.lowerBound, end: range.upperBound)
        var time: String?, pid: Int?, tid: Int?, call: String?, rv: String?, us: Double?, event: String?, message: String?
        var arguments: Range<Int>?
        var fields = TraceRecord.EventFields()
        var hasFields = false
        do {
            try scanner.expect(UInt8(ascii: "{"))
            if !scanner.skip(UInt8(ascii: "}")) {
                repeat {
                    let key = try scanner.string()
                    try scanner.expect(UInt8(ascii: ":"))
                    switch key {
                    case "time": time = try scanner.string()
                    case "pid": pid = Int(try scanner.numberText())
                    case "tid": tid = Int(try scanner.numberText())
                    case "call": call = try scanner.string()
                    case "rv": rv = try scanner.scalarText()
                    case "us": us = Double(try scanner.numberText())
                    case "event": event = try scanner.string()
                    case "message": message = try scanner.string()
                    case "kind": fields.kind = TraceEventKind(rawValue: try scanner.string()); hasFields = true
                    case "parent": fields.parent = Int(try scanner.numberText())
                    case "generation": fields.generation = Int(try scanner.numberText())
                    case "step": fields.step = RecoveryStep(rawValue: try scanner.string())
                    case "strategy": fields.strategy = StrategyName(rawValue: try scanner.string())
                    case "ms": fields.milliseconds = Double(try scanner.numberText())
                    case "outcome": fields.outcome = StepOutcome(rawValue: try scanner.string())
                    case "args":
                        scanner.skipSpace()
                        let start = scanner.index
                        try scanner.skipValue()
                        arguments = start..<scanner.index
                    default: try scanner.skipValue()
                    }
                } while scanner.skip(UInt8(ascii: ","))
                try scanner.expect(UInt8(ascii: "}"))
            }
            scanner.skipSpace()
            guard scanner.index == scanner.end else { return nil }
        } catch {
            return nil
        }
        guard let time, let pid else { return nil }
        if let call, let rv {
            return TraceRecord(line: line, time: time, pid: pid, tid: tid,
                               kind: .call(function: call, arguments: arguments.map { .json($0) } ?? .text(""), rv: rv, microseconds: us))
        }
        if let event, let message {
            return TraceRecord(line: line, time: time, pid: pid, tid: tid, kind: .event(level: event, message: message),
                               fields: hasFields ? fields : nil)
        }
        return nil
    }

    // MARK: text lines

    /// `2026-…Z p11fork[pid/tid] C_Sign(args) = CKR_OK 733.0us` or `… p11fork[pid/tid] fork: message`.
    static func parseText(_ text: String, line: Int) -> TraceRecord? {
        guard let header = text.firstMatch(of: #/^(\S+) p11fork\[(\d+)/(\d+)\] /#), let pid = Int(header.output.2) else { return nil }
        let time = String(header.output.1)
        let tid = Int(header.output.3)
        let body = text[header.range.upperBound...]
        if let event = body.firstMatch(of: /^(error|fork|calls|full): (.*)$/) {
            return TraceRecord(line: line, time: time, pid: pid, tid: tid,
                               kind: .event(level: String(event.output.1), message: String(event.output.2)))
        }
        guard let call = body.firstMatch(of: /^(C_\w+)\((.*)\) = (\S+) ([0-9.]+)us$/) else { return nil }
        return TraceRecord(line: line, time: time, pid: pid, tid: tid,
                           kind: .call(function: String(call.output.1), arguments: .text(String(call.output.2)),
                                       rv: String(call.output.3), microseconds: Double(call.output.4)))
    }
}

/// A JSON value that keeps the order of an object's keys (a call's arguments read best in the
/// order p11fork wrote them), with numbers kept as written.
enum JSONValue {
    case object([(key: String, value: JSONValue)])
    case array([JSONValue])
    case string(String)
    case number(String)
    case bool(Bool)
    case null

    /// The short form shown in a trace listing: `session=0x5e000001, data=32, signature={len.in=1024, len.out=256}`.
    func compact(top: Bool = false) -> String {
        switch self {
        case .object(let fields):
            let inner = fields.map { "\($0.key)=\($0.value.compact())" }.joined(separator: ", ")
            return top ? inner : "{\(inner)}"
        case .array(let values): return "[" + values.map { $0.compact() }.joined(separator: ", ") + "]"
        case .string(let text): return text.contains(where: { $0 == " " || $0 == "," }) ? "\"\(text)\"" : text
        case .number(let text): return text
        case .bool(let value): return value ? "true" : "false"
        case .null: return "NULL"
        }
    }
}

/// Reads JSON from bytes in place: values, or only their extent (`skipValue`).
struct JSONScanner {
    struct Malformed: Error {}

    let buffer: UnsafeBufferPointer<UInt8>
    var index: Int
    let end: Int

    mutating func skipSpace() {
        while index < end, buffer[index] == 0x20 || buffer[index] == 0x09 || buffer[index] == 0x0A || buffer[index] == 0x0D { index += 1 }
    }

    /// Consumes `byte` (after white space) if it is next.
    mutating func skip(_ byte: UInt8) -> Bool {
        skipSpace()
        guard index < end, buffer[index] == byte else { return false }
        index += 1
        return true
    }

    mutating func expect(_ byte: UInt8) throws {
        guard skip(byte) else { throw Malformed() }
    }

    mutating func string() throws -> String {
        try expect(UInt8(ascii: "\""))
        let start = index
        // Most strings have no escape: taken as they are.
        while index < end, buffer[index] != UInt8(ascii: "\""), buffer[index] != UInt8(ascii: "\\") {
            guard buffer[index] >= 0x20 else { throw Malformed() }
            index += 1
        }
        guard index < end else { throw Malformed() }
        if buffer[index] == UInt8(ascii: "\"") {
            index += 1
            return String(decoding: UnsafeBufferPointer(rebasing: buffer[start..<index - 1]), as: UTF8.self)
        }
        var out = Array(buffer[start..<index])
        while index < end {
            let byte = buffer[index]
            index += 1
            if byte == UInt8(ascii: "\"") { return String(decoding: out, as: UTF8.self) }
            guard byte >= 0x20 else { throw Malformed() }
            guard byte == UInt8(ascii: "\\") else { out.append(byte); continue }
            guard index < end else { throw Malformed() }
            let escaped = buffer[index]
            index += 1
            switch escaped {
            case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(escaped)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "u"):
                guard index + 4 <= end,
                      let code = UInt32(String(decoding: UnsafeBufferPointer(rebasing: buffer[index..<index + 4]), as: UTF8.self), radix: 16)
                else { throw Malformed() }
                index += 4
                // Lone surrogates (never written by p11fork) become U+FFFD.
                out.append(contentsOf: Array(String(Unicode.Scalar(code).map(Character.init) ?? "\u{FFFD}").utf8))
            default: throw Malformed()
            }
        }
        throw Malformed()
    }

    mutating func numberText() throws -> String {
        skipSpace()
        let start = index
        while index < end {
            let byte = buffer[index]
            guard (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")) || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "+")
                    || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "e") || byte == UInt8(ascii: "E") else { break }
            index += 1
        }
        guard index > start else { throw Malformed() }
        return String(decoding: UnsafeBufferPointer(rebasing: buffer[start..<index]), as: UTF8.self)
    }

    /// A string or a number, as text.
    mutating func scalarText() throws -> String {
        skipSpace()
        guard index < end else { throw Malformed() }
        return buffer[index] == UInt8(ascii: "\"") ? try string() : try numberText()
    }

    mutating func literal(_ word: StaticString) throws {
        skipSpace()
        let count = word.utf8CodeUnitCount
        guard index + count <= end else { throw Malformed() }
        for offset in 0..<count where buffer[index + offset] != word.utf8Start[offset] { throw Malformed() }
        index += count
    }

    mutating func skipValue() throws {
        _ = try value(keep: false, depth: 0)
    }

    mutating func value() throws -> JSONValue {
        try value(keep: true, depth: 0)
    }

    /// How deep arrays and objects may nest: p11fork writes four levels at most (a template in a
    /// mechanism parameter); a file someone else wrote could nest until the stack ends.
    static let maximumDepth = 32

    /// One value; with `keep` false only its extent is checked (nothing is built).
    private mutating func value(keep: Bool, depth: Int) throws -> JSONValue {
        skipSpace()
        guard index < end, depth <= Self.maximumDepth else { throw Malformed() }
        switch buffer[index] {
        case UInt8(ascii: "{"):
            index += 1
            var fields: [(key: String, value: JSONValue)] = []
            if skip(UInt8(ascii: "}")) { return .object(fields) }
            repeat {
                let key = try string()
                try expect(UInt8(ascii: ":"))
                let value = try value(keep: keep, depth: depth + 1)
                if keep { fields.append((key, value)) }
            } while skip(UInt8(ascii: ","))
            try expect(UInt8(ascii: "}"))
            return .object(fields)
        case UInt8(ascii: "["):
            index += 1
            var values: [JSONValue] = []
            if skip(UInt8(ascii: "]")) { return .array(values) }
            repeat {
                let value = try value(keep: keep, depth: depth + 1)
                if keep { values.append(value) }
            } while skip(UInt8(ascii: ","))
            try expect(UInt8(ascii: "]"))
            return .array(values)
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        default: return .number(try numberText())
        }
    }
}
