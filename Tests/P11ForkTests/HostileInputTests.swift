import Foundation
import XCTest

/// Inputs from someone other than the process's owner (docs/SECURITY.md), through real programs:
/// a setuid-root program run by `nobody` with hostile P11FORK_* variables, configuration files
/// and modules others can change (refused when running as root), and trace paths that are traps
/// (a planted symbolic link, a FIFO, another user's file). The setuid and ownership cases need
/// root, as CI has.
final class HostileInputTests: XCTestCase {
    private var work: URL!

    override func setUpWithError() throws {
        guard geteuid() == 0 else { throw XCTSkip("needs root: makes a setuid-root program and files of other users") }
        work = FileManager.default.temporaryDirectory.appendingPathComponent("p11fork-hostile-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
        chmod(work.path, 0o755)
    }

    override func tearDownWithError() throws {
        if let work { try? FileManager.default.removeItem(at: work) }
    }

    /// A folder under the test's folder with an owner and a mode.
    private func folder(_ name: String, owner: uid_t = 0, mode: mode_t = 0o755) throws -> URL {
        let folder = work.appendingPathComponent(name)
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        chown(folder.path, owner, owner)
        chmod(folder.path, mode)
        return folder
    }

    @discardableResult
    private func file(_ url: URL, _ text: String, owner: uid_t = 0, mode: mode_t = 0o644) throws -> URL {
        try text.write(to: url, atomically: false, encoding: .utf8)
        chown(url.path, owner, owner)
        chmod(url.path, mode)
        return url
    }

    /// The attacker's library: its constructor leaves a mark (with the rights it ran with) in
    /// `mark`, which is how a load shows, even one that fails later as "not a PKCS#11 module".
    private func attackerLibrary(in folder: URL, mark: URL) throws -> URL {
        let source = folder.appendingPathComponent("evil.c")
        try file(source, """
        #include <stdio.h>
        #include <unistd.h>
        __attribute__((constructor)) static void mark(void) {
            FILE *f = fopen("\(mark.path)", "a");
            if (f) { fprintf(f, "loaded with euid %d\\n", (int)geteuid()); fclose(f); }
        }
        """, owner: 65534)
        let library = folder.appendingPathComponent("evil.so")
        let built = try runProgram("/usr/bin/cc", ["-shared", "-fPIC", "-o", library.path, source.path])
        XCTAssertEqual(built.status, 0, built.output)
        chown(library.path, 65534, 65534)
        return library
    }

    /// The probe in a folder of root's: a copy of p11fork-setuid-probe (setuid root when asked)
    /// with its probe.conf; `reserved` is the program's own C_Initialize pReserved.
    private func probe(setuid: Bool, reserved: String?, token: String) throws -> URL {
        let folder = try self.folder("program-\(setuid ? "setuid" : "plain")-\(UUID().uuidString.prefix(8))")
        let program = folder.appendingPathComponent("probe")
        try FileManager.default.copyItem(atPath: Products.path("p11fork-setuid-probe"), toPath: program.path)
        chmod(program.path, setuid ? 0o4755 : 0o755)
        try file(folder.appendingPathComponent("probe.conf"),
                 "library=\(Products.module)\n" + (reserved.map { "reserved=\($0)\n" } ?? "") + "token=\(token)\n")
        return program
    }

    private func asNobody(_ program: [String], environment: [String: String]) throws -> ProcessResult {
        try runProgram("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups"] + program,
                       environment: environment, timeout: 60)
    }

    /// A token root alone may use, in a folder nobody can look into.
    private func rootToken() throws -> SoftHSMToken {
        let token = try SoftHSMToken()
        chmod(token.directory.path, 0o700)
        return token
    }

