// Opens the PKCS#11 KeyStore of SunPKCS11 (configured by p11fork.cfg), lists its aliases,
// signs with a key on the token and verifies the signature in software with the public key of
// the certificate stored next to the key.
//   PIN=... java examples/java/Sign.java examples/java/p11fork.cfg [ALIAS]
import java.nio.charset.StandardCharsets;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.Security;
import java.security.Signature;
import java.security.cert.Certificate;
import java.util.Collections;
import java.util.List;

public class Sign {
    public static void main(String[] args) throws Exception {
        if (args.length < 1 || System.getenv("PIN") == null) {
            System.err.println("usage: PIN=... java Sign.java CONFIG [ALIAS]");
            System.exit(2);
        }
        Provider provider = Security.getProvider("SunPKCS11").configure(args[0]);
        KeyStore store = KeyStore.getInstance("PKCS11", provider);
        store.load(null, System.getenv("PIN").toCharArray());
        List<String> aliases = Collections.list(store.aliases());
        for (String alias : aliases) System.out.println("alias: " + alias);
        String alias = args.length > 1 ? args[1] : aliases.get(0);

        PrivateKey key = (PrivateKey) store.getKey(alias, null);
        Certificate certificate = store.getCertificate(alias);
        if (key == null || certificate == null) {
            System.err.println("no key with a certificate under alias " + alias);
            System.exit(1);
        }
        String algorithm = key.getAlgorithm().equals("EC") ? "SHA256withECDSA" : "SHA256withRSA";
        byte[] data = "signed by a key on a PKCS#11 token".getBytes(StandardCharsets.UTF_8);

        Signature signer = Signature.getInstance(algorithm, provider);
        signer.initSign(key);
        signer.update(data);
        byte[] signature = signer.sign();

        // The provider is not installed, so this is Java's own software implementation.
        Signature verifier = Signature.getInstance(algorithm);
        verifier.initVerify(certificate.getPublicKey());
        verifier.update(data);
        boolean verified = verifier.verify(signature);
        System.out.println((verified ? "signature verified: " : "signature does NOT verify: ") + algorithm
                + " by " + provider.getName());
        System.exit(verified ? 0 : 1);
    }
}
