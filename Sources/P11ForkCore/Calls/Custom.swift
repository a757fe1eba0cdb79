import CPKCS11
import Glibc

/// Hand-written entry points: the general-purpose functions (PKCS#11 2.40 section 5.4) and
/// the 3.0 interface functions. The rest of `Custom` is in the other files of Calls/.
enum Custom {
    static let C_Initialize: CK_C_Initialize = { pInitArgs in
        var call = Call(.C_Initialize)
        let args = pInitArgs?.assumingMemoryBound(to: CK_C_INITIALIZE_ARGS.self)
        // Like C_Finalize, with other threads' calls out of the way (FinalizeGate): a module being
        // initialised is no safer to call than one being finalised (SoftHSM crashed so).
        let (rv, claimed, settledNow) = FinalizeGate.whileClosed { initialize(pInitArgs, args) }
        // Settings read just now may have turned tracing on: this call is then traced too.
        if settledNow { call = Call(.C_Initialize) }
        if call.isTraced {
            var line = call.line()
            if let args {
                line.flags("flags", args.pointee.flags, names: CK_FLAGS.initializeFlagNames)
                line.key("mutexCallbacks")
                line.symbol { $0.append(args.pointee.CreateMutex != nil ? "yes" : "no") }
                line.key("reserved")
                if claimed { line.symbol { $0.append("p11fork-settings") } }
                else if args.pointee.pReserved == nil { line.null() } else { line.symbol { $0.append("ptr") } }
            } else {
                line.key("args")
                line.null()
            }
            call.finish(rv, &line)
        }
        return rv
    }

    /// C_Initialize's work: the settings (at the first one), then the real module's C_Initialize.
    private static func initialize(_ pInitArgs: UnsafeMutableRawPointer?, _ args: UnsafeMutablePointer<CK_C_INITIALIZE_ARGS>?)
        -> (rv: CK_RV, claimed: Bool, settledNow: Bool) {
        let (claimed, settledNow) = Core.settle(reserved: args?.pointee.pReserved.map { UnsafeRawPointer($0) })
        let rv: CK_RV
        if FinalizeGate.moduleGone {
            // The process is exiting and the module's exit handlers have run (FinalizeGate.closeAtExit).
            rv = CK_RV(CKR_GENERAL_ERROR)
        } else if let problem = Core.loadProblem {
            // One line on stderr naming the problem and the fix, every time the app tries.
            let message = "p11fork: \(problem.message)\n"
            Trace.write(2, message, message.utf8.count)
            rv = CK_RV(CKR_GENERAL_ERROR)
        } else if Recovery.initializationUnclaimed {
            // A child following the old rule: p11fork already initialised its module.
            Recovery.initializationUnclaimed = false
            Core.appInitialized = true
            rv = CK_RV(CKR_OK)
            Trace.event(.fork, "C_Initialize in the child: the module was already made ready for this process: answered CKR_OK")
        } else if let function = Core.functions?.pointee.C_Initialize {
            // The application's arguments (mutex callbacks, flags, pReserved) go on unchanged,
            // but for a pReserved holding p11fork's own settings, which the real module never sees.
            let forward = { (passed: UnsafeMutableRawPointer?) -> CK_RV in
                let rv = function(passed)
                if rv == CKR_OK {
                    Core.appInitialized = true
                    ModuleRecovery.keepInitArguments(passed)
                    if !Slots.translating { Records.noteModule(Core.functions!) }
                }
                return rv
            }
            if claimed, var own = args?.pointee {
                own.pReserved = nil
                rv = withUnsafeMutablePointer(to: &own) { forward(UnsafeMutableRawPointer($0)) }
            } else {
                rv = forward(pInitArgs)
            }
        } else {
            rv = Core.unusable ?? CK_RV(CKR_GENERAL_ERROR)
        }
        return (rv, claimed, settledNow)
    }

    static let C_GetInfo: CK_C_GetInfo = { pInfo in
        let call = Call(.C_GetInfo)
        guard let function = call.functions?.pointee.C_GetInfo else { return call.unavailable() }
        let rv = function(pInfo)
        // Through the helper, the module answering is p11-kit's RPC client: the application is
        // told what its own module said (the error codes stay the module's).
        if rv == CKR_OK, let pInfo, Core.module?.isHelperClient == true, let kept = Records.moduleInfo {
            pInfo.pointee = kept
        }
        if call.isTraced {
            var line = call.line()
            line.pointer("info", pInfo)
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_Finalize: CK_C_Finalize = { pReserved in
        let call = Call(.C_Finalize)
        guard !FinalizeGate.moduleGone, Recovery.moduleInherited || Core.functions?.pointee.C_Finalize != nil else { return call.unavailable() }
        // Other threads' calls end first and new ones wait (FinalizeGate): the module frees what
        // they use, and so does forgetting the handles.
        let rv: CK_RV = FinalizeGate.whileClosed {
            let rv: CK_RV
            if Recovery.moduleInherited {
                // A child finalizing what it inherited: p11fork forgets it all; the inherited module
                // (and a server-side state it may share with the parent) is left alone.
                rv = !Core.appInitialized ? CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED)
                    : pReserved != nil ? CK_RV(CKR_ARGUMENTS_BAD) : CK_RV(CKR_OK)
            } else {
                // In a child this reaches only the child's own (recovered) module.
                rv = Core.functions!.pointee.C_Finalize!(pReserved)
            }
            if rv == CKR_OK {
                Core.appInitialized = false
                Recovery.initializationUnclaimed = false
                Core.forgetSessionsAndObjects()
            }
            return rv
        }
        if call.isTraced {
            var line = call.line()
            line.key("reserved")
            if pReserved == nil { line.null() } else { line.symbol { $0.append("ptr") } }
            call.finish(rv, &line)
        }
        return rv
    }

    static let C_GetFunctionList: CK_C_GetFunctionList = { ppFunctionList in
        Exports.getFunctionList(ppFunctionList)
    }

    static let C_GetInterfaceList: CK_C_GetInterfaceList = { pInterfacesList, pulCount in
        Exports.getInterfaceList(pInterfacesList, pulCount)
    }

    static let C_GetInterface: CK_C_GetInterface = { pInterfaceName, pVersion, ppInterface, flags in
        Exports.getInterface(pInterfaceName, pVersion, ppInterface, flags)
    }
}
