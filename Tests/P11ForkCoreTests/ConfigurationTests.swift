import Testing
@testable import P11ForkCore

@Suite struct ConfigurationTests {
    private func load(_ environment: [String: String], file: String? = nil) -> Result<Configuration, ConfigurationProblem> {
        Configuration.load(environment: environment) { path in
            if let file, path != Configuration.systemFile { return .success(file) }
            return .failure(FileProblem(reason: "No such file or directory", missing: true))
        }
    }

    /// Loads with the given files (path: contents) and records which paths were read.
    private func load(_ environment: [String: String], reserved: String?, files: [String: String],
                      read: inout [String]) -> Result<Configuration, ConfigurationProblem> {
        var asked: [String] = []
        defer { read = asked }
        return Configuration.load(environment: environment, reserved: reserved) { path in
            asked.append(path)
            if let text = files[path] { return .success(text) }
            return .failure(FileProblem(reason: "No such file or directory", missing: true))
        }
    }

    private func load(_ environment: [String: String], reserved: String?, files: [String: String] = [:])
        -> Result<Configuration, ConfigurationProblem> {
        var read: [String] = []
        return load(environment, reserved: reserved, files: files, read: &read)
    }

    private func problem(_ result: Result<Configuration, ConfigurationProblem>) -> String? {
        if case .failure(let problem) = result { return problem.message }
        return nil
    }

    @Test func moduleFromTheEnvironmentWithTracingOff() throws {
        let configuration = try load(["P11FORK_MODULE": "/lib/x.so"]).get()
        #expect(configuration.modulePath == "/lib/x.so")
        #expect(configuration.moduleSource == "P11FORK_MODULE")
        #expect(configuration.trace == nil)
    }

    @Test func traceSettingsFromTheEnvironment() throws {
        let configuration = try load(["P11FORK_MODULE": "/m.so", "P11FORK_TRACE": "/tmp/t-%p.log",
                                      "P11FORK_TRACE_LEVEL": "full", "P11FORK_TRACE_FORMAT": "json"]).get()
        #expect(configuration.trace == .file(template: "/tmp/t-%p.log"))
        #expect(configuration.traceLevel == .full)
        #expect(configuration.traceFormat == .json)
        #expect(try load(["P11FORK_MODULE": "/m.so", "P11FORK_TRACE": "stderr"]).get().trace == .standardError)
        #expect(try load(["P11FORK_MODULE": "/m.so", "P11FORK_TRACE": "stderr"]).get().traceLevel == .calls)
    }

    @Test func fileWithCommentsQuotesAndBlankLines() throws {
        let file = """
        # p11fork for the signing service
        module = "/usr/lib/vendor/libhsm.so"

        trace=stderr   # while we debug
        trace_level = fork
        """
        let configuration = try load(["P11FORK_CONFIG": "/etc/p11fork/signing.conf"], file: file).get()
        #expect(configuration.modulePath == "/usr/lib/vendor/libhsm.so")
        #expect(configuration.moduleSource == "/etc/p11fork/signing.conf line 2")
        #expect(configuration.trace == .standardError)
        #expect(configuration.traceLevel == .fork)
    }

    @Test func theEnvironmentWinsOverTheFile() throws {
        let configuration = try load(["P11FORK_CONFIG": "/c", "P11FORK_MODULE": "/env.so"], file: "module = /file.so").get()
        #expect(configuration.modulePath == "/env.so")
    }

    @Test func missingModuleNamesTheVariableAndTheFix() {
        let message = problem(load([:]))
        #expect(message?.hasPrefix("P11FORK_MODULE is not set: set it to the path of the real PKCS#11 module") == true)
    }

    @Test func unknownKeyNamesTheLineAndTheKnownKeys() {
        let message = problem(load(["P11FORK_CONFIG": "/c"], file: "module = /m.so\nmodul = /x.so\n"))
        #expect(message == "/c line 2: unknown key 'modul': the keys are module, trace, trace_level, trace_format, strategy, login_replay, replay_limit")
    }

