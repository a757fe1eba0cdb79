/// SHA-224, SHA-256, SHA-384 and SHA-512 (FIPS 180-4), for the hash-and-sign mechanisms that
/// p11-kit's RPC does not carry (RPCMechanisms): a child served by the broker or a helper hashes
/// the data itself and has the module sign the digest. Constants: the fractional parts of the
/// square and cube roots of the first primes (computed with integer roots, checked against
/// OpenSSL by the unit tests).
struct SHA2 {
    enum Variant {
        case sha224, sha256, sha384, sha512
        var digestLength: Int {
            switch self {
            case .sha224: 28
            case .sha256: 32
            case .sha384: 48
            case .sha512: 64
            }
        }
        var usesWords64: Bool { self == .sha384 || self == .sha512 }
        var name: String {
            switch self {
            case .sha224: "SHA-224"
            case .sha256: "SHA-256"
            case .sha384: "SHA-384"
            case .sha512: "SHA-512"
            }
        }
    }

    let variant: Variant
    private var state32: [UInt32] = []
    private var state64: [UInt64] = []
    private var buffer: [UInt8] = []
    private var length: UInt64 = 0
    private var blockSize: Int { variant.usesWords64 ? 128 : 64 }

    init(_ variant: Variant) {
        self.variant = variant
        switch variant {
        case .sha224: state32 = Self.h224
        case .sha256: state32 = Self.h256
        case .sha384: state64 = Self.h384
        case .sha512: state64 = Self.h512
        }
        buffer.reserveCapacity(128)
    }

    mutating func update(_ bytes: UnsafeRawBufferPointer) {
        length &+= UInt64(bytes.count)
        for byte in bytes {
            buffer.append(byte)
            if buffer.count == blockSize {
                compress()
                buffer.removeAll(keepingCapacity: true)
            }
        }
    }

