import CPKCS11

/// Mechanism parameters that carry object handles must reach the real module with real ones:
/// they are the application's own where nothing has forked, translated in a forked child.
enum MechanismHandles {
    static func withRealHandles(_ mechanism: UnsafeMutablePointer<CK_MECHANISM>?,
                                _ body: (UnsafeMutablePointer<CK_MECHANISM>?) -> CK_RV) -> CK_RV {
        guard HandleValues.translated, let mechanism, let parameter = mechanism.pointee.pParameter else { return body(mechanism) }
        let type = mechanism.pointee.mechanism
        switch ParameterLayout.of(type) {
        case .structure(let fields) where fields.contains(.handle):
            guard Int(mechanism.pointee.ulParameterLen) == ParameterLayout.size(fields) else { return body(mechanism) }
            let length = Int(mechanism.pointee.ulParameterLen)
            let copy = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 8)
            defer { copy.deallocate() }
            copy.copyMemory(from: parameter, byteCount: length)
            // A handle the child does not know becomes one the module refuses (its own answer).
            _ = ParameterLayout.resolveHandles(in: copy, at: ParameterLayout.handleOffsets(fields)) { exposed in
                var failure = CK_RV(CKR_OK)
                return Objects.real(exposed, &failure)
            }
            var translated = mechanism.pointee
            translated.pParameter = copy
            return body(&translated)
        case .unknown where handleCarriers.contains(type):
            Trace.event(.error, "\(mechanismName(type).map { "\($0)" } ?? "mechanism") carries object handles in its parameter, which p11fork does not translate yet: in this forked child the module sees the application's handle values")
            return body(mechanism)
        default:
            return body(mechanism)
        }
    }

    static let handleCarriers: Set<CK_MECHANISM_TYPE> = Set([
        CKM_ECMQV_DERIVE, CKM_X9_42_DH_HYBRID_DERIVE, CKM_X9_42_MQV_DERIVE, CKM_SSL3_KEY_AND_MAC_DERIVE,
        CKM_TLS_KEY_AND_MAC_DERIVE,
    ].map { CK_MECHANISM_TYPE($0) })
}
