import Foundation
import Vocabulary
import TraceReader

/// What the doctor was asked to examine, arguments checked.
struct DoctorPlan {
    var module: String
    var p11fork: String
    var pin: String
    var tokenLabel: String?
    var tokenSerial: String?
    var keyLabel: String?
    var keyID: [UInt8]?
    var keyClass: String?
    var allowSessionObjects: Bool
    var timeout: Int
    var workers: Int
    /// Where to keep the traces of the runs through p11fork (nil: not kept).
    var traceDirectory: URL?
    /// pkcs11-provider's pkcs11.so, with --consumer provider: its scenario runs too.
    var provider: String? = nil
    /// The user the children of the worker-switches-user scenario become.
    var workerUser = "nobody"

    var scenarios: [DoctorScenario] { DoctorScenario.allCases.filter { $0 != .providerWorkers || provider != nil } }
    var keyNamed: Bool { keyLabel != nil || keyID != nil }
}

/// Runs the probe and the scenarios, directly and through p11fork, each in a helper process;
/// tries the other strategies when `auto` leaves a scenario failing.
struct Doctor {
    /// In the order tried: the broker last (it costs every call a round trip).
    static let strategies = ([.auto, .freshCopy, .outOfProcess, .reinitialize, .broker] as [StrategyName]).map(\.rawValue)

    let plan: DoctorPlan
    let helper: HelperProcess
    let progress: (String) -> Void
    private let workDirectory: URL

    init(plan: DoctorPlan, progress: @escaping (String) -> Void) throws {
        self.plan = plan
        self.progress = progress
        workDirectory = FileManager.default.temporaryDirectory.appendingPathComponent("p11fork-doctor-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: workDirectory, withIntermediateDirectories: true)
        // The helper is this very executable, started afresh.
        helper = HelperProcess(executable: URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path,
                               workDirectory: workDirectory)
        if let traces = plan.traceDirectory {
            try FileManager.default.createDirectory(at: traces, withIntermediateDirectories: true)
        }
    }

    func cleanUp() { try? FileManager.default.removeItem(at: workDirectory) }

    func title(_ scenario: DoctorScenario) -> String { scenario.title(workers: plan.workers, user: plan.workerUser) }

    // MARK: the runs

    /// Through p11fork, or directly on the module.
    enum Route: Equatable {
        case direct
        case p11fork(strategy: String)
    }

    private func arguments(_ scenario: String, _ route: Route, key: ProbeResult?) -> [String] {
        var arguments = ["doctor-helper", "--module", route == .direct ? plan.module : plan.p11fork, "--scenario", scenario,
                         "--timeout", String(plan.timeout), "--workers", String(plan.workers)]
        if let token = key?.tokenLabel ?? plan.tokenLabel { arguments += ["--token", token] }
        if let serial = key.map({ $0.tokenSerial.isEmpty ? nil : $0.tokenSerial }) ?? plan.tokenSerial { arguments += ["--serial", serial] }
        // After the probe, every run uses exactly the key the probe chose.
        let label = key.map { $0.keyLabel.isEmpty ? nil : $0.keyLabel } ?? plan.keyLabel
        let id = key.map { $0.keyID.isEmpty ? nil : $0.keyID } ?? plan.keyID.map { $0.map { String(format: "%02x", $0) }.joined() }
        if let label { arguments += ["--key-label", label] }
        if let id { arguments += ["--key-id", id] }
        if let keyClass = key?.keyClass ?? plan.keyClass { arguments += ["--key-class", keyClass] }
        if scenario == DoctorScenario.workerSwitchesUser.rawValue { arguments += ["--worker-user", plan.workerUser] }
        if scenario == DoctorScenario.providerWorkers.rawValue, let provider = plan.provider {
            arguments += ["--provider", provider]
        }
        return arguments
    }

    private func environment(_ route: Route, trace: URL?) -> [String: String] {
        var environment = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("P11FORK_") }
        if case .p11fork(let strategy) = route {
            environment["P11FORK_MODULE"] = plan.module
            if strategy != "auto" { environment["P11FORK_STRATEGY"] = strategy }
            if let trace {
                environment["P11FORK_TRACE"] = trace.path
                environment["P11FORK_TRACE_LEVEL"] = "fork"
                environment["P11FORK_TRACE_FORMAT"] = "json"
            }
        }
        return environment
    }

