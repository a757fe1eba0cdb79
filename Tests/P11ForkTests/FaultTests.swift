import Foundation
import Testing

/// Faults from the real module (docs/FORK.md "Faults from the real module"): SoftHSM behind the
/// fault-injecting test module (Tests/Modules/FaultyModule), driven by
/// Tests/Tools/Faults. Each test asserts the exact codes the application's calls get, the
/// trace line, and from the faulty module's call log how often each real function was called in
/// the child (no retry loop, a PIN tried at most once); after each run the parent still signs and
/// verifies. Where the application's view without p11fork means something, the same run is made
/// directly against the faulty module and must give the same codes.
@Suite(.serialized) struct FaultTests {
    // Return codes (PKCS#11 2.40 section 11.1), as the driver prints them.
    static let ok = "0", hostMemory = "2", deviceError = "30", deviceRemoved = "32", objectHandleInvalid = "82",
               pinIncorrect = "a0", pinExpired = "a3", pinLocked = "a4", sessionClosed = "b0", sessionHandleInvalid = "b3",
               tokenNotPresent = "e0", userNotLoggedIn = "101"

    final class Setup {
        let token: SoftHSMToken
        let directory: URL
        var control: String { directory.appendingPathComponent("control").path }
        var log: String { directory.appendingPathComponent("calls.log").path }
        var trace: String { directory.appendingPathComponent("trace.log").path }

        init() throws {
            // SoftHSM's default mode: a child without p11fork keeps working on what it inherited,
            // so the direct runs show what the faults alone do.
            token = try SoftHSMToken()
            try token.generateKeyPair(label: "fault-key")
            directory = token.directory
        }
    }

    struct Outcome {
        let result: ProcessResult
        let trace: String
        /// The faulty module's log: (pid, function, rv in hex).
        let calls: [(pid: String, function: String, rv: String)]
        var succeeded: Bool { result.status == 0 && result.stdout.contains("result: ok") }
        /// Calls made by processes other than the parent (the first to log a call).
        var childCalls: [(pid: String, function: String, rv: String)] { calls.filter { $0.pid != calls.first?.pid } }
        func childCount(_ function: String) -> Int { childCalls.filter { $0.function == function }.count }
        func answers(_ who: String) -> [String] {
            result.stdout.split(separator: "\n").compactMap { line in
                guard line.hasPrefix("\(who): call "), let arrow = line.range(of: "-> 0x") else { return nil }
                return String(line[arrow.upperBound...])
            }
        }
        var report: String {
            "status \(result.status)\(result.timedOut ? " (timed out)" : "")\n\(result.output)\ntrace:\n\(trace)\ncalls:\n"
                + calls.map { "\($0.pid) \($0.function) \($0.rv)" }.joined(separator: "\n")
        }
    }

