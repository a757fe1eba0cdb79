import Foundation
import Testing

/// nginx and Apache serving HTTPS with a token key through OpenSSL's pkcs11 engine, run from the
/// configurations in examples/ by scripts/server-check.sh: every request is a new curl process,
/// so a full TLS handshake the token's key signs. Each server runs directly on the real module
/// (to show what happens there) and through p11fork.
@Suite(.serialized) struct ServerTests {
    static let nginxAvailable = FileManager.default.fileExists(atPath: "/usr/sbin/nginx")
    /// Apache runs its children as www-data: the test gives the token to www-data (needs root).
    static let apacheAvailable = FileManager.default.fileExists(atPath: "/usr/sbin/apache2") && getuid() == 0

    /// One server run, read back from server-check.sh's output.
    struct Run {
        let name: String
        let output: String
        let served: Int
        let requests: Int
        let workers: Int
        let trace: String
        var errorLog: String {
            guard let start = output.range(of: "--- error log\n"), let end = output.range(of: "--- end of error log") else { return "" }
            return String(output[start.upperBound..<end.lowerBound])
        }
        var report: String { "\(name): \(served) of \(requests) served by \(workers) worker(s)\n\(output)\ntrace:\n\(trace)" }
    }

    /// How one run is made: the module the engine loads, master/worker or one process, requests.
    struct Plan {
        let name: String
        var throughP11Fork = true
        var mode = "daemon"
        var requests = 40
        var requestTimeout = 5
        /// `env` lines for nginx (variables kept for its workers).
        var keep: [String] = []
        /// When set, the server gets exactly this environment (and PATH), as a unit would give it.
        var unitEnvironment: [String: String]? = nil
        /// nginx: the user its workers switch to (`user www-data;`, Debian's own nginx.conf).
        var workerUser: String? = nil
    }

    /// Runs the plans one after another in one process tree (under `launcher`: the TPM lives
    /// only as long as its launcher's command), each with a fresh server.
    private func serve(_ server: String, token: any TestToken, keyLabel: String, realModule: String, launcher: [String] = [],
                       plans: [Plan], serverStarts: Bool = true) throws -> [String: Run] {
        let work = token.directory.appendingPathComponent("servers-\(UUID().uuidString)")
        let script = Products.packageRoot.appendingPathComponent("scripts/server-check.sh").path
        func quoted(_ text: String) -> String { "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'" }
        var commands: [String] = []
        for plan in plans {
            var variables = [
                "LIBP11FORK": plan.throughP11Fork ? Products.module : realModule,
                "P11FORK_TRACE": work.appendingPathComponent("trace-\(plan.name).log").path,
                "P11FORK_TRACE_LEVEL": "fork",
            ]
            var prefix = ""
            if let unit = plan.unitEnvironment {
                variables = unit
                prefix = "env -i PATH=\"$PATH\" PIN=\"$PIN\" "
            }
            variables["REQUEST_TIMEOUT"] = String(plan.requestTimeout)
            if let user = plan.workerUser { variables["WORKER_USER"] = user }
            let assignments = prefix + variables.map { "\($0.key)=\(quoted($0.value))" }.sorted().joined(separator: " ")
            let arguments = [script, server, work.path, token.label, keyLabel, plan.mode, String(plan.requests)] + plan.keep
            commands.append("echo \(quoted("=== run \(plan.name)")); \(assignments) \(arguments.map(quoted).joined(separator: " "))")
        }
        var env = token.environment
        env["PIN"] = token.pin
        env["P11FORK_MODULE"] = realModule
        let command = launcher + ["/bin/bash", "-c", commands.joined(separator: "\n")]
        let result = try runProgram(command[0], Array(command.dropFirst()), environment: env, timeout: 170)
        #expect(!result.timedOut && (result.status == 0) == serverStarts, "server-check.sh: status \(result.status)\(result.timedOut ? " (timed out)" : "")\n\(result.output)")
        var runs: [String: Run] = [:]
        for chunk in result.stdout.components(separatedBy: "=== run ").dropFirst() {
            let name = String(chunk.prefix { $0 != "\n" })
            let trace = (try? String(contentsOf: work.appendingPathComponent("trace-\(name).log"), encoding: .utf8)) ?? ""
            var served = -1, requests = -1, workers = -1
            if let line = chunk.split(separator: "\n").last(where: { $0.hasPrefix("result: ") }) {
                // "result: S of N served; workers: W (pids)"
                let words = line.split(separator: " ")
                if words.count >= 7 { served = Int(words[1]) ?? -1; requests = Int(words[3]) ?? -1; workers = Int(words[6]) ?? -1 }
            }
            runs[name] = Run(name: name, output: chunk, served: served, requests: requests, workers: workers, trace: trace)
        }
        for plan in plans where runs[plan.name] == nil {
            Issue.record("no result for \(plan.name): \(result.output)")
        }
        for run in runs.values {
            #expect(!run.output.contains(token.pin) && !run.trace.contains(token.pin), "the PIN leaked into \(run.name)'s logs")
        }
        return runs
    }