    private func traceFile(_ scenario: String, _ route: Route) -> URL? {
        guard case .p11fork(let strategy) = route else { return nil }
        return (plan.traceDirectory ?? workDirectory).appendingPathComponent("\(scenario)-\(strategy).json")
    }

    func runHelper(_ scenario: String, _ route: Route, key: ProbeResult?) throws -> HelperProcess.Run {
        let arguments = arguments(scenario, route, key: key)
        let trace = traceFile(scenario, route)
        if let trace { try? FileManager.default.removeItem(at: trace) }
        // Each child has `timeout` seconds; the pool's are staggered; the parent's own calls on top.
        let deadline = plan.timeout * 3 + 20
        return try helper.run(arguments, environment: environment(route, trace: trace), input: plan.pin, timeout: deadline)
    }

    /// One scenario's outcome; through p11fork, a failure is completed with the trace's errors.
    func outcome(_ scenario: DoctorScenario, _ route: Route, key: ProbeResult) throws -> ScenarioOutcome {
        if scenario == .sessionObject && !plan.allowSessionObjects {
            return ScenarioOutcome(status: .skipped, detail: "creates a session key: run with --allow-session-objects")
        }
        let run = try runHelper(scenario.rawValue, route, key: key)
        var outcome = ScenarioOutcome(run: run)
        if scenario == .providerWorkers, outcome.isBroken,
           let said = run.stderr.split(separator: "\n").first(where: { $0.contains(":error:") }) {
            // OpenSSL's error line names the provider's reason ("Module re-initialization failed!").
            outcome.detail += "; OpenSSL says: \(said.split(separator: ":", maxSplits: 5).last ?? said)"
        }
        if outcome.isBroken, let trace = traceFile(scenario.rawValue, route),
           let text = try? String(contentsOf: trace, encoding: .utf8) {
            let errors = TraceFile(text: text).records.compactMap { record -> String? in
                if case .event(let level, let message) = record.kind, level == "error" { return message }
                return nil
            }
            if let first = errors.first { outcome.detail += "; p11fork's trace says: \(first)" }
        }
        return outcome
    }

    // MARK: the probe

    /// What the probe found: the token, the key and how it signs.
    struct ProbeResult {
        var tokenLabel: String
        var tokenSerial: String
        var keyClass: String
        var keyType: String
        var keyLabel: String
        var keyID: String
        var mechanism: String
        var multipartMechanism: String
        var check: String
    }

    /// Loads the module directly, finds token and key, logs in once and signs once: if the PIN is
    /// wrong, nothing else runs (the token must not be locked by the doctor's many logins).
    func probeDirectly() throws -> ProbeResult {
        progress("checking the module, the token, the PIN and the key (directly)")
        let run = try runHelper("probe", .direct, key: nil)
        let fields = run.fields
        guard let result = fields["result"], result.hasPrefix("ok") else {
            throw Self.probeProblem(run: run, plan: plan)
        }
        return ProbeResult(tokenLabel: fields["token"] ?? "", tokenSerial: fields["token-serial"] ?? "",
                           keyClass: fields["key-class"] ?? "", keyType: fields["key-type"] ?? "",
                           keyLabel: fields["key-label"] ?? "", keyID: fields["key-id"] ?? "",
                           mechanism: fields["mechanism"] ?? "", multipartMechanism: fields["multipart-mechanism"] ?? "",
                           check: fields["check"] ?? "")
    }