    /// One run of the driver; `arguments` are its fault options.
    static func run(_ setup: Setup, throughP11Fork: Bool, _ arguments: [String], strategy: String? = nil) throws -> Outcome {
        for path in [setup.log, setup.trace] { try? FileManager.default.removeItem(atPath: path) }
        let faulty = Products.path("libp11fork-test-faulty.so")
        var environment = setup.token.environment
        environment["FAULTY_MODULE"] = RealModules.softHSM
        environment["FAULTY_CONTROL"] = setup.control
        environment["FAULTY_LOG"] = setup.log
        if throughP11Fork {
            environment["P11FORK_MODULE"] = faulty
            environment["P11FORK_TRACE"] = setup.trace
            environment["P11FORK_TRACE_LEVEL"] = "calls"
            environment["P11FORK_STRATEGY"] = strategy
        }
        let result = try runProgram(Products.path("p11fork-faults"),
                                    ["--module", throughP11Fork ? Products.module : faulty, "--token", setup.token.label,
                                     "--pin", setup.token.pin, "--key", "fault-key", "--control", setup.control] + arguments,
                                    environment: environment, timeout: Baseline.timeout(through: throughP11Fork, else: 120))
        Baseline.note("faults", result, through: throughP11Fork)
        let log = (try? String(contentsOfFile: setup.log, encoding: .utf8)) ?? ""
        let calls = log.split(separator: "\n").compactMap { line -> (String, String, String)? in
            let fields = line.split(separator: " ")
            return fields.count == 3 ? (String(fields[0]), String(fields[1]), String(fields[2].dropFirst(2))) : nil
        }
        let outcome = Outcome(result: result, trace: (try? String(contentsOfFile: setup.trace, encoding: .utf8)) ?? "", calls: calls)
        #expect(!outcome.trace.contains(setup.token.pin) && !outcome.result.output.contains(setup.token.pin),
                "the PIN is in the trace or the output")
        return outcome
    }

    static func expect(_ codes: [String]) -> [String] { ["--expect", codes.joined(separator: ",")] }

    /// Errors the real module answers in a process that never forked pass through unchanged, one
    /// real call per application call, and are not taken for a fork.
    @Test(arguments: [
        ("C_SignInit CKR_DEVICE_ERROR", [deviceError, deviceError, deviceError, deviceError]),
        ("C_SignInit CKR_DEVICE_REMOVED", [deviceRemoved, deviceRemoved, deviceRemoved, deviceRemoved]),
        // The real session closed under the application: later calls get what the module says of a
        // closed session; closing the last one logged the token out (SoftHSM then hides the key).
        ("session closed", [sessionClosed, sessionHandleInvalid, objectHandleInvalid, sessionHandleInvalid]),
        // The token pulled out: its sessions' calls, then opening one.
        ("token absent", [deviceRemoved, deviceRemoved, tokenNotPresent, deviceRemoved]),
    ])
    func realModuleErrorsInAProcessThatNeverForked(_ fault: String, _ codes: [String]) throws {
        let setup = try Setup()
        let arguments = ["--in-parent", "--fault", fault] + Self.expect(codes)
        let direct = try Self.run(setup, throughP11Fork: false, arguments)
        #expect(direct.succeeded && direct.answers("parent") == codes, "directly: \(direct.report)")
        let through = try Self.run(setup, throughP11Fork: true, arguments)
        #expect(through.succeeded && through.answers("parent") == codes, "through p11fork: \(through.report)")
        // Exactly the real calls the application made directly: nothing retried, nothing added.
        let real = { (o: Outcome) in o.calls.filter { ["C_SignInit", "C_Sign", "C_Initialize", "C_Login"].contains($0.function) }.map { "\($0.function) \($0.rv)" } }
        #expect(real(through) == real(direct), "\(through.report)")
        #expect(!through.trace.contains("fork detected"), "\(through.report)")
        let name = ["session closed": "CKR_SESSION_CLOSED", "token absent": "CKR_DEVICE_REMOVED"][fault] ?? String(fault.split(separator: " ")[1])
        #expect(through.trace.split(separator: "\n").contains { $0.contains("C_SignInit(") && $0.contains(") = \(name) ") },
                "no trace line with the error: \(through.report)")
    }

    /// After recovery, errors the child's module answers pass through unchanged, as they do
    /// directly, and never start a second recovery.
    @Test(arguments: [
        ("C_SignInit CKR_DEVICE_ERROR", [ok, deviceError, deviceError, deviceError], [ok, deviceError, deviceError, deviceError]),
        ("C_SignInit CKR_DEVICE_REMOVED", [ok, deviceRemoved, deviceRemoved, deviceRemoved], [ok, deviceRemoved, deviceRemoved, deviceRemoved]),
        // Call 3: directly, the child's only session was closed, which logged it out; through
        // p11fork the child keeps a session of its own (the one it re-found the key with), and its login.
        ("session closed", [ok, sessionClosed, objectHandleInvalid, sessionHandleInvalid], [ok, sessionClosed, ok, sessionHandleInvalid]),
    ])
    func realModuleErrorsInAChildAfterRecovery(_ fault: String, _ directCodes: [String], _ codes: [String]) throws {
        let setup = try Setup()
        let direct = try Self.run(setup, throughP11Fork: false, ["--child-fault", fault] + Self.expect(directCodes))
        #expect(direct.succeeded && direct.answers("child") == directCodes, "directly: \(direct.report)")
        let through = try Self.run(setup, throughP11Fork: true, ["--child-fault", fault, "--scan-child"] + Self.expect(codes))
        #expect(through.succeeded && through.answers("child") == codes, "through p11fork: \(through.report)")
        // The replayed login's PIN is still kept in the child (what the scan of a failed replay must not find).
        #expect(through.result.stdout.contains("the PIN is in the child's memory 1 time(s)"), "\(through.report)")
        #expect(through.childCount("C_Initialize") == 1, "one recovery only: \(through.report)")
        #expect(through.childCount("C_Login") == 1, "one login replay only: \(through.report)")
        #expect(through.trace.components(separatedBy: "fork detected").count == 2, "\(through.report)")
        // Each faulted application call reached the module once.
        let faulted = through.childCalls.filter { $0.rv != "0" && ["C_SignInit", "C_Sign"].contains($0.function) }.count
        #expect(faulted == codes.filter { $0 != Self.ok }.count, "\(through.report)")
    }

    /// The real C_Initialize fails in the child: every call of the child answers that code, or
    /// CKR_DEVICE_ERROR when it is not a code any call may answer; the module is called only for
    /// the tries (one with a fresh copy, one in place), which come at the child's calls once due: the
    /// driver pauses 300 ms before each call, longer than the first three delays (50, 100, 200 ms),
    /// so each of the four calls makes one try. No PIN is sent, the parent signs on.
    @Test(arguments: [("CKR_DEVICE_ERROR", deviceError), ("CKR_HOST_MEMORY", hostMemory),
                      ("CKR_CRYPTOKI_ALREADY_INITIALIZED", deviceError)])
    func initializeFailsInTheChild(_ code: String, _ answer: String) throws {
        let setup = try Setup()
        let codes = [answer, answer, answer, answer]
        let through = try Self.run(setup, throughP11Fork: true, ["--fault", "C_Initialize \(code) child", "--pause", "300"] + Self.expect(codes))
        #expect(through.succeeded && through.answers("child") == codes, "\(through.report)")
        #expect(through.childCount("C_Initialize") == 8 && through.childCalls.count == 8,
                "the child's module calls: \(through.report)")
        #expect(through.trace.contains("calling C_Initialize of the fresh copy of the module")
                && through.trace.contains("calling C_Initialize of the inherited module, in place"), "\(through.report)")
        #expect(through.trace.contains("error: no working module in this child (try 1): ") && through.trace.contains("every call answers CKR_")
                && through.trace.contains("no working module in this child (try 4): "), "\(through.report)")
    }

    /// With a strategy that has one way to a module, the real C_Initialize is called once a try
    /// (four tries: see initializeFailsInTheChild).
    @Test(arguments: [("fresh-copy", "the fresh copy of the module"), ("reinitialize", "the inherited module, in place")])
    func initializeFailsOnceATryWithAOneWayStrategy(_ strategy: String, _ which: String) throws {
        let setup = try Setup()
        let codes = [Self.deviceError, Self.deviceError, Self.deviceError, Self.deviceError]
        let through = try Self.run(setup, throughP11Fork: true,
                                   ["--fault", "C_Initialize CKR_DEVICE_ERROR child", "--pause", "300"] + Self.expect(codes),
                                   strategy: strategy)
        #expect(through.succeeded && through.answers("child") == codes, "\(through.report)")
        #expect(through.childCalls.map(\.function) == Array(repeating: "C_Initialize", count: 4), "the child's module calls: \(through.report)")
        #expect(through.trace.contains("calling C_Initialize of \(which)"), "\(through.report)")
    }

    /// The real C_Initialize never returns in the child: the trace names the call the child waits
    /// in; the child's second thread waits asleep (no CPU burnt), the parent is unharmed.
    @Test func initializeHangsInTheChild() throws {
        let setup = try Setup()
        let through = try Self.run(setup, throughP11Fork: true, ["--fault", "C_Initialize hang child", "--hang", "3"])
        #expect(through.succeeded, "\(through.report)")
        let cpu = through.result.stdout.firstMatch(of: /it used (\d+) clock ticks of CPU/).map { Int($0.1)! }
        // 3 s of a thread spinning would be about 300 ticks (fewer on a loaded machine); asleep, about 0.
        #expect(cpu != nil && cpu! <= 30, "\(through.report)")
        // The child's lines: not the parent's, nor the broker's (which the parent starts at its fork).
        let child = through.trace.split(separator: "\n").filter { !$0.contains("p11fork[\(through.calls.first?.pid ?? "?")/") && !$0.contains("] broker: ") }
        #expect(child.last?.contains("calling C_Initialize of the fresh copy of the module") == true, "\(through.report)")
        #expect(!through.trace.contains("module ready in the child"), "\(through.report)")
    }

    /// The PIN is wrong, locked or expired between parent and child: the login replay is made
    /// once, answers that verdict, and is not tried again whatever the child does next (the driver
    /// pauses 300 ms before each call, so a retry would have been due); the calls that need the
    /// login answer the same code; the kept PIN is gone from the child's memory (a child whose
    /// replay worked holds one copy: the scan finds it); the parent's login is untouched. (A
    /// failure that is no verdict on the PIN is tried again: ConcurrentRecoveryTests.)
    @Test(arguments: [("CKR_PIN_LOCKED", pinLocked), ("CKR_PIN_EXPIRED", pinExpired), ("CKR_PIN_INCORRECT", pinIncorrect)])
    func loginReplayFailsInTheChild(_ code: String, _ answer: String) throws {
        let setup = try Setup()
        let codes = [answer, answer, answer, answer]
        let through = try Self.run(setup, throughP11Fork: true,
                                   ["--fault", "C_Login \(code) child", "--scan-child", "--pause", "300"] + Self.expect(codes))
        #expect(through.succeeded && through.answers("child") == codes, "\(through.report)")
        #expect(through.childCount("C_Login") == 1, "the PIN was sent more than once: \(through.report)")
        #expect(through.result.stdout.contains("the PIN is in the child's memory 0 time(s)"), "\(through.report)")
        #expect(through.childCount("C_Initialize") == 1, "\(through.report)")
        #expect(through.trace.components(separatedBy: "login replay failed").count == 2
                && through.trace.contains("answered \(code); the kept PIN is wiped and will not be tried again"), "\(through.report)")
        #expect(through.trace.contains("not re-found (CKO_PRIVATE_KEY") && !through.trace.contains("is lost in this child"),
                "\(through.report)")
    }

    /// The token is gone from its slot in the child: the child's calls get what the module answers
    /// for an empty slot, as they do directly: CKR_DEVICE_REMOVED on a session, CKR_TOKEN_NOT_PRESENT
    /// on opening one; one C_OpenSession per call, the module initialised once, no PIN sent.
    @Test func tokenRemovedInTheChild() throws {
        let setup = try Setup()
        let codes = [Self.deviceRemoved, Self.deviceRemoved, Self.tokenNotPresent, Self.deviceRemoved]
        let arguments = ["--fault", "token absent child"] + Self.expect(codes)
        let direct = try Self.run(setup, throughP11Fork: false, arguments)
        #expect(direct.succeeded && direct.answers("child") == codes, "directly: \(direct.report)")
        let through = try Self.run(setup, throughP11Fork: true, arguments)
        #expect(through.succeeded && through.answers("child") == codes, "through p11fork: \(through.report)")
        #expect(through.childCount("C_Initialize") == 1 && through.childCount("C_Finalize") == 0, "\(through.report)")
        #expect(through.childCount("C_OpenSession") == 4 && through.childCount("C_Login") == 0, "\(through.report)")
        // Both of SoftHSM's tokens are gone (the free slot's uninitialised one too): both are named.
        #expect(through.trace.contains("no token present in the slot of token '', 'p11fork-test' (removed?)")
                && through.trace.contains("C_OpenSession answered CKR_TOKEN_NOT_PRESENT; the call answers CKR_DEVICE_REMOVED"),
                "\(through.report)")
    }
}
