import Foundation
import Testing

/// Where a PIN lives in a process that logged in (docs/DESIGN.md "Secrets"), found by reading the
/// process's memory (/proc/PID/mem) rather than by trusting the calls: the only copy p11fork keeps
/// is in memory that is locked and left out of core dumps, it is gone after C_Logout and
/// C_Finalize, and a core dump of the process does not hold it. The driver
/// (Tests/Tools/Secrets) wipes its own copy of the PIN right after C_Login; SoftHSM alone
/// keeps none, which the first test shows, so every copy found through p11fork is p11fork's.
@Suite(.serialized) struct SecretCopiesInProcessTests {
    /// A running p11fork-secrets, driven one command at a time.
    final class Driver {
        let program: Spawned
        var pid: Int32 = 0
        /// The token lives as long as the process using it.
        let token: SoftHSMToken

        init(module: String, token: SoftHSMToken, environment extra: [String: String] = [:]) throws {
            self.token = token
            var environment = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("P11FORK_") && $0.key != "SOFTHSM2_CONF" }
            for (key, value) in token.environment.merging(extra, uniquingKeysWith: { $1 }) { environment[key] = value }
            program = try Spawned(Products.path("p11fork-secrets"), ["--module", module, "--token", token.label, "--key", "fork-key"],
                                  environment: environment, errors: .null)
            program.write(token.pin + "\n")
            let ready = try line()
            guard ready.hasPrefix("ready "), let pid = Int32(ready.dropFirst(6)) else { throw TestFailure("driver: \(ready)") }
            self.pid = pid
        }

        func line() throws -> String {
            guard let text = program.line(within: 60) else { throw TestFailure("driver ended early or said nothing for 60 s") }
            return text
        }

        func command(_ text: String) throws -> String {
            program.write(text + "\n")
            return try line()
        }

