import Foundation
import Glibc
import Testing
@testable import P11ForkCore

/// Inputs someone other than the process's owner may have chosen (docs/SECURITY.md): the
/// environment under AT_SECURE, the files that give settings or code, and trace files. Each
/// check is run on real files in a folder of the test's own; the owner checks need root (CI).
@Suite struct InputTrustTests {
    private static let isRoot = geteuid() == 0
    /// Root's rules; a test run by another user trusts its own files too, as setuid to it would.
    private let privileged = InputTrust.FileRules(privileged: true, trustedOwner: isRoot ? nil : geteuid())
    private let unprivileged = InputTrust.FileRules(privileged: false, trustedOwner: nil)

    /// A folder of the test's own (0755) under the temporary folder, removed at the end.
    private final class Folder {
        let path: String
        init() throws {
            var template = Array("/tmp/p11fork-trust-XXXXXX".utf8CString)
            guard let made = mkdtemp(&template) else { throw POSIXError(.EIO) }
            path = String(cString: made)
            chmod(path, 0o755)
        }
        deinit { try? FileManager.default.removeItem(atPath: path) }

        func file(_ name: String, _ text: String = "module = /m.so\n", mode: mode_t = 0o644) throws -> String {
            let file = "\(path)/\(name)"
            try text.write(toFile: file, atomically: false, encoding: .utf8)
            chmod(file, mode)
            return file
        }

        func folder(_ name: String, mode: mode_t) -> String {
            let folder = "\(path)/\(name)"
            mkdir(folder, 0o755)
            chmod(folder, mode)
            return folder
        }
    }

    private func refusal(_ result: Result<String, InputTrust.Refusal>) -> String? {
        if case .failure(let refusal) = result { return refusal.detail }
        return nil
    }

    // MARK: the environment

    @Test func secureExecutionIgnoresEveryP11ForkVariable() {
        let environment = ["P11FORK_MODULE": "/tmp/x/evil.so", "P11FORK_TRACE": "/etc/shadow",
                           "P11FORK_CONFIG": "/tmp/x/c.conf", "SOFTHSM2_CONF": "/etc/softhsm/softhsm2.conf", "PATH": "/bin"]
        let (kept, ignored) = InputTrust.settingsEnvironment(environment, secure: true)
        #expect(kept == ["SOFTHSM2_CONF": "/etc/softhsm/softhsm2.conf", "PATH": "/bin"])
        #expect(ignored == ["P11FORK_CONFIG", "P11FORK_MODULE", "P11FORK_TRACE"])
        #expect(InputTrust.ignoredMessage(ignored).hasPrefix("p11fork: P11FORK_CONFIG, P11FORK_MODULE, P11FORK_TRACE ignored: this program runs with rights its user did not give it"))
        // Without AT_SECURE everything is kept; with it and nothing to ignore, nothing is said.
        #expect(InputTrust.settingsEnvironment(environment, secure: false).kept == environment)
        #expect(InputTrust.settingsEnvironment(["PATH": "/bin"], secure: true).ignored.isEmpty)
    }

    @Test func secureExecutionStillReadsTheSystemFileAndPReserved() throws {
        // What is left of the environment names no module: the settings come from pReserved
        // (and the files it names) or /etc/p11fork.conf.
        let (kept, _) = InputTrust.settingsEnvironment(["P11FORK_MODULE": "/tmp/x/evil.so"], secure: true)
        #expect(!Configuration.environmentNamesModule(kept))
        let configuration = try Configuration.load(environment: kept, reserved: "p11fork: module=/usr/lib/m.so") { _ in
            .failure(FileProblem(reason: "No such file or directory", missing: true))
        }.get()
        #expect(configuration.modulePath == "/usr/lib/m.so")
    }

    // MARK: files that give settings or code

