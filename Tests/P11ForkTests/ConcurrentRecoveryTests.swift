import Foundation
import Glibc
import Testing

/// Children that recover at once (docs/DESIGN.md "Recovery in the child", "Threads and locks"):
/// worker pools whose workers all make their first call together, over SoftHSM with
/// `reset_on_fork`, whose file store a child may read while another child's login or
/// initialisation rewrites it; and the retry of a recovery step that failed without a verdict on
/// the PIN, pinned with the fault-injecting module (FaultTests' driver).
///
/// Each pool test first runs the pool directly against SoftHSM, where the workers must fail (the
/// run is bounded: the pool waits 30 s for its workers, gunicorn's requests 15 s each), then many
/// times through libp11fork.so, where no job may fail. No assertion depends on timing: a retry
/// test's driver pauses 300 ms before each call after the first, longer than the first three
/// delays before a next try (50, 100, 200 ms), so which tries are made does not depend on the
/// machine's load.
@Suite(.serialized) struct ConcurrentRecoveryTests {
    typealias Setup = PythonConsumerTests.Setup

    /// One run of an example with PyKCS11, directly (`through` false) or through p11fork; the
    /// number of jobs whose signature verified, read from the example's summary line.
    static func run(_ setup: Setup, _ script: String, _ extra: [String], through: Bool, timeout: TimeInterval)
        throws -> (verified: Int, report: String, trace: String) {
        let outcome = try PythonConsumerTests.run(setup, .pykcs11, script, extra, throughP11Fork: through, timeout: timeout)
        let verified = outcome.result.stdout.firstMatch(of: /(\d+) of \d+ signatures/).map { Int($0.1)! } ?? 0
        #expect(!outcome.trace.contains(setup.token.pin) && !outcome.result.output.contains(setup.token.pin), "the PIN appeared")
        return (verified, outcome.report, outcome.trace)
    }

    /// Directly once (every job fails), then `runs` times through p11fork (no job fails); the
    /// reports of the runs with failed jobs, at most three, are in the failure message. With
    /// `outsider`, a process of another tree logs in and out on the token all along (`outsider`), so
    /// that SoftHSM's token file is being rewritten while the workers recover; a run whose parent
    /// could not log in because of it (its own login, made without p11fork's help) is left out, and
    /// what must hold is that no worker is lost (`lostWorkers`): a job that comes while a retry is
    /// not yet due fails by design.
    static func check(_ script: String, jobs: Int, workers: Int, runs: Int, _ extra: [String], outsider: Bool = false) throws {
        let setup = try PythonConsumerTests.setUp(.softHSM)
        let direct = try run(setup, script, extra, through: false, timeout: 60)
        #expect(direct.verified < jobs, "directly, the workers signed: \(direct.report)")
        let other = outsider ? try startOutsider(setup) : nil
        defer {
            // SIGTERM did not end it (the loop went on after the test); SIGKILL does.
            if let other {
                other.kill()
                other.reap(within: 10)
            }
        }
        var failedJobs = 0
        var failedRuns: [String] = []
        var parentFailed = 0
        for number in 1...runs {
            let through = try run(setup, script, extra, through: true, timeout: 120)
            if outsider && (through.report.contains("opening token") || through.report.contains("no single token labelled")) {
                parentFailed += 1
                continue
            }
            #expect(through.trace.components(separatedBy: "fork detected").count > 2, "run \(number): \(through.report)")
            if outsider {
                let lost = lostWorkers(through.report)
                if !lost.isEmpty { failedRuns.append("run \(number): lost worker(s) \(lost.joined(separator: ", "))\n\(through.report)") }
                failedJobs += jobs - through.verified
            } else if through.verified != jobs {
                failedJobs += jobs - through.verified
                failedRuns.append("run \(number): \(through.verified) of \(jobs) verified\n\(through.report)")
            }
        }
        let reports = failedRuns.prefix(3).joined(separator: "\n\n")
        if outsider {
            #expect(parentFailed < runs, "the parent could not log in in any run")
            #expect(failedRuns.isEmpty, "\(failedRuns.count) of \(runs - parentFailed) runs lost a worker (\(failedJobs) failed jobs in all):\n\(reports)")
        } else {
            #expect(failedJobs == 0, "\(failedJobs) failed job(s) in \(failedRuns.count) of \(runs) runs with \(workers) workers:\n\(reports)")
        }
    }

