import CPKCS11
import P11ForkCore

// The only symbols libp11fork.so exports (see exports.map). Everything else is in P11ForkCore.

@_cdecl("C_GetFunctionList")
public func p11fork_C_GetFunctionList(_ ppFunctionList: UnsafeMutablePointer<UnsafeMutablePointer<CK_FUNCTION_LIST>?>?) -> CK_RV {
    Exports.getFunctionList(ppFunctionList)
}

@_cdecl("C_GetInterfaceList")
public func p11fork_C_GetInterfaceList(_ pInterfacesList: UnsafeMutablePointer<CK_INTERFACE>?,
                                       _ pulCount: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    Exports.getInterfaceList(pInterfacesList, pulCount)
}

@_cdecl("C_GetInterface")
public func p11fork_C_GetInterface(_ pInterfaceName: UnsafeMutablePointer<CK_UTF8CHAR>?,
                                   _ pVersion: UnsafeMutablePointer<CK_VERSION>?,
                                   _ ppInterface: UnsafeMutablePointer<UnsafeMutablePointer<CK_INTERFACE>?>?,
                                   _ flags: CK_FLAGS) -> CK_RV {
    Exports.getInterface(pInterfaceName, pVersion, ppInterface, flags)
}