    /// The same through p11fork: nil when it works, else why not (p11fork's own stderr line first).
    func probeThroughP11Fork(_ key: ProbeResult) throws -> String? {
        progress("checking the same through p11fork")
        let run = try runHelper("probe", .p11fork(strategy: "auto"), key: key)
        if run.fields["result"]?.hasPrefix("ok") == true { return nil }
        let p11forkSaid = run.stderr.split(separator: "\n").first { $0.hasPrefix("p11fork:") }.map(String.init)
        return p11forkSaid ?? ScenarioOutcome(run: run).detail
    }

    /// A failed probe as the error the user sees: arguments to fix (exit 2) or a module problem (1).
    static func probeProblem(run: HelperProcess.Run, plan: DoctorPlan) -> Error {
        let result = run.fields["result"] ?? ""
        let parts = result.split(separator: " ", maxSplits: 2).map(String.init)
        guard parts.count == 3, parts[0] == "error" else {
            let outcome = ScenarioOutcome(run: run)
            return CommandFailure("the module failed before any fork, in the doctor's first use of it: \(outcome.detail)")
        }
        let detail = parts[2]
        switch parts[1] {
        case "module":
            return UsageError("--module \(plan.module): \(detail): name the vendor's PKCS#11 module (a shared library exporting C_GetFunctionList)")
        case "token-missing":
            return UsageError("\(detail): name the token with --token LABEL or --uri 'pkcs11:token=LABEL'")
        case "token-ambiguous":
            return UsageError("the module has \(detail): name one with --token LABEL")
        case "login":
            if detail.contains("CKR_PIN_LOCKED") {
                return UsageError("the user PIN is locked (\(detail)): unlock it with the token's SO before running the doctor")
            }
            if ["CKR_PIN_INCORRECT", "CKR_PIN_INVALID", "CKR_PIN_LEN_RANGE"].contains(where: detail.contains) {
                return UsageError("the token refused the PIN (\(detail)): check the PIN; the doctor stopped after this one attempt so as not to lock the token")
            }
            return CommandFailure("logging in failed: \(detail)")
        case "key-missing":
            return UsageError("\(detail): name a key that can sign with --key LABEL or --uri '…;object=LABEL'")
        case "key-unusable":
            return UsageError("\(detail): name another key with --key LABEL")
        case "initialize":
            return CommandFailure("the module does not initialise (\(detail)): check the module's own configuration (for SoftHSM, SOFTHSM2_CONF)")
        case "usage":
            return UsageError(detail)
        default:
            return CommandFailure("the module failed before any fork: \(detail)")
        }
    }
}

// MARK: the whole examination

