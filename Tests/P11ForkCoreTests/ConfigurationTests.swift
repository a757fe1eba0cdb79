import Testing
@testable import P11ForkCore

@Suite struct ConfigurationTests {
    private func load(_ environment: [String: String], file: String? = nil) -> Result<Configuration, ConfigurationProblem> {
        Configuration.load(environment: environment) { path in
            if let file { return .success(file) }
            return .failure(ConfigurationProblem("P11FORK_CONFIG=\(path): cannot read the file (No such file or directory): create it, or unset P11FORK_CONFIG"))
        }
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
        let configuration = try load(["P11FORK_CONFIG": "/etc/p11fork.conf"], file: file).get()
        #expect(configuration.modulePath == "/usr/lib/vendor/libhsm.so")
        #expect(configuration.moduleSource == "/etc/p11fork.conf line 2")
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
}
