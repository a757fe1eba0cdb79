import CPKCS11

/// A copy of an application's attribute template, kept to replay the call that used it: types
/// and lengths in ordinary memory, every value (key material included) in protected memory.
/// The attribute arrays nested in CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE and CKA_DERIVE_TEMPLATE
/// are copied as templates of their own, not as bytes (they hold pointers).
final class KeptTemplate: @unchecked Sendable {
    struct Item {
        let type: CK_ATTRIBUTE_TYPE
        let length: CK_ULONG
        /// Offset of the value in `values`; nil for a NULL value.
        let offset: Int?
        let nested: KeptTemplate?
    }

    let items: [Item]
    let values: KeptBytes?
    /// Bytes kept for this template, nested ones included (for the replay bound).
    let byteCount: Int

    static let nestedTypes: Set<CK_ATTRIBUTE_TYPE> = [CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE, CKA_DERIVE_TEMPLATE].map { CK_ATTRIBUTE_TYPE($0) }.reduce(into: []) { $0.insert($1) }

    private init(items: [Item], values: KeptBytes?, byteCount: Int) {
        self.items = items
        self.values = values
        self.byteCount = byteCount
    }

    /// Copies a template the real module accepted; nil when it cannot be copied (no memory, or
    /// a shape no module could have accepted).
    static func copy(_ template: UnsafePointer<CK_ATTRIBUTE>?, _ count: CK_ULONG, depth: Int = 0) -> KeptTemplate? {
        guard count > 0 else { return KeptTemplate(items: [], values: nil, byteCount: 0) }
        guard let template, count <= 4096, depth < 4 else { return nil }
        var total = 0
        for i in 0..<Int(count) where !nestedTypes.contains(template[i].type) && template[i].pValue != nil {
            guard template[i].ulValueLen < (1 << 24) else { return nil }
            total += Int(template[i].ulValueLen)
        }
        let values = total > 0 ? KeptBytes(copying: nil, count: total) : nil
        if total > 0 && values == nil { return nil }
        var items: [Item] = []
        items.reserveCapacity(Int(count))
        var offset = 0
        var byteCount = total + Int(count) * MemoryLayout<Item>.stride
        for i in 0..<Int(count) {
            let attribute = template[i]
            if nestedTypes.contains(attribute.type), let inner = attribute.pValue {
                let innerCount = attribute.ulValueLen / CK_ULONG(MemoryLayout<CK_ATTRIBUTE>.stride)
                guard let nested = copy(inner.assumingMemoryBound(to: CK_ATTRIBUTE.self), innerCount, depth: depth + 1)
                else { return nil }
                byteCount += nested.byteCount
                items.append(Item(type: attribute.type, length: attribute.ulValueLen, offset: nil, nested: nested))
            } else if let value = attribute.pValue {
                if attribute.ulValueLen > 0 { (values!.start + offset).copyMemory(from: value, byteCount: Int(attribute.ulValueLen)) }
                items.append(Item(type: attribute.type, length: attribute.ulValueLen, offset: offset, nested: nil))
                offset += Int(attribute.ulValueLen)
            } else {
                items.append(Item(type: attribute.type, length: attribute.ulValueLen, offset: nil, nested: nil))
            }
        }
        return KeptTemplate(items: items, values: values, byteCount: byteCount)
    }

    /// Calls `body` with the template rebuilt; values point into protected memory.
    func withTemplate<T>(_ body: (UnsafeMutablePointer<CK_ATTRIBUTE>?, CK_ULONG) -> T) -> T {
        guard !items.isEmpty else { return body(nil, 0) }
        let template = UnsafeMutablePointer<CK_ATTRIBUTE>.allocate(capacity: items.count)
        defer { template.deallocate() }
        var nestedBuilt: [UnsafeMutablePointer<CK_ATTRIBUTE>] = []
        defer { for inner in nestedBuilt { inner.deallocate() } }
        fill(template, &nestedBuilt)
        return body(template, CK_ULONG(items.count))
    }

    private func fill(_ template: UnsafeMutablePointer<CK_ATTRIBUTE>, _ built: inout [UnsafeMutablePointer<CK_ATTRIBUTE>]) {
        for (i, item) in items.enumerated() {
            var value: UnsafeMutableRawPointer?
            if let nested = item.nested {
                let inner = UnsafeMutablePointer<CK_ATTRIBUTE>.allocate(capacity: max(nested.items.count, 1))
                built.append(inner)
                nested.fill(inner, &built)
                value = UnsafeMutableRawPointer(inner)
            } else if let offset = item.offset {
                value = values.map { $0.start + offset } ?? UnsafeMutableRawPointer(template)
            }
            template[i] = CK_ATTRIBUTE(type: item.type, pValue: value, ulValueLen: item.length)
        }
    }
}
