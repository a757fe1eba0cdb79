import Foundation
import Testing

/// Python consumers across fork, run through the examples in examples/python: a multiprocessing
/// pool (fork start method) and gunicorn with preload_app (master logs in and finds the key at
/// import, two sync workers sign with its session and key handle), each with PyKCS11 and with
/// python-pkcs11, from the venv scripts/install-deps.sh makes (.venv, pinned versions from
/// examples/python/requirements.txt).
///
/// Every case runs twice: directly against the real module, where the workers must fail the way
/// that module fails after fork (CKR_CRYPTOKI_NOT_INITIALIZED from the strict ones; over
/// tpm2-pkcs11 the workers disturb the shared TPM session and signatures fail with
/// CKR_GENERAL_ERROR), and through libp11fork.so, where every signature verifies with the public
/// key, the parent still signs (pool), and both gunicorn workers sign (distinct pids). Hangs are
/// bounded: the pool waits 30 s for its workers, each HTTP request 15 s, the whole run 120 s.
///
/// The matrix is complete (2 examples x 2 libraries x 4 backends: SoftHSM with reset_on_fork,
/// p11-kit's proxy over SoftHSM, openCryptoki, tpm2-pkcs11; 32 runs): the suite took 34-49 s in
/// five runs here (`swift test --filter PythonConsumerTests` on the shared 2-core machine; all of
/// scripts/test.sh 4 min 22 s), so nothing is left out for CI's sake. The signatures are RSA PKCS#1 v1.5 over SHA-256, made as CKM_RSA_PKCS over a
/// DigestInfo because openCryptoki's soft token has no CKM_SHA256_RSA_PKCS.
@Suite(.serialized) struct PythonConsumerTests {
    enum Library: String, CaseIterable, Sendable { case pykcs11, pythonPKCS11 = "python-pkcs11" }

    enum Backend: String, CaseIterable, Sendable {
        case softHSM = "SoftHSM reset_on_fork", p11Kit = "p11-kit proxy over SoftHSM", openCryptoki, tpm2 = "tpm2-pkcs11"
    }

    struct Case: CustomTestStringConvertible, Sendable {
        let library: Library
        let backend: Backend
        var testDescription: String { "\(library.rawValue) over \(backend.rawValue)" }
        static let all = Backend.allCases.flatMap { backend in Library.allCases.map { Case(library: $0, backend: backend) } }
    }

    static let python = Products.packageRoot.appendingPathComponent(".venv/bin/python").path

    /// A token on the backend, the real module, and how to run a program next to it.
    struct Setup {
        let token: any TestToken
        let keyLabel: String
        let realModule: String
        let launcher: [String]
        let environment: [String: String]
    }

    static func setUp(_ backend: Backend) throws -> Setup {
        guard FileManager.default.isExecutableFile(atPath: python) else {
            throw TestFailure("\(python) is missing: run scripts/install-deps.sh (it makes the venv the Python tests use)")
        }
        switch backend {
        case .softHSM, .p11Kit:
            // Behind p11-kit's proxy SoftHSM stays in its default mode: the proxy is the strict one.
            let token = try SoftHSMToken(strict: backend == .softHSM)
            try token.generateKeyPair(label: "py-key")
            return backend == .softHSM
                ? Setup(token: token, keyLabel: "py-key", realModule: RealModules.softHSM, launcher: [], environment: token.environment)
                : Setup(token: token, keyLabel: "py-key", realModule: RealModules.p11KitProxy,
                        launcher: try RealModules.p11KitLauncher(in: token.directory), environment: token.environment)
        case .openCryptoki:
            // openCryptoki needs the out-of-process strategy (see OpenCryptokiForkTests).
            let token = try OpenCryptokiToken()
            return Setup(token: token, keyLabel: "py-key", realModule: OpenCryptokiToken.module,
                         launcher: token.launcher(keyLabel: "py-key"), environment: ["P11FORK_STRATEGY": "out-of-process"])
        case .tpm2:
            let token = try TPM2Token()
            return Setup(token: token, keyLabel: "py-key", realModule: TPM2Token.module,
                         launcher: token.launcher(keyLabel: "py-key"), environment: [:])
        }
    }

    static func available(_ backend: Backend) -> Bool {
        switch backend {
        case .softHSM, .p11Kit: true
        case .openCryptoki: FileManager.default.fileExists(atPath: "/usr/sbin/pkcsslotd")
        case .tpm2: TPM2Token.available
        }
    }

    struct Outcome {
        let result: ProcessResult
        let trace: String
        var report: String { "status \(result.status)\(result.timedOut ? " (timed out)" : "")\n\(result.output)\ntrace:\n\(trace)" }
    }

