import Foundation
import Testing

/// The lane (docs/FORK.md "The lane"): a child the broker serves makes its signing path's calls
/// through memory it shares with the broker, and every other call over p11-kit's RPC. Both reach
/// one module, so the child must answer exactly what its parent answers: the same deterministic
/// signatures (RSA PKCS #1 v1.5, single-part and in parts), the same attributes and objects, an
/// RSA-PSS signature (whose parameter p11-kit 0.24's RPC does not carry) that verifies, data
/// larger than the lane (which goes over the RPC), and the module's own refusal of a mechanism it
/// lacks (p11-kit's client refuses it too, and p11fork would then hash by itself: over the lane
/// the refusal is the module's, and stands). python-pkcs11 from the venv, SoftHSM with
/// `reset_on_fork`; directly, the child fails.
@Suite(.serialized) struct LaneTests {
    static let program = #"""
    import hashlib, json, os, signal, sys
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, MGF, ObjectClass

    module, label = sys.argv[1:3]
    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=label)
    session = token.open(user_pin=os.environ["TEST_PIN"])
    private = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, label="rsa-key")
    public = session.get_key(ObjectClass.PUBLIC_KEY, KeyType.RSA, label="rsa-key")
    ec_private = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label="ec-key")
    ec_public = session.get_key(ObjectClass.PUBLIC_KEY, KeyType.EC, label="ec-key")
    pss = dict(mechanism=Mechanism.SHA256_RSA_PKCS_PSS, mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32))

    def attempt(what):
        try:
            return what()
        except Exception as problem:
            return "fails: %s" % type(problem).__name__

    def battery():
        data = b"the lane carries this" * 20
        large = b"larger than the lane " * 20000
        return [
            ("PKCS #1 signature", attempt(lambda: private.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS).hex())),
            ("PKCS #1 signature in parts", attempt(lambda: private.sign(iter([data[:7], data[7:300], data[300:]]), mechanism=Mechanism.SHA256_RSA_PKCS).hex())),
            ("PKCS #1 signature of data larger than the lane", attempt(lambda: private.sign(large, mechanism=Mechanism.SHA256_RSA_PKCS).hex())),
            ("RSA-PSS signature verifies", attempt(lambda: public.verify(data, private.sign(data, **pss), **pss))),
            ("a wrong RSA-PSS signature does not verify", attempt(lambda: not public.verify(data + b"!", private.sign(data, **pss), **pss))),
            ("ECDSA signature verifies", attempt(lambda: ec_public.verify(hashlib.sha256(data).digest(), ec_private.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA), mechanism=Mechanism.ECDSA))),
            # SoftHSM 2.6 lacks the hashed ECDSA mechanisms: the child hears the module's refusal.
            ("CKM_ECDSA_SHA256, the module's own answer", attempt(lambda: len(ec_private.sign(data, mechanism=Mechanism.ECDSA_SHA256)))),
            ("modulus", attempt(lambda: bytes(public[Attribute.MODULUS]).hex())),
            ("public keys found", attempt(lambda: sorted(key.label for key in session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY})))),
            ("random bytes", attempt(lambda: len(session.generate_random(2048)))),
        ]

    mine = battery()
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)
        os.close(reading)
        os.write(writing, json.dumps(battery()).encode())
        os._exit(0)
    os.close(writing)
    received = b""
    while True:
        part = os.read(reading, 65536)
        if not part:
            break
        received += part
    os.waitpid(pid, 0)
    theirs = json.loads(received or b"[]")
    for (what, parent), (_, child) in zip(json.loads(json.dumps(mine)), theirs):
        print("%s: %s" % (what, "same" if parent == child else "differs: parent %s, child %s" % (str(parent)[:60], str(child)[:60])))
    valid = all(answer is True or (isinstance(answer, (str, list, int)) and not str(answer).startswith("fails"))
                for what, answer in mine if "own answer" not in what)
    same = len(theirs) == len(mine) and all(a == b for (_, a), (_, b) in zip(json.loads(json.dumps(mine)), theirs))
    print("the parent's own answers are all good: %s" % ("yes" if valid else "no"))
    print("result: %s" % ("same" if same else "differs"))
    """#

    static let available = FileManager.default.isExecutableFile(atPath: PythonConsumerTests.python)

    @Test(.enabled(if: available, "needs the venv (scripts/install-deps.sh)"))
    func aChildOnTheLaneAnswersWhatItsParentAnswers() throws {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "rsa-key", type: "rsa:2048", id: "01")
        try token.generateKeyPair(label: "ec-key", type: "EC:prime256v1", id: "02")
        let script = token.directory.appendingPathComponent("lane.py")
        try Self.program.write(to: script, atomically: true, encoding: .utf8)
        let trace = token.directory.appendingPathComponent("trace.log").path
        let environment = token.environment.merging(["TEST_PIN": token.pin]) { $1 }

        // Directly: SoftHSM refuses what the child inherited.
        let direct = Baseline.note("a child of a python-pkcs11 process", try runProgram(
            PythonConsumerTests.python, [script.path, RealModules.softHSM, token.label], environment: environment, timeout: Baseline.timeout), through: false)
        print("directly:\n\(direct.stdout)")
        #expect(direct.stdout.contains("result: differs"), "directly: \(direct.output)")

        let through = try runProgram(PythonConsumerTests.python, [script.path, Products.module, token.label], environment: environment.merging([
            "P11FORK_MODULE": RealModules.softHSM, "P11FORK_STRATEGY": "broker", "P11FORK_TRACE": trace, "P11FORK_TRACE_LEVEL": "fork",
        ]) { $1 }, timeout: 120)
        let text = (try? String(contentsOfFile: trace, encoding: .utf8)) ?? ""
        print("through p11fork, the broker:\n\(through.stdout)")
        #expect(through.stdout.contains("the parent's own answers are all good: yes"), "\(through.output)")
        #expect(through.stdout.contains("result: same") && !through.stdout.contains("differs"), "\(through.output)\ntrace:\n\(text.suffix(4000))")
        #expect(text.contains("module served by the broker") && text.contains(", with a lane"), "\(text.suffix(4000))")
        #expect(!text.contains("the broker closed this process's lane"), "\(text.suffix(4000))")
        #expect(!text.contains(token.pin) && !through.output.contains(token.pin), "the PIN is in the trace or the output")
    }
}
