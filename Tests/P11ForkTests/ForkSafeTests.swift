import Foundation
import Testing

/// "Fork safe" (PKCS#11 3.0 CKF_INTERFACE_FORK_SAFE): session objects, operations in progress
/// and searches carried into a forked child (Tests/Tools/ForkSafe). Each scenario runs
/// directly first, where the child loses everything, then through p11fork, with the function
/// list taken from C_GetInterface(..., CKF_INTERFACE_FORK_SAFE): the child never calls
/// C_Initialize, and its results equal the parent's. Over the 3.2 test module (NetHSM) the
/// fork-safe interface is the 3.2 one, and the 3.2 scenarios run too (docs/FORK.md "PKCS#11 3.0
/// and 3.2").
@Suite(.serialized) struct ForkSafeTests {
    static let scenarios = ["create-object", "unwrap-derive", "ecdh", "generated-lost", "sign-update", "decrypt-update",
                            "digest-update", "find"]

    struct Setup {
        let token: any TestToken
        let module: String
        let mechanism: String
        let directShows: String
        /// The version of the interface C_GetInterface(NULL, NULL, ..., CKF_INTERFACE_FORK_SAFE) gives.
        let forkSafeVersion: String
    }

    static func softHSM() throws -> Setup {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "fork-key")
        return Setup(token: token, module: RealModules.softHSM, mechanism: "rsa", directShows: "-> 0x190", forkSafeVersion: "3.0")
    }

    static func netHSM() throws -> Setup {
        let token = try NetHSMToken()
        try token.generateSecretKey(label: "fork-key")
        return Setup(token: token, module: NetHSMToken.module, mechanism: "hmac", directShows: "-> 0x30", forkSafeVersion: "3.2")
    }

    struct Outcome {
        let result: ProcessResult
        let trace: String
        var succeeded: Bool { result.status == 0 && result.stdout.contains("result: ok") }
        var report: String { "status \(result.status)\(result.timedOut ? " (timed out)" : "")\n\(result.output)\ntrace:\n\(trace)" }
    }

    static func run(_ setup: Setup, _ scenario: String, throughP11Fork: Bool, environment extra: [String: String] = [:]) throws -> Outcome {
        let traceFile = setup.token.directory.appendingPathComponent("trace-\(UUID().uuidString).log")
        var environment = setup.token.environment.merging(extra) { $1 }
        var arguments = ["--module", throughP11Fork ? Products.module : setup.module, "--token", setup.token.label,
                         "--pin", setup.token.pin, "--key", "fork-key", "--mechanism", setup.mechanism]
        if throughP11Fork {
            environment["P11FORK_MODULE"] = setup.module
            environment["P11FORK_TRACE"] = traceFile.path
            environment["P11FORK_TRACE_LEVEL"] = "fork"
            arguments.append("--fork-safe")
        }
        let result = Baseline.note("forksafe \(scenario)",
                                   try runProgram(Products.path("p11fork-forksafe"), arguments + [scenario], environment: environment,
                                                  timeout: Baseline.timeout(through: throughP11Fork, else: 120)),
                                   through: throughP11Fork)
        return Outcome(result: result, trace: (try? String(contentsOf: traceFile, encoding: .utf8)) ?? "")
    }

    static func directLosesThenP11ForkKeeps(_ setup: Setup, _ scenario: String) throws {
        let direct = try run(setup, scenario, throughP11Fork: false)
        #expect(!direct.succeeded && direct.result.output.contains(setup.directShows), "directly: \(direct.report)")
        let through = try run(setup, scenario, throughP11Fork: true)
        #expect(through.succeeded, "through p11fork: \(through.report)")
        #expect(through.result.stdout.contains("fork-safe interface: 'PKCS 11' \(setup.forkSafeVersion)"), "\(through.report)")
        #expect(!through.trace.contains(setup.token.pin), "the PIN is in the trace")
        switch scenario {
        case "generated-lost":
            #expect(through.trace.contains("is lost in this child: it is a session object of the parent")
                    && through.trace.contains("it was made by C_GenerateKey, and a random key cannot be made again"), "\(through.report)")
        case "sign-update", "decrypt-update", "digest-update":
            #expect(through.trace.contains("carried into the child") && through.trace.contains("1 update(s) of 32 bytes replayed"), "\(through.report)")
        case "context-login":
            #expect(through.trace.contains("context-specific login replayed"), "\(through.report)")
        case "find":
            #expect(through.trace.contains("2 already returned to the parent, 3 left"), "\(through.report)")
        case "verify-signature-update":
            #expect(through.trace.contains(/operation C_VerifySignatureInit on session 0x[0-9a-f]+ carried into the child: C_VerifySignatureInit \(CKM_SHA256_HMAC, key 0x[0-9a-f]+\) and 1 update\(s\) of 32 bytes replayed/),
                    "\(through.report)")
            #expect(through.result.stdout.contains("a wrong signature -> 0xc0"), "\(through.report)")
        case "async-pending":
            #expect(through.result.stdout.contains("C_AsyncComplete for the parent's operation -> 0x91, C_AsyncJoin with its ID -> 0x160")
                    && through.result.stdout.contains("its own verification -> 0x204, completed -> 0x0"), "\(through.report)")
            #expect(through.trace.contains(/C_AsyncComplete\(C_VerifySignature\) on session 0x[0-9a-f]+: the asynchronous operation was begun in the parent and stays the parent's; answered CKR_OPERATION_NOT_INITIALIZED without asking the module/)
                    && through.trace.contains(/C_AsyncJoin\(C_VerifySignature\) on session 0x[0-9a-f]+: the asynchronous operation was begun in the parent and stays the parent's; answered CKR_SAVED_STATE_INVALID/),
                    "\(through.report)")
        case "decapsulate":
            #expect(through.trace.contains("made again (CKO_SECRET_KEY, session object; C_DecapsulateKey with mechanism 0xce480001")
                    && through.trace.contains("it was made by C_EncapsulateKey, and a random key cannot be made again"), "\(through.report)")
        case "unwrap-derive":
            #expect(through.trace.contains("C_UnwrapKey with CKM_AES_KEY_WRAP") && through.trace.contains("C_DeriveKey with"), "\(through.report)")
        default:
            break
        }
    }

    /// SoftHSM only: the network-HSM test module has no CKA_ALWAYS_AUTHENTICATE keys.
    @Test(arguments: scenarios + ["context-login"]) func softHSMWithResetOnFork(_ scenario: String) throws {
        try Self.directLosesThenP11ForkKeeps(try Self.softHSM(), scenario)
    }

    @Test(arguments: scenarios) func networkHSMTestModule(_ scenario: String) throws {
        try Self.directLosesThenP11ForkKeeps(try Self.netHSM(), scenario)
    }

    /// PKCS#11 3.2, over the 3.2 test module: a child continues a C_VerifySignatureInit + Update
    /// begun in its parent (the signature verifies, a wrong one is refused); a child uses a key
    /// its parent made by C_DecapsulateKey (made again from its recipe), while one made by
    /// C_EncapsulateKey (a random secret) is reported lost with the reason; an asynchronous
    /// operation of the parent (CKR_PENDING passed through, its ID from C_AsyncGetID) stays the
    /// parent's: the child gets CKR_OPERATION_NOT_INITIALIZED / CKR_SAVED_STATE_INVALID for it.
    @Test(arguments: ["verify-signature-update", "decapsulate", "async-pending"]) func pkcs11v32OverTheNetworkHSMTestModule(_ scenario: String) throws {
        try Self.directLosesThenP11ForkKeeps(try Self.netHSM(), scenario)
    }

    /// Past P11FORK_REPLAY_LIMIT the data fed to an operation is not kept: the child gets
    /// CKR_OPERATION_NOT_INITIALIZED (0x91) and the trace says why; the parent is unaffected.
    @Test func operationPastTheReplayLimitIsNotCarried() throws {
        let setup = try Self.softHSM()
        let outcome = try Self.run(setup, "sign-update", throughP11Fork: true, environment: ["P11FORK_REPLAY_LIMIT": "16"])
        #expect(outcome.result.output.contains("C_SignUpdate(session, (CK_BYTE_PTR)plaintext + 32, 32) -> 0x91"), "\(outcome.report)")
        #expect(outcome.trace.contains(/operation C_SignInit on session 0x[0-9a-f]+ is not carried into the child: p11fork's replay memory \(P11FORK_REPLAY_LIMIT, 16 bytes\) was full/),
                "\(outcome.report)")
    }

    /// P11FORK_REPLAY_LIMIT=0 keeps nothing: a session object is then lost in a child.
    @Test func replayLimitZeroKeepsNothing() throws {
        let setup = try Self.softHSM()
        let outcome = try Self.run(setup, "create-object", throughP11Fork: true, environment: ["P11FORK_REPLAY_LIMIT": "0"])
        #expect(!outcome.succeeded, "\(outcome.report)")
        #expect(outcome.trace.contains("nothing was kept to make it again"), "\(outcome.report)")
    }
}
