import CPKCS11

// Key management and random number generation functions (PKCS#11 v2.40 sections 5.13, 5.14).
extension Module {
    public func generateKey(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism,
                            _ template: [Attribute]) -> (rv: CK_RV, key: CK_OBJECT_HANDLE) {
        var key: CK_OBJECT_HANDLE = 0
        let rv = withMechanism(mechanism) { mechanism in
            withTemplate(template) { entry(\.C_GenerateKey, "C_GenerateKey")(session, mechanism, $0, $1, &key) }
        }
        return (rv, key)
    }

    public func generateKeyPair(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, publicKey: [Attribute],
                                privateKey: [Attribute]) -> (rv: CK_RV, publicKey: CK_OBJECT_HANDLE, privateKey: CK_OBJECT_HANDLE) {
        var publicHandle: CK_OBJECT_HANDLE = 0
        var privateHandle: CK_OBJECT_HANDLE = 0
        let function = entry(\.C_GenerateKeyPair, "C_GenerateKeyPair")
        let rv = withMechanism(mechanism) { mechanism in
            withTemplate(publicKey) { publicTemplate, publicCount in
                withTemplate(privateKey) { privateTemplate, privateCount in
                    function(session, mechanism, publicTemplate, publicCount, privateTemplate, privateCount,
                             &publicHandle, &privateHandle)
                }
            }
        }
        return (rv, publicHandle, privateHandle)
    }

    public func wrapKey(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, wrappingKey: CK_OBJECT_HANDLE,
                        key: CK_OBJECT_HANDLE, _ space: OutputSpace = .fit) -> Output {
        let function = entry(\.C_WrapKey, "C_WrapKey")
        return withMechanism(mechanism) { mechanism in
            produce(space) { function(session, mechanism, wrappingKey, key, $0, $1) }
        }
    }

    public func unwrapKey(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, unwrappingKey: CK_OBJECT_HANDLE,
                          wrappedKey: [UInt8], _ template: [Attribute]) -> (rv: CK_RV, key: CK_OBJECT_HANDLE) {
        var key: CK_OBJECT_HANDLE = 0
        let function = entry(\.C_UnwrapKey, "C_UnwrapKey")
        let rv = withMechanism(mechanism) { mechanism in
            withInput(wrappedKey) { wrapped, wrappedLength in
                withTemplate(template) { function(session, mechanism, unwrappingKey, wrapped, wrappedLength, $0, $1, &key) }
            }
        }
        return (rv, key)
    }

    public func deriveKey(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, baseKey: CK_OBJECT_HANDLE,
                          _ template: [Attribute]) -> (rv: CK_RV, key: CK_OBJECT_HANDLE) {
        var key: CK_OBJECT_HANDLE = 0
        let rv = withMechanism(mechanism) { mechanism in
            withTemplate(template) { entry(\.C_DeriveKey, "C_DeriveKey")(session, mechanism, baseKey, $0, $1, &key) }
        }
        return (rv, key)
    }

    public func seedRandom(_ session: CK_SESSION_HANDLE, _ seed: [UInt8]) -> CK_RV {
        withInput(seed) { entry(\.C_SeedRandom, "C_SeedRandom")(session, $0, $1) }
    }

    public func generateRandom(_ session: CK_SESSION_HANDLE, count: Int) -> (rv: CK_RV, bytes: [UInt8]) {
        var bytes = [UInt8](repeating: 0, count: max(count, 1))
        let rv = bytes.withUnsafeMutableBufferPointer {
            entry(\.C_GenerateRandom, "C_GenerateRandom")(session, $0.baseAddress, CK_ULONG(count))
        }
        return (rv, Array(bytes.prefix(count)))
    }
}
