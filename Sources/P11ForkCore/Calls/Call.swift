import CPKCS11

/// The one shape of every entry point: check for a fork, note the start when tracing, call the
/// real module with real handles, make returned handles virtual, trace the result. Nothing in
/// it throws or traps across the C boundary; the common path is a few loads and branches.
struct Call {
    let function: Function
    /// Monotonic start time (odd, never 0) when tracing calls, else 0.
    let started: UInt64

    @inline(__always)
    init(_ function: Function) {
        self.function = function
        started = _fastPath(ProcessMark.isFast) ? 0 : Self.slowStart(function)
    }

    /// A new child to adopt, a thread to set up for a module copy, a call to time for the trace.
    @inline(never)
    static func slowStart(_ function: Function) -> UInt64 {
        if !ProcessMark.isCurrentProcess { ForkDetection.adoptChild(function) }
        CPKCS11_enter_copy()
        return Trace.level >= .calls ? Clock.monotonicNanoseconds() : 0
    }

    @inline(__always)
    var isTraced: Bool { started != 0 }

    /// The real module has no such function: without a module the library is not initialised;
    /// with one, the function is not supported.
    @inline(never)
    func unavailable() -> CK_RV {
        let rv = Core.functions == nil ? Core.unusable ?? CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED) : CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
        if isTraced {
            var line = line()
            finish(rv, &line)
        }
        return rv
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