    /// Everything in `folder` that the test did not put there.
    private func unexpectedFiles(in folder: URL, besides known: Set<String>) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: folder.path).filter { !known.contains($0) }.sorted()
    }

    // MARK: setuid

    /// Run by nobody with every P11FORK_ variable pointing at the attacker's files, a setuid-root
    /// program neither loads the attacker's library nor writes a trace, and still works from the
    /// configuration it names itself (a root-owned file).
    func testSetuidProgramIgnoresTheCallersVariables() throws {
        let token = try rootToken()
        let attacker = try folder("attacker", owner: 65534)
        let mark = attacker.appendingPathComponent("mark")
        let evil = try attackerLibrary(in: attacker, mark: mark)
        let evilConf = try file(attacker.appendingPathComponent("evil.conf"), "module = \(evil.path)\ntrace = \(attacker.path)/from-config.log\n", owner: 65534)
        let rootConf = try file(try folder("etc").appendingPathComponent("p11fork.conf"), "module = \(RealModules.softHSM)\n")
        let program = try probe(setuid: true, reserved: "p11fork: config=\(rootConf.path)", token: token.label)
        let known = Set(try FileManager.default.contentsOfDirectory(atPath: attacker.path))
        var environment = token.environment
        environment["P11FORK_MODULE"] = evil.path
        environment["P11FORK_CONFIG"] = evilConf.path
        environment["P11FORK_TRACE"] = attacker.appendingPathComponent("trace.log").path
        environment["P11FORK_TRACE_LEVEL"] = "full"

        let result = try asNobody([program.path], environment: environment)
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertTrue(result.stdout.contains("uid=65534 euid=0"), result.output)
        XCTAssertTrue(result.stdout.contains("token: \(token.label)"), result.output)
        XCTAssertFalse(FileManager.default.fileExists(atPath: mark.path), "the attacker's library ran: \(result.output)")
        XCTAssertEqual(try unexpectedFiles(in: attacker, besides: known), [], result.output)
        let said = result.stderr.split(separator: "\n").filter { $0.hasPrefix("p11fork: ") }
        XCTAssertEqual(said, ["p11fork: P11FORK_CONFIG, P11FORK_MODULE, P11FORK_TRACE, P11FORK_TRACE_LEVEL ignored: this program runs with rights its user did not give it (setuid, setgid or file capabilities); p11fork takes its settings only from /etc/p11fork.conf or from the program (C_Initialize's pReserved), in files only root can change"], result.output)
    }

    /// The control: the same program without the setuid bit, run by nobody, does load the
    /// library its user names (that user's own choice, with that user's rights): the mark works.
    func testTheMarkShowsALoadWithoutSetuid() throws {
        let attacker = try folder("attacker", owner: 65534)
        let mark = attacker.appendingPathComponent("mark")
        let evil = try attackerLibrary(in: attacker, mark: mark)
        let program = try probe(setuid: false, reserved: nil, token: "any")
        let result = try asNobody([program.path], environment: ["P11FORK_MODULE": evil.path])
        XCTAssertNotEqual(result.status, 0, result.output)
        XCTAssertTrue(result.stderr.contains("is not a PKCS#11 module"), result.output)
        XCTAssertEqual(try String(contentsOf: mark, encoding: .utf8), "loaded with euid 65534\n")
    }

    /// A setuid program whose own pReserved names a configuration file others can change refuses it.
    func testSetuidProgramRefusesAConfigurationOthersCanChange() throws {
        let token = try rootToken()
        let shared = try folder("shared", mode: 0o777)
        let conf = try file(shared.appendingPathComponent("p11fork.conf"), "module = \(RealModules.softHSM)\n")
        let program = try probe(setuid: true, reserved: "p11fork: config=\(conf.path)", token: token.label)
        let result = try asNobody([program.path], environment: token.environment)
        XCTAssertEqual(result.status, 1, result.output)
        XCTAssertTrue(result.stderr.contains("p11fork: pReserved config=\(conf.path): refused: the folder \(shared.path) on its path is writable by group or others (owner root, mode 0777): anyone who can change it could run code in this privileged process: chmod go-w \(shared.path)"), result.output)
        XCTAssertTrue(result.stdout.contains("C_Initialize: CKR_GENERAL_ERROR"), result.output)
    }

    // MARK: files others can change, as root

    /// `pkcs11-tool -L` through p11fork as root, and the one line p11fork wrote on stderr.
    private func listSlots(_ environment: [String: String], file: StaticString, line: UInt) throws -> (ProcessResult, String) {
        let result = try runProgram("/usr/bin/pkcs11-tool", ["--module", Products.module, "-L"], environment: environment, timeout: 30)
        let lines = result.stderr.split(separator: "\n").filter { $0.hasPrefix("p11fork: ") }
        XCTAssertEqual(lines.count, 1, result.stderr, file: file, line: line)
        return (result, lines.first.map(String.init) ?? "")
    }

    /// The p11fork line of a run that must fail in C_Initialize.
    private func refusal(_ environment: [String: String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let (result, said) = try listSlots(environment, file: file, line: line)
        XCTAssertNotEqual(result.status, 0, result.output, file: file, line: line)
        XCTAssertTrue(result.output.contains("C_Initialize failed: rv = CKR_GENERAL_ERROR"), result.output, file: file, line: line)
        return said
    }

    func testRootRefusesConfigurationFilesOthersCanChange() throws {
        let etc = try folder("etc")
        let module = "module = \(RealModules.softHSM)\n"
        let group = try file(etc.appendingPathComponent("group.conf"), module, mode: 0o664)
        XCTAssertEqual(try refusal(["P11FORK_CONFIG": group.path]),
                       "p11fork: P11FORK_CONFIG=\(group.path): refused: the file is writable by group or others (owner root, mode 0664): anyone who can change it could run code in this privileged process: chmod go-w \(group.path)")
        let world = try file(etc.appendingPathComponent("world.conf"), module, mode: 0o666)
        XCTAssertTrue(try refusal(["P11FORK_CONFIG": world.path]).contains("refused: the file is writable by group or others (owner root, mode 0666)"))
        let theirs = try file(etc.appendingPathComponent("theirs.conf"), module, owner: 65534)
        XCTAssertEqual(try refusal(["P11FORK_CONFIG": theirs.path]),
                       "p11fork: P11FORK_CONFIG=\(theirs.path): refused: the file is not owned by root (owner uid 65534 (nobody), mode 0644): a process running as root or with setuid rights uses only what root owns: chown root \(theirs.path)")
        let open = try folder("open", mode: 0o777)
        let under = try file(open.appendingPathComponent("p11fork.conf"), module)
        XCTAssertTrue(try refusal(["P11FORK_CONFIG": under.path]).contains("refused: the folder \(open.path) on its path is writable by group or others (owner root, mode 0777)"))
    }

    func testRootRefusesAModuleOthersCanChange() throws {
        let open = try folder("vendor", mode: 0o775)
        let copy = open.appendingPathComponent("libvendor.so")
        try FileManager.default.copyItem(atPath: URL(fileURLWithPath: RealModules.softHSM).resolvingSymlinksInPath().path, toPath: copy.path)
        XCTAssertEqual(try refusal(["P11FORK_MODULE": copy.path]),
                       "p11fork: P11FORK_MODULE=\(copy.path): refused: the folder \(open.path) on its path is writable by group or others (owner root, mode 0775): anyone who can change it could run code in this privileged process: chmod go-w \(open.path)")
        // World-writable, or another user's: refused too.
        chmod(open.path, 0o755)
        chmod(copy.path, 0o757)
        XCTAssertTrue(try refusal(["P11FORK_MODULE": copy.path]).contains("refused: the file is writable by group or others (owner root, mode 0757)"))
        chmod(copy.path, 0o755)
        chown(copy.path, 65534, 65534)
        XCTAssertTrue(try refusal(["P11FORK_MODULE": copy.path]).contains("refused: the file is not owned by root (owner uid 65534 (nobody), mode 0755)"))
        // The same module where only root can change it loads.
        chown(copy.path, 0, 0)
        let token = try SoftHSMToken()
        var environment = token.environment
        environment["P11FORK_MODULE"] = copy.path
        let result = try runProgram("/usr/bin/pkcs11-tool", ["--module", Products.module, "-L"], environment: environment, timeout: 30)
        XCTAssertEqual(result.status, 0, result.output)
        XCTAssertTrue(result.stdout.contains("token label        : \(token.label)"), result.output)
    }

    // MARK: trace paths that are traps

    /// pkcs11-tool with the trace named `trace`: it must still work, say why there is no trace in
    /// one line, and leave the target alone.
    private func refusedTrace(_ trace: String, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let token = try SoftHSMToken()
        var environment = token.environment
        environment["P11FORK_MODULE"] = RealModules.softHSM
        environment["P11FORK_TRACE"] = trace
        let (result, said) = try listSlots(environment, file: file, line: line)
        XCTAssertEqual(result.status, 0, result.output, file: file, line: line)
        XCTAssertTrue(result.stdout.contains("token label        : \(token.label)"), result.output, file: file, line: line)
        return said
    }

    func testAPlantedSymbolicLinkIsNotFollowed() throws {
        let victim = try file(try folder("etc").appendingPathComponent("victim"), "root's file\n", mode: 0o600)
        let shared = try folder("shared", mode: 0o1777)
        let link = shared.appendingPathComponent("p11trace.log")
        // Planted by another user, as in /tmp.
        XCTAssertEqual(symlink(victim.path, link.path), 0)
        lchown(link.path, 65534, 65534)
        XCTAssertEqual(try refusedTrace(link.path),
                       "p11fork: P11FORK_TRACE=\(link.path): refused the trace file: it is a symbolic link, which p11fork never follows to write a trace (anyone who could write in its folder may have planted it): name the file itself; nothing is traced")
        XCTAssertEqual(try String(contentsOf: victim, encoding: .utf8), "root's file\n")
    }

    func testAFIFOIsRefusedAndNothingWaits() throws {
        let fifo = work.appendingPathComponent("trace.fifo")
        XCTAssertEqual(mkfifo(fifo.path, 0o666), 0)
        XCTAssertEqual(try refusedTrace(fifo.path),
                       "p11fork: P11FORK_TRACE=\(fifo.path): refused the trace file: it is a FIFO, not a regular file: name a regular file, or use stderr; nothing is traced")
    }

    func testAnotherUsersFileIsNotAppendedTo() throws {
        let theirs = try file(work.appendingPathComponent("theirs.log"), "theirs\n", owner: 65534, mode: 0o666)
        XCTAssertEqual(try refusedTrace(theirs.path),
                       "p11fork: P11FORK_TRACE=\(theirs.path): refused the trace file: it belongs to uid 65534 (nobody), not to this process's user (root): p11fork appends only to its own user's files; remove it, or name another file; nothing is traced")
        XCTAssertEqual(try String(contentsOf: theirs, encoding: .utf8), "theirs\n")
    }

    /// A worker that switched user after the fork makes its own `%p` trace file as that user where
    /// it may (a sticky shared folder), and where it may not, writes on in its parent's file and
    /// says so there; never anywhere else.
    func testAWorkerThatSwitchedUserMakesItsOwnTraceOrKeepsItsParents() throws {
        let token = try SoftHSMToken()
        // The worker (nobody) reads the token through its own copy of the module.
        _ = try runProgram("/bin/chmod", ["-R", "a+rwX", token.directory.path])
        for (name, mode) in [("sticky", mode_t(0o1777)), ("roots", mode_t(0o755))] {
            let traces = try folder("traces-\(name)", mode: mode)
            let conf = try file(try folder("etc-\(name)").appendingPathComponent("p11fork.conf"),
                                "module = \(RealModules.softHSM)\ntrace = \(traces.path)/t-%p.log\ntrace_level = fork\n")
            let program = try probe(setuid: false, reserved: "p11fork: config=\(conf.path)", token: token.label)
            let result = try runProgram(program.path, ["--fork-worker", "65534"], environment: token.environment, timeout: 60)
            XCTAssertEqual(result.status, 0, result.output)
            XCTAssertTrue(result.stdout.contains("worker (uid 65534): token lookup CKR_OK"), result.output)
            let files = try FileManager.default.contentsOfDirectory(atPath: traces.path).sorted()
            var owners: [uid_t] = []
            for name in files {
                var status = stat()
                stat(traces.appendingPathComponent(name).path, &status)
                owners.append(status.st_uid)
                XCTAssertEqual(status.st_mode & 0o777, 0o600, name)
            }
            // The parent's file, the broker's (which the parent started, as root, at its fork)
            // and, where the worker may make one, the worker's.
            let texts = try files.map { try String(contentsOf: traces.appendingPathComponent($0), encoding: .utf8) }
            XCTAssertEqual(texts.filter { $0.contains("] broker: started for the application's children") }.count, 1, "\(files)")
            if name == "sticky" {
                XCTAssertEqual(files.count, 3, "\(files)")
                XCTAssertEqual(owners.sorted(), [0, 0, 65534], "\(files)")
            } else {
                XCTAssertEqual(files.count, 2, "\(files)")
                let parent = texts.first { $0.contains("cannot create this child's trace file") } ?? texts.joined()
                XCTAssertTrue(parent.contains("cannot create this child's trace file"), parent)
                XCTAssertTrue(parent.contains("the child runs as uid 65534 (nobody)): its lines go on in the parent's file"), parent)
            }
        }
    }
}