    /// Runs an example (`script` with its trailing arguments) directly or through p11fork.
    static func run(_ setup: Setup, _ library: Library, _ script: String, _ extra: [String], throughP11Fork: Bool,
                    timeout: TimeInterval = 120) throws -> Outcome {
        let traces = setup.token.directory.appendingPathComponent("python-trace-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: traces, withIntermediateDirectories: true)
        var environment = setup.environment
        environment["PIN"] = setup.token.pin
        if throughP11Fork {
            environment["P11FORK_MODULE"] = setup.realModule
            environment["P11FORK_TRACE"] = traces.appendingPathComponent("%p.log").path
            environment["P11FORK_TRACE_LEVEL"] = "fork"
        }
        let module = throughP11Fork ? Products.module : setup.realModule
        let command = setup.launcher + [python, Products.example("python/\(script)"), library.rawValue, module,
                                        setup.token.label, setup.keyLabel] + extra
        let result = try runProgram(command[0], Array(command.dropFirst()), environment: environment, timeout: timeout)
        let files = (try? FileManager.default.contentsOfDirectory(at: traces, includingPropertiesForKeys: nil)) ?? []
        let trace = files.compactMap { try? String(contentsOf: $0, encoding: .utf8) }.joined()
        return Outcome(result: result, trace: trace)
    }

    /// What the real module does to the workers without p11fork, as measured here.
    static func failedDirectly(_ backend: Backend, _ outcome: Outcome) -> Bool {
        let out = outcome.result.stdout
        guard outcome.result.status != 0 else { return false }
        switch backend {
        case .softHSM:
            // Now and then a worker hangs in SoftHSM's own fork reset instead: caught by the bounds.
            return out.contains("CKR_CRYPTOKI_NOT_INITIALIZED") || out.contains("did not answer") || out.contains("no answer within")
                || outcome.result.timedOut
        case .p11Kit, .openCryptoki:
            return out.contains("CKR_CRYPTOKI_NOT_INITIALIZED")
        case .tpm2:
            return out.contains("CKR_GENERAL_ERROR")
        }
    }

    static func check(_ testCase: Case, _ script: String, _ extra: [String], success: String) throws {
        let setup = try setUp(testCase.backend)
        let direct = try run(setup, testCase.library, script, extra, throughP11Fork: false)
        #expect(failedDirectly(testCase.backend, direct), "directly: \(direct.report)")
        let through = try run(setup, testCase.library, script, extra, throughP11Fork: true)
        #expect(through.result.status == 0 && through.result.stdout.contains(success), "through p11fork: \(through.report)")
        #expect(through.trace.contains("fork detected"), "through p11fork: \(through.report)")
        #expect(!through.trace.contains(setup.token.pin) && !through.result.output.contains(setup.token.pin), "the PIN appeared")
    }

    @Test(arguments: Case.all.filter { available($0.backend) })
    func multiprocessingPoolSignsWithTheParentsSessionAndKey(_ testCase: Case) throws {
        try Self.check(testCase, "pool_sign.py", ["2", "6"],
                       success: "6 of 6 signatures made by forked workers verified")
    }

    /// A wrong PIN: the example stops with one line naming the module's answer, the same
    /// through p11fork as directly, and the PIN it was given appears nowhere.
    @Test(arguments: Library.allCases)
    func wrongPinIsTheModulesAnswerInOneLine(_ library: Library) throws {
        let setup = try Self.setUp(.softHSM)
        let wrong = Setup(token: WrongPin(setup.token), keyLabel: setup.keyLabel, realModule: setup.realModule,
                          launcher: setup.launcher, environment: setup.environment)
        for through in [false, true] {
            let outcome = try Self.run(wrong, library, "pool_sign.py", [], throughP11Fork: through)
            let module = through ? Products.module : setup.realModule
            #expect(outcome.result.status == 1 && outcome.result.stdout.isEmpty, "\(outcome.report)")
            #expect(outcome.result.stderr == "\(module): opening token '\(setup.token.label)' and key 'py-key' failed: CKR_PIN_INCORRECT\n",
                    "\(outcome.report)")
            #expect(!outcome.result.output.contains(wrong.token.pin) && !outcome.trace.contains(wrong.token.pin))
        }
    }

    /// The token with another PIN than its own.
    final class WrongPin: TestToken {
        let token: any TestToken
        let pin = makeSecret()
        init(_ token: any TestToken) { self.token = token }
        var directory: URL { token.directory }
        var label: String { token.label }
        var environment: [String: String] { token.environment }
    }

    @Test(arguments: Case.all.filter { available($0.backend) })
    func gunicornWorkersSignWithTheMastersSessionAndKey(_ testCase: Case) throws {
        try Self.check(testCase, "run_gunicorn.py", ["8"], success: "signatures verified, made by 2 worker(s)")
    }
}
