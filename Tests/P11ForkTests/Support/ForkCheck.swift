import Foundation
import XCTest

/// Runs p11fork-forkcheck (Tests/Tools/ForkCheck) for one scenario, against the real
/// module directly or through libp11fork.so, and returns what it printed.
struct ForkCheck {
    let token: any TestToken
    var keyLabel = "fork-key"
    var mechanism = "rsa"
    var realModule = RealModules.softHSM
    /// The libp11fork.so the driver loads when it runs through p11fork (an installed one, say).
    var p11fork = Products.module
    var extraEnvironment: [String: String] = [:]
    /// A command the driver runs under (e.g. a private mount namespace for p11-kit's proxy).
    var launcher: [String] = []

    struct Outcome {
        let result: ProcessResult
        let trace: String
        var succeeded: Bool { result.status == 0 && result.stdout.contains("result: ok") }
        var report: String { "status \(result.status)\(result.timedOut ? " (timed out)" : "")\n\(result.output)\ntrace:\n\(trace)" }
    }

    func run(_ scenario: String, throughP11Fork: Bool, children: Int = 1, signatures: Int = 1,
             extra: [String] = []) throws -> Outcome {
        let traceFile = token.directory.appendingPathComponent("trace-\(UUID().uuidString).log")
        var environment = token.environment.merging(extraEnvironment) { $1 }
        if throughP11Fork {
            environment["P11FORK_MODULE"] = realModule
            environment["P11FORK_TRACE"] = traceFile.path
            environment["P11FORK_TRACE_LEVEL"] = environment["P11FORK_TRACE_LEVEL"] ?? "fork"
        }
        let arguments = ["--module", throughP11Fork ? p11fork : realModule, "--token", token.label,
                         "--pin", token.pin, "--key", keyLabel, "--mechanism", mechanism,
                         "--children", String(children), "--signatures", String(signatures), "--stagger", "100"] + extra + [scenario]
        let command = launcher + [Products.forkcheck] + arguments
        let result = Baseline.note("forkcheck \(scenario)", try runProgram(command[0], Array(command.dropFirst()), environment: environment,
                                                                             timeout: Baseline.timeout(through: throughP11Fork, else: 180)),
                                   through: throughP11Fork)
        let trace = (try? String(contentsOf: traceFile, encoding: .utf8)) ?? ""
        return Outcome(result: result, trace: trace)
    }
}