    @Test func badValuesAreRefusedWithTheChoices() {
        #expect(problem(load(["P11FORK_MODULE": "/m", "P11FORK_TRACE_LEVEL": "verbose"]))
            == "P11FORK_TRACE_LEVEL: 'verbose' is not a trace level: use error, fork, calls or full")
        #expect(problem(load(["P11FORK_CONFIG": "/c"], file: "module=/m\ntrace_format = xml"))
            == "/c line 2: 'xml' is not a trace format: use text or json")
        #expect(problem(load(["P11FORK_CONFIG": "/c"], file: "just words")) == "/c line 1: expected 'key = value', found 'just words'")
        #expect(problem(load(["P11FORK_CONFIG": "/c"], file: "module =")) == "/c line 1: 'module' has no value")
    }

    @Test func unreadableFileIsAProblem() {
        #expect(problem(load(["P11FORK_CONFIG": "/nonexistent"]))?.contains("cannot read the file") == true)
    }

    @Test func everyMessageIsOneLine() {
        for result in [load([:]), load(["P11FORK_CONFIG": "/c"], file: "x = 1"), load(["P11FORK_CONFIG": "/nope"])] {
            #expect(problem(result)?.contains("\n") == false)
        }
    }

    // Settings from C_Initialize's pReserved (p11-kit's x-init-reserved) and the system file.

    @Test func reservedStringNamesTheModuleAndTracing() throws {
        let configuration = try load([:], reserved: "p11fork: module=/r.so trace=/tmp/t-%p.log  trace_level=full").get()
        #expect(configuration.modulePath == "/r.so")
        #expect(configuration.moduleSource == "pReserved module")
        #expect(configuration.trace == .file(template: "/tmp/t-%p.log"))
        #expect(configuration.traceLevel == .full)
        #expect(try load([:], reserved: "p11fork:module=\"/opt/my hsm/lib.so\"\ttrace=stderr").get().modulePath == "/opt/my hsm/lib.so")
    }

    @Test func reservedConfigFileIsBelowTheReservedWords() throws {
        let files = ["/etc/p11fork/hsm.conf": "module = /file.so\ntrace_level = fork\ntrace = stderr\n"]
        let configuration = try load([:], reserved: "p11fork: config=/etc/p11fork/hsm.conf trace_level=error", files: files).get()
        #expect(configuration.modulePath == "/file.so")
        #expect(configuration.moduleSource == "/etc/p11fork/hsm.conf line 1")
        #expect(configuration.traceLevel == .error)
        #expect(configuration.trace == .standardError)
    }

    @Test func precedenceIsEnvironmentThenReservedThenConfigFileThenSystemFile() throws {
        let files = ["/c": "module = /c.so\ntrace = /c.log\ntrace_level = fork\nstrategy = reinitialize\n",
                     Configuration.systemFile: "module = /s.so\nlogin_replay = off\n"]
        // Each layer sets one key more than the one above it.
        let configuration = try load(["P11FORK_CONFIG": "/c", "P11FORK_TRACE_LEVEL": "full"],
                                     reserved: "p11fork: trace=stderr trace_level=error", files: files).get()
        #expect(configuration.traceLevel == .full)         // the environment
        #expect(configuration.trace == .standardError)     // pReserved
        #expect(configuration.strategy == .reinitialize)  // P11FORK_CONFIG's file
        #expect(configuration.modulePath == "/c.so")       // the file names it: the system file is not read
        #expect(configuration.loginReplay == true)
        var read: [String] = []
        _ = load(["P11FORK_MODULE": "/e.so"], reserved: "p11fork: module=/r.so", files: files, read: &read)
        #expect(read.isEmpty)
        #expect(try load(["P11FORK_MODULE": "/e.so"], reserved: "p11fork: module=/r.so", files: files).get().modulePath == "/e.so")
    }

    @Test func systemFileIsReadOnlyWhenNothingNamesTheModule() throws {
        let files = [Configuration.systemFile: "module = /s.so\ntrace = /s.log\nlogin_replay = off\n"]
        var read: [String] = []
        let configuration = try load(["P11FORK_TRACE": "stderr"], reserved: nil, files: files, read: &read).get()
        #expect(read == [Configuration.systemFile])
        #expect(configuration.modulePath == "/s.so")
        #expect(configuration.moduleSource == "\(Configuration.systemFile) line 1")
        #expect(configuration.trace == .standardError)     // the environment still wins over it
        #expect(configuration.loginReplay == false)
        _ = load([:], reserved: "p11fork: module=/r.so", files: files, read: &read)
        #expect(read.isEmpty)
    }

    @Test func withoutAnySourceTheMessageNamesEveryWay() {
        let message = problem(load([:], reserved: nil))
        #expect(message?.hasPrefix("P11FORK_MODULE is not set: set it to the path of the real PKCS#11 module") == true)
        #expect(message?.contains(Configuration.systemFile) == true)
        #expect(message?.contains("'p11fork: module=PATH' as pReserved (p11-kit: x-init-reserved)") == true)
    }

    @Test func unreadableSystemFileIsAProblemButAMissingOneIsNot() {
        let result = Configuration.load(environment: [:]) { _ in .failure(FileProblem(reason: "Permission denied")) }
        #expect(problem(result) == "\(Configuration.systemFile): cannot read the file (Permission denied): make it readable, or remove it")
        #expect(problem(load([:], reserved: nil))?.hasPrefix("P11FORK_MODULE is not set") == true)
    }

    @Test func badReservedStringsNameTheProblem() {
        #expect(problem(load([:], reserved: "p11fork: module=/m.so modul=/x.so"))
            == "pReserved: unknown key 'modul': the keys are module, trace, trace_level, trace_format, strategy, login_replay, replay_limit, config")
        #expect(problem(load([:], reserved: "p11fork: /m.so")) == "pReserved: expected 'key=value', found '/m.so'")
        #expect(problem(load([:], reserved: "p11fork: module")) == "pReserved: expected 'key=value', found 'module'")
        #expect(problem(load([:], reserved: "p11fork: module=\"/m.so")) == "pReserved module: the value has no closing '\"'")
        #expect(problem(load([:], reserved: "p11fork: module= trace=stderr")) == "pReserved: 'module' has no value")
        #expect(problem(load([:], reserved: "p11fork: module=/m.so trace_level=loud"))
            == "pReserved trace_level: 'loud' is not a trace level: use error, fork, calls or full")
        #expect(problem(load([:], reserved: "p11fork: config=/nope"))?.hasPrefix("pReserved config=/nope: cannot read the file (No such file or directory)") == true)
    }

    @Test func onlyStringsWithThePrefixAreClaimed() throws {
        func claimed(_ text: String) -> Result<String, ConfigurationProblem>? {
            text.withCString { Configuration.claimedReserved(UnsafeRawPointer($0)) }
        }
        #expect(claimed("configdir='sql:/etc/pki/nssdb'") == nil)
        #expect(claimed("p11fork") == nil)
        #expect(try claimed("p11fork: module=/m.so")?.get() == "p11fork: module=/m.so")
        guard case .failure(let tooLong)? = claimed("p11fork:" + String(repeating: "x", count: 1 << 16)) else {
            Issue.record("a string without an end within 64 KiB was taken")
            return
        }
        #expect(tooLong.message.contains("longer than 64 KiB"))
    }

    @Test func theEnvironmentNamesTheModuleThroughEitherVariable() {
        #expect(Configuration.environmentNamesModule(["P11FORK_MODULE": "/m.so"]))
        #expect(Configuration.environmentNamesModule(["P11FORK_CONFIG": "/c"]))
        #expect(!Configuration.environmentNamesModule(["P11FORK_TRACE": "stderr", "P11FORK_MODULE": ""]))
    }
}
