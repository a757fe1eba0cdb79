import CPKCS11

// Object management functions (PKCS#11 v2.40 section 5.7).
extension Module {
    public func createObject(_ session: CK_SESSION_HANDLE, _ template: [Attribute]) -> (rv: CK_RV, object: CK_OBJECT_HANDLE) {
        var object: CK_OBJECT_HANDLE = 0
        let rv = withTemplate(template) { entry(\.C_CreateObject, "C_CreateObject")(session, $0, $1, &object) }
        return (rv, object)
    }

    public func copyObject(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE,
                           _ template: [Attribute]) -> (rv: CK_RV, object: CK_OBJECT_HANDLE) {
        var copy: CK_OBJECT_HANDLE = 0
        let rv = withTemplate(template) { entry(\.C_CopyObject, "C_CopyObject")(session, object, $0, $1, &copy) }
        return (rv, copy)
    }

    public func destroyObject(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE) -> CK_RV {
        entry(\.C_DestroyObject, "C_DestroyObject")(session, object)
    }

    public func objectSize(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE) -> (rv: CK_RV, size: CK_ULONG) {
        var size: CK_ULONG = 0
        let rv = entry(\.C_GetObjectSize, "C_GetObjectSize")(session, object, &size)
        return (rv, size)
    }

    /// One `C_GetAttributeValue` call with exactly the buffers the requests describe.
    public func getAttributeValue(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE,
                                  _ requests: [AttributeRequest]) -> (rv: CK_RV, attributes: [AttributeResult]) {
        let template = UnsafeMutablePointer<CK_ATTRIBUTE>.allocate(capacity: max(requests.count, 1))
        var buffers: [UnsafeMutableRawPointer] = []
        defer {
            buffers.forEach { $0.deallocate() }
            template.deallocate()
        }
        for (index, request) in requests.enumerated() {
            var value: UnsafeMutableRawPointer?
            if let capacity = request.capacity {
                let buffer = UnsafeMutableRawPointer.allocate(byteCount: max(capacity, 1), alignment: 16)
                buffers.append(buffer)
                value = buffer
            }
            template[index] = CK_ATTRIBUTE(type: request.type, pValue: value, ulValueLen: CK_ULONG(request.capacity ?? 0))
        }
        let rv = entry(\.C_GetAttributeValue, "C_GetAttributeValue")(session, object, template, CK_ULONG(requests.count))
        let results = requests.enumerated().map { index, request -> AttributeResult in
            let entry = template[index]
            var value: [UInt8]?
            if let capacity = request.capacity, let pointer = entry.pValue, entry.ulValueLen != ckUnavailableInformation,
               Int(clamping: entry.ulValueLen) <= capacity {
                value = Array(UnsafeRawBufferPointer(start: pointer, count: Int(entry.ulValueLen)))
            }
            return AttributeResult(type: request.type, length: entry.ulValueLen, value: value)
        }
        return (rv, results)
    }

    /// The values of `types`: a length query, then a call with a buffer of that length for
    /// every attribute the module could give (the others are asked with a NULL `pValue` again).
    /// The return code is the second call's, or the first's when there is nothing to fetch.
    public func attributeValues(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE,
                                _ types: [CK_ATTRIBUTE_TYPE]) -> (rv: CK_RV, attributes: [AttributeResult]) {
        let query = getAttributeValue(session, object, types.map { AttributeRequest($0, capacity: nil) })
        let partial = [CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID].map { CK_RV($0) }
        guard query.rv == CKR_OK || partial.contains(query.rv) else { return query }
        let requests = query.attributes.map {
            AttributeRequest($0.type, capacity: $0.isUnavailable ? nil : Int(clamping: $0.length))
        }
        return getAttributeValue(session, object, requests)
    }

    public func setAttributeValue(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE, _ template: [Attribute]) -> CK_RV {
        withTemplate(template) { entry(\.C_SetAttributeValue, "C_SetAttributeValue")(session, object, $0, $1) }
    }

    public func findObjectsInit(_ session: CK_SESSION_HANDLE, _ template: [Attribute]) -> CK_RV {
        withTemplate(template) { entry(\.C_FindObjectsInit, "C_FindObjectsInit")(session, $0, $1) }
    }

    /// `C_FindObjects` with room for `maxCount` handles.
    public func findObjects(_ session: CK_SESSION_HANDLE, maxCount: Int) -> (rv: CK_RV, objects: [CK_OBJECT_HANDLE]) {
        var objects = [CK_OBJECT_HANDLE](repeating: 0, count: max(maxCount, 1))
        var found: CK_ULONG = 0
        let rv = objects.withUnsafeMutableBufferPointer {
            entry(\.C_FindObjects, "C_FindObjects")(session, $0.baseAddress, CK_ULONG(maxCount), &found)
        }
        return (rv, rv == CKR_OK ? Array(objects.prefix(min(Int(found), maxCount))) : [])
    }

    public func findObjectsFinal(_ session: CK_SESSION_HANDLE) -> CK_RV {
        entry(\.C_FindObjectsFinal, "C_FindObjectsFinal")(session)
    }

    /// Every object matching `template`: init, find in batches of `batch` until none is left,
    /// final. The return code is the first that was not CKR_OK (final always runs after a
    /// successful init).
    public func findAll(_ session: CK_SESSION_HANDLE, _ template: [Attribute],
                        batch: Int = 16) -> (rv: CK_RV, objects: [CK_OBJECT_HANDLE]) {
        let initRV = findObjectsInit(session, template)
        guard initRV == CKR_OK else { return (initRV, []) }
        var all: [CK_OBJECT_HANDLE] = []
        var rv = CK_RV(CKR_OK)
        while true {
            let found = findObjects(session, maxCount: batch)
            if found.rv != CKR_OK { rv = found.rv; break }
            all += found.objects
            if found.objects.isEmpty { break }
        }
        let finalRV = findObjectsFinal(session)
        return (rv != CKR_OK ? rv : finalRV, all)
    }
}
