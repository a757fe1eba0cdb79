import CPKCS11
import Glibc

/// Memory for what p11fork keeps so that a child can replay it: templates of session objects
/// (which may hold key values), mechanism parameters, data fed to operations in progress.
/// Like kept PINs (Fork/Secrets.swift) it is locked (mlock), left out of core dumps
/// (MADV_DONTDUMP) and wiped (explicit_bzero) when given back; unlike them it is carved from
/// regions shared by many blocks, so that keeping a few bytes on C_SignInit costs no system call.
enum ProtectedMemory {
    /// Block sizes; a request larger than the largest gets a mapping of its own.
    static let sizes = [64, 256, 1024, 4096, 16384, 65536]
    static let regionSize = 256 * 1024

    nonisolated(unsafe) static var lock: ForkSafeLock!
    // Guarded by `lock`.
    nonisolated(unsafe) static var free: [[UnsafeMutableRawPointer]] = Array(repeating: [], count: sizes.count)
    nonisolated(unsafe) static var regions: [(start: UnsafeMutableRawPointer, size: Int)] = []
    /// Bytes handed out now (block sizes), for memory figures and tests.
    nonisolated(unsafe) static var bytesInUse = 0

    static func install() { lock = ForkDetection.register(ForkSafeLock()) }

    /// A block of at least `count` bytes (contents undefined), or nil when no memory is left.
    static func allocate(_ count: Int) -> UnsafeMutableRawPointer? {
        guard let sizeClass = sizes.firstIndex(where: { $0 >= count }) else {
            guard let region = map(count) else { return nil }
            lock.withLock { bytesInUse += roundedToPages(count) }
            return region
        }
        return lock.withLock {
            if free[sizeClass].isEmpty {
                guard let region = map(regionSize) else { return nil }
                regions.append((region, regionSize))
                let size = sizes[sizeClass]
                for offset in stride(from: regionSize - size, through: 0, by: -size) { free[sizeClass].append(region + offset) }
            }
            bytesInUse += sizes[sizeClass]
            return free[sizeClass].removeLast()
        }
    }

    /// Wipes a block from `allocate(count)` and takes it back.
    static func release(_ block: UnsafeMutableRawPointer, count: Int) {
        guard let sizeClass = sizes.firstIndex(where: { $0 >= count }) else {
            explicit_bzero(block, count)
            let size = roundedToPages(count)
            munlock(block, size)
            munmap(block, size)
            lock.withLock { bytesInUse -= size }
            return
        }
        explicit_bzero(block, sizes[sizeClass])
        lock.withLock {
            bytesInUse -= sizes[sizeClass]
            free[sizeClass].append(block)
        }
    }

    /// In a child: locks of memory are not inherited; lock the regions again. The pages are
    /// locked as they are (MLOCK_ONFAULT: the ones the child shares with its parent stay shared,
    /// the ones it writes are locked as it makes its own): locking them all at once would copy
    /// every page of a region, 0.13–0.23 ms of a child's first call for one region (measured).
    static func enterChild() {
        for region in regions where CPKCS11_mlock_on_fault(region.start, region.size) != 0 {
            _ = mlock(region.start, region.size)
        }
    }

    private static func roundedToPages(_ count: Int) -> Int {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        return max(page, (count + page - 1) / page * page)
    }

    private static func map(_ count: Int) -> UnsafeMutableRawPointer? {
        let size = roundedToPages(count)
        guard let raw = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              raw != MAP_FAILED else { return nil }
        _ = madvise(raw, size, CPKCS11_madv_dontdump())
        if mlock(raw, size) != 0 && !Secret.lockFailureReported {
            Secret.lockFailureReported = true
            Trace.event(.error, "mlock failed (\(String(cString: strerror(errno)))): kept secrets are not locked in memory; raise RLIMIT_MEMLOCK (ulimit -l) to lock them")
        }
        return raw
    }
}

/// Bytes kept in protected memory, wiped when the last reference goes.
final class KeptBytes: @unchecked Sendable {
    let start: UnsafeMutableRawPointer
    private(set) var count: Int
    private var capacity: Int

    init?(copying bytes: UnsafeRawPointer?, count: Int, capacity: Int? = nil) {
        let capacity = max(capacity ?? count, count, 1)
        guard let start = ProtectedMemory.allocate(capacity) else { return nil }
        self.start = start
        self.count = count
        self.capacity = capacity
        if let bytes, count > 0 { start.copyMemory(from: bytes, byteCount: count) }
    }

    deinit { ProtectedMemory.release(start, count: capacity) }

    /// Appends if it fits in the capacity this was made with; false otherwise.
    func append(_ bytes: UnsafeRawPointer, count extra: Int) -> Bool {
        guard count + extra <= capacity else { return false }
        (start + count).copyMemory(from: bytes, byteCount: extra)
        count += extra
        return true
    }

    /// Wipes what is held and starts again at 0 bytes (the capacity stays).
    func clear() {
        explicit_bzero(start, count)
        count = 0
    }

    var pointer: UnsafeMutablePointer<UInt8> { start.assumingMemoryBound(to: UInt8.self) }
}
