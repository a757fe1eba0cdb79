import Foundation
import Testing
@testable import P11ForkCore

/// The SHA-2 digests a child served through p11-kit's RPC computes itself for CKM_ECDSA_SHA224 …
/// CKM_ECDSA_SHA512 (RPCMechanisms): against Python's hashlib (OpenSSL), at the lengths around
/// the padding's block boundaries.
@Suite struct SHA2Tests {
    /// (length of the message, bytes i % 251; SHA-224, SHA-256, SHA-384, SHA-512 of it).
    static let expected: [(Int, String, String, String, String)] = [
        (0, "d14a028c2a3a2bc9476102bb288234c415a2b01f828ea62ac5b3e42f", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "38b060a751ac96384cd9327eb1b1e36a21fdb71114be07434c0cc7bf63f6e1da274edebfe76f65fbd51ad2f14898b95b", "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"),
        (3, "e615202185aabe2aca924bec29e5a12384f8339eae4e64c9cba9f1da", "ae4b3280e56e2faf83f414a6e3dabe9d5fbe18976544c05fed121accb85b53fc", "4f895854c1a4fc5aa2e0456eaf8d0ecaa70c196bd901153861d76b8fa3cd95ceea29eab6a279f8b08437703ce0b4b91a", "8081da5f9c1e3d0e1aa16f604d5e5064543cff5d7bace2bb312252461e151b3fe0f034ea8dc1dacff3361a892d625fbe1b614cda265f87a473c24b0fa1d91dfd"),
        (55, "8991dfba74284e04dc7581c7c3e4068ff6cb7a63733361429834bb56", "463eb28e72f82e0a96c0a4cc53690c571281131f672aa229e0d45ae59b598b59", "dcedb6b590edb4efa849c801e6b6490657a5c1e64f69269f5f63c9267f6223de24cea7aaa6b267d9bcecc15147b6c875", "6856647f269c2ee3d8128f0b25427659d880641ef343300dd3cd4679168f58d6527fda70b4ebc854e2065e172b7d58c1536992c0810599259ba84a2b40c65414"),
        (56, "2b2cd637c16ad7290bb067ad7d8fd04e204fa43a84366afc7130f4ef", "da2ae4d6b36748f2a318f23e7ab1dfdf45acdc9d049bd80e59de82a60895f562", "7b9132d597b8873ad55bbc30f18ed3f2c9f340e7de69fb5774056c71a06d9bc2b14137e9e1c68b6b645fed28b188249d", "8b12b2f6fe400a51d29656e2b8c42a1bbfe6fcf3e425da430db05d1a2dda14790dee20fa8b22d8762afffe4988a5c98a4430d22a17e41e23d90fa61ab75671a9"),
        (63, "049e8dd7eab3378ce9f823bfb569e5b270235d4b7f9623606971998f", "29af2686fd53374a36b0846694cc342177e428d1647515f078784d69cdb9e488", "dd66b519f51a925814407a449c60b34c553d7652d41783ee903a810a4c9f833b8181c91c7f12283eacd6a5f8a2639ddf", "9dc9c5598e55dc42955695320839788e353f1d7f6ba74df74c80a8a52f463c0697f57f68835d1418f4ce9b6530cd79bd0f4c6f7e13c93feb1218c0b65c2c0561"),
        (64, "c37b88a3522dbf7ac30d1c68ea397ac11d4773571aed01ddab73531e", "fdeab9acf3710362bd2658cdc9a29e8f9c757fcf9811603a8c447cd1d9151108", "9f2c9eb7116b3d7a4ba84a74a4d4eff8a5efcf54b6d7b662693c38577914c73a214766f0a175339bb0895a863824fc0a", "ee4320ebaf3fdb4f2c832b137200c08e235e0fa7bbd0eb1740c7063ba8a0d151da77e003398e1714a955d475b05e3e950b639503b452ec185de4229bc4873949"),
        (111, "1aeef583c448a9ae00fbc931b50bc0da5bb8323e616b11076cee8b44", "60780e9451bdc43cf4530ffc95cbb0c4eb24dae2c39f55f334d679e076c08065", "f5f9fe110d809d34029de262a01b208356caec6e054c7f926b2591f6c9780579d4b59f5578c6f531a84f158a33660cef", "a1a111449b198d9b1f538bad7f3fc1022b3a5b1a5e90a0bc860de8512746cbc31599e6c834de3a3235327af0b51ff57bf7acf1974a73014d9c3953812edc7c8d"),
        (112, "01e5abf50619b5c2078e754eddedcf4de8d31185a2219313cb91a8c9", "09373f127d34e61dbbaa8bc4499c87074f2ddb10e1b465f506d7d70a15011979", "33ba080ec0ccb378e4e95fed3b26c23aa1a280476e007519ee47f60cd9c5c8a65d627259a9aa2fd33ca06d3c14ee5548", "c5fbd731d19d2ae1180f001be72c2c1aaba1d7b094b3748880e24593b8e117a750e11c1bd867cc2f96dace8c8b74abd2d5c4f236be444e77d30d1916174070b9"),
        (127, "554c9c3f7e92b80f4121e00cc147535d377eaeb4fb1fa8e25c7f81c1", "92ca0fa6651ee2f97b884b7246a562fa71250fedefe5ebf270d31c546bfea976", "d5fcfe2fcf6b3ef375ede37c8123d9b78065fecc1d55197e2f7721e6e9a93d0ba4d7fd15f9b96dea2744df24141ba2ef", "eab89674feaa34e27aebeeff3c0a4d70070bb872d5e9f186cf1dbbdee517b6e35724d629ff025a5b07185e911ada7e3c8acf830aa0e4f71777bd2d44f504f7f0"),
        (128, "67d88da33fd632d8742424791dface672ff59d597fe38b3f2a998386", "471fb943aa23c511f6f72f8d1652d9c880cfa392ad80503120547703e56a2be5", "ca2385773319124534111a36d0581fc3f00815e907034b90cff9c3a861e126a741d5dfcff65a417b6d7296863ac0ec17", "1dffd5e3adb71d45d2245939665521ae001a317a03720a45732ba1900ca3b8351fc5c9b4ca513eba6f80bc7b1d1fdad4abd13491cb824d61b08d8c0e1561b3f7"),
        (1000, "c182669a7f6629dc7fd8a9198f15af15adbbaeffa1842e854f681357", "4e4c294b331f7a2099a379bec34b9f9fc03dc46ab465d998f4d683da53487e6d", "7a2f8c7f12344964a13cb9260492b845e56615d6152b9eb9e54b580fc88405e64f31813bfda10de2a642fdf1676c61b4", "5096498d96f50f9a137c4db5b8b0cd38383ad55350fb5a98805fedc31fa1262f1f0cf4d6f12d7ecd8dedd933a4c9126344fe22e937a8ad35fdeae1e876ae698b"),
    ]

