import CPKCS11
import Synchronization

/// The one shape of every entry point: check for a fork, note the start when tracing, call the
/// real module with real handles, expose returned handles (translated only in a forked child),
/// trace the result. Nothing in
/// it throws or traps across the C boundary; the common path is a few loads and branches, and
/// an atomic add and subtract that let C_Finalize wait for the call (FinalizeGate).
/// Not copyable: its end (when the entry point returns) counts the call out of the gate.
struct Call: ~Copyable {
    let function: Function
    /// Monotonic start time (odd, never 0) when tracing calls, else 0.
    let started: UInt64
    /// This call's counter in the FinalizeGate; nil for the calls it does not count.
    private let gate: UnsafeMutablePointer<Atomic<Int>>?
    /// The real module's functions for this call; nil without a module, or while the application
    /// has not initialised the library (the gate refused the call).
    let functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>?

    @inline(__always)
    init(_ function: Function) {
        self.function = function
        started = _fastPath(ProcessMark.isFast) ? 0 : Self.slowStart(function)
        if function.waitsForFinalize {
            let (counter, admitted) = FinalizeGate.enter()
            gate = admitted ? counter : nil
            functions = admitted ? Core.functions : nil
        } else {
            gate = nil
            // Not gated (C_Initialize, C_Finalize, C_WaitForSlotEvent): none reaches a module
            // whose exit handlers have run.
            functions = FinalizeGate.moduleGone ? nil : Core.functions
        }
    }

    @inline(__always)
    deinit {
        if let gate { FinalizeGate.leave(gate) }
    }

    /// A new child to adopt, a thread to set up for a module copy, a call to time for the trace.
    @inline(never)
    static func slowStart(_ function: Function) -> UInt64 {
        if !ProcessMark.isCurrentProcess { ForkDetection.adoptChild(function) }
        CPKCS11_enter_copy()
        if Broker.servesThisProcess { Broker.noticeEnd() }
        return Trace.level >= .calls ? Clock.monotonicNanoseconds() : 0
    }

    @inline(__always)
    var isTraced: Bool { started != 0 }

    /// The call cannot reach the module: without a module the library is not initialised (or
    /// unusable in this child); a function the module does not have is not supported, whether
    /// or not the library is initialised; else the application has not initialised it.
    @inline(never)
    func unavailable() -> CK_RV {
        let rv = Core.functions.map { moduleHas($0) ? CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED) : CK_RV(CKR_FUNCTION_NOT_SUPPORTED) }
            ?? Core.unusable ?? CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED)
        if isTraced {
            var line = line()
            finish(rv, &line)
        }
        return rv
    }

    /// Whether the module's list has this call's function: `Function` is in the order of
    /// CK_FUNCTION_LIST_3_2's entries (generated from the same description).
    private func moduleHas(_ list: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>) -> Bool {
        let first = MemoryLayout<CK_FUNCTION_LIST_3_2>.offset(of: \.C_Initialize)!
        let stride = MemoryLayout<UnsafeRawPointer?>.stride
        return UnsafeRawPointer(list).load(fromByteOffset: first + function.rawValue * stride, as: UnsafeRawPointer?.self) != nil
    }

    func line() -> TraceLine {
        var line = TraceLine(json: Trace.format == .json)
        line.header()
        line.beginCall(function)
        return line
    }

    func finish(_ rv: CK_RV, _ line: inout TraceLine) {
        line.endCall(rv, nanoseconds: Clock.monotonicNanoseconds() &- started)
        line.write(to: Trace.fd)
    }
}

extension Function {
    /// Every call but these counts in the FinalizeGate: C_Initialize and C_Finalize themselves,
    /// C_WaitForSlotEvent (which C_Finalize ends, PKCS#11 2.40 section 5.4), and the three
    /// exported functions, which do not reach the module.
    var waitsForFinalize: Bool {
        switch self {
        case .C_Initialize, .C_Finalize, .C_WaitForSlotEvent, .C_GetFunctionList, .C_GetInterfaceList, .C_GetInterface: false
        default: true
        }
    }
}
