// p11fork-input-fuzz: feeds text someone else may have written to the parsers that read it
// (docs/RELIABILITY.md "Untrusted text"): a settings file, a C_Initialize pReserved string, and a
// trace file read by `p11fork trace`. No input may crash, hang or take memory out of proportion.
//
//   p11fork-input-fuzz TARGET [--mutations N] [--seed S] FILE|FOLDER...
//       runs every file, then N inputs mutated from them with a fixed seed (no coverage; what
//       the tests run), and prints the figures
//   scripts/fuzz-inputs.sh builds it with libFuzzer (INPUT_FUZZ_LIBFUZZER) for guided fuzzing;
//   the target then comes from P11FORK_INPUT_FUZZ_TARGET.
//
// TARGET: settings (a settings file, then the whole configuration it makes), reserved (pReserved
// bytes as C_Initialize gets them, then the configuration), trace (the trace reader and its report).
import Foundation
@testable import P11ForkCore
import TraceReader

enum FuzzTarget: String, CaseIterable {
    case settings, reserved, trace

    func run(_ bytes: UnsafeRawBufferPointer) {
        switch self {
        case .settings:
            let text = String(decoding: bytes, as: UTF8.self)
            _ = Configuration.parse(text, path: "fuzz.conf")
            _ = Configuration.load(environment: ["P11FORK_CONFIG": "/fuzz.conf"]) { path in
                path == "/fuzz.conf" ? .success(text) : .failure(FileProblem(reason: "missing", missing: true))
            }
        case .reserved:
            // As C_Initialize sees it: bytes up to a NUL, no length given.
            var terminated = [UInt8](bytes)
            terminated.append(0)
            terminated.withUnsafeBytes { raw in
                guard case .success(let text)? = Configuration.claimedReserved(raw.baseAddress!) else { return }
                // The file `config=` names holds the same text.
                _ = Configuration.load(environment: [:], reserved: text) { _ in .success(text) }
            }
        case .trace:
            let file = TraceFile(bytes: [UInt8](bytes))
            let style = Style(enabled: true)
            let report = TraceReport(file: file)
            _ = report.listing(errorsOnly: false, style: style)
            _ = report.summary(style: style)
            if let pid = file.records.first?.pid {
                _ = TraceReport(file: file, pid: pid).listing(errorsOnly: true, style: style)
            }
        }
    }
}

nonisolated(unsafe) var selected = FuzzTarget.settings

#if INPUT_FUZZ_LIBFUZZER
typealias FuzzCallback = @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<Int32>,
                         _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
                         _ callback: FuzzCallback) -> Int32

/// libFuzzer's own main (linked, but not the one that runs) names this entry.
@_cdecl("LLVMFuzzerTestOneInput")
func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    selected.run(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

guard let name = ProcessInfo.processInfo.environment["P11FORK_INPUT_FUZZ_TARGET"], let target = FuzzTarget(rawValue: name) else {
    FileHandle.standardError.write(Data("p11fork-input-fuzz: set P11FORK_INPUT_FUZZ_TARGET to \(FuzzTarget.allCases.map(\.rawValue).joined(separator: ", "))\n".utf8))
    exit(2)
}
selected = target
var argc = CommandLine.argc
var argv = CommandLine.unsafeArgv
exit(LLVMFuzzerRunDriver(&argc, &argv, fuzzOne))
#else

/// xorshift64*: the same mutations on every machine for one seed.
struct Mutator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state ^= state >> 12; state ^= state << 25; state ^= state >> 27
        return state &* 2685821657736338717
    }
    mutating func below(_ n: Int) -> Int { n <= 1 ? 0 : Int(next() % UInt64(n)) }

    /// Bytes that matter to the parsers, so that mutations reach their branches.
    static let interesting: [[UInt8]] = ["=", "\"", "#", "\n", " ", "\t", "{", "}", "[", "]", ":", ",", "\\", "\\u00", "%p",
                                         "p11fork:", "config=", "module", "trace", "pid", "fork detected: this is a child of pid 1 (fork generation 2)",
                                         "\"event\":", "\"call\":", "\"rv\":", "1m", "99999999999", "-1", "\u{0}", "\u{FF}"].map { Array($0.utf8) }

    mutating func mutate(_ input: [UInt8], with other: [UInt8]) -> [UInt8] {
        var bytes = input
        for _ in 0...below(4) {
            let at = below(bytes.count + 1)
            switch below(6) {
            case 0 where !bytes.isEmpty: bytes[min(at, bytes.count - 1)] ^= UInt8(truncatingIfNeeded: 1 << below(8))
            case 1: bytes.insert(contentsOf: Self.interesting[below(Self.interesting.count)], at: at)
            case 2 where !bytes.isEmpty: bytes.removeSubrange(at..<min(bytes.count, at + 1 + below(16)))
            case 3 where !bytes.isEmpty:
                // A chunk repeated: long lines, deep nesting, many processes.
                let start = below(bytes.count), end = min(bytes.count, start + 1 + below(64))
                let chunk = Array(bytes[start..<end])
                for _ in 0..<(1 + below(64)) { bytes.insert(contentsOf: chunk, at: min(at, bytes.count)) }
            case 4 where !other.isEmpty:
                let start = below(other.count)
                bytes.insert(contentsOf: other[start..<min(other.count, start + 1 + below(256))], at: at)
            default: bytes.insert(UInt8(truncatingIfNeeded: next()), at: at)
            }
        }
        return Array(bytes.prefix(1 << 16))
    }
}

