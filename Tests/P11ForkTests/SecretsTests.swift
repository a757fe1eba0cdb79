import Foundation
import Testing

/// Where a PIN lives in a process that logged in (DESIGN.md "Secrets"), found by reading the
/// process's memory (/proc/PID/mem) rather than by trusting the calls: the only copy p11fork keeps
/// is in memory that is locked and left out of core dumps, it is gone after C_Logout and
/// C_Finalize, and a core dump of the process does not hold it. The driver
/// (Sources/TestTools/Secrets) wipes its own copy of the PIN right after C_Login; SoftHSM alone
/// keeps none, which the first test shows, so every copy found through p11fork is p11fork's.
@Suite(.serialized) struct SecretsTests {
    /// A running p11fork-secrets, driven one command at a time.
    final class Driver {
        let process = Process()
        let input = Pipe(), output = Pipe()
        var pending = Data()
        var pid: Int32 = 0

        init(module: String, token: SoftHSMToken, environment extra: [String: String] = [:]) throws {
            process.executableURL = URL(fileURLWithPath: Products.path("p11fork-secrets"))
            process.arguments = ["--module", module, "--token", token.label, "--key", "fork-key"]
            var environment = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("P11FORK_") && $0.key != "SOFTHSM2_CONF" }
            for (key, value) in token.environment.merging(extra, uniquingKeysWith: { $1 }) { environment[key] = value }
            process.environment = environment
            process.standardInput = input
            process.standardOutput = output
            var nothing = sigset_t(), previous = sigset_t()
            sigemptyset(&nothing)
            pthread_sigmask(SIG_SETMASK, &nothing, &previous)
            try process.run()
            pthread_sigmask(SIG_SETMASK, &previous, nil)
            input.fileHandleForWriting.write(Data((token.pin + "\n").utf8))
            let ready = try line()
            guard ready.hasPrefix("ready "), let pid = Int32(ready.dropFirst(6)) else { throw TestFailure("driver: \(ready)") }
            self.pid = pid
        }

        func line() throws -> String {
            while true {
                if let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                    let text = String(decoding: pending[..<newline], as: UTF8.self)
                    pending.removeSubrange(...newline)
                    return text
                }
                let more = output.fileHandleForReading.availableData
                if more.isEmpty { throw TestFailure("driver ended early: \(String(decoding: pending, as: UTF8.self))") }
                pending.append(more)
            }
        }

        func command(_ text: String) throws -> String {
            input.fileHandleForWriting.write(Data((text + "\n").utf8))
            return try line()
        }

        func finish() {
            try? input.fileHandleForWriting.close()
            process.waitUntilExit()
        }
    }

    struct Copy: CustomStringConvertible {
        let address: UInt
        let mapping: String
        let flags: [String]
        let lockedKiB: Int
        var description: String { "0x\(String(address, radix: 16)) in \(mapping.isEmpty ? "anonymous memory" : mapping) [\(flags.joined(separator: " "))] locked \(lockedKiB) kB" }
    }

    /// Every place `secret` is in the memory of process `pid`.
    static func copies(of secret: String, in pid: Int32) throws -> [Copy] {
        let needle = Array(secret.utf8)
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
            var i = 0
            while i + needle.count <= read {
                if bytes[i] == needle[0] && Array(bytes[i..<(i + needle.count)]) == needle {
                    found.append(Copy(address: region.start + UInt(i), mapping: region.name, flags: region.flags, lockedKiB: region.locked))
                }
                i += 1
            }
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
        #expect(kept.count == 1, "\(kept)")
        for copy in kept {
            #expect(copy.mapping.isEmpty && copy.flags.contains("dd") && copy.flags.contains("lo") && copy.lockedKiB > 0, "\(copy)")
        }
        // The kept PIN is what lets a child log in.
        #expect(try driver.command("fork") == "done child 0")
        #expect(try Self.copies(of: token.pin, in: driver.pid).count == 1)
        #expect(try driver.command("logout") == "done 0x0")
        let afterLogout = try Self.copies(of: token.pin, in: driver.pid)
        #expect(afterLogout.isEmpty, "still there after C_Logout: \(afterLogout)")
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
        try #require(FileManager.default.isExecutableFile(atPath: "/usr/bin/gcore"), "gdb (gcore) is installed by scripts/install-deps.sh")
        let token = try Self.token()
        let driver = try Driver(module: Products.module, token: token, environment: ["P11FORK_MODULE": RealModules.softHSM])
        defer { driver.finish() }
        #expect(try Self.copies(of: token.pin, in: driver.pid).count == 1)
        let core = token.directory.appendingPathComponent("core")
        let dump = try runProgram("/usr/bin/gcore", ["-o", core.path, String(driver.pid)], timeout: 60)
        let file = token.directory.appendingPathComponent("core.\(driver.pid)")
        let bytes = try Data(contentsOf: file)
        #expect(dump.status == 0 && bytes.count > 1_000_000, "\(dump.output)")
        #expect(bytes.range(of: Data(token.pin.utf8)) == nil, "the PIN is in the core dump")
        try? FileManager.default.removeItem(at: file)
    }
}
