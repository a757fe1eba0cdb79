import Foundation
import Vocabulary

/// One process of a trace: its lines in file order, and where it came from.
struct TracedProcess {
    let pid: Int
    /// 1, or more when the pid was used again by a later process in the same file.
    let instance: Int
    var records: [TraceRecord] = []
    /// The pid named by "fork detected: this is a child of pid N".
    var parentPID: Int?
    /// The parent's index in `TraceReport.processes`, when the parent is in the trace.
    var parent: Int?
    var children: [Int] = []
    var generation: Int?

    var name: String { instance == 1 ? "\(pid)" : "\(pid) (#\(instance))" }
}

/// What a trace line is, for the listing's left-hand marker.
enum TraceLineRole {
    case forkDetected, recoveryStep, note, call, error
}

/// A trace grouped per process, with the recovery steps and errors picked out, and a summary.
public struct TraceReport {
    private(set) var processes: [TracedProcess] = []
    let file: TraceFile
    var malformedLines: [Int] { file.malformedLines }

    public init(file: TraceFile, pid: Int? = nil) {
        self.file = file
        var latest: [Int: Int] = [:]
        var instances: [Int: Int] = [:]
        for record in file.records where pid == nil || record.pid == pid {
            let forkDetected = record.parentPID != nil
            var index = latest[record.pid]
            // A child's first line is its "fork detected" line: seen again, the pid was reused.
            if let existing = index, forkDetected, !processes[existing].records.isEmpty {
                index = nil
            }
            if index == nil {
                let instance = instances[record.pid, default: 0] + 1
                instances[record.pid] = instance
                processes.append(TracedProcess(pid: record.pid, instance: instance))
                index = processes.count - 1
                latest[record.pid] = index
            }
            let at = index!
            if let parentPID = record.parentPID, processes[at].parentPID == nil {
                processes[at].parentPID = parentPID
                processes[at].generation = record.forkGeneration
                if let parent = latest[parentPID], parent != at {
                    processes[at].parent = parent
                    processes[parent].children.append(at)
                }
            }
            processes[at].records.append(record)
        }
    }

    /// Parents before their children, depth first, in order of first appearance.
    /// Without recursion: a chain of generations may be as long as the file (pids can repeat).
    var ordered: [(process: TracedProcess, depth: Int)] {
        var result: [(TracedProcess, Int)] = []
        var pending: [(index: Int, depth: Int)] = processes.indices.reversed().filter { processes[$0].parent == nil }.map { ($0, 0) }
        while let (index, depth) = pending.popLast() {
            result.append((processes[index], depth))
            pending += processes[index].children.reversed().map { ($0, depth + 1) }
        }
        return result
    }

    /// Indentation shows the first generations; deeper ones keep that of the last shown (the
    /// header names each child's parent), so the listing grows with the trace, not its square.
    static let maximumIndent = 16

    static func role(of record: TraceRecord, afterFork: Bool) -> TraceLineRole {
        if record.isError { return .error }
        switch record.kind {
        case .call: return .call
        case .event(_, let message):
            if record.parentPID != nil { return .forkDetected }
            switch record.fields?.kind {
            case .forkDetected?: return .forkDetected
            case .preparation?: return .note
            case .recoveryStep?, .decision?: return afterFork ? .recoveryStep : .note
            case nil: break
            }
            // A text line (or a JSON event without a kind): by its wording.
            let preparation = ["loaded ", "spare copy", "no spare copy", "copy of the module"].contains { message.hasPrefix($0) }
            return afterFork && !preparation ? .recoveryStep : .note
        }
    }

    // MARK: recovery steps

    /// The kind of step a fork-level message is, without its handles, numbers and details:
    /// "session 0x5e000001 re-opened on slot 0x52166c08 (…)" is "session re-opened on slot".
    static func stepName(_ message: String) -> String {
        var text = Substring(message)
        if let cut = text.range(of: " (") { text = text[..<cut.lowerBound] }
        if let cut = text.range(of: ": ") { text = text[..<cut.lowerBound] }
        let words = text.split(separator: " ").filter { word in
            !(word.hasPrefix("0x") || word.allSatisfy { $0.isNumber || $0 == "." } || word.hasPrefix("\""))
        }
        return words.joined(separator: " ")
    }

