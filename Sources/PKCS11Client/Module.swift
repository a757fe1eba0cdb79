import CPKCS11

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A PKCS#11 module loaded with `dlopen` and reached through its `CK_FUNCTION_LIST`.
///
/// Every call returns the module's `CK_RV` as it came, next to its outputs: tests compare
/// return codes, so nothing here turns them into errors. `functions` is the raw list, for the
/// calls a test wants to make with arguments this wrapper would never build (NULL pointers).
public final class Module {
    public let path: String
    /// The module's own function list, as `C_GetFunctionList` gave it.
    public let functions: UnsafeMutablePointer<CK_FUNCTION_LIST>
    /// What `C_GetFunctionList` itself returned (CKR_OK, or the list would be missing).
    public let getFunctionListResult: CK_RV
    private let handle: UnsafeMutableRawPointer

    public enum LoadError: Error, CustomStringConvertible {
        case cannotOpen(path: String, reason: String)
        case noGetFunctionList(path: String)
        case getFunctionListFailed(path: String, rv: CK_RV)

        public var description: String {
            switch self {
            case .cannotOpen(let path, let reason): "cannot load \(path): \(reason)"
            case .noGetFunctionList(let path): "\(path) does not export C_GetFunctionList"
            case .getFunctionListFailed(let path, let rv): "C_GetFunctionList of \(path) returned \(ckrName(rv))"
            }
        }
    }

    /// Loads the module (RTLD_NOW | RTLD_LOCAL) and asks it for its function list.
    /// The library is never unloaded: some modules leave threads or atexit handlers behind.
    public init(path: String) throws {
        guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            throw LoadError.cannotOpen(path: path, reason: dlerror().map { String(cString: $0) } ?? "unknown error")
        }
        guard let symbol = dlsym(handle, "C_GetFunctionList") else {
            throw LoadError.noGetFunctionList(path: path)
        }
        let getFunctionList = unsafeBitCast(symbol, to: CK_C_GetFunctionList.self)
        var list: UnsafeMutablePointer<CK_FUNCTION_LIST>?
        let rv = getFunctionList(&list)
        guard rv == CKR_OK, let list else { throw LoadError.getFunctionListFailed(path: path, rv: rv) }
        self.path = path
        self.handle = handle
        self.functions = list
        self.getFunctionListResult = rv
    }

    /// The version the function list carries (2.40 for a 2.40 list).
    public var functionListVersion: CK_VERSION { functions.pointee.version }

    /// One entry of the function list; a module with a NULL entry is broken, and a test
    /// should stop there rather than guess a return code.
    func entry<Function>(_ field: KeyPath<CK_FUNCTION_LIST, Function?>, _ name: StaticString) -> Function {
        guard let function = functions.pointee[keyPath: field] else {
            preconditionFailure("\(path): the function list has no \(name)")
        }
        return function
    }
}

/// `CK_UNAVAILABLE_INFORMATION` (the header spells it with a cast Swift does not import).
public let ckUnavailableInformation: CK_ULONG = CK_ULONG.max
