import CPKCS11
import Glibc

/// A deep copy of a CK_MECHANISM: the parameter structure and every buffer it points to, in
/// protected memory; object handles in it are kept virtual and made real when it is used.
final class KeptMechanism: @unchecked Sendable {
    let type: CK_MECHANISM_TYPE
    let parameterLength: CK_ULONG
    /// The parameter structure (pointers zeroed), or nil without a parameter.
    private let parameter: KeptBytes?
    /// Buffers the structure points to, by the offset of the pointer field.
    private let buffers: [(offset: Int, data: KeptBytes?)]
    /// Offsets of object handle fields.
    private let handleOffsets: [Int]
    let byteCount: Int

    private init(type: CK_MECHANISM_TYPE, parameterLength: CK_ULONG, parameter: KeptBytes?,
                 buffers: [(offset: Int, data: KeptBytes?)], handleOffsets: [Int], byteCount: Int) {
        self.type = type
        self.parameterLength = parameterLength
        self.parameter = parameter
        self.buffers = buffers
        self.handleOffsets = handleOffsets
        self.byteCount = byteCount
    }

    enum Copy {
        case kept(KeptMechanism)
        /// Why the mechanism cannot be replayed (for the trace).
        case notReplayable(String)
    }

    /// Copies a mechanism the real module accepted.
    static func copy(_ mechanism: UnsafePointer<CK_MECHANISM>?) -> Copy {
        guard let mechanism else { return .notReplayable("no mechanism was given") }
        let type = mechanism.pointee.mechanism
        let length = mechanism.pointee.ulParameterLen
        guard let source = mechanism.pointee.pParameter, length > 0 else {
            return .kept(KeptMechanism(type: type, parameterLength: length, parameter: nil, buffers: [], handleOffsets: [], byteCount: 0))
        }
        func described() -> String { mechanismName(type).map { "\($0)" } ?? "mechanism 0x\(String(type, radix: 16))" }
        guard length <= 65536, let parameter = KeptBytes(copying: source, count: Int(length)) else {
            return .notReplayable("the parameter of \(described()) could not be kept")
        }
        switch ParameterLayout.of(type) {
        case .flat:
            return .kept(KeptMechanism(type: type, parameterLength: length, parameter: parameter, buffers: [], handleOffsets: [], byteCount: Int(length)))
        case .unknown:
            return .notReplayable("p11fork does not know the parameter structure of \(described())")
        case .structure(let fields):
            guard Int(length) == ParameterLayout.size(fields) else {
                return .notReplayable("the parameter of \(described()) has \(length) bytes, not the \(ParameterLayout.size(fields)) of its structure")
            }
            let offsets = ParameterLayout.offsets(fields)
            var buffers: [(offset: Int, data: KeptBytes?)] = []
            var handles: [Int] = []
            var byteCount = Int(length)
            for (index, field) in fields.enumerated() {
                switch field {
                case .pointer(let lengthIndex):
                    let pointer = source.load(fromByteOffset: offsets[index], as: UnsafeRawPointer?.self)
                    let count = Int(source.load(fromByteOffset: offsets[lengthIndex], as: CK_ULONG.self))
                    (parameter.start + offsets[index]).storeBytes(of: nil, as: UnsafeRawPointer?.self)
                    guard let pointer, count > 0 else {
                        buffers.append((offsets[index], nil))
                        continue
                    }
                    guard count <= 65536, let data = KeptBytes(copying: pointer, count: count) else {
                        return .notReplayable("the parameter of \(described()) could not be kept")
                    }
                    byteCount += count
                    buffers.append((offsets[index], data))
                case .handle:
                    handles.append(offsets[index])
                case .word, .bytes:
                    break
                }
            }
            return .kept(KeptMechanism(type: type, parameterLength: length, parameter: parameter, buffers: buffers,
                                       handleOffsets: handles, byteCount: byteCount))
        }
    }

    /// Calls `body` with the mechanism rebuilt, its object handles turned into real ones by
    /// `resolve` (nil when a handle cannot be resolved: `body` is not called).
    func withMechanism<T>(resolve: (CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE?,
                          _ body: (UnsafeMutablePointer<CK_MECHANISM>) -> T) -> T? {
        guard let parameter else {
            var mechanism = CK_MECHANISM(mechanism: type, pParameter: nil, ulParameterLen: parameterLength)
            return body(&mechanism)
        }
        let structure = UnsafeMutableRawPointer.allocate(byteCount: Int(parameterLength), alignment: 8)
        defer {
            explicit_bzero(structure, Int(parameterLength))
            structure.deallocate()
        }
        structure.copyMemory(from: parameter.start, byteCount: Int(parameterLength))
        for (offset, data) in buffers {
            structure.storeBytes(of: data.map { UnsafeRawPointer($0.start) }, toByteOffset: offset, as: UnsafeRawPointer?.self)
        }
        guard ParameterLayout.resolveHandles(in: structure, at: handleOffsets, resolve) else { return nil }
        var mechanism = CK_MECHANISM(mechanism: type, pParameter: structure, ulParameterLen: parameterLength)
        return body(&mechanism)
    }

    /// True when `mechanism` is this one again: the same type and no parameter, or the same flat
    /// parameter bytes (structures with pointers are never taken as the same).
    func isSame(as mechanism: UnsafePointer<CK_MECHANISM>) -> Bool {
        guard mechanism.pointee.mechanism == type, mechanism.pointee.ulParameterLen == parameterLength,
              buffers.isEmpty, handleOffsets.isEmpty else { return false }
        guard let parameter else { return mechanism.pointee.pParameter == nil || parameterLength == 0 }
        guard let other = mechanism.pointee.pParameter else { return false }
        return memcmp(parameter.start, other, Int(parameterLength)) == 0
    }

    var name: String { mechanismName(type).map { "\($0)" } ?? "mechanism 0x\(String(type, radix: 16))" }
}