func usage() -> Never {
    FileHandle.standardError.write(Data("usage: p11fork-input-fuzz \(FuzzTarget.allCases.map(\.rawValue).joined(separator: "|")) [--mutations N] [--seed S] FILE|FOLDER...\n".utf8))
    exit(2)
}

var arguments = Array(CommandLine.arguments.dropFirst())
guard let first = arguments.first, let target = FuzzTarget(rawValue: first) else { usage() }
arguments.removeFirst()
var mutations = 0
var seed: UInt64 = 1
var inputs: [[UInt8]] = []
while let argument = arguments.first {
    arguments.removeFirst()
    switch argument {
    case "--mutations": guard let value = arguments.first.flatMap({ Int($0) }) else { usage() }; mutations = value; arguments.removeFirst()
    case "--seed": guard let value = arguments.first.flatMap({ UInt64($0) }) else { usage() }; seed = value; arguments.removeFirst()
    default:
        var isFolder: ObjCBool = false
        guard FileManager.default.fileExists(atPath: argument, isDirectory: &isFolder) else { usage() }
        let files = isFolder.boolValue
            ? try FileManager.default.contentsOfDirectory(atPath: argument).sorted().map { "\(argument)/\($0)" }
            : [argument]
        for file in files { inputs.append([UInt8](FileManager.default.contents(atPath: file) ?? Data())) }
    }
}
guard !inputs.isEmpty else { usage() }

/// The slowest input (ms) and the largest (bytes) run so far.
struct Figures { var slowest = 0.0, largest = 0 }
var figures = Figures()
func timed(_ bytes: [UInt8], _ figures: inout Figures) {
    let start = DispatchTime.now().uptimeNanoseconds
    bytes.withUnsafeBytes { target.run($0) }
    figures.slowest = max(figures.slowest, Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6)
    figures.largest = max(figures.largest, bytes.count)
}
for input in inputs { timed(input, &figures) }
var mutator = Mutator(state: seed | 1)
var corpus = inputs
for _ in 0..<mutations {
    let input = mutator.mutate(corpus[mutator.below(corpus.count)], with: corpus[mutator.below(corpus.count)])
    timed(input, &figures)
    // Mutants breed too, within a bound: deeper structures than the seeds hold.
    if corpus.count < 4096 { corpus.append(input) } else { corpus[mutator.below(corpus.count)] = input }
}
var resources = rusage()
getrusage(RUSAGE_SELF.rawValue, &resources)
print("p11fork-input-fuzz: \(target.rawValue): \(inputs.count) seeds, \(mutations) mutations (seed \(seed)), largest input \(figures.largest) bytes, slowest \(String(format: "%.1f", figures.slowest)) ms, peak memory \(resources.ru_maxrss / 1024) MB")
#endif
