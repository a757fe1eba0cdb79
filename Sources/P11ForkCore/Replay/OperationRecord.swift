import CPKCS11
import Glibc

/// What was recorded about one operation in progress, to start it again in a child and feed
/// it what the parent fed it.
final class OperationRecord {
    enum Part {
        case data(Int)
        case key(CK_OBJECT_HANDLE)
    }

    let kind: OperationKind
    let mechanism: KeptMechanism?
    let key: CK_OBJECT_HANDLE
    let template: KeptTemplate?
    /// The signature C_VerifySignatureInit was given (3.2).
    let signature: KeptBytes?
    var parts: [Part] = []
    /// The data parts, one after the other.
    var data: KeptBytes?
    /// Handles a search already returned (virtual).
    var found: [CK_OBJECT_HANDLE] = []
    /// The PIN of a context-specific login made for this operation.
    var contextPIN: Secret?
    /// A multi-part message (3.0 C_*MessageBegin) was begun and not ended.
    var inMessage = false
    /// Why this operation cannot be carried into a child; nil while it can.
    var notReplayable: String?
    /// Bytes taken from ReplayBudget, and the part of them taken by fed data and found handles.
    var reserved = 0
    var fedBytes = 0

    init(kind: OperationKind, mechanism: KeptMechanism?, key: CK_OBJECT_HANDLE, template: KeptTemplate?, signature: KeptBytes? = nil) {
        self.kind = kind
        self.mechanism = mechanism
        self.key = key
        self.template = template
        self.signature = signature
    }

    /// The same init again (under Records.lock): what was fed is wiped and given back to the
    /// budget; the buffers stay for the next updates.
    func restart() {
        ReplayBudget.releaseLocked(fedBytes)
        reserved -= fedBytes
        fedBytes = 0
        data?.clear()
        parts.removeAll(keepingCapacity: true)
        found.removeAll(keepingCapacity: true)
        contextPIN?.wipe()
        contextPIN = nil
        inMessage = false
        if notReplayable != nil {
            // It stopped being kept (the bound, C_SetOperationState): its mechanism still is.
            notReplayable = nil
        }
    }

    func discard() {
        contextPIN?.wipe()
        contextPIN = nil
        data = nil
    }
}