    /// The workers of a pool run that failed every job they took after their first failure, five
    /// or more (a worker lost for its life: before the retry, 19 to 37 jobs each here), read from
    /// the example's lines "job N: worker PID: signature verified" (or the error).
    static func lostWorkers(_ output: String) -> [String] {
        var jobs: [String: [(job: Int, ok: Bool)]] = [:]
        for match in output.matches(of: /job (\d+): worker (\d+): ([^\n]*)/) {
            jobs[String(match.2), default: []].append((Int(match.1)!, match.3 == "signature verified"))
        }
        return jobs.compactMap { worker, taken in
            let ordered = taken.sorted { $0.job < $1.job }
            guard let first = ordered.firstIndex(where: { !$0.ok }) else { return nil }
            let after = ordered[first...]
            return after.count >= 5 && !after.contains(where: \.ok) ? worker : nil
        }
    }

    /// A multiprocessing pool of 4 workers, 40 jobs, 50 runs: every worker recovers at its first
    /// job, all at once.
    @Test func multiprocessingPoolOfFourRecoversAtOnce() throws {
        try Self.check("pool_sign.py", jobs: 40, workers: 4, runs: 50, ["4", "40"])
    }

    /// gunicorn with preload_app and 3 sync workers, 30 requests, 20 runs.
    @Test func gunicornWithThreeWorkersRecoversAtOnce() throws {
        try Self.check("run_gunicorn.py", jobs: 30, workers: 3, runs: 20, ["30", "3"])
    }

    /// The pool of 4, 40 runs, while another process logs in and out on the token all along: the
    /// tree lock does not reach it, so now and then a worker's module reads the token file half
    /// rewritten: the login replay answers CKR_USER_PIN_NOT_INITIALIZED, or the token is missing
    /// (before the retry, that worker failed every job it took: 6 of 111 runs here). The worker
    /// initialises its module again and tries again, and no worker is lost.
    @Test func multiprocessingPoolRecoversWhileAnotherProcessLogsIn() throws {
        try Self.check("pool_sign.py", jobs: 40, workers: 4, runs: 40, ["4", "40"], outsider: true)
    }

    /// Logs in and out on the token in a loop until killed, directly on SoftHSM, ignoring errors.
    static let outsider = """
        import os, sys, PyKCS11
        lib = PyKCS11.PyKCS11Lib()
        lib.load(sys.argv[1])
        slot = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == sys.argv[2]][0]
        pin = os.environ.pop("PIN")
        while True:
            try:
                session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
                try:
                    session.login(pin)
                    session.logout()
                finally:
                    session.closeSession()
            except PyKCS11.PyKCS11Error:
                pass
        """

    static func startOutsider(_ setup: Setup) throws -> Spawned {
        let script = setup.token.directory.appendingPathComponent("outsider.py")
        try outsider.write(to: script, atomically: true, encoding: .utf8)
        return try Spawned(PythonConsumerTests.python, [script.path, setup.realModule, setup.token.label],
                           environment: setup.environment.merging(["PIN": setup.token.pin]) { $1 },
                           input: .null, output: .null, errors: .null)
    }

    // MARK: the retry, pinned with faults

    static let pause = ["--pause", "300"]

