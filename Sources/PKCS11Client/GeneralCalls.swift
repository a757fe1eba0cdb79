import CPKCS11

// General-purpose functions (PKCS#11 v2.40 section 5.4).
extension Module {
    /// `C_Initialize(NULL)` when `args` is nil, else with a pointer to a copy of `args`.
    public func initialize(args: CK_C_INITIALIZE_ARGS? = nil) -> CK_RV {
        let function = entry(\.C_Initialize, "C_Initialize")
        guard var args else { return function(nil) }
        return function(&args)
    }

    /// `C_Finalize(NULL)`, or with `reserved` as pReserved (the spec requires NULL).
    public func finalize(reserved: UnsafeMutableRawPointer? = nil) -> CK_RV {
        entry(\.C_Finalize, "C_Finalize")(reserved)
    }

    public func getInfo() -> (rv: CK_RV, info: CK_INFO) {
        var info = CK_INFO()
        let rv = entry(\.C_GetInfo, "C_GetInfo")(&info)
        return (rv, info)
    }
}