    /// Through p11fork: every request served, by `workers` of them (nginx: its 2 workers; Apache:
    /// 2 or more children), whose recovery the trace shows.
    private func expectEveryRequestServed(_ run: Run?, workers: ClosedRange<Int> = 2...2, traced: Bool = true) {
        guard let run else { return }
        #expect(run.served == run.requests && run.requests == 40, "\(run.report)")
        #expect(workers.contains(run.workers), "\(run.report)")
        guard traced else { return }
        let children = Set(run.trace.split(separator: "\n").filter { $0.contains("fork detected") }.compactMap { line in
            line.range(of: "p11fork[").map { line[$0.upperBound...].prefix { $0 != "/" } }
        })
        #expect(children.count >= 2, "the workers recovered through p11fork: \(run.report)")
    }

    // MARK: nginx

    /// tpm2-pkcs11 keeps the master's TPM session in each worker: the first worker to sign
    /// advances its HMAC state and the other worker's signatures fail from then on.
    @Test(.enabled(if: nginxAvailable && TPM2Token.available))
    func nginxWorkersOverTPM2ServeEveryRequestThroughP11Fork() throws {
        let run = try serveOverTPM2("nginx", direct: Plan(name: "direct", throughP11Fork: false),
                                    directError: "PKCS#11 module::General Error", workers: 2...2)
        #expect(run?.trace.contains("the broker runs it for this child") == true, "\(run?.report ?? "")")
    }

    /// A server over tpm2-pkcs11 three times: `direct` (fewer requests served than made, by one
    /// worker at most, `directError` in the error log), directly in one process (every request:
    /// the failure is fork's), and through p11fork (every request, by `workers`). Returns the
    /// run through p11fork.
    private func serveOverTPM2(_ server: String, direct plan: Plan, directError: String, workers: ClosedRange<Int>) throws -> Run? {
        let token = try TPM2Token()
        let runs = try serve(server, token: token, keyLabel: "tpm-key", realModule: TPM2Token.module,
                             launcher: token.launcher(keyLabel: "tpm-key"), plans: [
                                plan,
                                Plan(name: "direct-one-process", throughP11Fork: false, mode: "single"),
                                Plan(name: "p11fork"),
                             ])
        if let direct = runs[plan.name] {
            #expect(direct.served < direct.requests && direct.workers <= 1, "directly: \(direct.report)")
            #expect(direct.errorLog.contains(directError), "directly: \(direct.report)")
        }
        if let single = runs["direct-one-process"] {
            // Without fork the same configuration works directly: the failure is fork's.
            #expect(single.served == single.requests && single.requests == 40, "directly, one process: \(single.report)")
        }
        expectEveryRequestServed(runs["p11fork"], workers: workers)
        return runs["p11fork"]
    }

