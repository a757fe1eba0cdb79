import ArgumentParser
import Foundation
import TraceReader

/// `p11fork trace FILE`: a trace written with P11FORK_TRACE_FORMAT=json, per process.
struct TraceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trace",
        abstract: "Shows a p11fork trace per process, with fork recovery steps and errors marked, and a summary.",
        discussion: """
            FILE is a trace written with P11FORK_TRACE_FORMAT=json (one object per line; parent \
            and children may share the file); text traces are read too. Processes are shown \
            parents first, each child under the process it was forked from (from the trace's \
            'fork detected: this is a child of pid N' lines). Markers: FORK (a child's first \
            call), step (a recovery step in a child), note, ERROR (a call that did not answer \
            CKR_OK, or p11fork's own error). Colour only on a terminal (NO_COLOR turns it off). \
            Malformed lines are counted in the summary and skipped.
            """
    )

    @Argument(help: ArgumentHelp("The trace file.", valueName: "file"))
    var file: String

    @Option(help: ArgumentHelp("Only the lines of this process.", valueName: "pid"))
    var pid: Int?

    @Flag(help: "Only the summary: calls per function, errors by return code, recovery step durations.")
    var summary = false

    @Flag(help: "Only the lines that are errors (and the summary).")
    var errors = false

    func run() throws {
        let traceFile = TraceFile(bytes: try Self.read(file))
        guard !traceFile.records.isEmpty else {
            throw CommandFailure("\(file): no trace lines (\(traceFile.malformedLines.count) malformed): is it a p11fork trace (P11FORK_TRACE_FORMAT=json)?")
        }
        if let pid, !traceFile.records.contains(where: { $0.pid == pid }) {
            let pids = Array(Set(traceFile.records.map(\.pid))).sorted().prefix(20).map(String.init).joined(separator: ", ")
            throw UsageError("--pid \(pid): no line of that process in \(file): give one of its pids (\(pids))")
        }
        let report = TraceReport(file: traceFile, pid: pid)
        let style = Style.forStandardOutput()
        var text = ""
        if !summary {
            let listing = report.listing(errorsOnly: errors, style: style)
            text += listing.isEmpty ? "no errors\n\n" : listing + "\n"
        }
        text += report.summary(style: style)
        Output.standard(text)
    }

    /// The bytes of a regular file. A trace may come from someone else: a FIFO or a device is
    /// refused without waiting or reading without end.
    static func read(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
        guard fd >= 0 else {
            throw UsageError("\(path): cannot read the file (\(String(cString: strerror(errno)))): name a trace written with P11FORK_TRACE=FILE P11FORK_TRACE_FORMAT=json")
        }
        let handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        var status = stat()
        guard fstat(fd, &status) == 0, status.st_mode & S_IFMT == S_IFREG else {
            throw UsageError("\(path): not a regular file: name a trace file")
        }
        return [UInt8](handle.readDataToEndOfFile())
    }
}