    @Test func aFileOnlyRootCanChangePasses() throws {
        let folder = try Folder()
        let file = try folder.file("p11fork.conf")
        #expect(try InputTrust.checkedPath(file, rules: privileged).get() == file)
        #expect(try InputTrust.checkedPath(file, rules: unprivileged).get() == file)
    }

    @Test func aGroupOrWorldWritableFileIsRefusedWhenPrivileged() throws {
        let folder = try Folder()
        let group = try folder.file("group.conf", mode: 0o664)
        let detail = try #require(refusal(InputTrust.checkedPath(group, rules: privileged)))
        #expect(detail == "refused: the file is writable by group or others (owner \(InputTrust.userName(geteuid())), mode 0664): anyone who can change it could run code in this privileged process: chmod go-w \(group)")
        // An unprivileged process refuses only what anyone may write.
        #expect(refusal(InputTrust.checkedPath(group, rules: unprivileged)) == nil)
        let world = try folder.file("world.conf", mode: 0o646)
        #expect(refusal(InputTrust.checkedPath(world, rules: unprivileged))?.contains("is writable by anyone") == true)
        #expect(refusal(InputTrust.checkedPath(world, rules: privileged))?.contains("chmod go-w \(world)") == true)
    }

    @Test func aWritableFolderOnThePathIsRefused() throws {
        let folder = try Folder()
        let open = folder.folder("open", mode: 0o777)
        let file = try folder.file("open/libvendor.so")
        let detail = try #require(refusal(InputTrust.checkedPath(file, rules: privileged)))
        #expect(detail.hasPrefix("refused: the folder \(open) on its path is writable by group or others"))
        #expect(detail.hasSuffix("chmod go-w \(open)"))
        #expect(refusal(InputTrust.checkedPath(file, rules: unprivileged))?.contains("the folder \(open) on its path is writable by anyone") == true)
        // Group-writable: refused when privileged only.
        let shared = folder.folder("shared", mode: 0o775)
        let inShared = try folder.file("shared/p11fork.conf")
        #expect(refusal(InputTrust.checkedPath(inShared, rules: privileged))?.contains("the folder \(shared) on its path") == true)
        #expect(refusal(InputTrust.checkedPath(inShared, rules: unprivileged)) == nil)
    }

    @Test func aStickyFolderOwnedByRootPassesLikeTmp() throws {
        let folder = try Folder()
        _ = folder.folder("sticky", mode: 0o1777)
        let file = try folder.file("sticky/p11fork.conf")
        // /tmp itself is on the path of every file of this test.
        #expect(refusal(InputTrust.checkedPath(file, rules: privileged)) == nil)
        #expect(refusal(InputTrust.checkedPath(file, rules: unprivileged)) == nil)
    }

    @Test(.enabled(if: isRoot)) func aFileOfAnotherUserIsRefusedWhenPrivileged() throws {
        let folder = try Folder()
        let file = try folder.file("nobody.conf")
        chown(file, 65534, 65534)
        let detail = try #require(refusal(InputTrust.checkedPath(file, rules: privileged)))
        #expect(detail.hasPrefix("refused: the file is not owned by root (owner uid 65534"))
        #expect(detail.hasSuffix("chown root \(file)"))
        // A setuid program running as that user trusts it (its owner is who it runs as).
        #expect(refusal(InputTrust.checkedPath(file, rules: .init(privileged: true, trustedOwner: 65534))) == nil)
        #expect(refusal(InputTrust.checkedPath(file, rules: unprivileged)) == nil)
        // A sticky folder that another user owns could be emptied by that user.
        let theirs = folder.folder("theirs", mode: 0o1777)
        chown(theirs, 65534, 65534)
        let inTheirs = try folder.file("theirs/p11fork.conf")
        #expect(refusal(InputTrust.checkedPath(inTheirs, rules: privileged))?.contains("the folder \(theirs) on its path is not owned by root") == true)
    }