extension Doctor {
    func examine() throws -> DoctorReport {
        let key = try probeDirectly()
        let p11forkProblem = try probeThroughP11Fork(key)
        var direct: [DoctorScenario: ScenarioOutcome] = [:]
        for scenario in plan.scenarios {
            if !(scenario == .sessionObject && !plan.allowSessionObjects) { progress("\(title(scenario)), directly") }
            direct[scenario] = try outcome(scenario, .direct, key: key)
        }

        var attempts: [DoctorReport.StrategyAttempt] = []
        if let p11forkProblem {
            let outcomes = plan.scenarios.map { scenario in
                direct[scenario]!.status == .skipped ? direct[scenario]! : ScenarioOutcome(status: .error, detail: p11forkProblem)
            }
            attempts.append(attempt("auto", outcomes, direct: direct))
        } else {
            for strategy in Self.strategies {
                var outcomes: [ScenarioOutcome] = []
                for scenario in plan.scenarios {
                    if direct[scenario]!.status == .skipped { outcomes.append(direct[scenario]!); continue }
                    progress("\(title(scenario)), through p11fork (strategy \(strategy))")
                    outcomes.append(try outcome(scenario, .p11fork(strategy: strategy), key: key))
                }
                attempts.append(attempt(strategy, outcomes, direct: direct))
                if attempts.last!.failures == 0 { break }
            }
        }

        let passing = attempts.first { $0.failures == 0 }
        let shown = passing ?? attempts.min { $0.failures < $1.failures }!
        let scenarios = plan.scenarios.map { scenario in
            DoctorReport.Scenario(id: scenario.rawValue, title: title(scenario), direct: direct[scenario]!,
                                  p11fork: shown.outcomes[scenario.rawValue]!)
        }
        let counted = scenarios.filter { $0.direct.counts }
        let broken = counted.filter { $0.direct.isBroken }.count
        let strategy = p11forkProblem == nil ? passing?.strategy : nil
        let choices = shown.strategy == "auto" && p11forkProblem == nil ? autoChoices() : []
        return DoctorReport(
            module: plan.module, p11fork: plan.p11fork, token: key.tokenLabel, tokenSerial: key.tokenSerial,
            key: DoctorReport.Key(label: key.keyLabel, id: key.keyID, keyClass: key.keyClass, type: key.keyType,
                                  chosen: plan.keyNamed ? "named" : "first signing key on the token", mechanism: key.mechanism,
                                  multipartMechanism: key.multipartMechanism.isEmpty ? nil : key.multipartMechanism,
                                  signatureCheck: key.check),
            scenarios: scenarios, scenariosRun: counted.count, brokenDirectly: broken,
            failingWithP11fork: shown.failures, strategy: strategy, strategiesTried: attempts, p11forkProblem: p11forkProblem,
            allPassWithP11fork: shown.failures == 0 && p11forkProblem == nil,
            verdict: DoctorReport.verdict(brokenDirectly: broken, run: counted.count, failing: shown.failures,
                                          strategy: strategy, problem: p11forkProblem, choices: choices),
            configuration: p11forkProblem == nil
                ? DoctorReport.configuration(module: plan.module, p11fork: plan.p11fork, strategy: shown.strategy, choices: choices) : nil,
            autoChoices: shown.strategy == "auto" && p11forkProblem == nil ? choices : nil
        )
    }

    /// What `auto` chose in the children of each scenario, from the lines p11fork's trace says it
    /// with, grouped by strategy and reason.
    private func autoChoices() -> [DoctorReport.AutoChoice] {
        var choices: [DoctorReport.AutoChoice] = []
        for scenario in plan.scenarios {
            guard let trace = traceFile(scenario.rawValue, .p11fork(strategy: "auto")),
                  let text = try? String(contentsOf: trace, encoding: .utf8) else { continue }
            guard let (strategy, why) = TraceFile(text: text).records.lazy.compactMap(Self.autoChoice).first else { continue }
            if let index = choices.firstIndex(where: { $0.strategy == strategy && $0.why == why }) {
                choices[index].scenarios.append(title(scenario))
            } else {
                choices.append(DoctorReport.AutoChoice(strategy: strategy, why: why, scenarios: [title(scenario)]))
            }
        }
        return choices
    }

    /// The strategy and reason a trace line gives for how a child recovers, by its fields (the
    /// doctor's traces are JSON): `auto`'s decision, or a child that made a private copy work.
    static func autoChoice(_ record: TraceRecord) -> (strategy: String, why: String)? {
        guard case .event(_, let message) = record.kind, let fields = record.fields, let strategy = fields.strategy else { return nil }
        if fields.kind == .decision { return (strategy.rawValue, message) }
        if fields.step == .module, fields.outcome == .ok, strategy == .freshCopy {
            return (strategy.rawValue, "the child can run the module itself: it loads and initialises a private copy of it")
        }
        return nil
    }

    /// A scenario fails through p11fork when it breaks, or cannot run where it ran directly.
    private func attempt(_ strategy: String, _ outcomes: [ScenarioOutcome], direct: [DoctorScenario: ScenarioOutcome])
        -> DoctorReport.StrategyAttempt {
        var byID: [String: ScenarioOutcome] = [:]
        var failures = 0
        for (scenario, outcome) in zip(plan.scenarios, outcomes) {
            byID[scenario.rawValue] = outcome
            if outcome.isBroken || (direct[scenario]!.counts && !outcome.counts) { failures += 1 }
        }
        return DoctorReport.StrategyAttempt(strategy: strategy, failures: failures, outcomes: byID)
    }
}
