import CPKCS11
import Glibc

/// Who may have chosen p11fork's inputs, and what p11fork then accepts (docs/SECURITY.md).
///  - A process with rights its user did not give it (`AT_SECURE`: setuid, setgid, file
///    capabilities) ignores every `P11FORK_*` variable: whoever started it chose them.
///  - A file that gives p11fork settings or code (a configuration file, the real module) is used
///    only when nobody but the trusted owners can change it, nor any folder above it.
///  - Trace files are checked where they are opened (`TraceFile.open`).
enum InputTrust {
    /// Set at load (Core.load): the kernel marked this process as one whose inputs its user chose
    /// but whose rights it did not give.
    nonisolated(unsafe) static var secureExecution = false

    /// The rules a file named in the settings must pass (docs/SECURITY.md "Files that give
    /// settings or code").
    struct FileRules: Equatable, Sendable {
        /// Root or AT_SECURE: the file and every folder above it owned by a trusted owner and
        /// writable by nobody else. Otherwise only a file or folder anyone may write is refused.
        var privileged: Bool
        /// The owners trusted besides root: the effective user, unless it is also the user who
        /// started the process (setgid or file capabilities: that user is who is not trusted).
        var trustedOwner: uid_t?

        static var current: FileRules { of(euid: geteuid(), uid: getuid(), secure: secureExecution) }

        static func of(euid: uid_t, uid: uid_t, secure: Bool) -> FileRules {
            FileRules(privileged: secure || euid == 0,
                      trustedOwner: euid != 0 && !(secure && euid == uid) ? euid : nil)
        }
    }

    /// The environment p11fork takes its settings from: all of it, or, under AT_SECURE, all but
    /// its own variables, which are then named in `ignored`.
    static func settingsEnvironment(_ environment: [String: String], secure: Bool) -> (kept: [String: String], ignored: [String]) {
        guard secure else { return (environment, []) }
        let ignored = environment.keys.filter { $0.hasPrefix("P11FORK_") }.sorted()
        return (environment.filter { !$0.key.hasPrefix("P11FORK_") }, ignored)
    }

    /// The one stderr line when variables were ignored.
    static func ignoredMessage(_ ignored: [String]) -> String {
        "p11fork: \(ignored.joined(separator: ", ")) ignored: this program runs with rights its user did not give it (setuid, setgid or file capabilities); p11fork takes its settings only from \(Configuration.systemFile) or from the program (C_Initialize's pReserved), in files only root can change"
    }

    /// Checks that no one but the trusted owners can change the file at `path`, nor any folder
    /// above it. Returns the path with symbolic links resolved: the caller opens that one, whose
    /// folders were checked (a link's target could change after the check). A path that cannot
    /// be resolved (no such file) is returned as it is, for the caller's own message.
    static func checkedPath(_ path: String, rules: FileRules) -> Result<String, Refusal> {
        guard let resolvedPointer = realpath(path, nil) else { return .success(path) }
        let resolved = String(cString: resolvedPointer)
        free(resolvedPointer)
        var status = stat()
        guard stat(resolved, &status) == 0 else { return .success(path) }
        if let problem = problem(status, rules: rules, isFolder: false) {
            return .failure(refusal(subject: "the file", path: resolved, problem, status, rules: rules))
        }
        var folder = resolved
        while folder != "/" {
            folder = parentFolder(folder)
            guard stat(folder, &status) == 0 else { return .success(resolved) }
            if let problem = problem(status, rules: rules, isFolder: true) {
                return .failure(refusal(subject: "the folder \(folder) on its path", path: folder, problem, status, rules: rules))
            }
        }
        return .success(resolved)
    }

    /// Checks an opened file's own owner and mode (the folders were checked by `checkedPath`).
    static func checkedOpenFile(_ status: stat, path: String, rules: FileRules) -> Refusal? {
        problem(status, rules: rules, isFolder: false).map {
            refusal(subject: "the file", path: path, $0, status, rules: rules)
        }
    }

    /// Why a file was refused, after the name of the setting: "refused: the file ...: the fix".
    struct Refusal: Error, Equatable, Sendable {
        let detail: String
    }

    enum Problem: Equatable { case owner, writable }

    /// What is wrong with one file or folder under `rules`, if anything. A folder with the sticky
    /// bit (as /tmp) lets only an entry's owner rename or remove it: it passes when root owns it,
    /// since the entry below it is checked in its turn.
    static func problem(_ status: stat, rules: FileRules, isFolder: Bool) -> Problem? {
        let mode = status.st_mode
        let sticky = mode & S_ISVTX != 0
        if rules.privileged {
            guard status.st_uid == 0 || status.st_uid == rules.trustedOwner else { return .owner }
            if isFolder && sticky && status.st_uid == 0 { return nil }
            return mode & (S_IWGRP | S_IWOTH) != 0 ? .writable : nil
        }
        if isFolder && sticky { return nil }
        return mode & S_IWOTH != 0 ? .writable : nil
    }

    private static func refusal(subject: String, path: String, _ problem: Problem,
                                _ status: stat, rules: FileRules) -> Refusal {
        let facts = "owner \(userName(status.st_uid)), mode \(octalMode(status.st_mode))"
        let fix: String
        let what: String
        switch problem {
        case .owner:
            let owners = rules.trustedOwner.map { "root or \(userName($0))" } ?? "root"
            what = "is not owned by \(owners)"
            fix = "a process running as root or with setuid rights uses only what \(owners) owns: chown root \(path)"
        case .writable:
            what = rules.privileged ? "is writable by group or others" : "is writable by anyone"
            fix = rules.privileged
                ? "anyone who can change it could run code in this privileged process: chmod go-w \(path)"
                : "anyone could run code in this process: chmod o-w \(path)"
        }
        return Refusal(detail: "refused: \(subject) \(what) (\(facts)): \(fix)")
    }

    static func parentFolder(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return "/" }
        return String(path[..<slash])
    }

    static func octalMode(_ mode: mode_t) -> String {
        let digits = String(mode & 0o7777, radix: 8)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }

    /// `root`, or `uid 1000 (alice)`; only on the way to an error message (it may ask NSS).
    static func userName(_ uid: uid_t) -> String {
        if uid == 0 { return "root" }
        var entry = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 4096)
        let found = getpwuid_r(uid, &entry, &buffer, buffer.count, &result) == 0 && result != nil
        return found ? "uid \(uid) (\(String(cString: entry.pw_name)))" : "uid \(uid)"
    }
}
