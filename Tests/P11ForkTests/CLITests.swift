import Foundation
import Testing

/// The command-line tool (Sources/p11fork-cli), run as a user would: `p11fork doctor` against
/// throw-away SoftHSM tokens, and `p11fork trace` on a trace written by a forking program.
@Suite(.serialized) struct CLITests {
    /// The tool's binary (the product p11fork-cli; installed as `p11fork`).
    static var cli: String { Products.path("p11fork-cli") }

    /// SoftHSM with `library.reset_on_fork = true`: a child gets CKR_CRYPTOKI_NOT_INITIALIZED.
    private func strictToken() throws -> SoftHSMToken {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "fork-key")
        return token
    }

    private func doctor(_ token: SoftHSMToken, _ arguments: [String], environment: [String: String] = [:],
                        module: String = RealModules.softHSM) throws -> ProcessResult {
        try runProgram(Self.cli, ["doctor", "--module", module, "--p11fork", Products.module] + arguments,
                       environment: token.environment.merging(environment) { $1 }, timeout: 300)
    }

    /// The table row of a scenario: its cells, trimmed.
    private func row(_ output: String, _ scenario: String) -> [String]? {
        output.split(separator: "\n").first { $0.hasPrefix(scenario + " ") }
            .map { $0.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) } }
    }

    private func expectNoPIN(_ result: ProcessResult, _ pin: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(!result.stdout.contains(pin), "the PIN is in the standard output", sourceLocation: sourceLocation)
        #expect(!result.stderr.contains(pin), "the PIN is in the standard error", sourceLocation: sourceLocation)
    }

    // MARK: doctor

    static let asRoot = getuid() == 0

    /// Strict SoftHSM, its token folder root's alone (as Debian's /var/lib/softhsm/tokens): the
    /// workers that switch to nobody cannot reach it directly; through p11fork `auto` runs a fresh
    /// copy in most children and the broker for those, and the doctor says so.
    @Test func doctorShowsStrictSoftHSMFailingAfterForkAndEveryScenarioPassingThroughP11Fork() throws {
        let token = try strictToken()
        #expect(chmod(token.directory.appendingPathComponent("tokens").path, 0o700) == 0)
        let result = try doctor(token, ["--pin", token.pin, "--token", token.label, "--key", "fork-key", "--allow-session-objects"])
        #expect(result.status == 0, "\(result.output)")
        expectNoPIN(result, token.pin)
        let out = result.stdout
        let switching = "4 workers that switch to nobody"
        if Self.asRoot {
            #expect(out.contains("your module breaks after fork in 6 of 8 scenarios; with p11fork all pass (auto picks fresh-copy; the broker for \(switching))"),
                    "\(out)")
            #expect(row(out, switching) == [switching, "FAIL CKR_CRYPTOKI_NOT_INITIALIZED", "ok"], "\(out)")
            let nobody = try #require(getpwnam("nobody")).pointee.pw_uid
            // The workers' own copy runs as nobody and cannot read the root-only folder (SoftHSM's
            // C_Initialize fails, or it finds no token): the broker runs the module for them.
            #expect(out.contains("  broker in \(switching): "), "\(out)")
            #expect(out.contains("the child runs as uid \(nobody), the parent as 0"), "\(out)")
            #expect(out.contains("  p11fork starts its broker (p11fork-broker, installed in \(URL(fileURLWithPath: Products.module).deletingLastPathComponent().path) beside libp11fork.so)"),
                    "\(out)")
        } else {
            #expect(out.contains("your module breaks after fork in 5 of 7 scenarios; with p11fork all pass (auto picks fresh-copy)"), "\(out)")
            #expect(row(out, switching) == [switching, "n/a", "n/a"], "\(out)")
        }
        #expect(out.contains("  fresh-copy in inherited session, child re-initialises, worker pool (4 children), 4 workers at the same instant, session object, operation in progress: the child can run the module itself"),
                "\(out)")
        #expect(row(out, "inherited session") == ["inherited session", "FAIL CKR_CRYPTOKI_NOT_INITIALIZED", "ok"], "\(out)")
        #expect(row(out, "worker pool (4 children)") == ["worker pool (4 children)", "FAIL CKR_CRYPTOKI_NOT_INITIALIZED", "ok"], "\(out)")
        #expect(row(out, "4 workers at the same instant") == ["4 workers at the same instant", "FAIL CKR_CRYPTOKI_NOT_INITIALIZED", "ok"], "\(out)")
        #expect(row(out, "session object") == ["session object", "FAIL CKR_CRYPTOKI_NOT_INITIALIZED", "ok"], "\(out)")
        #expect(row(out, "operation in progress") == ["operation in progress", "FAIL CKR_CRYPTOKI_NOT_INITIALIZED", "ok"], "\(out)")
        // SoftHSM with reset_on_fork lets a child start again, and a child's teardown does not reach the parent.
        #expect(row(out, "child re-initialises") == ["child re-initialises", "ok", "ok"], "\(out)")
        #expect(row(out, "child finalizes") == ["child finalizes", "ok", "ok"], "\(out)")
        // What to configure: the real module for p11fork, no strategy (auto works).
        #expect(out.contains("    P11FORK_MODULE=\(RealModules.softHSM)\n"), "\(out)")
        #expect(out.contains("    module = \(RealModules.softHSM)\n"), "\(out)")
        #expect(!out.contains("P11FORK_STRATEGY"), "\(out)")
        #expect(out.contains("\"fork-key\": RSA private key, ID 01, named"), "\(out)")
        #expect(!out.contains("\u{1B}["), "colour only on a terminal")
    }

    @Test func doctorJSONIsMachineReadableAndSaysWhichKeyItChose() throws {
        let token = try strictToken()
        let pinFile = token.directory.appendingPathComponent("pin.txt")
        try (token.pin + "\n").write(to: pinFile, atomically: true, encoding: .utf8)
        let result = try doctor(token, ["--pin-file", pinFile.path, "--json"])
        #expect(result.status == 0, "\(result.output)")
        expectNoPIN(result, token.pin)
        let report = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any], "\(result.stdout)")
        let scenarios = try #require(report["scenarios"] as? [[String: Any]])
        let byID = Dictionary(uniqueKeysWithValues: scenarios.map { ($0["id"] as? String ?? "", $0) })
        func status(_ id: String, _ route: String) -> String? { (byID[id]?[route] as? [String: Any])?["status"] as? String }
        #expect(Set(byID.keys) == ["inherited-session", "child-reinitializes", "child-finalizes", "worker-pool", "simultaneous-workers",
                                   "worker-switches-user", "session-object", "operation-in-progress"])
        #expect(status("inherited-session", "direct") == "fail")
        #expect(status("worker-pool", "direct") == "fail")
        #expect(status("operation-in-progress", "direct") == "fail")
        #expect(status("child-reinitializes", "direct") == "ok")
        // Nothing is created on the token unless asked.
        #expect(status("session-object", "direct") == "skipped")
        #expect(status("session-object", "p11fork") == "skipped")
        #expect(status("simultaneous-workers", "direct") == "fail")
        let switching = Self.asRoot ? "fail" : "n/a"
        #expect(status("worker-switches-user", "direct") == switching)
        for id in byID.keys where !["session-object", "worker-switches-user"].contains(id) {
            #expect(status(id, "p11fork") == "ok", "\(id): \(result.stdout)")
        }
        #expect(status("worker-switches-user", "p11fork") == (Self.asRoot ? "ok" : "n/a"))
        #expect(report["broken_directly"] as? Int == (Self.asRoot ? 5 : 4))
        #expect(report["scenarios_run"] as? Int == (Self.asRoot ? 7 : 6))
        #expect(report["all_pass_with_p11fork"] as? Bool == true)
        #expect(report["strategy"] as? String == "auto")
        // What auto chose, scenario by scenario, from p11fork's trace. The workers that switch to
        // nobody get the broker when their own copy cannot read the token (the first test pins
        // that, over a folder only root may enter) and keep a copy otherwise.
        let choices = try #require(report["auto_choices"] as? [[String: Any]], "\(result.stdout)")
        #expect(choices.first?["strategy"] as? String == "fresh-copy")
        let base = ["inherited session", "child re-initialises", "worker pool (4 children)", "4 workers at the same instant", "operation in progress"]
        let firstScenarios: [String] = choices.first?["scenarios"] as? [String] ?? []
        #expect(Set(firstScenarios).isSuperset(of: base), "\(choices)")
        let brokered = choices.contains { $0["strategy"] as? String == "broker" }
        if brokered {
            #expect(choices.count == 2 && choices.last?["scenarios"] as? [String] == ["4 workers that switch to nobody"], "\(choices)")
            #expect((choices.last?["why"] as? String)?.contains("the child runs as uid") == true, "\(choices)")
        }
        #expect((report["verdict"] as? String) == (Self.asRoot
            ? "your module breaks after fork in 5 of 7 scenarios; with p11fork all pass (auto picks fresh-copy\(brokered ? "; the broker for 4 workers that switch to nobody" : ""))"
            : "your module breaks after fork in 4 of 6 scenarios; with p11fork all pass (auto picks fresh-copy)"))
        let key = try #require(report["key"] as? [String: Any])
        #expect(key["label"] as? String == "fork-key")
        #expect(key["chosen"] as? String == "first signing key on the token")
        #expect(key["mechanism"] as? String == "CKM_SHA256_RSA_PKCS")
        let configuration = try #require(report["configuration"] as? [String: Any])
        #expect(configuration["environment"] as? [String] == ["P11FORK_MODULE=\(RealModules.softHSM)"])
        #expect(configuration["config_file"] as? [String] == ["module = \(RealModules.softHSM)"])
        #expect(configuration["p11fork_module"] as? String == Products.module)
        #expect((configuration["notes"] as? [String])?.count == (brokered ? 1 : 0))
    }

    @Test func doctorRejectsBadArgumentsWithOneLineThatNamesTheFix() throws {
        let token = try strictToken()
        let wrongPIN = makeSecret()
        let cases: [(arguments: [String], environment: [String: String], says: String)] = [
            (["--pin", token.pin], [:], "--module"),
            (["--module", "/nonexistent/libvendor.so", "--pin", token.pin], [:], "no such file"),
            (["--module", RealModules.softHSM], [:], "no PIN"),
            (["--module", RealModules.softHSM, "--pin", token.pin, "--pin-env", "DOCTOR_PIN"], ["DOCTOR_PIN": token.pin], "only one"),
            (["--module", RealModules.softHSM, "--pin-env", "DOCTOR_PIN_UNSET"], [:], "is not set"),
            (["--module", RealModules.softHSM, "--uri", "pkcs11:token=\(token.label)?pin-value=\(token.pin)"], [:], "no PIN"),
            (["--module", RealModules.softHSM, "--pin", token.pin, "--uri", "pkcs11:token=\(token.label)?pin-value=\(token.pin)"], [:],
             "carries a PIN"),
            (["--module", RealModules.softHSM, "--pin", token.pin, "--token", "no-such-token"], [:], "--token"),
            (["--module", RealModules.softHSM, "--pin", token.pin, "--key", "no-such-key"], [:], "--key"),
            (["--module", RealModules.softHSM, "--pin", wrongPIN], [:], "refused the PIN"),
            (["--module", RealModules.softHSM, "--pin", token.pin, "--timeout", "0"], [:], "--timeout"),
            (["--module", RealModules.softHSM, "--pin", token.pin, "--no-such-option"], [:], "--no-such-option"),
            (["--module", RealModules.softHSM, "--pin", token.pin, "--worker-user", "no-such-user"], [:], "--worker-user no-such-user: no such user"),
            (["--module", RealModules.softHSM, "--pin", token.pin, "--worker-user", "root"], [:], "--worker-user root: that is root"),
        ]
        for (arguments, environment, says) in cases {
            let result = try runProgram(Self.cli, ["doctor", "--p11fork", Products.module] + arguments,
                                        environment: token.environment.merging(environment) { $1 }, timeout: 120)
            #expect(result.status == 2, "\(arguments): \(result.output)")
            #expect(result.stdout.isEmpty, "\(arguments): \(result.stdout)")
            let lines = result.stderr.split(separator: "\n")
            #expect(lines.count == 1, "\(arguments): one line, not \(result.stderr)")
            #expect(result.stderr.hasPrefix("p11fork doctor: "), "\(arguments): \(result.stderr)")
            #expect(result.stderr.contains(says), "\(arguments): \(result.stderr)")
            expectNoPIN(result, token.pin)
            expectNoPIN(result, wrongPIN)
        }
    }

    /// tpm2-pkcs11 (a GLib stack, on a private software TPM): `auto` has the broker run it in
    /// every child, and the doctor gives both reasons the trace gives: GLib, and the switched user.
    @Test(.enabled(if: TPM2Token.available, "needs tpm2-pkcs11 and swtpm: run scripts/install-deps.sh"))
    func doctorNamesTheBrokerAndWhyForTPM2() throws {
        let token = try TPM2Token()
        let command = token.launcher(keyLabel: "tpm-key") + [
            Self.cli, "doctor", "--module", TPM2Token.module, "--p11fork", Products.module, "--pin-env", "DOCTOR_PIN",
            "--token", token.label, "--key", "tpm-key", "--workers", "3"]
        let result = try runProgram(command[0], Array(command.dropFirst()), environment: ["DOCTOR_PIN": token.pin], timeout: 300)
        #expect(result.status == 0, "\(result.output)")
        expectNoPIN(result, token.pin)
        let out = result.stdout
        #expect(out.contains("; with p11fork all pass (auto picks broker)"), "\(out)")
        #expect(out.contains("  broker in inherited session, child re-initialises, worker pool (3 children), 3 workers at the same instant, operation in progress: the module's stack loads GLib, which cannot be loaded twice in one process: the broker runs it for this child\n"),
                "\(out)")
        if Self.asRoot {
            #expect(out.contains("  broker in 3 workers that switch to nobody: the module's stack loads GLib, which cannot be loaded twice in one process (the child runs as uid "), "\(out)")
        }
        #expect(out.contains("p11fork starts its broker (p11fork-broker"), "\(out)")
        #expect(!out.contains("P11FORK_STRATEGY"), "\(out)")
    }

    /// A module that hangs in a child (a wrapper over SoftHSM, compiled here): the doctor reports
    /// it after its time limit instead of waiting, and p11fork's fresh copy never meets the hang.
    @Test func doctorReportsAChildThatHangsInsteadOfWaitingForIt() throws {
        let token = try SoftHSMToken()
        try token.generateKeyPair(label: "fork-key")
        let source = token.directory.appendingPathComponent("hanging.c")
        let module = token.directory.appendingPathComponent("libhanging.so")
        try Self.hangingModule.write(to: source, atomically: true, encoding: .utf8)
        let compiled = try runProgram("/usr/bin/cc", ["-shared", "-fPIC", "-o", module.path, source.path,
                                                      "-DREAL_MODULE=\"\(RealModules.softHSM)\"", "-ldl"])
        try #require(compiled.status == 0, "\(compiled.output)")
        let started = Date()
        let result = try doctor(token, ["--pin-env", "DOCTOR_PIN", "--timeout", "5"], environment: ["DOCTOR_PIN": token.pin],
                                module: module.path)
        #expect(Date().timeIntervalSince(started) < 120, "the doctor waited on a hung child")
        #expect(result.status == 0, "\(result.output)")
        #expect(row(result.stdout, "inherited session") == ["inherited session", "HUNG", "ok"], "\(result.stdout)")
        #expect(result.stdout.contains("the child hung (no answer within 5 s)"), "\(result.stdout)")
        expectNoPIN(result, token.pin)
    }

    /// Forwards to the real module, but C_SignInit never returns in a process other than the one
    /// that initialised it.
    static let hangingModule = """
        #include <p11-kit-1/p11-kit/pkcs11.h>
        #include <dlfcn.h>
        #include <string.h>
        #include <unistd.h>
        static CK_FUNCTION_LIST_PTR real;
        static CK_FUNCTION_LIST list;
        static pid_t owner;
        static CK_RV initialize(CK_VOID_PTR args) { if (!owner) owner = getpid(); return real->C_Initialize(args); }
        static CK_RV sign_init(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
            while (owner && getpid() != owner) pause();
            return real->C_SignInit(s, m, k);
        }
        CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out) {
            if (!real) {
                void *library = dlopen(REAL_MODULE, RTLD_NOW | RTLD_LOCAL);
                CK_C_GetFunctionList get = library ? (CK_C_GetFunctionList)dlsym(library, "C_GetFunctionList") : NULL;
                if (!get || get(&real) != CKR_OK) return CKR_GENERAL_ERROR;
                memcpy(&list, real, sizeof list);
                list.C_Initialize = initialize;
                list.C_SignInit = sign_init;
            }
            *out = &list;
            return CKR_OK;
        }
        """

    // MARK: trace

    /// A JSON trace of a parent and two forked children (one file), a failed login by another
    /// process appended to it, and two malformed lines.
    private func forkingTrace(_ token: SoftHSMToken) throws -> URL {
        let trace = token.directory.appendingPathComponent("trace.json")
        var environment = token.environment
        environment["P11FORK_MODULE"] = RealModules.softHSM
        environment["P11FORK_TRACE"] = trace.path
        environment["P11FORK_TRACE_FORMAT"] = "json"
        environment["P11FORK_TRACE_LEVEL"] = "calls"
        let forked = try runProgram(Products.forkcheck, ["--module", Products.module, "--token", token.label, "--pin", token.pin,
                                                         "--key", "fork-key", "--children", "2", "--stagger", "100", "inherited"],
                                    environment: environment)
        #expect(forked.status == 0, "\(forked.output)")
        let refused = try runProgram("/usr/bin/pkcs11-tool", ["--module", Products.module, "--token-label", token.label, "--login",
                                                             "--pin", makeSecret(), "-O"], environment: environment)
        #expect(refused.status != 0, "\(refused.output)")
        let handle = try FileHandle(forWritingTo: trace)
        handle.seekToEndOfFile()
        handle.write(Data("not a trace line\n{\"time\":\"2026-01-01T00:00:00Z\",\"pid\":\n".utf8))
        try handle.close()
        return trace
    }

    /// The trace's records as JSON objects (the malformed lines left out), for comparison.
    private func records(_ trace: URL) throws -> [[String: Any]] {
        try String(contentsOf: trace, encoding: .utf8).split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
    }

    /// The listing's blocks, by the pid in their "process N" header.
    private func blocks(_ output: String) -> [Int: [String]] {
        var blocks: [Int: [String]] = [:]
        var current: Int?
        for line in output.split(separator: "\n").map(String.init) {
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            if trimmed.hasPrefix("process "), let pid = Int(trimmed.dropFirst("process ".count).prefix { $0.isNumber }) {
                current = pid
                blocks[pid] = [trimmed]
            } else if trimmed == "summary" {
                current = nil
            } else if let pid = current, !trimmed.isEmpty {
                blocks[pid, default: []].append(trimmed)
            }
        }
        return blocks
    }

    /// A summary table row's cells, e.g. ["C_Sign", "4", "0", "2.38", "595.2"].
    private func summaryRow(_ output: String, _ first: String) -> [String]? {
        let summary = output.components(separatedBy: "\nsummary\n").last ?? output
        return summary.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }.first { $0.first == first }
    }

    @Test func traceReaderGroupsLinesPerProcessUnderTheirParentAndCountsThem() throws {
        let token = try strictToken()
        let trace = try forkingTrace(token)
        let objects = try records(trace)
        let children = objects.compactMap { object -> (child: Int, parent: Int)? in
            guard let message = object["message"] as? String, message.hasPrefix("fork detected"),
                  let match = message.firstMatch(of: /child of pid (\d+)/) else { return nil }
            return (object["pid"] as! Int, Int(match.output.1)!)
        }
        try #require(children.count == 2, "two forked children in the trace")
        let parent = children[0].parent
        #expect(children.allSatisfy { $0.parent == parent })

        let result = try runProgram(Self.cli, ["trace", trace.path])
        #expect(result.status == 0, "\(result.output)")
        #expect(!result.stdout.contains("\u{1B}["), "colour only on a terminal")
        let blocks = blocks(result.stdout)
        let pids = Set(objects.compactMap { $0["pid"] as? Int })
        #expect(Set(blocks.keys) == pids, "one block per process: \(result.stdout)")
        #expect(blocks[parent]?.first?.contains("forked \(children[0].child), \(children[1].child)") == true, "\(result.stdout)")
        for (child, _) in children {
            #expect(blocks[child]?.first?.contains("child of \(parent), fork generation 1") == true, "\(result.stdout)")
            let lines = blocks[child] ?? []
            #expect(lines.dropFirst().first?.contains("FORK  fork detected: this is a child of pid \(parent)") == true, "\(lines)")
            #expect(lines.contains { $0.contains("step  login replayed: CKU_USER") }, "\(lines)")
            #expect(lines.contains { $0.contains(/step  session 0x[0-9a-f]+ re-opened/) }, "\(lines)")
        }
        // Every call line is in its own process's block, and nowhere else.
        for pid in pids {
            let calls = objects.filter { $0["pid"] as? Int == pid && $0["call"] != nil }.count
            #expect(blocks[pid]?.filter { $0.contains(" = CKR_") }.count == calls, "pid \(pid): \(blocks[pid] ?? [])")
        }
        // The children are listed after their parent, indented under it.
        let parentAt = try #require(result.stdout.range(of: "process \(parent) "))
        let childAt = try #require(result.stdout.range(of: "  process \(children[0].child) "))
        #expect(parentAt.lowerBound < childAt.lowerBound)
        #expect(result.stdout.contains(/ERROR C_Login\(session=0x[0-9a-f]+, user=CKU_USER, pin=hidden\) = CKR_PIN_INCORRECT/), "\(result.stdout)")

        // The summary's counts are the trace's.
        func calls(_ function: String) -> Int { objects.filter { $0["call"] as? String == function }.count }
        for function in ["C_Sign", "C_SignInit", "C_Login", "C_Initialize"] {
            #expect(summaryRow(result.stdout, function)?[1] == String(calls(function)), "\(function): \(result.stdout)")
        }
        #expect(summaryRow(result.stdout, "C_Login")?[2] == "1", "one failed login")
        #expect(summaryRow(result.stdout, "CKR_PIN_INCORRECT") == ["CKR_PIN_INCORRECT", "1", "C_Login", "1"], "\(result.stdout)")
        #expect(result.stdout.contains("malformed lines skipped: 2 (line \(objects.count + 1), \(objects.count + 2))"), "\(result.stdout)")
        #expect(result.stdout.contains("processes: \(pids.count); forked children among them: 2 (deepest fork generation 1)"), "\(result.stdout)")
        let replayed = try #require(summaryRow(result.stdout, "login"), "\(result.stdout)")
        #expect(replayed.prefix(3) == ["login", "replayed", "2"], "a login replayed in each child: \(replayed)")
    }

    /// JSON event lines carry what the event is in the shared vocabulary (include/p11fork.h,
    /// codegen/vocabulary.txt), and the reader goes by those fields: with every event's message
    /// reworded, it finds the same process tree and the same recovery steps.
    @Test func traceReaderReadsJSONEventsByTheirFieldsNotTheirWords() throws {
        let token = try strictToken()
        let trace = try forkingTrace(token)
        let objects = try records(trace)
        let forks = objects.filter { $0["kind"] as? String == "fork-detected" }
        try #require(forks.count == 2, "\(objects.filter { $0["event"] != nil })")
        let parent = try #require(forks[0]["parent"] as? Int)
        #expect(forks.allSatisfy { $0["parent"] as? Int == parent && $0["generation"] as? Int == 1 }, "\(forks)")
        #expect(objects.contains { $0["pid"] as? Int == parent && $0["kind"] == nil && $0["call"] as? String == "C_Initialize" })
        for fork in forks {
            let child = fork["pid"] as! Int
            let steps = objects.filter { $0["pid"] as? Int == child && $0["kind"] as? String == "recovery-step" }
            let module = try #require(steps.first { $0["step"] as? String == "module" }, "\(steps)")
            #expect(module["strategy"] as? String == "fresh-copy" && module["outcome"] as? String == "ok" && module["ms"] is Double, "\(module)")
            #expect(steps.contains { $0["step"] as? String == "module-ready" && $0["strategy"] as? String == "auto" }, "\(steps)")
            for step in ["slots", "login", "session", "object"] {
                #expect(steps.contains { $0["step"] as? String == step && $0["outcome"] as? String == "ok" }, "\(step): \(steps)")
            }
        }

        // The same file with every event's message reworded.
        var reworded = ""
        for line in try String(contentsOf: trace, encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false) {
            reworded += line.replacing(/"message":"(?:[^"\\]|\\.)*"/, with: "\"message\":\"reworded\"") + "\n"
        }
        let rewordedFile = token.directory.appendingPathComponent("reworded.json")
        try reworded.write(to: rewordedFile, atomically: true, encoding: .utf8)
        #expect(!reworded.contains("fork detected"))
        let original = try runProgram(Self.cli, ["trace", trace.path, "--summary"])
        let result = try runProgram(Self.cli, ["trace", rewordedFile.path])
        #expect(result.status == 0, "\(result.output)")
        let blocks = blocks(result.stdout)
        for fork in forks {
            #expect(blocks[fork["pid"] as! Int]?.first?.contains("child of \(parent), fork generation 1") == true, "\(result.stdout)")
        }
        for step in ["login replayed", "module made working (fresh-copy)", "session re-opened", "object re-found"] {
            let row = result.stdout.split(separator: "\n").first { $0.trimmingCharacters(in: .whitespaces).hasPrefix(step + " ") }
            #expect(row?.split(separator: " ").dropFirst(step.split(separator: " ").count).first.flatMap { Int($0) } ?? 0 >= 2,
                    "\(step), in each child: \(result.stdout)")
            #expect(original.stdout.contains(step), "the original's summary names the step the same way: \(original.stdout)")
        }
        #expect(result.stdout.contains("processes: \(Set(objects.compactMap { $0["pid"] as? Int }).count); forked children among them: 2"), "\(result.stdout)")
    }

    @Test func traceReaderShowsOneProcessTheErrorsOrOnlyTheSummaryOnRequest() throws {
        let token = try strictToken()
        let trace = try forkingTrace(token)
        let objects = try records(trace)
        let child = try #require(objects.first { ($0["message"] as? String)?.hasPrefix("fork detected") == true }?["pid"] as? Int)

        let one = try runProgram(Self.cli, ["trace", trace.path, "--pid", String(child)])
        #expect(one.status == 0, "\(one.output)")
        #expect(Set(blocks(one.stdout).keys) == [child], "\(one.stdout)")
        #expect(one.stdout.contains("processes: 1; forked children among them: 1"), "\(one.stdout)")

        let errors = try runProgram(Self.cli, ["trace", trace.path, "--errors"])
        #expect(errors.status == 0, "\(errors.output)")
        let listed = blocks(errors.stdout).values.flatMap { $0.dropFirst() }
        #expect(listed.count == 1 && listed[0].contains("C_Login") && listed[0].contains("CKR_PIN_INCORRECT"), "\(errors.stdout)")

        let summary = try runProgram(Self.cli, ["trace", trace.path, "--summary"])
        #expect(summary.status == 0, "\(summary.output)")
        #expect(blocks(summary.stdout).isEmpty, "\(summary.stdout)")
        #expect(summary.stdout.hasPrefix("summary\n"), "\(summary.stdout)")

        let missing = try runProgram(Self.cli, ["trace", trace.path, "--pid", "1"])
        #expect(missing.status == 2 && missing.stderr.split(separator: "\n").count == 1, "\(missing.output)")
        let notAFile = try runProgram(Self.cli, ["trace", token.directory.appendingPathComponent("none.json").path])
        #expect(notAFile.status == 2 && notAFile.stderr.hasPrefix("p11fork trace: "), "\(notAFile.output)")
    }
}
