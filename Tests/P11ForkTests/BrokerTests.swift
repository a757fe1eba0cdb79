import Foundation
import Testing

/// The broker (docs/FORK.md "The broker"): a process the application starts before its first
/// fork, with its rights, which runs the real module for children that cannot. These tests run
/// p11fork-forkcheck (Tests/Tools/ForkCheck) over SoftHSM: the children switch to `nobody`
/// (as server workers do) while the token folder is root's alone, or the strategy forces the broker.
@Suite(.serialized) struct BrokerTests {
    static let asRoot = getuid() == 0

    /// A token whose folder only root may enter, as Debian's /var/lib/softhsm/tokens.
    private func rootOnlyToken() throws -> (SoftHSMToken, ForkCheck) {
        let token = try SoftHSMToken()
        try token.generateKeyPair(label: "fork-key", type: "EC:prime256v1")
        #expect(chmod(token.directory.appendingPathComponent("tokens").path, 0o700) == 0)
        var check = ForkCheck(token: token)
        check.mechanism = "ec"
        return (token, check)
    }

    /// The broker's pid, from the application's trace line.
    private func brokerPid(_ trace: String) -> pid_t? {
        guard let range = trace.range(of: "broker started (pid ") else { return nil }
        return pid_t(trace[range.upperBound...].prefix { $0.isNumber })
    }

    /// True once `pid` has ended (gone, or a zombie nobody reaped yet), waiting at most 5 s.
    private func ends(_ pid: pid_t) -> Bool {
        for _ in 0..<50 {
            let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
            if stat.isEmpty || stat.contains(") Z ") { return true }
            usleep(100_000)
        }
        return false
    }

    /// Workers that switch to `nobody` cannot read the token: directly they fail; through p11fork
    /// the broker runs the module with the parent's rights, every worker signs, the trace says
    /// why, the broker closes what each worker left open and ends with the process tree.
    @Test(.enabled(if: asRoot))
    func workersThatSwitchUserSignThroughTheBroker() throws {
        let (token, check) = try rootOnlyToken()
        let direct = try check.run("inherited", throughP11Fork: false, children: 3, extra: ["--worker-user", "nobody"])
        #expect(!direct.succeeded, "directly: \(direct.report)")
        let outcome = try check.run("inherited", throughP11Fork: true, children: 3, signatures: 3, extra: ["--worker-user", "nobody"])
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        // A copy in the child runs as nobody and finds no token: the broker runs the module.
        #expect(outcome.trace.contains("the child runs as uid 65534, the parent as 0"), "\(outcome.report)")
        #expect(outcome.trace.contains("the broker, which has the parent's rights, runs the module for this child") ||
                outcome.trace.contains("the broker runs the module for this child instead"), "\(outcome.report)")
        #expect(outcome.trace.components(separatedBy: "module served by the broker").count - 1 == 3, "\(outcome.report)")
        #expect(outcome.trace.contains("went away with 2 session(s) open: closed"), "\(outcome.report)")
        #expect(!outcome.trace.contains(token.pin), "the PIN is in the trace")
        let pid = try #require(brokerPid(outcome.trace), "\(outcome.report)")
        #expect(ends(pid), "the broker (pid \(pid)) outlived the process tree it served")
    }

    /// P11FORK_STRATEGY=broker serves every scenario: grandchildren, threads, a child that
    /// initialises or tears down the library itself (that one never needs the module recovered).
    @Test(arguments: ["inherited", "generations", "child-initializes", "child-teardown", "threads", "child-threads"])
    func forcedBrokerServesEveryScenario(_ scenario: String) throws {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "fork-key")
        var check = ForkCheck(token: token)
        check.extraEnvironment = ["P11FORK_STRATEGY": "broker"]
        let outcome = try check.run(scenario, throughP11Fork: true, children: 2, signatures: 2)
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        if scenario != "child-teardown" {
            #expect(outcome.trace.contains("module served by the broker"), "\(outcome.report)")
        }
    }

    /// Children that outlive their parent (killed with SIGKILL) keep being served, and no broker
    /// is left once they are gone.
    @Test(.enabled(if: asRoot))
    func orphansAreServedAndLeaveNoBroker() throws {
        let (_, check) = try rootOnlyToken()
        let outcome = try check.run("orphans", throughP11Fork: true, children: 3, extra: ["--worker-user", "nobody"])
        let served = outcome.result.stdout.components(separatedBy: "signed and verified after its parent was killed: CKR_OK").count - 1
        #expect(served == 3, "\(outcome.report)")
        #expect(outcome.result.signaled && outcome.result.status == SIGKILL, "the parent was killed: \(outcome.report)")
        let pid = try #require(brokerPid(outcome.trace), "\(outcome.report)")
        #expect(ends(pid), "the broker (pid \(pid)) outlived the children it served")
    }

    /// A broker that dies: the child's next calls answer CKR_DEVICE_ERROR at once (no hang, no
    /// SIGPIPE killing a child that left it at its default), the trace says so once, and the
    /// parent, whose module is its own, keeps signing. The broker holds no socket another
    /// process could connect to (none listens): only the inherited channel and its connections.
    @Test func deadBrokerGivesAnErrorNotAHang() throws {
        let token = try SoftHSMToken()
        try token.generateKeyPair(label: "fork-key")
        var check = ForkCheck(token: token)
        check.extraEnvironment = ["P11FORK_STRATEGY": "broker", "P11FORK_TRACE_LEVEL": "calls"]
        let outcome = try check.run("broker-dies", throughP11Fork: true)
        #expect(outcome.succeeded, "\(outcome.report)")
        #expect(outcome.result.stdout.contains("signature 2 after the broker (pid"), "\(outcome.report)")
        #expect(outcome.result.stdout.contains("was killed: CKR_DEVICE_ERROR"), "\(outcome.report)")
        #expect(outcome.trace.components(separatedBy: "has ended: this child's calls answer").count - 1 == 1, "\(outcome.report)")
        #expect(outcome.result.stdout.contains(", listening: 0"), "\(outcome.report)")
        #expect(!outcome.result.stdout.contains("broker sockets: 0,"), "\(outcome.report)")
    }

    /// Over SoftHSM's default mode each generation of a fork chain loads one more copy of the
    /// module with its own libc, until the static TLS block is full (measured: generation 12).
    /// The broker takes over where a copy cannot be loaded: 25 generations all sign.
    @Test func chainOfTwentyFiveGenerationsSigns() throws {
        let token = try SoftHSMToken()
        try token.generateKeyPair(label: "fork-key")
        let check = ForkCheck(token: token)
        let outcome = try check.run("chain", throughP11Fork: true, children: 25)
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        #expect(outcome.result.stdout.contains("generation 25 (pid"), "\(outcome.report)")
    }

    /// A fork storm through the broker: 1,000 children, each served, the parent never failing.
    @Test func forkStormOfAThousandChildrenThroughTheBroker() throws {
        let token = try SoftHSMToken()
        try token.generateKeyPair(label: "fork-key")
        var check = ForkCheck(token: token)
        check.extraEnvironment = ["P11FORK_STRATEGY": "broker"]
        let outcome = try check.run("storm", throughP11Fork: true, children: 1000)
        #expect(outcome.succeeded, "through p11fork: \(outcome.report)")
        print("fork storm through the broker: \(outcome.result.stdout.split(separator: "\n").last ?? "")")
    }
}
