import CPKCS11

// Slot and token management functions (PKCS#11 v2.40 section 5.5).
extension Module {
    /// `C_GetSlotList` with a NULL list: the number of slots.
    public func slotCount(tokenPresent: Bool) -> (rv: CK_RV, count: CK_ULONG) {
        var count: CK_ULONG = 0
        let rv = entry(\.C_GetSlotList, "C_GetSlotList")(tokenPresent ? 1 : 0, nil, &count)
        return (rv, count)
    }

    /// `C_GetSlotList` with room for `capacity` slots. `count` is what the module wrote back.
    public func slotList(tokenPresent: Bool, capacity: Int) -> (rv: CK_RV, count: CK_ULONG, slots: [CK_SLOT_ID]) {
        var slots = [CK_SLOT_ID](repeating: 0, count: max(capacity, 1))
        var count = CK_ULONG(capacity)
        let rv = slots.withUnsafeMutableBufferPointer {
            entry(\.C_GetSlotList, "C_GetSlotList")(tokenPresent ? 1 : 0, $0.baseAddress, &count)
        }
        return (rv, count, rv == CKR_OK ? Array(slots.prefix(min(Int(count), capacity))) : [])
    }

    /// The slot list: the count, then the list (the two-call convention).
    public func slotList(tokenPresent: Bool) -> (rv: CK_RV, slots: [CK_SLOT_ID]) {
        let (rv, count) = slotCount(tokenPresent: tokenPresent)
        guard rv == CKR_OK else { return (rv, []) }
        let list = slotList(tokenPresent: tokenPresent, capacity: Int(count))
        return (list.rv, list.slots)
    }

    public func slotInfo(_ slot: CK_SLOT_ID) -> (rv: CK_RV, info: CK_SLOT_INFO) {
        var info = CK_SLOT_INFO()
        let rv = entry(\.C_GetSlotInfo, "C_GetSlotInfo")(slot, &info)
        return (rv, info)
    }

    public func tokenInfo(_ slot: CK_SLOT_ID) -> (rv: CK_RV, info: CK_TOKEN_INFO) {
        var info = CK_TOKEN_INFO()
        let rv = entry(\.C_GetTokenInfo, "C_GetTokenInfo")(slot, &info)
        return (rv, info)
    }

    /// `C_GetMechanismList` with a NULL list (`capacity` nil) or room for `capacity` entries.
    public func mechanismList(_ slot: CK_SLOT_ID, capacity: Int?) -> (rv: CK_RV, count: CK_ULONG, mechanisms: [CK_MECHANISM_TYPE]) {
        let function = entry(\.C_GetMechanismList, "C_GetMechanismList")
        guard let capacity else {
            var count: CK_ULONG = 0
            let rv = function(slot, nil, &count)
            return (rv, count, [])
        }
        var list = [CK_MECHANISM_TYPE](repeating: 0, count: max(capacity, 1))
        var count = CK_ULONG(capacity)
        let rv = list.withUnsafeMutableBufferPointer { function(slot, $0.baseAddress, &count) }
        return (rv, count, rv == CKR_OK ? Array(list.prefix(min(Int(count), capacity))) : [])
    }

    /// The mechanism list: the count, then the list.
    public func mechanismList(_ slot: CK_SLOT_ID) -> (rv: CK_RV, mechanisms: [CK_MECHANISM_TYPE]) {
        let query = mechanismList(slot, capacity: nil)
        guard query.rv == CKR_OK else { return (query.rv, []) }
        let list = mechanismList(slot, capacity: Int(query.count))
        return (list.rv, list.mechanisms)
    }

    public func mechanismInfo(_ slot: CK_SLOT_ID, _ type: CK_MECHANISM_TYPE) -> (rv: CK_RV, info: CK_MECHANISM_INFO) {
        var info = CK_MECHANISM_INFO()
        let rv = entry(\.C_GetMechanismInfo, "C_GetMechanismInfo")(slot, type, &info)
        return (rv, info)
    }
}