    @Test func whoIsTrustedBesidesRoot() {
        // Root: root only. Setuid to another user: that user too (its files are the program's).
        #expect(InputTrust.FileRules.of(euid: 0, uid: 1000, secure: true) == .init(privileged: true, trustedOwner: nil))
        #expect(InputTrust.FileRules.of(euid: 5, uid: 1000, secure: true) == .init(privileged: true, trustedOwner: 5))
        // Setgid or file capabilities: the effective user is who started it, and is not trusted.
        #expect(InputTrust.FileRules.of(euid: 1000, uid: 1000, secure: true) == .init(privileged: true, trustedOwner: nil))
        // An ordinary process.
        #expect(InputTrust.FileRules.of(euid: 1000, uid: 1000, secure: false) == .init(privileged: false, trustedOwner: 1000))
    }

    @Test func aSymbolicLinkIsResolvedAndItsTargetChecked() throws {
        let folder = try Folder()
        let target = try folder.file("real.conf")
        let open = folder.folder("open", mode: 0o777)
        symlink(target, "\(open)/link.conf")
        // The caller opens the target, whose folders were checked, never the link again.
        #expect(try InputTrust.checkedPath("\(open)/link.conf", rules: privileged).get() == target)
        let badTarget = try folder.file("open/bad.conf")
        symlink(badTarget, "\(folder.path)/good-looking.conf")
        #expect(refusal(InputTrust.checkedPath("\(folder.path)/good-looking.conf", rules: privileged))?.contains("the folder \(open) on its path") == true)
    }

    @Test func aMissingFileIsLeftToTheCallersMessage() throws {
        #expect(try InputTrust.checkedPath("/nonexistent/p11fork.conf", rules: privileged).get() == "/nonexistent/p11fork.conf")
    }

    @Test func settingsFilesAreReadOnlyWhenTheyPass() throws {
        let folder = try Folder()
        let good = try folder.file("good.conf")
        #expect(try Configuration.readFile(good, rules: privileged).get() == "module = /m.so\n")
        let writable = try folder.file("writable.conf", mode: 0o666)
        let problem = try #require(Configuration.readFile(writable, rules: privileged).failure)
        #expect(problem.refused)
        // A refused file is a configuration problem that names the file and the fix.
        let loaded = Configuration.load(environment: ["P11FORK_CONFIG": writable]) { Configuration.readFile($0, rules: privileged) }
        #expect(loaded.failure?.message == "P11FORK_CONFIG=\(writable): \(problem.reason)")
    }

    @Test func aFIFOOrADeviceIsNeverReadAsSettings() throws {
        let folder = try Folder()
        let fifo = "\(folder.path)/fifo.conf"
        mkfifo(fifo, 0o600)
        // Would wait forever for a writer if it were opened for reading as a file.
        #expect(Configuration.readFile(fifo, rules: privileged).failure?.reason == "not a regular file")
        // A device anyone may write is refused before it is opened; read, it would never end.
        #expect(Configuration.readFile("/dev/zero", rules: unprivileged).failure?.refused == true)
    }

    @Test func aRefusedSystemFileStopsTheConfiguration() {
        let loaded = Configuration.load(environment: [:]) { path in
            path == Configuration.systemFile
                ? .failure(FileProblem(reason: "refused: the file is writable by group or others (owner root, mode 0666): …", refused: true))
                : .failure(FileProblem(reason: "No such file or directory", missing: true))
        }
        #expect(loaded.failure?.message == "/etc/p11fork.conf: refused: the file is writable by group or others (owner root, mode 0666): …")
    }

    // MARK: trace files

    private func contents(_ path: String) -> String? { try? String(contentsOfFile: path, encoding: .utf8) }

