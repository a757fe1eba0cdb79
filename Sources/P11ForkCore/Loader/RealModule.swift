import CPKCS11
import Glibc

/// The real (vendor) module, loaded in process with dlopen.
///
/// Its functions are copied into a 3.2-layout list owned by p11fork (the 3.2 part empty when the
/// module offers 3.0, the 3.0 part too when it offers only 2.40), so every forwarder reads one
/// table whatever the module's age.
struct RealModule {
    let path: String
    let handle: UnsafeMutableRawPointer
    let functions: UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>
    /// The newest "PKCS 11" interface the module offered through C_GetInterface: 2.40 (only
    /// C_GetFunctionList), 3.0 or 3.2 (docs/FORK.md "PKCS#11 3.0 and 3.2").
    let offered: Offered
    enum Offered: Comparable { case v240, v30, v32 }
    var offers30: Bool { offered >= .v30 }
    var offers32: Bool { offered >= .v32 }
    /// How many GLib images were loaded before this module. A module whose stack brings GLib in
    /// (when loaded, or later, as tpm2-pkcs11's TCTI does in C_Initialize) cannot be loaded a
    /// second time in one process: GObject crashes (docs/DESIGN.md "Modules across fork").
    let glibBaseline: Int32
    var loadsGLib: Bool { CPKCS11_loaded_count("libglib-2.0") > glibBaseline }
    /// True for a private copy loaded in a child (dlmopen, a new link-map namespace).
    let isPrivateCopy: Bool
    /// The path of the module this one stands for: itself, or, for p11-kit's RPC client talking
    /// to a helper (the out-of-process strategy), the real module the helper runs.
    var servedModulePath: String?
    var isHelperClient: Bool { servedModulePath != nil }
    /// True when that helper is the broker of this process tree (Broker), not one of its own.
    var servedByBroker = false

    /// Loads `path`; `source` names where the path came from, for messages. With `privateCopy`,
    /// loads a fresh copy in a new link-map namespace, sharing nothing with the loaded one.
    static func load(path: String, source: String, privateCopy: Bool = false) -> Result<RealModule, ConfigurationProblem> {
        var status = stat()
        guard stat(path, &status) == 0 else {
            return .failure(ConfigurationProblem(
                "\(source)=\(path): no such file: set it to the path of the real PKCS#11 module"))
        }
        // Loaded by its resolved path, whose folders were checked: code that others can change
        // is never run (InputTrust; docs/SECURITY.md "Files that give settings or code").
        let resolved: String
        switch InputTrust.checkedPath(path, rules: .current) {
        case .success(let path): resolved = path
        case .failure(let refusal): return .failure(ConfigurationProblem("\(source)=\(path): \(refusal.detail)"))
        }
        let glibBefore = CPKCS11_loaded_count("libglib-2.0")
        let opened = privateCopy ? CPKCS11_dlmopen_new(resolved, RTLD_NOW | RTLD_LOCAL) : dlopen(resolved, RTLD_NOW | RTLD_LOCAL)
        guard let handle = opened else {
            let reason = dlerror().map { String(cString: $0) } ?? "unknown reason"
            return .failure(ConfigurationProblem(
                "\(source)=\(path): the module cannot be loaded (\(reason)): check that it is a PKCS#11 library for this machine and that its dependencies are installed"))
        }
        guard let getList = dlsym(handle, "C_GetFunctionList") else {
            dlclose(handle)
            return .failure(ConfigurationProblem(
                "\(source)=\(path) is not a PKCS#11 module (it has no C_GetFunctionList): point it at the vendor's PKCS#11 library"))
        }
        if let own = Self.ownHandle, getList == dlsym(own, "C_GetFunctionList") {
            return .failure(ConfigurationProblem(
                "\(source)=\(path) is p11fork itself: point it at the real PKCS#11 module, not at libp11fork.so"))
        }

        let functions = UnsafeMutablePointer<CK_FUNCTION_LIST_3_2>.allocate(capacity: 1)
        UnsafeMutableRawPointer(functions).initializeMemory(as: UInt8.self, repeating: 0,
                                                            count: MemoryLayout<CK_FUNCTION_LIST_3_2>.size)
        var offered = Offered.v240
        if let getInterface = dlsym(handle, "C_GetInterface"),
           let (list, version) = Self.interface3(unsafeBitCast(getInterface, to: CK_C_GetInterface.self)) {
            // Only as much as the module's list holds is read: a 3.0 list ends where 3.2 adds on.
            offered = version
            let size = version == .v32 ? MemoryLayout<CK_FUNCTION_LIST_3_2>.size : MemoryLayout<CK_FUNCTION_LIST_3_0>.size
            UnsafeMutableRawPointer(functions).copyMemory(from: list, byteCount: size)
        } else {
            var list: UnsafeMutablePointer<CK_FUNCTION_LIST>?
            let rv = unsafeBitCast(getList, to: CK_C_GetFunctionList.self)(&list)
            guard rv == CKR_OK, let list else {
                let name = returnCodeName(rv).map { "\($0)" } ?? "0x\(String(rv, radix: 16))"
                return .failure(ConfigurationProblem(
                    "\(source)=\(path): the module's C_GetFunctionList failed (\(name)): the module is broken or not set up; try 'pkcs11-tool --module \(path) -I'"))
            }
            UnsafeMutableRawPointer(functions).copyMemory(from: list, byteCount: MemoryLayout<CK_FUNCTION_LIST>.size)
        }
        return .success(RealModule(path: path, handle: handle, functions: functions, offered: offered,
                                   glibBaseline: glibBefore, isPrivateCopy: privateCopy))
    }

    /// The module's newest "PKCS 11" 3.x function list, if it has one: 3.2 when it offers it,
    /// else 3.0 (asked by version first, then for any version).
    private static func interface3(_ getInterface: CK_C_GetInterface) -> (UnsafeRawPointer, Offered)? {
        var name = Array("PKCS 11".utf8CString).map { CK_UTF8CHAR(bitPattern: $0) }
        for wanted in [CK_VERSION(major: 3, minor: 2), CK_VERSION(major: 3, minor: 0)] {
            var version = wanted
            var interface: UnsafeMutablePointer<CK_INTERFACE>?
            if getInterface(&name, &version, &interface, 0) == CKR_OK, let found = usable(interface) { return found }
        }
        var interface: UnsafeMutablePointer<CK_INTERFACE>?
        guard getInterface(&name, nil, &interface, 0) == CKR_OK else { return nil }
        return usable(interface)
    }

    private static func usable(_ interface: UnsafeMutablePointer<CK_INTERFACE>?) -> (UnsafeRawPointer, Offered)? {
        guard let interface, let list = interface.pointee.pFunctionList,
              let interfaceName = interface.pointee.pInterfaceName,
              String(cString: UnsafeRawPointer(interfaceName).assumingMemoryBound(to: CChar.self)) == "PKCS 11"
        else { return nil }
        let version = list.assumingMemoryBound(to: CK_VERSION.self).pointee
        guard version.major >= 3 else { return nil }
        return (UnsafeRawPointer(list), version.major > 3 || version.minor >= 2 ? .v32 : .v30)
    }

    /// p11fork's own image, to refuse being pointed at itself.
    nonisolated(unsafe) static let ownHandle: UnsafeMutableRawPointer? = {
        guard let name = CPKCS11_image_path(#dsohandle) else { return nil }
        return dlopen(name, RTLD_NOW | RTLD_NOLOAD)
    }()
}
