import Foundation
import XCTest

/// The parsers of text someone else may have written — a settings file, a pReserved string, a
/// trace file — never crash, hang or take memory out of proportion (docs/RELIABILITY.md "Untrusted
/// text"). Here without libFuzzer: the seeds and a fixed set of their mutations, then the inputs
/// that once broke the trace reader; scripts/fuzz-inputs.sh fuzzes with coverage (CI does).
final class InputFuzzTests: XCTestCase {
    private let seeds = Products.packageRoot.appendingPathComponent("Tests/Tools/InputFuzz/seeds").path

    private func fuzz(_ arguments: [String], timeout: TimeInterval = 300, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let result = try runProgram(Products.path("p11fork-input-fuzz"), arguments, timeout: timeout)
        XCTAssertFalse(result.timedOut, result.output, file: file, line: line)
        XCTAssertEqual(result.status, 0, result.output, file: file, line: line)
        print(result.stdout, terminator: "")
        return result.stdout
    }

    func testSeedsAndTheirMutationsNeverCrash() throws {
        for target in ["settings", "reserved", "trace"] {
            let mutations = target == "trace" ? "1500" : "20000"
            let figures = try fuzz([target, "--mutations", mutations, "--seed", "1", "\(seeds)/\(target)"])
            XCTAssertTrue(figures.contains("p11fork-input-fuzz: \(target): "), figures)
        }
    }

    /// Found by fuzzing: arrays nested 200,000 deep overflowed the stack (the JSON scanner now
    /// stops at 32 levels); 20,000 lines of one reused pid took 74 s (a quadratic count of a pid's
    /// instances; now about 8 s in a debug build, bounded here by a minute: a hang, not a speed
    /// target); a chain of 10,000 generations recursed as deep and indented by its square.
    func testTheTraceReaderTakesHostileShapesInItsStride() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("p11fork-hostile-trace-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let header = #"{"time":"2026-12-03T08:00:00.000000Z","pid":1,"tid":1,"call":"C_Sign","args":"#
        let deep = header + String(repeating: "[", count: 200_000) + "\n"
        let reused = String(repeating: "2026-12-03T08:00:00.000000Z p11fork[5/5] fork: fork detected: this is a child of pid 4 (fork generation 2), first call C_Sign\n", count: 20_000)
        let chain = (2..<10_002).map { "2026-12-03T08:00:00.000000Z p11fork[\($0)/\($0)] fork: fork detected: this is a child of pid \($0 - 1) (fork generation \($0)), first call C_Sign\n" }.joined()
        for (name, text) in [("deep", deep), ("reused", reused), ("chain", chain)] {
            let file = folder.appendingPathComponent(name)
            try text.write(to: file, atomically: false, encoding: .utf8)
            _ = try fuzz(["trace", file.path], timeout: 60)
        }
        // The command itself refuses what is not a regular file instead of reading it forever.
        let zero = try runProgram(Products.path("p11fork-cli"), ["trace", "/dev/zero"], timeout: 30)
        XCTAssertFalse(zero.timedOut)
        XCTAssertTrue(zero.stderr.contains("/dev/zero: not a regular file: name a trace file"), zero.output)
    }
}
