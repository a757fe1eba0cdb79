import Foundation

/// The fork scenarios the doctor runs (each implemented in DoctorScenarios/doctor_scenarios.c).
enum DoctorScenario: String, CaseIterable, Codable, Sendable {
    /// The parent logs in, finds the key and signs; the child signs with the inherited handles.
    case inheritedSession = "inherited-session"
    /// The old rule: the child calls C_Initialize, opens a session and logs in again.
    case childReinitializes = "child-reinitializes"
    /// The child logs out, closes the session and finalizes; the parent goes on signing.
    case childFinalizes = "child-finalizes"
    /// Several children at once, each signing a few times with the parent's handles.
    case workerPool = "worker-pool"
    /// The same pool, every child let go at the same instant: all recover the module at once.
    case simultaneousWorkers = "simultaneous-workers"
    /// Run as root, each child of the pool switches to another user (--worker-user) before its
    /// first call, as a web server's workers do: the child lacks the rights the module needs.
    case workerSwitchesUser = "worker-switches-user"
    /// A session key made by C_CreateObject in the parent, used in the child (opt-in).
    case sessionObject = "session-object"
    /// C_SignInit and a first C_SignUpdate in the parent, the rest and C_SignFinal in the child.
    case operationInProgress = "operation-in-progress"
    /// Through OpenSSL 3's pkcs11-provider (--consumer provider): the parent loads the key
    /// through OSSL_STORE, forked workers sign with it, the parent keeps signing.
    case providerWorkers = "provider-workers"

    func title(workers: Int, user: String = "nobody") -> String {
        switch self {
        case .inheritedSession: return "inherited session"
        case .childReinitializes: return "child re-initialises"
        case .childFinalizes: return "child finalizes"
        case .workerPool: return "worker pool (\(workers) children)"
        case .simultaneousWorkers: return "\(workers) workers at the same instant"
        case .workerSwitchesUser: return "\(workers) workers that switch to \(user)"
        case .sessionObject: return "session object"
        case .operationInProgress: return "operation in progress"
        case .providerWorkers: return "pkcs11-provider, \(workers) forked workers"
        }
    }
}

/// What one scenario gave, directly or through p11fork.
struct ScenarioOutcome: Codable, Equatable, Sendable {
    enum Status: String, Codable, Sendable {
        case ok
        case fail
        /// A child or the helper did not answer in time and was killed.
        case hung
        case crashed
        /// The module cannot do what the scenario needs (no mechanism, refuses C_CreateObject).
        case notApplicable = "n/a"
        /// Not run: needs --allow-session-objects.
        case skipped
        /// The scenario could not even start (set-up before any fork failed).
        case error
    }

    var status: Status
    var detail: String

    /// Counts as the module breaking after fork.
    var isBroken: Bool { [.fail, .hung, .crashed, .error].contains(status) }
    /// Takes part in "N of M scenarios".
    var counts: Bool { status != .notApplicable && status != .skipped }

    /// The short form for a table cell.
    var cell: String {
        switch status {
        case .ok: return "ok"
        case .notApplicable: return "n/a"
        case .skipped: return "skipped"
        case .hung: return "HUNG"
        case .crashed: return "CRASHED"
        case .error: return "ERROR"
        case .fail:
            if let code = detail.firstMatch(of: /CKR_[A-Z0-9_]+/) { return "FAIL \(code.output)" }
            if detail.contains("hung") { return "FAIL hung" }
            if detail.contains("crashed") { return "FAIL crashed" }
            return "FAIL wrong result"
        }
    }

    /// What the helper's run says: its "result:" line, or how it ended without one.
    init(run: HelperProcess.Run) {
        let result = run.fields["result"] ?? ""
        let word = result.split(separator: " ", maxSplits: 1).first.map(String.init) ?? ""
        let rest = result.split(separator: " ", maxSplits: 1).dropFirst().first.map(String.init) ?? ""
        switch word {
        case "ok": self.init(status: .ok, detail: rest)
        case "fail": self.init(status: rest.contains(" hung (") ? .hung : rest.contains(" crashed (") ? .crashed : .fail, detail: rest)
        case "n/a": self.init(status: .notApplicable, detail: rest)
        case "error":
            // "error CODE detail": the code is for the doctor, the detail for people.
            let detail = rest.split(separator: " ", maxSplits: 1).dropFirst().first.map(String.init) ?? rest
            self.init(status: .error, detail: detail)
        default:
            switch run.ending {
            case .timedOut(let seconds):
                self.init(status: .hung, detail: "no result within \(seconds) s: the helper and its children were killed")
            case .signaled(let signal) where signal == SIGALRM:
                self.init(status: .hung, detail: "the parent process hung (its alarm fired)")
            case .signaled(let signal):
                self.init(status: .crashed, detail: "the parent process crashed (signal \(signal), \(String(cString: strsignal(signal))))")
            case .exited(let status):
                let said = run.stderr.split(separator: "\n").first.map { ": \($0)" } ?? ""
                self.init(status: .error, detail: "the helper exited with status \(status) and no result\(said)")
            }
        }
    }

    init(status: Status, detail: String) {
        self.status = status
        self.detail = detail
    }
}