    /// A step's name: from its fields ("login replayed", "module made working (broker)"), or
    /// else from its message.
    static func stepName(_ fields: TraceRecord.EventFields?, _ message: String) -> String {
        if let step = fields?.step {
            let strategy = step == .module ? fields?.strategy.map { " (\($0.rawValue))" } ?? "" : ""
            let outcome = fields?.outcome.flatMap { $0 == .ok ? nil : ": \($0.rawValue)" } ?? ""
            return step.phrase + strategy + outcome
        }
        if fields?.kind == .forkDetected { return "fork detected" }
        return stepName(message)
    }

    /// The duration a step's message ends with: "(… 2.3 ms)".
    static func stepMilliseconds(_ message: String) -> Double? {
        guard let match = message.firstMatch(of: /([0-9]+(?:\.[0-9]+)?) ms\)\s*$/) else { return nil }
        return Double(match.output.1)
    }

    // MARK: listing

    public func listing(errorsOnly: Bool, style: Style) -> String {
        var lines: [String] = []
        for (process, depth) in ordered {
            var afterFork = false
            var body: [String] = []
            for record in process.records {
                if record.parentPID != nil { afterFork = true }
                let role = Self.role(of: record, afterFork: afterFork)
                if errorsOnly && role != .error { continue }
                body.append("  " + format(record, role: role, pid: process.pid, style: style))
            }
            if errorsOnly && body.isEmpty { continue }
            let indent = String(repeating: "  ", count: min(depth, Self.maximumIndent))
            lines.append(style.bold("\(indent)process \(process.name)") + " " + header(process))
            lines += body.map { indent + $0 }
            lines.append("")
        }
        return lines.joined(separator: "\n")
    }

    private func header(_ process: TracedProcess) -> String {
        var parts: [String] = []
        if let parentPID = process.parentPID {
            let generation = process.generation.map { ", fork generation \($0)" } ?? ""
            parts.append("child of \(parentPID)\(process.parent == nil ? " (not in this trace)" : "")\(generation)")
        }
        if !process.children.isEmpty { parts.append("forked " + process.children.map { processes[$0].name }.joined(separator: ", ")) }
        let errors = process.records.filter(\.isError).count
        parts.append("\(process.records.count) line(s)\(errors > 0 ? ", \(errors) error(s)" : "")")
        return "— " + parts.joined(separator: "; ")
    }

    func format(_ record: TraceRecord, role: TraceLineRole, pid: Int, style: Style) -> String {
        let time = record.time.split(separator: "T").last.map { String($0.dropLast($0.hasSuffix("Z") ? 1 : 0)) } ?? record.time
        let thread = record.tid.map { $0 != pid ? " [thread \($0)]" : "" } ?? ""
        let text: String
        switch record.kind {
        case .call(let function, let arguments, let rv, let microseconds):
            text = "\(function)(\(file.render(arguments))) = \(rv)" + (microseconds.map { String(format: " %.1fus", $0) } ?? "")
        case .event(let level, let message):
            text = level == "fork" ? message : "\(level): \(message)"
        }
        let marker: String
        switch role {
        case .error: marker = style.red("ERROR")
        case .forkDetected: marker = style.cyan(style.bold("FORK "))
        case .recoveryStep: marker = style.cyan("step ")
        case .note: marker = style.dim("note ")
        case .call: marker = "     "
        }
        let shown = role == .error ? style.red(text) : role == .forkDetected ? style.bold(text) : text
        return "\(time) \(marker) \(shown)\(thread)"
    }

    // MARK: summary

    struct FunctionCount { var calls = 0, errors = 0, microseconds = 0.0 }
    struct StepStatistics { var count = 0, timed = 0, total = 0.0, minimum = Double.infinity, maximum = 0.0 }

    /// Every record of the processes shown.
    private var allRecords: some Sequence<TraceRecord> { processes.lazy.flatMap(\.records) }

    var functionCounts: [String: FunctionCount] {
        var counts: [String: FunctionCount] = [:]
        for record in allRecords {
            guard case .call(let function, _, let rv, let microseconds) = record.kind else { continue }
            counts[function, default: FunctionCount()].calls += 1
            if rv != "CKR_OK" { counts[function]!.errors += 1 }
            counts[function]!.microseconds += microseconds ?? 0
        }
        return counts
    }

    /// Return codes other than CKR_OK, with the functions that gave them.
    var errorsByCode: [String: [String: Int]] {
        var errors: [String: [String: Int]] = [:]
        for record in allRecords {
            guard case .call(let function, _, let rv, _) = record.kind, rv != "CKR_OK" else { continue }
            errors[rv, default: [:]][function, default: 0] += 1
        }
        return errors
    }

    var errorEvents: [TraceRecord] {
        allRecords.filter { if case .event("error", _) = $0.kind { return true } else { return false } }
    }

    var recoverySteps: [String: StepStatistics] {
        var steps: [String: StepStatistics] = [:]
        for process in processes {
            var afterFork = false
            for record in process.records {
                if record.parentPID != nil { afterFork = true }
                let role = Self.role(of: record, afterFork: afterFork)
                guard case .event(_, let message) = record.kind, role == .recoveryStep || role == .forkDetected
                        || (role == .error && afterFork) else { continue }
                let name = Self.stepName(record.fields, message)
                steps[name, default: StepStatistics()].count += 1
                if let ms = record.fields?.milliseconds ?? Self.stepMilliseconds(message) {
                    steps[name]!.timed += 1
                    steps[name]!.total += ms
                    steps[name]!.minimum = min(steps[name]!.minimum, ms)
                    steps[name]!.maximum = max(steps[name]!.maximum, ms)
                }
            }
        }
        return steps
    }

    public func summary(style: Style) -> String {
        var lines: [String] = [style.bold("summary")]
        var read = "  lines read: \(processes.reduce(0) { $0 + $1.records.count })"
        if !malformedLines.isEmpty {
            let shown = malformedLines.prefix(5).map(String.init).joined(separator: ", ")
            read += "; malformed lines skipped: \(malformedLines.count) (line \(shown)\(malformedLines.count > 5 ? ", …" : ""))"
        }
        lines.append(read)
        let children = processes.filter { $0.parentPID != nil }.count
        let deepest = processes.compactMap(\.generation).max().map { " (deepest fork generation \($0))" } ?? ""
        lines.append("  processes: \(processes.count); forked children among them: \(children)\(deepest)")

        let functions = functionCounts.sorted { $0.value.calls != $1.value.calls ? $0.value.calls > $1.value.calls : $0.key < $1.key }
        if !functions.isEmpty {
            lines.append("")
            lines.append(table(["calls per function", "calls", "errors", "total ms", "mean us"],
                               functions.map { name, count in
                                   [name, "\(count.calls)", "\(count.errors)", String(format: "%.2f", count.microseconds / 1000),
                                    String(format: "%.1f", count.microseconds / Double(max(count.calls, 1)))]
                               }))
        }
        let codes = errorsByCode.sorted { $0.value.values.reduce(0, +) != $1.value.values.reduce(0, +)
            ? $0.value.values.reduce(0, +) > $1.value.values.reduce(0, +) : $0.key < $1.key }
        let events = errorEvents
        lines.append("")
        if codes.isEmpty && events.isEmpty {
            lines.append("  errors: none")
        } else {
            var rows = codes.map { code, functions in
                [style.red(code), "\(functions.values.reduce(0, +))",
                 functions.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")]
            }
            if !events.isEmpty { rows.append([style.red("p11fork errors (level error)"), "\(events.count)", ""]) }
            lines.append(table(["errors by return code", "count", "from"], rows))
        }
        let steps = recoverySteps.sorted { $0.key < $1.key }
        if !steps.isEmpty {
            lines.append("")
            lines.append(table(["fork recovery steps", "count", "total ms", "min ms", "mean ms", "max ms"],
                               steps.map { name, s in
                                   let timed = s.timed > 0
                                   return [name, "\(s.count)", timed ? String(format: "%.1f", s.total) : "-",
                                           timed ? String(format: "%.1f", s.minimum) : "-",
                                           timed ? String(format: "%.2f", s.total / Double(s.timed)) : "-",
                                           timed ? String(format: "%.1f", s.maximum) : "-"]
                               }))
        }
        return lines.joined(separator: "\n")
    }

    /// Columns: the first left-aligned, the others right-aligned (colour codes not counted).
    private func table(_ header: [String], _ rows: [[String]]) -> String {
        func visible(_ text: String) -> Int { text.replacing(/\u{1B}\[[0-9;]*m/, with: "").count }
        let widths = header.indices.map { column in ([header] + rows).map { visible($0[column]) }.max() ?? 0 }
        func render(_ cells: [String]) -> String {
            "  " + cells.enumerated().map { index, cell in
                let pad = String(repeating: " ", count: widths[index] - visible(cell))
                return index == 0 ? cell + pad : (index == cells.count - 1 && header.last == "from" ? cell : pad + cell)
            }.joined(separator: "  ")
        }
        return ([render(header)] + rows.map(render)).joined(separator: "\n")
    }
}
