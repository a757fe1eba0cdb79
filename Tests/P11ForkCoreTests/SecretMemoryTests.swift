import Foundation
import Testing
@testable import P11ForkCore

/// The memory a `Secret` lives in: locked, left out of core dumps, and only zeros once wiped.
@Suite struct SecretMemoryTests {
    /// The /proc/self/smaps block of the mapping that holds `address`.
    private func smapsBlock(containing address: UnsafeRawPointer) throws -> String {
        let handle = try #require(FileHandle(forReadingAtPath: "/proc/self/smaps"))
        let text = String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
        let target = UInt(bitPattern: address)
        var current: [String] = []
        var inside = false
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            let parts = line.split(separator: " ", maxSplits: 1)
            if let range = parts.first, range.contains("-"), let dash = range.firstIndex(of: "-"),
               let start = UInt(range[..<dash], radix: 16), let end = UInt(range[range.index(after: dash)...], radix: 16) {
                if inside { break }
                inside = (start..<end).contains(target)
                current = []
            }
            if inside { current.append(String(line)) }
        }
        return current.joined(separator: "\n")
    }

    @Test func keptPinIsLockedAndLeftOutOfCoreDumps() throws {
        let pin = Array("739146".utf8)
        let secret = try #require(pin.withUnsafeBytes { Secret(copying: $0.baseAddress, count: $0.count) })
        let block = try smapsBlock(containing: secret.address)
        #expect(block.contains("VmFlags:"))
        let flags = block.split(separator: "\n").first { $0.hasPrefix("VmFlags:") } ?? ""
        #expect(flags.contains(" dd"), "MADV_DONTDUMP: \(flags)")
        // mlock may be refused under a small RLIMIT_MEMLOCK; as root in CI it is granted.
        // The address and thread sanitizers turn mlock into a no-op that answers success.
        let sanitized = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "__asan_init") != nil
            || dlsym(UnsafeMutableRawPointer(bitPattern: 0), "__tsan_init") != nil
        if getuid() == 0 && !sanitized { #expect(flags.contains(" lo"), "mlock: \(flags)") }
        #expect(Array(UnsafeRawBufferPointer(start: secret.address, count: pin.count)) == pin)
    }

    @Test func wipedPinMemoryHoldsOnlyZeros() throws {
        let pin = Array("739146".utf8)
        let secret = try #require(pin.withUnsafeBytes { Secret(copying: $0.baseAddress, count: $0.count) })
        secret.wipe()
        #expect(secret.bytes == nil)
        let page = UnsafeRawBufferPointer(start: secret.address, count: Int(sysconf(Int32(_SC_PAGESIZE))))
        #expect(page.allSatisfy { $0 == 0 })
    }
}
