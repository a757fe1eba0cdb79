import ArgumentParser
import Foundation

/// `p11fork`: the command-line tool beside libp11fork.so.
@main
struct P11ForkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "p11fork",
        abstract: "Checks what fork does to a PKCS#11 module, and reads p11fork's traces.",
        discussion: """
            'p11fork doctor' runs fork scenarios against your module directly and through \
            libp11fork.so and prints the configuration to use; 'p11fork trace' shows a JSON trace \
            (P11FORK_TRACE_FORMAT=json) per process, with fork recovery steps and errors.
            """,
        subcommands: [DoctorCommand.self, TraceCommand.self, DoctorHelperCommand.self]
    )

    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        // A PIN given on the command line is hidden even in argument errors.
        Output.hide(PINSource.valuesOfPINOptions(in: arguments))
        do {
            var command = try parseAsRoot(arguments)
            try command.run()
        } catch {
            exit(for: error, arguments: arguments)
        }
    }

    /// Usage errors: one line on stderr that names the fix, exit status 2. Help: exit 0.
    static func exit(for error: Error, arguments: [String]) -> Never {
        let subcommand = arguments.first.flatMap { ["doctor", "trace"].contains($0) ? " \($0)" : nil } ?? ""
        switch error {
        case let usage as UsageError:
            Output.error("p11fork\(subcommand): \(usage.description)")
            Foundation.exit(2)
        case let failure as CommandFailure:
            Output.error("p11fork\(subcommand): \(failure.description)")
            Foundation.exit(1)
        default:
            break
        }
        let code = exitCode(for: error)
        if code == .success {
            Output.standard(fullMessage(for: error))
            Foundation.exit(0)
        }
        if error is ExitCode { Foundation.exit(code.rawValue) }
        let message = message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
        if code == .validationFailure {
            Output.error("p11fork\(subcommand): \(message) (see 'p11fork\(subcommand) --help')")
            Foundation.exit(2)
        }
        Output.error("p11fork\(subcommand): \(message)")
        Foundation.exit(code.rawValue)
    }
}

/// A problem with the arguments: exit status 2, the message names the fix.
struct UsageError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The command could not do its work: exit status 1.
struct CommandFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
