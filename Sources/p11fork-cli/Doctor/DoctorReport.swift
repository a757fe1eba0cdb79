import Foundation
import TraceReader

/// Everything the doctor found, as printed in the table and as `--json`.
struct DoctorReport: Codable {
    struct Key: Codable {
        var label: String
        var id: String
        var keyClass: String
        var type: String
        /// "named" (by --key or the URI) or "first signing key on the token".
        var chosen: String
        var mechanism: String
        var multipartMechanism: String?
        var signatureCheck: String

        enum CodingKeys: String, CodingKey {
            case label, id, type, chosen, mechanism
            case keyClass = "class", multipartMechanism = "multipart_mechanism", signatureCheck = "signature_check"
        }
    }

    struct Scenario: Codable {
        var id: String
        var title: String
        var direct: ScenarioOutcome
        var p11fork: ScenarioOutcome
    }

    /// The scenarios' outcomes through p11fork with one strategy.
    struct StrategyAttempt: Codable {
        var strategy: String
        var failures: Int
        var outcomes: [String: ScenarioOutcome]
    }

    struct Configuration: Codable {
        /// Lines for the environment of the application, e.g. P11FORK_MODULE=/usr/lib/….
        var environment: [String]
        /// The same as the lines of a file named by P11FORK_CONFIG.
        var configFile: [String]
        /// The module path to give the application.
        var p11forkModule: String
        /// What to know about the strategy auto picks (e.g. that it starts the broker).
        var notes: [String] = []

        enum CodingKeys: String, CodingKey {
            case environment, notes, configFile = "config_file", p11forkModule = "p11fork_module"
        }
    }

    /// How `auto` made the module work in the children of some scenarios, and why (from p11fork's trace).
    struct AutoChoice: Codable, Equatable {
        var strategy: String
        var why: String
        var scenarios: [String]
    }

    var module: String
    var p11fork: String
    var token: String
    var tokenSerial: String
    var key: Key
    var scenarios: [Scenario]
    /// Scenarios that ran (neither skipped nor impossible with this module).
    var scenariosRun: Int
    /// Of those, how many break when the module is used directly.
    var brokenDirectly: Int
    /// How many still fail with p11fork with the strategy shown.
    var failingWithP11fork: Int
    /// The strategy that passes every scenario (nil: none does).
    var strategy: String?
    var strategiesTried: [StrategyAttempt]
    /// Why p11fork could not be used at all with this module, if so.
    var p11forkProblem: String?
    /// Every scenario passes through p11fork (with `strategy`).
    var allPassWithP11fork: Bool
    var verdict: String
    var configuration: Configuration?
    /// With `auto`: the strategy it picked in the children, scenario by scenario (nil otherwise).
    var autoChoices: [AutoChoice]?

    enum CodingKeys: String, CodingKey {
        case module, p11fork, token, key, scenarios, strategy, verdict, configuration
        case autoChoices = "auto_choices"
        case tokenSerial = "token_serial", scenariosRun = "scenarios_run", brokenDirectly = "broken_directly"
        case failingWithP11fork = "failing_with_p11fork", strategiesTried = "strategies_tried", p11forkProblem = "p11fork_problem"
        case allPassWithP11fork = "all_pass_with_p11fork"
    }

    static func verdict(brokenDirectly: Int, run: Int, failing: Int, strategy: String?, problem: String?,
                        choices: [AutoChoice] = []) -> String {
        let direct = brokenDirectly == 0
            ? "your module keeps working after fork in all \(run) scenarios"
            : "your module breaks after fork in \(brokenDirectly) of \(run) scenarios"
        if let problem { return "\(direct); p11fork cannot use the module: \(problem)" }
        if failing > 0 { return "\(direct); with p11fork \(failing) still fail (see below)" }
        let how = strategy.map { $0 == "auto" ? "" : " (with P11FORK_STRATEGY=\($0))" } ?? ""
        return "\(direct); with p11fork all pass\(how)" + (strategy == "auto" ? picks(choices).map { " (auto picks \($0))" } ?? "" : "")
    }

    /// "fresh-copy" or "fresh-copy; the broker for 4 workers switch to nobody": the strategy of most
    /// scenarios, then the others with the scenarios they served.
    static func picks(_ choices: [AutoChoice]) -> String? {
        var byStrategy: [(strategy: String, scenarios: [String])] = []
        for choice in choices {
            if let index = byStrategy.firstIndex(where: { $0.strategy == choice.strategy }) {
                byStrategy[index].scenarios += choice.scenarios
            } else {
                byStrategy.append((choice.strategy, choice.scenarios))
            }
        }
        guard let main = byStrategy.max(by: { $0.scenarios.count < $1.scenarios.count }) else { return nil }
        let others = byStrategy.filter { $0.strategy != main.strategy }
            .map { "\($0.strategy == "broker" ? "the broker" : $0.strategy) for \($0.scenarios.joined(separator: ", "))" }
        return ([main.strategy] + others).joined(separator: "; ")
    }