        func finish() {
            program.closeInput()
            if program.reap(within: 30) == nil { program.kill() }
        }
    }

    struct Copy: CustomStringConvertible {
        let address: UInt
        let mapping: String
        let flags: [String]
        let lockedKiB: Int
        var description: String { "0x\(String(address, radix: 16)) in \(mapping.isEmpty ? "anonymous memory" : mapping) [\(flags.joined(separator: " "))] locked \(lockedKiB) kB" }
        /// In memory like p11fork's protected memory: anonymous, locked, left out of core dumps.
        var isProtected: Bool { mapping.isEmpty && flags.contains("dd") && flags.contains("lo") && lockedKiB > 0 }
    }

    /// Every place `secret` is in the memory of process `pid`.
    static func copies(of secret: String, in pid: Int32) throws -> [Copy] {
        try copies(of: Array(secret.utf8), in: pid)
    }

    static func copies(of needle: [UInt8], in pid: Int32) throws -> [Copy] {
        let smaps = try readProcFile("/proc/\(pid)/smaps")
        var regions: [(start: UInt, end: UInt, readable: Bool, name: String, flags: [String], locked: Int)] = []
        for line in smaps.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            if let range = fields.first, range.contains("-"), fields.count >= 5, !range.hasSuffix(":") {
                let bounds = range.split(separator: "-")
                if bounds.count == 2, let start = UInt(bounds[0], radix: 16), let end = UInt(bounds[1], radix: 16) {
                    regions.append((start, end, fields[1].hasPrefix("r"), fields.count > 5 ? String(fields[5]) : "", [], 0))
                    continue
                }
            }
            guard !regions.isEmpty else { continue }
            if line.hasPrefix("VmFlags:") { regions[regions.count - 1].flags = fields.dropFirst().map(String.init) }
            if line.hasPrefix("Locked:"), fields.count >= 2 { regions[regions.count - 1].locked = Int(fields[1]) ?? 0 }
        }
        let fd = open("/proc/\(pid)/mem", O_RDONLY)
        guard fd >= 0 else { throw TestFailure("cannot open /proc/\(pid)/mem") }
        defer { close(fd) }
        var found: [Copy] = []
        for region in regions where region.readable && region.name != "[vvar]" && region.name != "[vsyscall]" {
            let size = Int(region.end - region.start)
            var bytes = [UInt8](repeating: 0, count: size)
            let read = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, size, off_t(region.start)) }
            guard read > 0 else { continue }
            for at in bytes.withUnsafeBytes({ offsets(of: needle, in: UnsafeRawBufferPointer(rebasing: $0[..<read])) }) {
                found.append(Copy(address: region.start + UInt(at), mapping: region.name, flags: region.flags, lockedKiB: region.locked))
            }
        }
        return found
    }

    /// Where `needle` starts in `memory`, every time.
    static func offsets(of needle: [UInt8], in memory: UnsafeRawBufferPointer) -> [Int] {
        guard let base = memory.baseAddress else { return [] }
        var found: [Int] = []
        var offset = 0
        while offset + needle.count <= memory.count,
              let hit = memchr(base + offset, Int32(needle[0]), memory.count - needle.count + 1 - offset) {
            let at = base.distance(to: UnsafeRawPointer(hit))
            if memcmp(hit, needle, needle.count) == 0 { found.append(at) }
            offset = at + 1
        }
        return found
    }

    /// /proc files claim a size of 0: read them to their end.
    static func readProcFile(_ path: String) throws -> String {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw TestFailure("cannot open \(path)") }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    private static func token() throws -> SoftHSMToken {
        let token = try SoftHSMToken(strict: true)
        try token.generateKeyPair(label: "fork-key")
        return token
    }

    @Test func softHSMAloneKeepsNoCopyOfThePINAndItsChildCannotSign() throws {
        let token = try Self.token()
        let driver = try Driver(module: RealModules.softHSM, token: token)
        defer { driver.finish() }
        #expect(try Self.copies(of: token.pin, in: driver.pid).isEmpty)
        #expect(try driver.command("fork") != "done child 0", "a child signed without p11fork")
    }

    @Test func p11forkKeepsOneLockedUndumpedCopyUntilLogout() throws {
        let token = try Self.token()
        let driver = try Driver(module: Products.module, token: token, environment: ["P11FORK_MODULE": RealModules.softHSM])
        defer { driver.finish() }
        let kept = try Self.copies(of: token.pin, in: driver.pid)
        #expect(kept.count == 1 && kept.allSatisfy(\.isProtected), "\(kept)")
        // The kept PIN is what lets a child log in.
        #expect(try driver.command("fork") == "done child 0")
        #expect(try Self.copies(of: token.pin, in: driver.pid).count == 1)
        #expect(try driver.command("logout") == "done 0x0")
        let afterLogout = try Self.copies(of: token.pin, in: driver.pid)
        #expect(afterLogout.isEmpty, "still there after C_Logout: \(afterLogout)")
    }

    /// With the broker, a worker keeps no copy of the PIN once its login is in place: the first
    /// worker sends the PIN to the broker once (its login replay) and wipes its copy; the next
    /// finds the login held there and sends none. With a copy of the module in the worker, the
    /// worker keeps its copy: it is what its own module needs to log in.
    @Test(arguments: ["broker", "fresh-copy"])
    func workersTheBrokerServesKeepNoCopyOfThePIN(_ strategy: String) throws {
        let token = try Self.token()
        let trace = token.directory.appendingPathComponent("trace.log")
        let driver = try Driver(module: Products.module, token: token,
                                environment: ["P11FORK_MODULE": RealModules.softHSM, "P11FORK_STRATEGY": strategy,
                                              "P11FORK_TRACE": trace.path, "P11FORK_TRACE_LEVEL": "fork"])
        defer { driver.finish() }
        for worker in 1...2 {
            let started = try driver.command("child")
            let pid = try #require(Int32(started.dropFirst("child ".count)), "\(started)")
            #expect(try Self.copies(of: token.pin, in: pid).count == 1, "worker \(worker) inherits the parent's copy")
            #expect(try driver.command("sign-once") == "done 0x0", "worker \(worker) signs")
            let left = try Self.copies(of: token.pin, in: pid)
            if strategy == "broker" {
                #expect(left.isEmpty, "worker \(worker), served by the broker, still holds the PIN: \(left)")
            } else {
                #expect(left.count == 1 && left.allSatisfy(\.isProtected), "worker \(worker), with a copy of the module: \(left)")
            }
            #expect(try driver.command("exit") == "done child 0")
        }
        #expect(try Self.copies(of: token.pin, in: driver.pid).count == 1, "the parent keeps its copy")
        let lines = try String(contentsOf: trace, encoding: .utf8)
        if strategy == "broker" {
            #expect(lines.contains("the broker keeps the login, and this worker's copy of the PIN is wiped"), "\(lines)")
            #expect(lines.contains("is held by the broker for the application; no PIN sent"), "\(lines)")
        }
        #expect(!lines.contains(token.pin))
    }

    @Test func finalizeWipesTheKeptPIN() throws {
        let token = try Self.token()
        let driver = try Driver(module: Products.module, token: token, environment: ["P11FORK_MODULE": RealModules.softHSM])
        defer { driver.finish() }
        #expect(try Self.copies(of: token.pin, in: driver.pid).count == 1)
        #expect(try driver.command("finalize") == "done 0x0")
        #expect(try Self.copies(of: token.pin, in: driver.pid).isEmpty)
    }

    @Test func loginReplayOffKeepsNothing() throws {
        let token = try Self.token()
        let driver = try Driver(module: Products.module, token: token,
                                environment: ["P11FORK_MODULE": RealModules.softHSM, "P11FORK_LOGIN_REPLAY": "off"])
        defer { driver.finish() }
        #expect(try Self.copies(of: token.pin, in: driver.pid).isEmpty)
    }

    /// gdb's gcore writes what a crash would: the PIN is in the process, not in its core.
    @Test func coreDumpDoesNotHoldThePIN() throws {
        let token = try Self.token()
        let driver = try Driver(module: Products.module, token: token, environment: ["P11FORK_MODULE": RealModules.softHSM])
        defer { driver.finish() }
        #expect(try Self.copies(of: token.pin, in: driver.pid).count == 1)
        let core = try Self.coreDump(of: driver.pid, in: driver.token.directory)
        #expect(core.range(of: Data(token.pin.utf8)) == nil, "the PIN is in the core dump")
    }

    /// What `gcore` writes for process `pid` (the file is removed once read).
    static func coreDump(of pid: Int32, in directory: URL) throws -> Data {
        try #require(FileManager.default.isExecutableFile(atPath: "/usr/bin/gcore"), "gdb (gcore) is installed by scripts/install-deps.sh")
        let dump = try runProgram("/usr/bin/gcore", ["-o", directory.appendingPathComponent("core").path, String(pid)], timeout: 60)
        let file = directory.appendingPathComponent("core.\(pid)")
        defer { try? FileManager.default.removeItem(at: file) }
        let bytes = try Data(contentsOf: file)
        #expect(dump.status == 0 && bytes.count > 1_000_000, "\(dump.output)")
        return bytes
    }

    /// A context-specific login (CKA_ALWAYS_AUTHENTICATE key) is kept with its operation, and
    /// wiped when the operation ends (C_Sign), not at the next C_SignInit. Copies of the PIN:
    /// logged in, after the context-specific login, after C_Sign.
    @Test func contextSpecificPINIsWipedWhenItsOperationEnds() throws {
        let token = try Self.token()
        for (module, environment, expected) in [(RealModules.softHSM, [:], [0, 0, 0]), (Products.module, ["P11FORK_MODULE": RealModules.softHSM], [1, 2, 1])] {
            let driver = try Driver(module: module, token: token, environment: environment)
            defer { driver.finish() }
            var found = [try Self.copies(of: token.pin, in: driver.pid)]
            #expect(try driver.command("always") == "done 0x0")
            #expect(try driver.command("context \(token.pin)") == "done 0x0")
            found.append(try Self.copies(of: token.pin, in: driver.pid))
            #expect(try driver.command("sign") == "done 0x0")
            found.append(try Self.copies(of: token.pin, in: driver.pid))
            #expect(found.map(\.count) == expected && found.allSatisfy { $0.allSatisfy(\.isProtected) }, "\(module): \(found)")
        }
    }

    // MARK: secret values of session objects and data fed to operations

    /// Random values p11fork keeps so that a child can make session keys again and carry an
    /// encryption on: an AES key value (C_CreateObject), data fed to an encryption
    /// (C_EncryptUpdate), derivation data in a mechanism parameter (C_DeriveKey); and the value
    /// of a key that is wrapped, then unwrapped (p11fork keeps only its wrapped bytes).
    struct SessionSecrets {
        let key = Self.random(), data = Self.random(), derivation = Self.random(), wrapped = Self.random()
        /// The driver's command for a step named "key", "feed", "derive" or "wrap"; other steps are commands.
        func command(_ step: String) -> String {
            switch step {
            case "key": "key " + Self.hex(key)
            case "feed": "feed " + Self.hex(data)
            case "derive": "derive " + Self.hex(derivation)
            case "wrap": "wrap " + Self.hex(wrapped)
            default: step
            }
        }
        static func random() -> [UInt8] { (0..<32).map { _ in UInt8.random(in: 0...255) } }
        static func hex(_ bytes: some Sequence<UInt8>) -> String { bytes.map { String(format: "%02x", $0) }.joined() }
    }

    /// Where the key value, the fed data and the derivation data are in one process; each
    /// count below is [key, data, derivation].
    struct Tally: CustomStringConvertible {
        let answer: String
        let copies: [[Copy]]
        /// Copies in protected memory (locked, left out of dumps).
        var kept: [Int] { copies.map { $0.filter(\.isProtected).count } }
        /// Copies in anonymous memory left out of dumps, locked or not (a child locks its
        /// inherited memory again at its first call).
        var undumped: [Int] { copies.map { $0.filter { $0.mapping.isEmpty && $0.flags.contains("dd") }.count } }
        var total: [Int] { copies.map(\.count) }
        /// Copies anywhere else than protected memory: the module's own.
        var others: [Int] { zip(total, kept).map { $0 - $1 } }
        var description: String { "\(answer) | key: \(copies[0]) | data: \(copies[1]) | derivation: \(copies[2])" }
    }

    static func tally(_ secrets: SessionSecrets, in pid: Int32, answer: String = "") throws -> Tally {
        Tally(answer: answer, copies: try [secrets.key, secrets.data, secrets.derivation].map { try copies(of: $0, in: pid) })
    }

    static let throughP11Fork = ["P11FORK_MODULE": RealModules.softHSM]

    /// A driver through p11fork (with `setting`) that has made the session key.
    static func drivingSessionKey(_ setting: [String: String] = [:]) throws -> (SessionSecrets, Driver) {
        let secrets = SessionSecrets()
        let token = try Self.token()
        let driver = try Driver(module: Products.module, token: token, environment: throughP11Fork.merging(setting) { $1 })
        #expect(try driver.command(secrets.command("key")) == "done 0x0")
        return (secrets, driver)
    }

    /// Runs `steps` on SoftHSM alone and through p11fork, and reads both processes after each:
    /// SoftHSM alone keeps nothing in protected memory; through p11fork protected memory holds
    /// `kept[i]` copies ([key, data, derivation]), and the rest of memory what SoftHSM alone holds.
    func compareWithSoftHSMAlone(_ steps: [String], kept: [[Int]]) throws {
        let secrets = SessionSecrets()
        let token = try Self.token()
        var runs: [[Tally]] = []
        for (module, environment) in [(RealModules.softHSM, [:]), (Products.module, Self.throughP11Fork)] {
            let driver = try Driver(module: module, token: token, environment: environment)
            defer { driver.finish() }
            runs.append(try steps.map { try Self.tally(secrets, in: driver.pid, answer: try driver.command(secrets.command($0))) })
        }
        for (i, step) in steps.enumerated() {
            let (alone, through) = (runs[0][i], runs[1][i])
            #expect(through.answer.hasPrefix("done 0x0") && through.answer == alone.answer, "\(step): \(through.answer) \(alone.answer)")
            #expect(alone.kept == [0, 0, 0], "\(step), SoftHSM alone: \(alone)")
            #expect(through.kept == kept[i], "\(step), through p11fork: \(through)")
            #expect(through.others == alone.others, "\(step): SoftHSM's own copies: \(alone); through p11fork: \(through)")
        }
    }

    @Test func sessionKeyAndFedDataAreKeptOnceInProtectedMemoryUntilDestroyAndFinal() throws {
        try compareWithSoftHSMAlone(["key", "encrypt", "feed", "final", "destroy"],
                                    kept: [[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    }

    /// The derivation data is kept with the derived key, and goes with it.
    @Test func derivationDataIsKeptOnceUntilTheDerivedKeyIsDestroyed() throws {
        try compareWithSoftHSMAlone(["key", "derive", "encrypt", "destroy"], kept: [[1, 0, 0], [1, 0, 1], [1, 0, 1], [1, 0, 0]])
    }

    @Test func closingTheSessionWipesItsKeysAndFedData() throws {
        try compareWithSoftHSMAlone(["key", "derive", "feed", "close"], kept: [[1, 0, 0], [1, 0, 1], [1, 1, 1], [0, 0, 0]])
    }

    @Test func finalizeWipesSessionKeysAndFedData() throws {
        try compareWithSoftHSMAlone(["key", "derive", "feed", "finalize"], kept: [[1, 0, 0], [1, 0, 1], [1, 1, 1], [0, 0, 0]])
    }

    /// Without p11fork a child can neither end the encryption its parent began nor use the key.
    @Test func softHSMAloneChildCannotUseTheSessionKey() throws {
        let secrets = SessionSecrets()
        let token = try Self.token()
        let driver = try Driver(module: RealModules.softHSM, token: token)
        defer { driver.finish() }
        #expect(try driver.command(secrets.command("key")) == "done 0x0")
        #expect(try driver.command(secrets.command("feed")) == "done 0x0")
        #expect(try driver.command("child").hasPrefix("child "))
        #expect(try driver.command("final") != "done 0x0")
        #expect(try !driver.command("encrypt").hasPrefix("done 0x0"))
        #expect(try driver.command("exit") == "done child 0")
    }

    /// Through p11fork the child makes both keys again and carries the encryption on, from the
    /// one copy of each value it inherited; ending the encryption wipes the data in the child only.
    @Test func childRemakesTheSessionKeysAndCarriesTheEncryptionFromOneProtectedCopy() throws {
        let (secrets, driver) = try Self.drivingSessionKey()
        defer { driver.finish() }
        #expect(try driver.command(secrets.command("derive")) == "done 0x0")
        let parentBlock = try driver.command("encrypt")
        #expect(try driver.command(secrets.command("feed")) == "done 0x0")
        let child = try driver.command("child")
        let pid = try #require(Int32(child.dropFirst(6)), "\(child)")
        // The module answers CKR_OPERATION_ACTIVE, as in the parent: the encryption was carried.
        #expect(try driver.command("encrypt").hasPrefix("done 0x90"))
        let carried = try Self.tally(secrets, in: pid)
        #expect(carried.kept == [1, 1, 1], "\(carried)")
        #expect(try driver.command("final") == "done 0x0")
        let ended = try Self.tally(secrets, in: pid)
        #expect(ended.kept == [1, 0, 1], "\(ended)")
        #expect(try driver.command("encrypt") == parentBlock)
        #expect(try driver.command("exit") == "done child 0")
        #expect(try Self.tally(secrets, in: driver.pid).kept == [1, 1, 1], "the child's wiping reached the parent")
    }

    /// A replay that fails in a child: what the child inherited is wiped at its first call, and
    /// nothing moves elsewhere; the parent keeps its copies.
    func failedReplayInAChild(_ setting: [String: String], keptInParent: [Int]) throws {
        let (secrets, driver) = try Self.drivingSessionKey(setting)
        defer { driver.finish() }
        #expect(try driver.command(secrets.command("derive")) == "done 0x0")
        #expect(try driver.command(secrets.command("feed")) == "done 0x0")
        #expect(try Self.tally(secrets, in: driver.pid).kept == keptInParent)
        let child = try driver.command("child")
        let pid = try #require(Int32(child.dropFirst(6)), "\(child)")
        let inherited = try Self.tally(secrets, in: pid)
        #expect(inherited.undumped == keptInParent, "\(inherited)")
        let answer = try driver.command("encrypt")
        #expect(!answer.hasPrefix("done 0x0") && !answer.hasPrefix("done 0x90"), "the child used the key or has the encryption: \(answer)")
        let after = try Self.tally(secrets, in: pid)
        #expect(after.undumped == [0, 0, 0], "\(after)")
        #expect(after.total == zip(inherited.total, keptInParent).map { $0 - $1 }, "\(after)")
        #expect(try driver.command("exit") == "done child 0")
        #expect(try Self.tally(secrets, in: driver.pid).kept == keptInParent)
    }

    /// The keys are private and the child is not logged in: C_CreateObject fails in the child.
    @Test func keysThatCannotBeMadeAgainAreWipedInTheChild() throws {
        try failedReplayInAChild(["P11FORK_LOGIN_REPLAY": "off"], keptInParent: [1, 1, 1])
    }

    /// The keys' recipes are past P11FORK_REPLAY_LIMIT (never kept); the data is kept, and the
    /// encryption cannot be carried without its key.
    @Test func operationWhoseKeyWasNotKeptIsWipedInTheChild() throws {
        try failedReplayInAChild(["P11FORK_REPLAY_LIMIT": "64"], keptInParent: [0, 1, 0])
    }

    /// The value of an unwrapped session key is nowhere in the process (SoftHSM keeps it
    /// encrypted, p11fork keeps the wrapped bytes, once, in protected memory until the key is
    /// destroyed); a child makes the key again from them. The extractable key made to be wrapped
    /// is destroyed at once, and its kept value with it.
    @Test func unwrappedKeyIsKeptAsItsWrappedBytesOnly() throws {
        let (secrets, driver) = try Self.drivingSessionKey()
        defer { driver.finish() }
        let answer = try driver.command(secrets.command("wrap")).split(separator: " ")
        try #require(answer.count == 3 && answer[1] == "0x0", "\(answer)")
        let wrapped = stride(from: 0, to: answer[2].count, by: 2).compactMap { UInt8(answer[2].dropFirst($0).prefix(2), radix: 16) }
        func copies(in pid: Int32) throws -> [Int] {
            let blob = try Self.copies(of: wrapped, in: pid)
            return [try Self.copies(of: secrets.wrapped, in: pid).count, blob.filter(\.isProtected).count, blob.filter { !$0.isProtected }.count]
        }
        #expect(try copies(in: driver.pid) == [0, 0, 0])
        #expect(try driver.command("unwrap \(answer[2])") == "done 0x0")
        let parentBlock = try driver.command("encrypt")
        #expect(parentBlock.hasPrefix("done 0x0 "))
        #expect(try copies(in: driver.pid) == [0, 1, 0], "value / wrapped bytes protected / elsewhere")
        let child = try driver.command("child")
        let pid = try #require(Int32(child.dropFirst(6)), "\(child)")
        #expect(try driver.command("encrypt") == parentBlock)
        #expect(try copies(in: pid) == [0, 1, 0])
        #expect(try driver.command("exit") == "done child 0")
        #expect(try driver.command("destroy") == "done 0x0")
        #expect(try copies(in: driver.pid) == [0, 0, 0])
    }

    /// At every level and in both formats, a trace of a parent and of children (one whose replay
    /// works, one whose replay fails) holds no part of the key or the data, raw or in hex.
    @Test(arguments: ["error", "fork", "calls", "full"])
    func sessionSecretsAreInNoTrace(level: String) throws {
        for format in ["text", "json"] {
            let secrets = SessionSecrets()
            let token = try Self.token()
            let trace = token.directory.appendingPathComponent("trace-\(level).\(format)")
            let tracing = ["P11FORK_TRACE": trace.path, "P11FORK_TRACE_LEVEL": level, "P11FORK_TRACE_FORMAT": format]
            for (setting, steps) in [([:], ["key", "wrap", "derive", "encrypt", "feed", "child", "encrypt", "final", "encrypt", "exit", "final", "destroy"]),
                                     (["P11FORK_LOGIN_REPLAY": "off"], ["key", "derive", "feed", "child", "encrypt", "final", "exit", "close"])] {
                let driver = try Driver(module: Products.module, token: token, environment: Self.throughP11Fork.merging(tracing) { $1 }.merging(setting) { $1 })
                for step in steps { _ = try driver.command(secrets.command(step)) }
                driver.finish()
            }
            let text = try Data(contentsOf: trace)
            let shown = String(decoding: text, as: UTF8.self)
            if level != "error" {
                #expect(shown.contains("made again") && shown.contains("is lost in this child"), "\(level) \(format): no recovery lines")
            }
            for secret in [secrets.key, secrets.data, secrets.derivation, secrets.wrapped] {
                for start in 0...(secret.count - 6) {
                    let window = Array(secret[start..<(start + 6)])
                    let hex = SessionSecrets.hex(window)
                    #expect(text.range(of: Data(window)) == nil, "\(level) \(format): raw bytes of a secret in the trace")
                    #expect(!shown.contains(hex) && !shown.contains(hex.uppercased()), "\(level) \(format): \(hex) of a secret in the trace")
                }
            }
        }
    }

    /// A core dump of a process holding the kept values has none of p11fork's copies: with no
    /// operation active SoftHSM holds no clear copy of the keys, and the core has no value at all;
    /// while the encryption is active, it holds exactly SoftHSM's own copies and none of p11fork's.
    @Test func coreDumpHoldsNoKeptSessionSecret() throws {
        let (secrets, driver) = try Self.drivingSessionKey()
        defer { driver.finish() }
        #expect(try driver.command(secrets.command("derive")) == "done 0x0")
        for step in ["derive", "feed"] {
            if step == "feed" { #expect(try driver.command(secrets.command("feed")) == "done 0x0") }
            let held = try Self.tally(secrets, in: driver.pid)
            #expect(held.kept == [1, step == "feed" ? 1 : 0, 1], "\(held)")
            let core = try Self.coreDump(of: driver.pid, in: driver.token.directory)
            let inCore = core.withUnsafeBytes { bytes in [secrets.key, secrets.data, secrets.derivation].map { Self.offsets(of: $0, in: bytes).count } }
            #expect(inCore == held.others && (step == "feed" || inCore == [0, 0, 0]), "after \(step): in the core \(inCore); in the process \(held)")
        }
    }
}