    /// Strict SoftHSM: libp11 initialises the module again in each worker, and SoftHSM then reads
    /// SOFTHSM2_CONF, which nginx has taken from its workers' environment: the workers block in
    /// libp11 and every handshake times out, unless nginx keeps the variable (`env SOFTHSM2_CONF;`).
    /// Through p11fork no `env` line is needed: it kept the environment it was loaded with.
    @Test(.enabled(if: nginxAvailable))
    func nginxWorkersOverStrictSoftHSMNeedNoEnvLinesThroughP11Fork() throws {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "server-key")
        let runs = try serve("nginx", token: token, keyLabel: "server-key", realModule: RealModules.softHSM, plans: [
            Plan(name: "direct", throughP11Fork: false, requests: 4, requestTimeout: 2),
            Plan(name: "direct-env-line", throughP11Fork: false, keep: ["SOFTHSM2_CONF"]),
            Plan(name: "p11fork"),
        ])
        if let direct = runs["direct"] {
            #expect(direct.served == 0 && direct.output.contains("curl exit 28"), "directly: \(direct.report)")
        }
        if let kept = runs["direct-env-line"] {
            #expect(kept.served == kept.requests && kept.requests == 40, "directly with env SOFTHSM2_CONF: \(kept.report)")
        }
        expectEveryRequestServed(runs["p11fork"])
        // libp11 starts over in each worker (C_Initialize, session, login): p11fork answers it.
        #expect(runs["p11fork"]?.trace.contains("C_Initialize in the child") == true, "\(runs["p11fork"]?.report ?? "")")
    }

    /// Debian's nginx.conf has `user www-data;` and Debian's SoftHSM keeps its tokens in a folder
    /// only root may read: the workers cannot reach the token. Directly every handshake fails (the
    /// workers' libp11 starts over as www-data and finds no token); through p11fork the workers'
    /// module runs in the broker, which the master started as root.
    @Test(.enabled(if: nginxAvailable && getuid() == 0))
    func nginxWorkersAsWwwDataOverARootOnlyTokenServeEveryRequestThroughTheBroker() throws {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "server-key")
        try token.makeTokenFolderRootOnly()
        let runs = try serve("nginx", token: token, keyLabel: "server-key", realModule: RealModules.softHSM, plans: [
            Plan(name: "direct", throughP11Fork: false, requests: 4, requestTimeout: 2, keep: ["SOFTHSM2_CONF"], workerUser: "www-data"),
            Plan(name: "p11fork", workerUser: "www-data"),
        ])
        if let direct = runs["direct"] {
            #expect(direct.served == 0, "directly: \(direct.report)")
        }
        expectEveryRequestServed(runs["p11fork"])
        #expect(runs["p11fork"]?.trace.contains("the child runs as uid 33, the parent as 0") == true, "\(runs["p11fork"]?.report ?? "")")
        #expect(runs["p11fork"]?.trace.contains("module served by the broker") == true, "\(runs["p11fork"]?.report ?? "")")
    }

    /// nginx with `user www-data;` over tpm2-pkcs11, whose TPM the workers may not reach.
    @Test(.enabled(if: nginxAvailable && TPM2Token.available && getuid() == 0))
    func nginxWorkersAsWwwDataOverTPM2ServeEveryRequestThroughTheBroker() throws {
        let token = try TPM2Token()
        let runs = try serve("nginx", token: token, keyLabel: "tpm-key", realModule: TPM2Token.module,
                             launcher: token.launcher(keyLabel: "tpm-key"), plans: [
                                Plan(name: "direct", throughP11Fork: false, workerUser: "www-data"),
                                Plan(name: "p11fork", workerUser: "www-data"),
                             ])
        if let direct = runs["direct"] {
            #expect(direct.served < direct.requests, "directly: \(direct.report)")
        }
        expectEveryRequestServed(runs["p11fork"])
        #expect(runs["p11fork"]?.trace.contains("(the child runs as uid 33, the parent as 0): the broker runs it for this child") == true, "\(runs["p11fork"]?.report ?? "")")
    }

    // MARK: Apache

    /// Apache's children always run as www-data; over a root-only token they cannot reach the
    /// token directly, and the broker serves them through p11fork.
    @Test(.enabled(if: apacheAvailable))
    func apacheChildrenOverARootOnlyTokenServeEveryRequestThroughTheBroker() throws {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "server-key")
        try token.makeTokenFolderRootOnly()
        let runs = try serve("apache", token: token, keyLabel: "server-key", realModule: RealModules.softHSM, plans: [
            Plan(name: "direct", throughP11Fork: false, requests: 4, requestTimeout: 2),
            Plan(name: "p11fork"),
        ])
        if let direct = runs["direct"] {
            #expect(direct.served == 0, "directly: \(direct.report)")
        }
        expectEveryRequestServed(runs["p11fork"], workers: 2...8)
        #expect(runs["p11fork"]?.trace.contains("the child runs as uid 33, the parent as 0") == true, "\(runs["p11fork"]?.report ?? "")")
        #expect(runs["p11fork"]?.trace.contains("module served by the broker") == true, "\(runs["p11fork"]?.report ?? "")")
    }

    /// Apache keeps its environment and libp11 starts over in each child, so strict SoftHSM works
    /// directly (measured: every request); p11fork must not spoil that. The children run as
    /// www-data, so the token's files are given to www-data.
    @Test(.enabled(if: apacheAvailable))
    func apacheChildrenOverStrictSoftHSMServeEveryRequest() throws {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "server-key")
        let chown = try runProgram("/bin/chown", ["-R", "www-data:www-data", token.directory.appendingPathComponent("tokens").path])
        #expect(chown.status == 0, "\(chown.output)")
        let runs = try serve("apache", token: token, keyLabel: "server-key", realModule: RealModules.softHSM, plans: [
            Plan(name: "direct", throughP11Fork: false),
            Plan(name: "p11fork"),
        ])
        if let direct = runs["direct"] {
            #expect(direct.served == direct.requests && direct.requests == 40 && direct.workers >= 2, "directly: \(direct.report)")
        }
        expectEveryRequestServed(runs["p11fork"], workers: 2...8)
    }

    /// Apache over tpm2-pkcs11 fails before any fork, with or without p11fork: `SSLCryptoDevice`
    /// makes the engine OpenSSL's default for everything, and tpm2-pkcs11's TPM library then
    /// fails its own RSA operation while logging in. README says so; this pins it.
    @Test(.enabled(if: apacheAvailable && TPM2Token.available))
    func apacheCannotLoadATPM2KeyThroughTheEngine() throws {
        let token = try TPM2Token()
        let runs = try serve("apache", token: token, keyLabel: "tpm-key", realModule: TPM2Token.module,
                             launcher: token.launcher(keyLabel: "tpm-key"), plans: [
                                Plan(name: "direct", throughP11Fork: false, mode: "single", requests: 1),
                                Plan(name: "p11fork", mode: "single", requests: 1),
                             ], serverStarts: false)
        for run in runs.values {
            #expect(run.output.contains("result: apache did not start") && run.output.contains("Error unsealing wrapping key"), "\(run.report)")
        }
    }

    /// Apache over tpm2-pkcs11 with examples/apache/p11fork-ssl-tpm2.conf: no engine
    /// configuration, no `SSLCryptoDevice`, and mod_ssl loads the pkcs11 engine by the key's
    /// scheme, which reads PKCS11_MODULE_PATH. Directly the prefork children (www-data) share the
    /// parent's TPM session and fail; one process (-X) serves every request, so the failure is
    /// fork's; through p11fork the broker runs tpm2-pkcs11 for the children.
    @Test(.enabled(if: apacheAvailable && TPM2Token.available))
    func apacheChildrenAsWwwDataOverTPM2ServeEveryRequestThroughTheBroker() throws {
        // One child signs; the other's TPM session no longer matches (measured: 3 of 6).
        let run = try serveOverTPM2("apache-tpm2", direct: Plan(name: "direct", throughP11Fork: false, requests: 6, requestTimeout: 3),
                                    directError: "the authorization HMAC check failed", workers: 2...8)
        #expect(run?.trace.contains("module served by the broker") == true, "\(run?.report ?? "")")
        #expect(run?.errorLog.contains("Error unsealing wrapping key") == false, "\(run?.report ?? "")")
    }

    // MARK: systemd

    /// The drop-in's `Environment=` assignments (systemd's syntax: several per line, each may be
    /// in double quotes).
    static func unitEnvironment(_ text: String) -> [String: String] {
        var environment: [String: String] = [:]
        for line in text.split(separator: "\n") where line.hasPrefix("Environment=") {
            var words: [String] = [], word = "", quoted = false
            for character in line.dropFirst("Environment=".count) {
                if character == "\"" { quoted.toggle() }
                else if character == " " && !quoted { if !word.isEmpty { words.append(word) }; word = "" }
                else { word.append(character) }
            }
            if !word.isEmpty { words.append(word) }
            for word in words {
                let parts = word.split(separator: "=", maxSplits: 1)
                if parts.count == 2 { environment[String(parts[0])] = String(parts[1]) }
            }
        }
        return environment
    }

    /// examples/systemd's drop-in for nginx.service: systemd accepts it (`systemd-analyze
    /// verify` with the drop-in beside Debian's unit), and nginx started with exactly its
    /// environment (installed paths mapped to this build and this token) serves every request
    /// through p11fork, with no `env` line in nginx.conf.
    @Test(.enabled(if: nginxAvailable))
    func systemdDropInConfiguresNginxThroughP11Fork() throws {
        let dropIn = Products.example("systemd/nginx.service.d/p11fork.conf")
        let text = try String(contentsOfFile: dropIn, encoding: .utf8)
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "server-key")

        if FileManager.default.fileExists(atPath: "/usr/bin/systemd-analyze"),
           FileManager.default.fileExists(atPath: "/lib/systemd/system/nginx.service") {
            let units = token.directory.appendingPathComponent("units")
            let dropIns = units.appendingPathComponent("nginx.service.d")
            try FileManager.default.createDirectory(at: dropIns, withIntermediateDirectories: true)
            try FileManager.default.copyItem(atPath: "/lib/systemd/system/nginx.service", toPath: units.appendingPathComponent("nginx.service").path)
            try FileManager.default.copyItem(atPath: dropIn, toPath: dropIns.appendingPathComponent("p11fork.conf").path)
            let verify = try runProgram("/usr/bin/systemd-analyze", ["verify", units.appendingPathComponent("nginx.service").path],
                                        environment: ["SYSTEMD_UNIT_PATH": units.path + ":"], timeout: 60)
            #expect(verify.status == 0 && !verify.output.contains("p11fork.conf"), "systemd-analyze verify: \(verify.output)")
        }

        // Where the drop-in names installed files, this run uses the build's and the token's.
        let installed = [
            "/etc/nginx/pkcs11-engine.cnf": Products.example("nginx/pkcs11-engine.cnf"),
            "/usr/local/lib/libp11fork.so": Products.module,
            "/etc/softhsm/softhsm2.conf": token.configPath,
        ]
        var environment = Self.unitEnvironment(text)
        #expect(environment["P11FORK_MODULE"] == RealModules.softHSM && environment["LIBP11FORK"] != nil, "\(environment)")
        for (key, value) in environment {
            environment[key] = installed[value] ?? value
            if value.hasPrefix("/") {
                #expect(installed[value] != nil || FileManager.default.fileExists(atPath: value), "\(key)=\(value): no such file here")
            }
        }
        let runs = try serve("nginx", token: token, keyLabel: "server-key", realModule: RealModules.softHSM, plans: [
            Plan(name: "unit", unitEnvironment: environment),
        ])
        expectEveryRequestServed(runs["unit"], traced: false)
    }
}