    /// The digest; `self` is left as it was (a copy is finished), so a length query may ask first.
    func finish() -> [UInt8] {
        var copy = self
        let bits = length &* 8
        copy.buffer.append(0x80)
        let lengthBytes = variant.usesWords64 ? 16 : 8
        while (copy.buffer.count + lengthBytes) % blockSize != 0 { copy.buffer.append(0) }
        if variant.usesWords64 { copy.buffer.append(contentsOf: [UInt8](repeating: 0, count: 8)) }
        for shift in stride(from: 56, through: 0, by: -8) { copy.buffer.append(UInt8(truncatingIfNeeded: bits >> UInt64(shift))) }
        var blocks = copy.buffer
        copy.buffer.removeAll()
        while !blocks.isEmpty {
            copy.buffer = Array(blocks.prefix(blockSize))
            blocks.removeFirst(blockSize)
            copy.compress()
        }
        var out: [UInt8] = []
        if variant.usesWords64 {
            for word in copy.state64 { for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: word >> UInt64(shift))) } }
        } else {
            for word in copy.state32 { for shift in stride(from: 24, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: word >> UInt32(shift))) } }
        }
        return Array(out.prefix(variant.digestLength))
    }

    private mutating func compress() {
        if variant.usesWords64 {
            Self.compress(&state64, buffer, k: Self.k512, small: ((1, 8, 7), (19, 61, 6)), big: ((28, 34, 39), (14, 18, 41)))
        } else {
            Self.compress(&state32, buffer, k: Self.k256, small: ((7, 18, 3), (17, 19, 10)), big: ((2, 13, 22), (6, 11, 25)))
        }
    }

    /// One block into the state: the same steps for 32- and 64-bit words, with the word size's
    /// rotations (`small`: the message schedule's σ0 and σ1, rotate, rotate, shift; `big`: Σ0
    /// and Σ1, three rotations each) and round constants.
    private static func compress<W: FixedWidthInteger & UnsignedInteger>(
        _ state: inout [W], _ block: [UInt8], k: [W], small: ((Int, Int, Int), (Int, Int, Int)), big: ((Int, Int, Int), (Int, Int, Int))) {
        func rotr(_ x: W, _ n: Int) -> W { (x >> n) | (x << (W.bitWidth - n)) }
        func sigma(_ x: W, _ r: (Int, Int, Int)) -> W { rotr(x, r.0) ^ rotr(x, r.1) ^ (x >> r.2) }
        func bigSigma(_ x: W, _ r: (Int, Int, Int)) -> W { rotr(x, r.0) ^ rotr(x, r.1) ^ rotr(x, r.2) }
        let size = W.bitWidth / 8
        var w = [W](repeating: 0, count: k.count)
        for i in 0..<16 {
            w[i] = (0..<size).reduce(W(0)) { $0 << 8 | W(block[size * i + $1]) }
        }
        for i in 16..<k.count {
            w[i] = w[i - 16] &+ sigma(w[i - 15], small.0) &+ w[i - 7] &+ sigma(w[i - 2], small.1)
        }
        var v = state
        for i in 0..<k.count {
            let t1 = v[7] &+ bigSigma(v[4], big.1) &+ ((v[4] & v[5]) ^ (~v[4] & v[6])) &+ k[i] &+ w[i]
            let t2 = bigSigma(v[0], big.0) &+ ((v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]))
            v = [t1 &+ t2, v[0], v[1], v[2], v[3] &+ t1, v[4], v[5], v[6]]
        }
        for i in 0..<8 { state[i] = state[i] &+ v[i] }
    }

    private static let h224: [UInt32] = [
        0xc1059ed8, 0x367cd507, 0x3070dd17, 0xf70e5939, 0xffc00b31, 0x68581511, 0x64f98fa7, 0xbefa4fa4,
    ]
    private static let h256: [UInt32] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    ]
    private static let h384: [UInt64] = [
        0xcbbb9d5dc1059ed8, 0x629a292a367cd507, 0x9159015a3070dd17, 0x152fecd8f70e5939,
        0x67332667ffc00b31, 0x8eb44a8768581511, 0xdb0c2e0d64f98fa7, 0x47b5481dbefa4fa4,
    ]
    private static let h512: [UInt64] = [
        0x6a09e667f3bcc908, 0xbb67ae8584caa73b, 0x3c6ef372fe94f82b, 0xa54ff53a5f1d36f1,
        0x510e527fade682d1, 0x9b05688c2b3e6c1f, 0x1f83d9abfb41bd6b, 0x5be0cd19137e2179,
    ]
    private static let k256: [UInt32] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ]
    private static let k512: [UInt64] = [
        0x428a2f98d728ae22, 0x7137449123ef65cd, 0xb5c0fbcfec4d3b2f, 0xe9b5dba58189dbbc,
        0x3956c25bf348b538, 0x59f111f1b605d019, 0x923f82a4af194f9b, 0xab1c5ed5da6d8118,
        0xd807aa98a3030242, 0x12835b0145706fbe, 0x243185be4ee4b28c, 0x550c7dc3d5ffb4e2,
        0x72be5d74f27b896f, 0x80deb1fe3b1696b1, 0x9bdc06a725c71235, 0xc19bf174cf692694,
        0xe49b69c19ef14ad2, 0xefbe4786384f25e3, 0x0fc19dc68b8cd5b5, 0x240ca1cc77ac9c65,
        0x2de92c6f592b0275, 0x4a7484aa6ea6e483, 0x5cb0a9dcbd41fbd4, 0x76f988da831153b5,
        0x983e5152ee66dfab, 0xa831c66d2db43210, 0xb00327c898fb213f, 0xbf597fc7beef0ee4,
        0xc6e00bf33da88fc2, 0xd5a79147930aa725, 0x06ca6351e003826f, 0x142929670a0e6e70,
        0x27b70a8546d22ffc, 0x2e1b21385c26c926, 0x4d2c6dfc5ac42aed, 0x53380d139d95b3df,
        0x650a73548baf63de, 0x766a0abb3c77b2a8, 0x81c2c92e47edaee6, 0x92722c851482353b,
        0xa2bfe8a14cf10364, 0xa81a664bbc423001, 0xc24b8b70d0f89791, 0xc76c51a30654be30,
        0xd192e819d6ef5218, 0xd69906245565a910, 0xf40e35855771202a, 0x106aa07032bbd1b8,
        0x19a4c116b8d2d0c8, 0x1e376c085141ab53, 0x2748774cdf8eeb99, 0x34b0bcb5e19b48a8,
        0x391c0cb3c5c95a63, 0x4ed8aa4ae3418acb, 0x5b9cca4f7763e373, 0x682e6ff3d6b2b8a3,
        0x748f82ee5defb2fc, 0x78a5636f43172f60, 0x84c87814a1f0ab72, 0x8cc702081a6439ec,
        0x90befffa23631e28, 0xa4506cebde82bde9, 0xbef9a3f7b2c67915, 0xc67178f2e372532b,
        0xca273eceea26619c, 0xd186b8c721c0c207, 0xeada7dd6cde0eb1e, 0xf57d4f7fee6ed178,
        0x06f067aa72176fba, 0x0a637dc5a2c898a6, 0x113f9804bef90dae, 0x1b710b35131c471b,
        0x28db77f523047d84, 0x32caab7b40c72493, 0x3c9ebe0a15c9bebc, 0x431d67c49c100d4c,
        0x4cc5d4becb3e42b6, 0x597f299cfc657e2a, 0x5fcb6fab3ad6faec, 0x6c44198c4a475817,
    ]
}
