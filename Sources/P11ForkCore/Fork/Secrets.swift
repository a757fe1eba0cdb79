import CPKCS11
import Glibc

/// A secret p11fork keeps (a PIN for login replay), in memory that is locked (mlock), left out
/// of core dumps (MADV_DONTDUMP) and wiped (explicit_bzero) when given up (docs/DESIGN.md "Secrets").
/// Never in a MADV_WIPEONFORK page: a child needs it. A child re-locks it (mlock is not
/// inherited across fork).
final class Secret: @unchecked Sendable {
    private let memory: UnsafeMutableRawPointer
    private let mapped: Int
    let count: Int
    private(set) var isWiped = false

    /// Locking can fail (RLIMIT_MEMLOCK); the secret is kept all the same and the trace says so.
    nonisolated(unsafe) static var lockFailureReported = false

    init?(copying bytes: UnsafeRawPointer?, count: Int) {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        mapped = max(page, (count + page - 1) / page * page)
        guard let raw = mmap(nil, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              raw != MAP_FAILED else { return nil }
        memory = raw
        self.count = count
        _ = madvise(memory, mapped, CPKCS11_madv_dontdump())
        lock()
        if let bytes, count > 0 { memory.copyMemory(from: bytes, byteCount: count) }
    }

    deinit {
        wipe()
        munmap(memory, mapped)
    }

    /// Where the secret is, for passing to the real module (nil once wiped or when empty).
    var bytes: UnsafeMutablePointer<CK_UTF8CHAR>? {
        isWiped ? nil : memory.assumingMemoryBound(to: CK_UTF8CHAR.self)
    }

    func lock() {
        if mlock(memory, mapped) != 0 && !Self.lockFailureReported {
            Self.lockFailureReported = true
            Trace.event(.error, "mlock failed (\(String(cString: strerror(errno)))): kept PINs are not locked in memory; raise RLIMIT_MEMLOCK (ulimit -l) to lock them")
        }
    }

    func wipe() {
        guard !isWiped else { return }
        isWiped = true
        explicit_bzero(memory, mapped)
        munlock(memory, mapped)
    }

    /// The address of the kept bytes (tests inspect the memory after a wipe).
    var address: UnsafeRawPointer { UnsafeRawPointer(memory) }
}