    /// The child's first recovery of its module fails (C_Initialize answers CKR_DEVICE_ERROR in
    /// every way the strategy tries); the call answers that; the child's next call, once the retry
    /// is due, recovers the module and signs, and so do the calls after it.
    @Test(arguments: [("auto", 2), ("fresh-copy", 1)])
    func moduleRecoveryIsTriedAgain(_ strategy: String, _ failures: Int) throws {
        let setup = try FaultTests.Setup()
        let codes = [FaultTests.deviceError, FaultTests.ok, FaultTests.ok, FaultTests.ok]
        let through = try FaultTests.run(setup, throughP11Fork: true,
                                         ["--fault", "C_Initialize CKR_DEVICE_ERROR child x\(failures)"] + Self.pause + FaultTests.expect(codes),
                                         strategy: strategy)
        #expect(through.succeeded && through.answers("child") == codes, "\(through.report)")
        #expect(through.childCount("C_Initialize") == failures + 1, "one C_Initialize per way tried, then the retry: \(through.report)")
        #expect(through.childCount("C_Login") == 1, "\(through.report)")
        #expect(through.trace.contains("error: no working module in this child (try 1): ")
                && through.trace.contains("trying again to get a working module (try 2, \(strategy) strategy)")
                && through.trace.contains("module ready in the child (\(strategy) strategy, try 2, "), "\(through.report)")
    }

    /// The login replay fails with a code that is no verdict on the PIN, in a child that has
    /// nothing else open on its module: the module is initialised again (it may have read the token
    /// while another process rewrote it) and the replay tried again at once, in the same call.
    @Test(arguments: [("CKR_DEVICE_ERROR", FaultTests.deviceError), ("CKR_USER_PIN_NOT_INITIALIZED", "102")])
    func loginReplayIsTriedAgainAtOnceOnAModuleInitialisedAgain(_ code: String, _ answer: String) throws {
        let setup = try FaultTests.Setup()
        let codes = [FaultTests.ok, FaultTests.ok, FaultTests.ok, FaultTests.ok]
        let through = try FaultTests.run(setup, throughP11Fork: true, ["--fault", "C_Login \(code) child x1"] + FaultTests.expect(codes))
        #expect(through.succeeded && through.answers("child") == codes, "\(through.report)")
        #expect(through.childCount("C_Login") == 2 && through.childCount("C_Initialize") == 2 && through.childCount("C_Finalize") == 1,
                "\(through.report)")
        #expect(through.trace.contains("login replay failed (try 1): CKU_USER on slot 0x")
                && through.trace.contains("answered \(code), no verdict on the PIN")
                && through.trace.contains("module initialised again for another try of the login replay")
                && through.trace.contains("login replay tried again (try 2): CKU_USER on slot 0x"), "\(through.report)")
    }

    /// The login replay keeps failing without a verdict on the PIN: after the two tries on a module
    /// initialised again, the call answers the failure; the next call, once the retry is due,
    /// replays the login again and signs. The PIN stays kept (the scan finds the one copy a
    /// logged-in child keeps).
    @Test(arguments: [("CKR_DEVICE_ERROR", FaultTests.deviceError), ("CKR_USER_PIN_NOT_INITIALIZED", "102")])
    func loginReplayIsTriedAgainAtALaterCall(_ code: String, _ answer: String) throws {
        let setup = try FaultTests.Setup()
        let codes = [answer, FaultTests.ok, FaultTests.ok, FaultTests.ok]
        let through = try FaultTests.run(setup, throughP11Fork: true,
                                         ["--fault", "C_Login \(code) child x3", "--scan-child"] + Self.pause + FaultTests.expect(codes))
        #expect(through.succeeded && through.answers("child") == codes, "\(through.report)")
        #expect(through.childCount("C_Login") == 4 && through.childCount("C_Initialize") == 3, "\(through.report)")
        #expect(through.result.stdout.contains("the PIN is in the child's memory 1 time(s)"), "\(through.report)")
        #expect(through.trace.contains("login replay failed (try 3): CKU_USER on slot 0x")
                && through.trace.contains("login replay tried again (try 4): CKU_USER on slot 0x")
                && through.trace.contains(", try 4)"), "\(through.report)")
        #expect(!through.trace.contains("will not be tried again"), "\(through.report)")
    }

    // MARK: the tree lock

    /// Two children of one parent, over the fault-injecting module behind p11fork with PyKCS11:
    /// child A hangs in its module's C_Initialize, holding the tree lock; child B, forked once A's
    /// trace says it called C_Initialize, then needs the lock for its own recovery. `kill`: the
    /// parent kills A, and B takes the lock over (EOWNERDEAD). `wait`: A is left hanging; B goes
    /// on without the lock after the 30 s bound, and does not wait for A again for its login
    /// replay. Either way B recovers and signs as the parent did (exit 0), each child under
    /// alarm(60), so B would be killed had it waited twice.
    static let twoChildren = """
        import os, signal, sys, time, PyKCS11
        module, token, key, control, traces, mode = sys.argv[1:7]
        lib = PyKCS11.PyKCS11Lib()
        lib.load(module)
        slot = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == token][0]
        session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)
        session.login(os.environ.pop("PIN"))
        private = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_LABEL, key)])[0]
        mechanism = PyKCS11.Mechanism(PyKCS11.CKM_SHA256_RSA_PKCS)
        sign = lambda: bytes(session.sign(private, b"tree lock", mechanism))
        expected = sign()

        def control_says(text):
            with open(control + ".new", "w") as f:
                f.write(text)
            os.rename(control + ".new", control)

        def child():
            signal.alarm(60)
            try:
                os._exit(0 if sign() == expected else 3)
            except PyKCS11.PyKCS11Error as error:
                print(f"child {os.getpid()}: {error}", flush=True)
                os._exit(2)

        def trace_of(pid):
            try:
                with open(os.path.join(traces, f"{pid}.log")) as f:
                    return f.read()
            except OSError:
                return ""

        control_says("C_Initialize hang child\\n")
        a = os.fork()
        if a == 0:
            child()
        deadline = time.monotonic() + 30
        while "calling C_Initialize" not in trace_of(a) and time.monotonic() < deadline:
            time.sleep(0.05)
        control_says("")
        b = os.fork()
        if b == 0:
            child()
        if mode == "kill":
            os.kill(a, signal.SIGKILL)
        _, status = os.waitpid(b, 0)
        os.kill(a, signal.SIGKILL)
        os.waitpid(a, 0)
        print(f"child A {a}, child B {b}: B's exit status {os.waitstatus_to_exitcode(status)}", flush=True)
        sys.exit(0 if os.waitstatus_to_exitcode(status) == 0 else 1)
        """

    @Test(arguments: ["kill", "wait"])
    func treeLockHeldByAHungSibling(_ mode: String) throws {
        let setup = try FaultTests.Setup()
        let traces = setup.directory.appendingPathComponent("traces")
        try FileManager.default.createDirectory(at: traces, withIntermediateDirectories: true)
        let script = setup.directory.appendingPathComponent("two_children.py")
        try Self.twoChildren.write(to: script, atomically: true, encoding: .utf8)
        var environment = setup.token.environment
        environment["PIN"] = setup.token.pin
        environment["FAULTY_MODULE"] = RealModules.softHSM
        environment["FAULTY_CONTROL"] = setup.control
        environment["P11FORK_MODULE"] = Products.path("libp11fork-test-faulty.so")
        environment["P11FORK_TRACE"] = traces.appendingPathComponent("%p.log").path
        environment["P11FORK_TRACE_LEVEL"] = "fork"
        let result = try runProgram(PythonConsumerTests.python,
                                    [script.path, Products.module, setup.token.label, "fault-key", setup.control, traces.path, mode],
                                    environment: environment, timeout: 120)
        let files = (try? FileManager.default.contentsOfDirectory(at: traces, includingPropertiesForKeys: nil)) ?? []
        let trace = files.compactMap { try? String(contentsOf: $0, encoding: .utf8) }.joined()
        let report = "\(result.ending)\n\(result.output)\ntrace:\n\(trace)"
        #expect(result.status == 0 && !result.timedOut, "\(report)")
        if mode == "kill" {
            #expect(trace.contains("initialising the module: pid ") && trace.contains("ended while it held the tree lock; taken over"),
                    "\(report)")
        } else {
            #expect(trace.contains("initialising the module: pid ") && trace.contains("still holds the tree lock after 30 s; going on without it")
                    && trace.contains("login replay: pid ") && trace.contains("still holds the tree lock (not waited for again)"), "\(report)")
        }
        #expect(trace.contains("module ready in the child"), "\(report)")
        #expect(!trace.contains(setup.token.pin) && !result.output.contains(setup.token.pin), "the PIN appeared")
    }
}