    @Test func aTraceFileIsCreatedForThisUserOnly() throws {
        let folder = try Folder()
        let path = "\(folder.path)/trace.log"
        let fd = try Trace.openFile(path, exclusive: false).get()
        defer { close(fd) }
        var status = stat()
        fstat(fd, &status)
        #expect(status.st_mode & 0o777 == 0o600)
        #expect(status.st_uid == geteuid())
        // Appending to one's own file is what a trace does, and the descriptor blocks again.
        #expect(fcntl(fd, F_GETFL) & O_NONBLOCK == 0)
        let again = try Trace.openFile(path, exclusive: false).get()
        close(again)
    }

    @Test func aPlantedSymbolicLinkIsNeverFollowed() throws {
        let folder = try Folder()
        let victim = try folder.file("victim", "untouched\n", mode: 0o600)
        let link = "\(folder.path)/trace.log"
        symlink(victim, link)
        #expect(Trace.openFile(link, exclusive: false).failure == .refused("it is a symbolic link, which p11fork never follows to write a trace (anyone who could write in its folder may have planted it): name the file itself"))
        #expect(Trace.openFile(link, exclusive: true).failure?.isRefusal == true)
        // A dangling link would have been created through, as root, anywhere.
        let dangling = "\(folder.path)/dangling.log"
        symlink("\(folder.path)/created-through-link", dangling)
        #expect(Trace.openFile(dangling, exclusive: false).failure?.isRefusal == true)
        #expect(!FileManager.default.fileExists(atPath: "\(folder.path)/created-through-link"))
        #expect(contents(victim) == "untouched\n")
    }

    @Test func aFIFOIsRefusedWithoutWaiting() throws {
        let folder = try Folder()
        let fifo = "\(folder.path)/trace.fifo"
        mkfifo(fifo, 0o600)
        #expect(Trace.openFile(fifo, exclusive: false).failure == .refused("it is a FIFO, not a regular file: name a regular file, or use stderr"))
        #expect(Trace.openFile(folder.path, exclusive: false).failure == .refused("it is a folder: name a file in it"))
        #expect(Trace.openFile("/dev/null", exclusive: false).failure?.isRefusal == true)
    }

    @Test(.enabled(if: isRoot)) func anotherUsersFileIsRefused() throws {
        let folder = try Folder()
        let theirs = try folder.file("theirs.log", "theirs\n", mode: 0o666)
        chown(theirs, 65534, 65534)
        let problem = try #require(Trace.openFile(theirs, exclusive: false).failure)
        #expect(problem == .refused("it belongs to uid 65534 (nobody), not to this process's user (root): p11fork appends only to its own user's files; remove it, or name another file"))
        #expect(contents(theirs) == "theirs\n")
    }

    @Test func aFileWithASecondNameIsRefused() throws {
        let folder = try Folder()
        let original = try folder.file("original", "kept\n", mode: 0o600)
        let trace = "\(folder.path)/trace.log"
        link(original, trace)
        #expect(Trace.openFile(trace, exclusive: false).failure?.isRefusal == true)
        #expect(contents(original) == "kept\n")
    }

    @Test func aPerProcessTraceIsAlwaysANewFile() throws {
        let folder = try Folder()
        let existing = try folder.file("trace-1234.log", "old\n", mode: 0o600)
        #expect(Trace.openFile(existing, exclusive: true).failure == .refused("it exists already, and a trace named with %p is always a new file (one made there by someone else could be a trap): remove the old trace files"))
        #expect(contents(existing) == "old\n")
        let fresh = "\(folder.path)/trace-1235.log"
        let fd = try Trace.openFile(fresh, exclusive: true).get()
        close(fd)
        #expect(FileManager.default.fileExists(atPath: fresh))
    }

    @Test func aFolderThatDoesNotExistIsAConfigurationProblemNotARefusal() {
        #expect(Trace.openFile("/nonexistent/dir/t.log", exclusive: false).failure == .failed("No such file or directory"))
    }
}

extension Result {
    var failure: Failure? {
        if case .failure(let failure) = self { return failure }
        return nil
    }
}

extension Trace.OpenProblem {
    var isRefusal: Bool {
        if case .refused = self { return true }
        return false
    }
}
