import CPKCS11
import Glibc

/// The three functions the shared library exports (Sources/P11Fork). They need no initialised
/// library; the first of them to be called loads the configuration and the real module.
public enum Exports {
    public static func getFunctionList(_ ppFunctionList: UnsafeMutablePointer<UnsafeMutablePointer<CK_FUNCTION_LIST>?>?) -> CK_RV {
        Core.ensureLoaded()
        let call = Call(.C_GetFunctionList)
        var rv = CK_RV(CKR_OK)
        if let ppFunctionList { ppFunctionList.pointee = Core.list240 } else { rv = CK_RV(CKR_ARGUMENTS_BAD) }
        if call.isTraced {
            var line = call.line()
            line.pointer("list", ppFunctionList)
            call.finish(rv, &line)
        }
        return rv
    }

    public static func getInterfaceList(_ pInterfacesList: UnsafeMutablePointer<CK_INTERFACE>?,
                                        _ pulCount: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
        Core.ensureLoaded()
        let call = Call(.C_GetInterfaceList)
        let countIn = pulCount?.pointee
        let available = CK_ULONG(Core.interfaceCount)
        var rv = CK_RV(CKR_OK)
        if let pulCount {
            if let pInterfacesList {
                if pulCount.pointee < available {
                    rv = CK_RV(CKR_BUFFER_TOO_SMALL)
                } else {
                    for i in 0..<Core.interfaceCount { pInterfacesList[i] = Core.interfaces[i] }
                }
            }
            pulCount.pointee = available
        } else {
            rv = CK_RV(CKR_ARGUMENTS_BAD)
        }
        if call.isTraced {
            var line = call.line()
            line.output("interfaces", pInterfacesList, in: countIn, out: pulCount, rv)
            call.finish(rv, &line)
        }
        return rv
    }

    public static func getInterface(_ pInterfaceName: UnsafeMutablePointer<CK_UTF8CHAR>?,
                                    _ pVersion: UnsafeMutablePointer<CK_VERSION>?,
                                    _ ppInterface: UnsafeMutablePointer<UnsafeMutablePointer<CK_INTERFACE>?>?,
                                    _ flags: CK_FLAGS) -> CK_RV {
        Core.ensureLoaded()
        let call = Call(.C_GetInterface)
        var rv = CK_RV(CKR_ARGUMENTS_BAD)
        if let ppInterface {
            let wanted = pInterfaceName.map { String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self)) }
            for i in 0..<Core.interfaceCount {
                let interface = Core.interfaces + i
                let list = interface.pointee.pFunctionList!.assumingMemoryBound(to: CK_VERSION.self).pointee
                guard wanted == nil || wanted == "PKCS 11",
                      pVersion == nil || (pVersion!.pointee.major == list.major && pVersion!.pointee.minor == list.minor),
                      interface.pointee.flags & flags == flags else { continue }
                ppInterface.pointee = interface
                rv = CK_RV(CKR_OK)
                break
            }
        }
        if call.isTraced {
            var line = call.line()
            line.key("name")
            if let pInterfaceName {
                line.appendQuoted(UnsafeRawBufferPointer(start: pInterfaceName, count: strlen(UnsafeRawPointer(pInterfaceName).assumingMemoryBound(to: CChar.self))))
            } else { line.null() }
            line.key("version")
            if let pVersion {
                line.symbol { l in
                    l.appendDecimal(UInt(pVersion.pointee.major)); l.append(UInt8(ascii: ".")); l.appendDecimal(UInt(pVersion.pointee.minor))
                }
            } else { line.null() }
            line.flags("flags", flags, names: [(CK_FLAGS(CKF_INTERFACE_FORK_SAFE), "CKF_INTERFACE_FORK_SAFE")])
            call.finish(rv, &line)
        }
        return rv
    }
}
