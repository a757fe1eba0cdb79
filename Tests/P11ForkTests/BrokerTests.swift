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

    /// The lane (docs/FORK.md "The lane") is memory a worker writes and the broker, with the
    /// application's rights, reads: a compromised worker could write anything there. Two children
    /// write requests of their own making: a mechanism parameter that would be a pointer in the
    /// broker, a byte string longer than the request. The broker refuses both without calling the
    /// module, closes those lanes and says so, stays up; each child signs on over p11-kit's RPC.
    @Test func requestsAWorkerMakesUpCloseItsLaneAndHarmNothing() throws {
        let token = try SoftHSMToken()
        try token.generateKeyPair(label: "fork-key")
        var check = ForkCheck(token: token)
        check.extraEnvironment = ["P11FORK_STRATEGY": "broker", "P11FORK_TRACE_LEVEL": "fork"]
        let outcome = try check.run("lane-abuse", throughP11Fork: true)
        #expect(outcome.succeeded, "\(outcome.report)")
        for child in [1, 2] {
            #expect(outcome.result.stdout.contains("child \(child): the lane after a request of its own making: closed"), "\(outcome.report)")
            #expect(outcome.result.stdout.contains("child \(child): broker still running"), "\(outcome.report)")
        }
        #expect(outcome.trace.components(separatedBy: "sent a request the lane does not carry").count - 1 == 2, "\(outcome.report)")
        #expect(outcome.trace.contains("the broker closed this process's lane"), "\(outcome.report)")
        // 2 signatures before and 2 after, each verified by the parent.
        #expect(outcome.result.stdout.contains("result: ok lane-abuse: 4 signature(s)"), "\(outcome.report)")
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

/// ECDSA with a hash (CKM_ECDSA_SHA256, CKM_ECDSA_SHA384) in a child whose module is p11-kit's
/// RPC client: p11-kit 0.24's client refuses them without asking the module. A P-256 key on
/// tpm2-pkcs11, which offers both. Directly through p11-kit's client (a `p11-kit server` for
/// tpm2-pkcs11, no p11fork, no fork) every check fails with CKR_MECHANISM_INVALID. Through
/// p11fork, in a forked child served by a helper, p11fork hashes in the child and has the module
/// sign the digest (RPCMechanisms; docs/FORK.md "The broker"): every signature, single-part, in
/// parts and after a length query, verifies on the token and in software (python-pkcs11 and
/// cryptography from the venv). Served by the broker, the lane carries the mechanisms to the
/// module itself, and the child answers exactly what the module answers in one process.
@Suite(.serialized) struct HashedECDSAThroughRPCTests {
    static let program = #"""
    import hashlib, os, signal, sys
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    module, label, key_label, mode = sys.argv[1:5]
    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=label)
    session = token.open(user_pin=os.environ["TEST_PIN"])
    private = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label=key_label)
    public = session.get_key(ObjectClass.PUBLIC_KEY, KeyType.EC, label=key_label)
    point = bytes(public[Attribute.EC_POINT])
    if point[0] == 4 and point[1] == len(point) - 2:
        point = point[2:]
    software = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)

    def software_verifies(signature, data, digest):
        half = len(signature) // 2
        der = utils.encode_dss_signature(int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big"))
        try:
            software.verify(der, data, ec.ECDSA(digest))
            return True
        except Exception:
            return False

    def checks():
        data = bytes(range(256)) * 5
        parts = lambda: iter([data[:100], data[100:777], data[777:]])
        failed = 0
        for mechanism, digest in [(Mechanism.ECDSA_SHA256, hashes.SHA256()), (Mechanism.ECDSA_SHA384, hashes.SHA384())]:
            name = mechanism.name
            for what, run in [
                ("sign single-part (length query first)", lambda: software_verifies(private.sign(data, mechanism=mechanism), data, digest)),
                ("sign in parts", lambda: software_verifies(private.sign(parts(), mechanism=mechanism), data, digest)),
                ("verify single-part", lambda: public.verify(data, private.sign(data, mechanism=mechanism), mechanism=mechanism)),
                ("verify in parts", lambda: public.verify(parts(), private.sign(data, mechanism=mechanism), mechanism=mechanism)),
                ("a wrong signature does not verify", lambda: not public.verify(data + b"!", private.sign(data, mechanism=mechanism), mechanism=mechanism)),
            ]:
                try:
                    ok = run()
                    print("%s %s: %s" % (name, what, "ok" if ok else "fail: wrong answer"))
                except Exception as error:
                    ok = False
                    print("%s %s: fail: %s" % (name, what, type(error).__name__))
                failed += 0 if ok else 1
        # Raw ECDSA afterwards: nothing left over from the hashed operations.
        raw = private.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
        ok = software_verifies(raw, data, hashes.SHA256())
        print("ECDSA over a SHA-256 digest afterwards: %s" % ("ok" if ok else "fail"))
        return failed + (0 if ok else 1)

    if mode == "no-fork":
        failed = checks()
    else:
        private.sign(b"parent", mechanism=Mechanism.ECDSA_SHA256)
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)
            os._exit(1 if checks() else 0)
        _, status = os.waitpid(pid, 0)
        failed = 0 if status == 0 else 1
        print("parent signs after the child: %s" % ("ok" if len(private.sign(b"parent", mechanism=Mechanism.ECDSA_SHA256)) == 64 else "fail"))
    print("result: %s" % ("ok" if failed == 0 else "fail"))
    sys.stdout.flush()
    os._exit(0 if failed == 0 else 1)
    """#

    static let available = TPM2Token.available && FileManager.default.isExecutableFile(atPath: PythonConsumerTests.python)
        && FileManager.default.isExecutableFile(atPath: "/usr/bin/p11-kit")

    @Test(.enabled(if: available, "needs swtpm, tpm2-pkcs11, p11-kit and the venv (scripts/install-deps.sh)"))
    func childrenSignWithHashedECDSAThroughTheBrokerAndAHelper() throws {
        let token = try TPM2Token()
        let script = token.directory.appendingPathComponent("hashed-ecdsa.py")
        try Self.program.write(to: script, atomically: true, encoding: .utf8)
        let trace = token.directory.appendingPathComponent("trace.log").path
        let socket = token.directory.appendingPathComponent("p11-kit.socket").path
        // Directly through p11-kit's client: a p11-kit server for tpm2-pkcs11, the script in one process.
        let direct = """
        p11-kit server -f -n "$SOCKET" --provider "$TPM2_MODULE" pkcs11: >/dev/null 2>&1 & server=$!
        for _ in $(seq 100); do [ -S "$SOCKET" ] && break; sleep 0.1; done
        P11_KIT_SERVER_ADDRESS="unix:path=$SOCKET" timeout 60 "$PYTHON" "$SCRIPT" "$CLIENT" "$LABEL" tpm-key no-fork; status=$?
        kill $server; wait $server 2>/dev/null; exit $status
        """
        // The module itself, loaded in the script's process: what its own answers are.
        let itself = "timeout 60 \"$PYTHON\" \"$SCRIPT\" \"$TPM2_MODULE\" \"$LABEL\" tpm-key no-fork"
        var commands = ["echo '=== direct'; (\(direct))", "echo '=== module'; \(itself)"]
        for strategy in ["broker", "out-of-process"] {
            commands.append("""
            echo '=== \(strategy)'; P11FORK_STRATEGY=\(strategy) P11FORK_MODULE="$TPM2_MODULE" P11FORK_TRACE="$TRACE" \
            timeout 120 "$PYTHON" "$SCRIPT" "$P11FORK" "$LABEL" tpm-key fork
            """)
        }
        let command = token.launcher(keyLabel: "tpm-key", algorithm: "ecc256") + ["/bin/bash", "-c", commands.joined(separator: "\n")]
        let environment = ["SOCKET": socket, "TPM2_MODULE": TPM2Token.module, "PYTHON": PythonConsumerTests.python, "SCRIPT": script.path,
                           "CLIENT": "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so", "LABEL": token.label, "TEST_PIN": token.pin, "TRACE": trace,
                           "P11FORK": Products.module]
        let result = try runProgram(command[0], Array(command.dropFirst()), environment: environment, timeout: 400)
        let runs = Dictionary(uniqueKeysWithValues: result.stdout.components(separatedBy: "=== ").dropFirst().map {
            (String($0.prefix { $0 != "\n" }), $0)
        })
        let text = (try? String(contentsOfFile: trace, encoding: .utf8)) ?? ""
        let directRun = runs["direct"] ?? ""
        print("directly through p11-kit's client:\n\(directRun)")
        let moduleRun = runs["module"] ?? ""
        print("the module in the script's own process:\n\(moduleRun)")
        #expect(directRun.contains("ECDSA_SHA256 sign single-part (length query first): fail: MechanismInvalid")
                && directRun.contains("result: fail"), "directly: \(result.output)")
        // Through the broker, the lane carries the hashed mechanisms to the module itself: the child
        // answers exactly what the module answers in one process (tpm2-pkcs11 signs in parts
        // wrongly by itself, measured; p11fork does not hide the module's answers where it reaches
        // the module). Through a helper, p11-kit's client refuses them and p11fork hashes: all ok.
        let answers = { (run: String) in run.split(separator: "\n").filter { $0.hasPrefix("ECDSA") } }
        let broker = runs["broker"] ?? ""
        print("through p11fork, broker:\n\(broker)")
        #expect(!answers(moduleRun).isEmpty && answers(broker) == answers(moduleRun), "broker: \(result.output)\ntrace:\n\(text.suffix(4000))")
        #expect(broker.contains("parent signs after the child: ok"), "broker: \(broker)")
        let helper = runs["out-of-process"] ?? ""
        print("through p11fork, out-of-process:\n\(helper)")
        #expect(helper.contains("result: ok") && !helper.contains("fail"), "out-of-process: \(result.output)\ntrace:\n\(text.suffix(4000))")
        #expect(helper.contains("parent signs after the child: ok"), "out-of-process: \(helper)")
        #expect(text.contains("module served by the broker") && text.contains("module running in a helper process"), "\(text.suffix(4000))")
        #expect(text.contains("CKM_ECDSA_SHA256 is not carried by p11-kit's RPC client"), "\(text.suffix(4000))")
        #expect(text.contains("CKM_ECDSA_SHA384 is not carried by p11-kit's RPC client"), "\(text.suffix(4000))")
        #expect(!text.contains(token.pin) && !result.output.contains(token.pin), "the PIN is in the trace or the output")
    }
}