    private func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

    private func digest(_ variant: SHA2.Variant, _ message: [UInt8], parts: Int = 1) -> String {
        var hasher = SHA2(variant)
        let size = max(1, (message.count + parts - 1) / parts)
        var start = 0
        repeat {
            let end = min(message.count, start + size)
            message[start..<end].withUnsafeBytes { hasher.update($0) }
            start = end
        } while start < message.count
        return hex(hasher.finish())
    }

    @Test(arguments: expected.indices)
    func digestsMatchOpenSSL(_ index: Int) {
        let (length, sha224, sha256, sha384, sha512) = Self.expected[index]
        let message = (0..<length).map { UInt8($0 % 251) }
        #expect(digest(.sha224, message) == sha224)
        #expect(digest(.sha256, message) == sha256)
        #expect(digest(.sha384, message) == sha384)
        #expect(digest(.sha512, message) == sha512)
        // In parts (C_SignUpdate), the same digest.
        #expect(digest(.sha256, message, parts: 7) == sha256)
        #expect(digest(.sha512, message, parts: 7) == sha512)
    }

    /// A length query (C_SignFinal without a buffer) finishes a copy: the hasher goes on.
    @Test func finishingLeavesTheHasherAsItWas() {
        var hasher = SHA2(.sha256)
        let first = [UInt8](repeating: 7, count: 70)
        first.withUnsafeBytes { hasher.update($0) }
        #expect(hasher.finish() == hasher.finish())
        first.withUnsafeBytes { hasher.update($0) }
        #expect(hex(hasher.finish()) == digest(.sha256, first + first))
    }
}
