import Foundation
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
    /// reports of the runs with failed jobs, at most three, are in the failure message.
    static func check(_ script: String, jobs: Int, workers: Int, runs: Int, _ extra: [String]) throws {
        let setup = try PythonConsumerTests.setUp(.softHSM)
        let direct = try run(setup, script, extra, through: false, timeout: 60)
        #expect(direct.verified < jobs, "directly, the workers signed: \(direct.report)")
        var failedJobs = 0
        var failedRuns: [String] = []
        for number in 1...runs {
            let through = try run(setup, script, extra, through: true, timeout: 120)
            #expect(through.trace.components(separatedBy: "fork detected").count > 2, "run \(number): \(through.report)")
            if through.verified != jobs {
                failedJobs += jobs - through.verified
                failedRuns.append("run \(number): \(through.verified) of \(jobs) verified\n\(through.report)")
            }
        }
        let reports = failedRuns.prefix(3).joined(separator: "\n\n")
        #expect(failedJobs == 0, "\(failedJobs) failed job(s) in \(failedRuns.count) of \(runs) runs with \(workers) workers:\n\(reports)")
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
}