    static func configuration(module: String, p11fork: String, strategy: String, choices: [AutoChoice] = []) -> Configuration {
        var environment = ["P11FORK_MODULE=\(module)"]
        var file = ["module = \(module)"]
        if strategy != "auto" {
            environment.append("P11FORK_STRATEGY=\(strategy)")
            file.append("strategy = \(strategy)")
        }
        var notes: [String] = []
        if strategy == "broker" || choices.contains(where: { $0.strategy == "broker" }) {
            let folder = URL(fileURLWithPath: p11fork).deletingLastPathComponent().path
            notes.append("p11fork starts its broker (p11fork-broker, installed in \(folder) beside libp11fork.so) with the application's rights before its first fork: keep it there")
        }
        return Configuration(environment: environment, configFile: file, p11forkModule: p11fork, notes: notes)
    }

    // MARK: text

    func text(style: Style) -> String {
        var lines: [String] = []
        lines.append(style.bold("p11fork doctor"))
        lines.append("  module   \(module)")
        lines.append("  p11fork  \(p11fork)")
        lines.append("  token    \"\(token)\"\(tokenSerial.isEmpty ? "" : " (serial \(tokenSerial))")")
        let id = key.id.isEmpty ? "no ID" : "ID \(key.id)"
        let label = key.label.isEmpty ? "(no label)" : "\"\(key.label)\""
        lines.append("  key      \(label): \(key.type.uppercased()) \(key.keyClass) key, \(id), \(key.chosen); signs with \(key.mechanism)")
        lines.append("")

        let header = ["scenario", "directly", "through p11fork" + (strategy.map { $0 == "auto" ? "" : " (strategy \($0))" } ?? "")]
        let rows = scenarios.map { [$0.title, $0.direct.cell, $0.p11fork.cell] }
        let widths = (0..<3).map { column in ([header] + rows).map { $0[column].count }.max() ?? 0 }
        func row(_ cells: [String], colour: Bool) -> String {
            cells.enumerated().map { index, cell in
                let padded = index == 2 ? cell : cell.padding(toLength: widths[index], withPad: " ", startingAt: 0)
                guard colour, index > 0 else { return padded }
                if cell == "ok" { return padded.replacingOccurrences(of: "ok", with: style.green("ok")) }
                if cell.hasPrefix("FAIL") || ["HUNG", "CRASHED", "ERROR"].contains(cell) {
                    return padded.replacingOccurrences(of: cell, with: style.red(cell))
                }
                return padded
            }.joined(separator: " | ")
        }
        lines.append(style.bold(row(header, colour: false)))
        lines.append(widths.map { String(repeating: "-", count: $0) }.joined(separator: "-+-"))
        lines += rows.map { row($0, colour: true) }
        lines.append("")
        lines.append(style.bold(verdict))

        let problems = scenarios.flatMap { scenario -> [String] in
            [("directly", scenario.direct), ("through p11fork", scenario.p11fork)].compactMap { route, outcome in
                outcome.status == .ok || outcome.status == .skipped ? nil : "  \(scenario.title), \(route): \(outcome.detail)"
            }
        }
        if !problems.isEmpty {
            lines.append("")
            lines.append("what happened:")
            lines += problems
        }
        let skipped = scenarios.filter { $0.direct.status == .skipped }
        if !skipped.isEmpty {
            lines.append("")
            lines.append("not run: \(skipped.map(\.title).joined(separator: ", ")) (creates a session key on the token: add --allow-session-objects)")
        }
        if let autoChoices, !autoChoices.isEmpty {
            lines.append("")
            lines.append("how auto recovers the module in the children:")
            for choice in autoChoices {
                lines.append("  \(choice.strategy) in \(choice.scenarios.joined(separator: ", ")): \(choice.why)")
            }
        }
        if strategiesTried.count > 1 {
            lines.append("")
            lines.append("strategies tried: " + strategiesTried.map { "\($0.strategy) (\($0.failures) failing)" }.joined(separator: ", "))
        }

        lines.append("")
        if let configuration {
            lines.append(style.bold("configuration") + (allPassWithP11fork ? "" : " (the closest; not every scenario passes with it)"))
            lines.append("  give your application this module path: \(configuration.p11forkModule)")
            lines.append("  and set in its environment:")
            lines += configuration.environment.map { "    \($0)" }
            lines.append("  or put in /etc/p11fork.conf (read when nothing else names the module), or in a file named by P11FORK_CONFIG:")
            lines += configuration.configFile.map { "    \($0)" }
            lines.append("  (the module's own settings, such as SOFTHSM2_CONF, stay as they are)")
            lines += configuration.notes.map { "  \($0)" }
        } else {
            lines.append("no configuration to give: p11fork could not use the module (run with P11FORK_TRACE=stderr to see why)")
        }
        return lines.joined(separator: "\n")
    }

    func json() throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(self), as: UTF8.self)
    }
}
