import ArgumentParser
import Foundation
import TraceReader

/// `p11fork doctor`: what fork does to your module, directly and through p11fork, and the
/// configuration that makes every scenario pass.
struct DoctorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor",
        abstract: "Runs fork scenarios against your module, directly and through libp11fork.so, and prints the configuration to use.",
        discussion: """
            Each scenario runs in throw-away processes under a time limit: a module that hangs or \
            crashes in a child is reported, never waited on. Read-only: sessions are opened \
            read-only, the doctor signs only with the key you name (or the first key that can \
            sign, and says which), logs in once before anything else (a wrong PIN stops it), never \
            changes a PIN and never writes token objects; --allow-session-objects lets it create \
            a session key (gone when the session ends). The PIN never appears in its output.
            Exit status: 0 every scenario passes through p11fork, 1 some do not (or the module \
            fails before any fork), 2 bad arguments.
            """
    )

    @Option(help: ArgumentHelp("The vendor's PKCS#11 module.", valueName: "path"))
    var module: String?

    @Option(help: ArgumentHelp("The user PIN (other users can see it in ps: prefer --pin-env or --pin-file).", valueName: "pin"))
    var pin: String?

    @Option(name: .customLong("pin-env"), help: ArgumentHelp("An environment variable holding the user PIN.", valueName: "var"))
    var pinEnv: String?

    @Option(name: .customLong("pin-file"), help: ArgumentHelp("A file holding the user PIN (one trailing newline ignored).", valueName: "file"))
    var pinFile: String?

    @Option(help: ArgumentHelp("The token's label (needed when the module has several tokens).", valueName: "label"))
    var token: String?

    @Option(help: ArgumentHelp("A PKCS#11 URI naming the token and key: 'pkcs11:token=…;object=…' (id=, serial=, type= too).", valueName: "uri"))
    var uri: String?

    @Option(help: ArgumentHelp("The label of the key to sign with (default: the first private or secret key that can sign).", valueName: "label"))
    var key: String?

    @Flag(name: .customLong("allow-session-objects"), help: "Also run the session-object scenario, which creates a session key.")
    var allowSessionObjects = false

    @Flag(help: "Print the result as JSON.")
    var json = false

    @Option(name: .customLong("p11fork"), help: ArgumentHelp("libp11fork.so (default: beside this tool, or in .build).", valueName: "path"))
    var p11fork: String?

    @Option(help: ArgumentHelp("Seconds a child may take before it counts as hung (5...300).", valueName: "seconds"))
    var timeout: Int = 15

    @Option(help: ArgumentHelp("Children in the worker scenarios (2...16).", valueName: "count"))
    var workers: Int = 4

    @Option(name: .customLong("worker-user"), help: ArgumentHelp("The user the workers switch to in the worker-switches-user scenario (run as root).", valueName: "name"))
    var workerUser: String = "nobody"

    @Option(name: .customLong("trace-dir"), help: ArgumentHelp("Keep the JSON traces of the runs through p11fork here (read them with 'p11fork trace').", valueName: "dir"))
    var traceDirectory: String?

    @Option(help: ArgumentHelp("'provider': also run a forking OpenSSL 3 program through pkcs11-provider (its own fork handling on top of the module's).", valueName: "consumer"))
    var consumer: String?

    @Option(help: ArgumentHelp("pkcs11-provider's module, with --consumer provider (default: OpenSSL's module folder, or .deps/pkcs11-provider).", valueName: "path"))
    var provider: String?

    func run() throws {
        let plan = try makePlan()
        // A helper that exits early must not kill the doctor while it writes the PIN to it.
        signal(SIGPIPE, SIG_IGN)
        let showProgress = isatty(2) == 1 && !json
        let doctor = try Doctor(plan: plan) { step in
            if showProgress { Output.status("… \(step)") }
        }
        defer { doctor.cleanUp() }
        let report: DoctorReport
        do {
            defer { if showProgress { Output.status(nil) } }
            report = try doctor.examine()
        }
        if json {
            Output.standard(try report.json())
        } else {
            Output.standard(report.text(style: Style.forStandardOutput()))
        }
        if !report.allPassWithP11fork { throw ExitCode(1) }
    }

    /// Checks the arguments; every problem is a one-line UsageError that says what to do.
    func makePlan() throws -> DoctorPlan {
        guard let module else {
            throw UsageError("--module is missing: name the vendor's PKCS#11 module, e.g. --module /usr/lib/softhsm/libsofthsm2.so")
        }
        let source = try PINSource.from(pin: pin, pinEnv: pinEnv, pinFile: pinFile)
        let pinValue = try source.read()
        Output.hide(pinValue)
        guard pinValue.utf8.count <= 255 else { throw UsageError("the PIN is longer than 255 bytes: give the token's user PIN") }

        let modulePath = ModuleLocator.absolute(module)
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: modulePath, isDirectory: &isDirectory), !isDirectory.boolValue else {
            throw UsageError("--module \(module): no such file: give the path of the vendor's PKCS#11 module (a .so file)")
        }
        let p11forkPath: String
        if let p11fork {
            p11forkPath = ModuleLocator.absolute(p11fork)
            guard FileManager.default.isReadableFile(atPath: p11forkPath) else {
                throw UsageError("--p11fork \(p11fork): no such file: give the path of libp11fork.so")
            }
        } else {
            guard let found = ModuleLocator.defaultP11Fork() else {
                throw UsageError("libp11fork.so not found beside this tool or in .build: build it (swift build --product p11fork) or give --p11fork PATH")
            }
            p11forkPath = found
        }
        let resolvedModule = URL(fileURLWithPath: modulePath).resolvingSymlinksInPath().path
        if resolvedModule == URL(fileURLWithPath: p11forkPath).resolvingSymlinksInPath().path {
            throw UsageError("--module names libp11fork.so itself: give the vendor's module; the doctor puts p11fork in front of it")
        }

        var tokenLabel = token
        var keyLabel = key
        var keyID: [UInt8]?
        var keyClass: String?
        var tokenSerial: String?
        if let uri {
            let parsed = try PKCS11URI(parsing: uri)
            if let uriToken = parsed.token {
                if let token, token != uriToken { throw UsageError("--token and --uri name different tokens: give the token once") }
                tokenLabel = uriToken
            }
            if let object = parsed.object {
                if let key, key != object { throw UsageError("--key and --uri's object= name different keys: give the key once") }
                keyLabel = object
            }
            tokenSerial = parsed.serial
            keyID = parsed.id
            keyClass = parsed.type.map { $0 == "private" ? "private" : "secret" }
        }
        guard (5...300).contains(timeout) else { throw UsageError("--timeout \(timeout): give a number of seconds from 5 to 300") }
        guard (2...16).contains(workers) else { throw UsageError("--workers \(workers): give a number of children from 2 to 16") }
        let providerPath = try providerModule()
        var plan = DoctorPlan(module: modulePath, p11fork: p11forkPath, pin: pinValue, tokenLabel: tokenLabel, tokenSerial: tokenSerial,
                          keyLabel: keyLabel, keyID: keyID, keyClass: keyClass, allowSessionObjects: allowSessionObjects,
                          timeout: timeout, workers: workers,
                          traceDirectory: traceDirectory.map { URL(fileURLWithPath: ModuleLocator.absolute($0)) })
        plan.provider = providerPath
        guard let entry = getpwnam(workerUser) else { throw UsageError("--worker-user \(workerUser): no such user: name one that exists (default nobody)") }
        guard entry.pointee.pw_uid != 0 else { throw UsageError("--worker-user \(workerUser): that is root: name a user without root's rights (default nobody)") }
        plan.workerUser = workerUser
        return plan
    }

    /// pkcs11-provider's module when --consumer provider asks for it; nil otherwise.
    func providerModule() throws -> String? {
        switch consumer {
        case nil:
            guard provider == nil else { throw UsageError("--provider goes with --consumer provider") }
            return nil
        case "provider"?:
            if let provider {
                let path = ModuleLocator.absolute(provider)
                guard FileManager.default.isReadableFile(atPath: path) else {
                    throw UsageError("--provider \(provider): no such file: give the path of pkcs11-provider's pkcs11.so")
                }
                return path
            }
            let candidates = ["/usr/lib/x86_64-linux-gnu/ossl-modules/pkcs11.so", "/usr/lib64/ossl-modules/pkcs11.so",
                              ".deps/pkcs11-provider/lib/ossl-modules/pkcs11.so"]
            guard let found = candidates.first(where: { FileManager.default.isReadableFile(atPath: $0) }) else {
                throw UsageError("pkcs11-provider not found in OpenSSL's module folder or .deps/pkcs11-provider: give --provider PATH (its pkcs11.so)")
            }
            return ModuleLocator.absolute(found)
        case let other?:
            throw UsageError("--consumer \(other): the one consumer the doctor runs is 'provider' (pkcs11-provider, OpenSSL 3)")
        }
    }
}
