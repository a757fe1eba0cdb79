import CPKCS11

/// Relays the real module's session notifications (CK_NOTIFY) to the application with the
/// application's session handle and its own pointer.
enum SessionNotifications {
    final class Relay {
        let notify: CK_NOTIFY
        let application: UnsafeMutableRawPointer?
        /// Set once the session has its handle as the application knows it.
        var session: CK_SESSION_HANDLE = CK_SESSION_HANDLE(CK_INVALID_HANDLE)

        init(notify: CK_NOTIFY, application: UnsafeMutableRawPointer?) {
            self.notify = notify
            self.application = application
        }
    }

    nonisolated(unsafe) static var lock: ForkSafeLock!
    nonisolated(unsafe) static var relays: [CK_SESSION_HANDLE: Relay] = [:]

    static func install() { lock = ForkDetection.register(ForkSafeLock()) }

    static let trampoline: CK_NOTIFY = { _, event, context in
        guard let context else { return CK_RV(CKR_OK) }
        let relay = Unmanaged<Relay>.fromOpaque(context).takeUnretainedValue()
        return relay.notify(relay.session, event, relay.application)
    }

    static func keep(_ relay: Relay, for session: CK_SESSION_HANDLE) {
        relay.session = session
        lock.withLock { relays[session] = relay }
    }

    static func forget(_ session: CK_SESSION_HANDLE) {
        lock.withLock { _ = relays.removeValue(forKey: session) }
    }

    static func removeAll() {
        lock.withLock { relays.removeAll() }
    }
}
