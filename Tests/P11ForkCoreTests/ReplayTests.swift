import CPKCS11
import Testing
@testable import P11ForkCore

/// What p11fork keeps to replay a call in a child: deep copies that do not depend on the
/// application's buffers, in protected memory that is wiped when given back.
@Suite(.serialized) struct ReplayTests {
    init() {
        if ProtectedMemory.lock == nil { ProtectedMemory.install() }
    }

    @Test func templateIsCopiedDeeplyIncludingNestedTemplates() throws {
        var value: [UInt8] = [1, 2, 3, 4]
        let flag = UnsafeMutablePointer<CK_BBOOL>.allocate(capacity: 1)
        defer { flag.deallocate() }
        flag.pointee = 1
        var inner = [CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_EXTRACTABLE), pValue: flag, ulValueLen: 1)]
        let kept = try #require(value.withUnsafeMutableBytes { bytes in
            inner.withUnsafeMutableBufferPointer { nested in
                var template = [
                    CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_VALUE), pValue: bytes.baseAddress, ulValueLen: 4),
                    CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_UNWRAP_TEMPLATE), pValue: UnsafeMutableRawPointer(nested.baseAddress),
                                 ulValueLen: CK_ULONG(MemoryLayout<CK_ATTRIBUTE>.stride)),
                    CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_LABEL), pValue: nil, ulValueLen: 0),
                ]
                return KeptTemplate.copy(&template, 3)
            }
        })
        // The application reuses its buffers at once.
        value = [9, 9, 9, 9]
        flag.pointee = 0
        kept.withTemplate { template, count in
            #expect(count == 3)
            guard let template else { return }
            #expect(Array(UnsafeRawBufferPointer(start: template[0].pValue, count: 4)) == [1, 2, 3, 4])
            let nested = template[1].pValue!.assumingMemoryBound(to: CK_ATTRIBUTE.self)
            #expect(nested[0].type == CK_ATTRIBUTE_TYPE(CKA_EXTRACTABLE))
            #expect(nested[0].pValue!.load(as: UInt8.self) == 1)
            #expect(template[2].pValue == nil && template[2].ulValueLen == 0)
        }
    }

    @Test func gcmParameterIsCopiedWithTheBuffersItPointsTo() throws {
        var ivBytes: [UInt8] = Array(repeating: 7, count: 12)
        var aad: [UInt8] = Array("header".utf8)
        let copy = ivBytes.withUnsafeMutableBufferPointer { iv in
            aad.withUnsafeMutableBufferPointer { aad in
                var parameters = CK_GCM_PARAMS(pIv: iv.baseAddress, ulIvLen: 12, ulIvBits: 96, pAAD: aad.baseAddress, ulAADLen: 6, ulTagBits: 128)
                return withUnsafeMutableBytes(of: &parameters) { raw in
                    var mechanism = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_AES_GCM), pParameter: raw.baseAddress,
                                                 ulParameterLen: CK_ULONG(raw.count))
                    return KeptMechanism.copy(&mechanism)
                }
            }
        }
        ivBytes = Array(repeating: 0, count: 12)
        aad = Array("xxxxxx".utf8)
        guard case .kept(let kept) = copy else { Issue.record("not kept: \(copy)"); return }
        let seen = kept.withMechanism(resolve: { $0 }) { mechanism -> ([UInt8], [UInt8], CK_ULONG) in
            let parameters = mechanism.pointee.pParameter!.load(as: CK_GCM_PARAMS.self)
            return (Array(UnsafeBufferPointer(start: parameters.pIv, count: 12)), Array(UnsafeBufferPointer(start: parameters.pAAD, count: 6)),
                    parameters.ulTagBits)
        }
        #expect(seen?.0 == Array(repeating: 7, count: 12))
        #expect(seen?.1 == Array("header".utf8))
        #expect(seen?.2 == 128)
    }

    @Test func handleInAParameterIsResolvedWhenUsed() throws {
        var handle: CK_OBJECT_HANDLE = 0x0B00_0007
        let copy = withUnsafeMutableBytes(of: &handle) { raw in
            var mechanism = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_CONCATENATE_BASE_AND_KEY), pParameter: raw.baseAddress, ulParameterLen: 8)
            return KeptMechanism.copy(&mechanism)
        }
        guard case .kept(let kept) = copy else { Issue.record("not kept"); return }
        let real = kept.withMechanism(resolve: { $0 == 0x0B00_0007 ? 42 : nil }) { $0.pointee.pParameter!.load(as: CK_OBJECT_HANDLE.self) }
        #expect(real == 42)
        // A handle that cannot be resolved: the call is not made.
        #expect(kept.withMechanism(resolve: { _ in nil }) { _ in 1 } == nil)
    }

    @Test func unknownParameterIsNeverCopiedAsOpaqueBytes() {
        var bytes: [UInt8] = Array(repeating: 1, count: 16)
        let copy = bytes.withUnsafeMutableBytes { raw in
            var mechanism = CK_MECHANISM(mechanism: 0x8000_1234, pParameter: raw.baseAddress, ulParameterLen: 16)
            return KeptMechanism.copy(&mechanism)
        }
        guard case .notReplayable(let why) = copy else { Issue.record("kept a parameter p11fork does not understand"); return }
        #expect(why.contains("does not know the parameter structure"))
        // A structure of the wrong size is refused too.
        let wrongSize = bytes.withUnsafeMutableBytes { raw in
            var mechanism = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_AES_GCM), pParameter: raw.baseAddress, ulParameterLen: 16)
            return KeptMechanism.copy(&mechanism)
        }
        if case .kept = wrongSize { Issue.record("kept a GCM parameter of the wrong size") }
    }

    @Test func protectedBlocksAreWipedWhenGivenBack() throws {
        let secret: [UInt8] = Array("PIN-ghjkmnpq key material".utf8)
        var address: UnsafeMutableRawPointer?
        do {
            let kept = try #require(secret.withUnsafeBytes { KeptBytes(copying: $0.baseAddress, count: $0.count) })
            address = kept.start
            #expect(Array(UnsafeRawBufferPointer(start: kept.start, count: secret.count)) == secret)
        }
        // The block stays mapped (it goes back to a free list): its bytes must be zero now.
        let after = Array(UnsafeRawBufferPointer(start: address, count: secret.count))
        #expect(after == Array(repeating: 0, count: secret.count))
    }

    @Test func replayLimitIsParsed() {
        #expect(Configuration.parseByteCount("65536") == 65536)
        #expect(Configuration.parseByteCount("64k") == 65536)
        #expect(Configuration.parseByteCount("1M") == 1 << 20)
        #expect(Configuration.parseByteCount("0") == 0)
        #expect(Configuration.parseByteCount("-1") == nil)
        #expect(Configuration.parseByteCount("lots") == nil)
        #expect(Configuration.parseByteCount("2048m") == nil)
        let problem = Configuration.load(environment: ["P11FORK_MODULE": "/m.so", "P11FORK_REPLAY_LIMIT": "lots"])
        if case .failure(let p) = problem {
            #expect(p.message.contains("P11FORK_REPLAY_LIMIT: 'lots' is not a number of bytes"))
        } else {
            Issue.record("accepted a bad replay limit")
        }
        #expect((try? Configuration.load(environment: ["P11FORK_MODULE": "/m.so"]).get().replayLimit) == ReplayBudget.defaultLimit)
    }
}
