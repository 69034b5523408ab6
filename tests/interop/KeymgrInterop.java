// Bouncy Castle's side of tests/test_interop_bouncycastle.py: encrypts with BC's defaults
// (CMSAuthEnvelopedDataGenerator, AES-256-GCM, its BER output) and decrypts what keymgr writes.
// Built by the test with javac against Debian's libbcprov-java / libbcpkix-java (BC 1.72).
//
//   encrypt CERT IN OUT MODE   MODE: default (RSA: PKCS#1 v1.5, BC's default), oaep-sha1, oaep-sha256,
//                                    ecdh-sha1kdf, ecdh-sha256kdf
//   decrypt KEY IN OUT         KEY: a PKCS#8 PEM private key; every recipient is tried with it
import java.io.FileReader;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.PrivateKey;
import java.security.Security;
import java.security.interfaces.ECPublicKey;
import java.security.spec.MGF1ParameterSpec;
import javax.crypto.spec.OAEPParameterSpec;
import javax.crypto.spec.PSource;

import org.bouncycastle.asn1.ASN1ObjectIdentifier;
import org.bouncycastle.asn1.pkcs.PKCSObjectIdentifiers;
import org.bouncycastle.cert.X509CertificateHolder;
import org.bouncycastle.cert.jcajce.JcaX509CertificateConverter;
import org.bouncycastle.cms.CMSAlgorithm;
import org.bouncycastle.cms.CMSAuthEnvelopedData;
import org.bouncycastle.cms.CMSAuthEnvelopedDataGenerator;
import org.bouncycastle.cms.CMSProcessableByteArray;
import org.bouncycastle.cms.KeyAgreeRecipientInformation;
import org.bouncycastle.cms.KeyTransRecipientInformation;
import org.bouncycastle.cms.Recipient;
import org.bouncycastle.cms.RecipientInformation;
import org.bouncycastle.cms.jcajce.JceCMSContentEncryptorBuilder;
import org.bouncycastle.cms.jcajce.JceKeyAgreeEnvelopedRecipient;
import org.bouncycastle.cms.jcajce.JceKeyAgreeRecipientInfoGenerator;
import org.bouncycastle.cms.jcajce.JceKeyTransAuthEnvelopedRecipient;
import org.bouncycastle.cms.jcajce.JceKeyTransRecipientInfoGenerator;
import org.bouncycastle.jce.provider.BouncyCastleProvider;
import org.bouncycastle.openssl.PEMParser;
import org.bouncycastle.openssl.jcajce.JcaPEMKeyConverter;
import org.bouncycastle.operator.OutputAEADEncryptor;
import org.bouncycastle.operator.jcajce.JcaAlgorithmParametersConverter;
import org.bouncycastle.asn1.pkcs.PrivateKeyInfo;

public class KeymgrInterop {
    public static void main(String[] args) throws Exception {
        Security.addProvider(new BouncyCastleProvider());
        if (args[0].equals("encrypt")) {
            encrypt(args[1], args[2], args[3], args[4]);
        } else {
            decrypt(args[1], args[2], args[3]);
        }
    }

    static Object readPem(String path) throws Exception {
        try (PEMParser parser = new PEMParser(new FileReader(path))) {
            return parser.readObject();
        }
    }

    static void encrypt(String certPath, String in, String out, String mode) throws Exception {
        X509CertificateHolder holder = (X509CertificateHolder) readPem(certPath);
        java.security.cert.X509Certificate cert = new JcaX509CertificateConverter().setProvider("BC").getCertificate(holder);
        CMSAuthEnvelopedDataGenerator gen = new CMSAuthEnvelopedDataGenerator();
        if (mode.equals("default")) {
            gen.addRecipientInfoGenerator(new JceKeyTransRecipientInfoGenerator(cert).setProvider("BC"));
        } else if (mode.startsWith("oaep-")) {
            String md = mode.equals("oaep-sha1") ? "SHA-1" : "SHA-256";
            OAEPParameterSpec spec = new OAEPParameterSpec(md, "MGF1", new MGF1ParameterSpec(md), PSource.PSpecified.DEFAULT);
            gen.addRecipientInfoGenerator(new JceKeyTransRecipientInfoGenerator(cert,
                new JcaAlgorithmParametersConverter().getAlgorithmIdentifier(PKCSObjectIdentifiers.id_RSAES_OAEP, spec))
                .setProvider("BC"));
        } else {
            ASN1ObjectIdentifier kdf = mode.equals("ecdh-sha1kdf") ? CMSAlgorithm.ECDH_SHA1KDF : CMSAlgorithm.ECDH_SHA256KDF;
            KeyPairGenerator kpg = KeyPairGenerator.getInstance("EC", "BC");
            kpg.initialize(((ECPublicKey) cert.getPublicKey()).getParams());
            KeyPair ephemeral = kpg.generateKeyPair();
            gen.addRecipientInfoGenerator(new JceKeyAgreeRecipientInfoGenerator(kdf, ephemeral.getPrivate(),
                ephemeral.getPublic(), CMSAlgorithm.AES256_WRAP).addRecipient(cert).setProvider("BC"));
        }
        CMSAuthEnvelopedData data = gen.generate(new CMSProcessableByteArray(Files.readAllBytes(Paths.get(in))),
            (OutputAEADEncryptor) new JceCMSContentEncryptorBuilder(CMSAlgorithm.AES256_GCM).setProvider("BC").build());
        Files.write(Paths.get(out), data.getEncoded());
    }

    static void decrypt(String keyPath, String in, String out) throws Exception {
        PrivateKey key = new JcaPEMKeyConverter().setProvider("BC").getPrivateKey((PrivateKeyInfo) readPem(keyPath));
        CMSAuthEnvelopedData data = new CMSAuthEnvelopedData(Files.readAllBytes(Paths.get(in)));
        for (RecipientInformation info : data.getRecipientInfos().getRecipients()) {
            Recipient recipient;
            if (info instanceof KeyTransRecipientInformation) {
                recipient = new JceKeyTransAuthEnvelopedRecipient(key).setProvider("BC");
            } else if (info instanceof KeyAgreeRecipientInformation) {
                recipient = new JceKeyAgreeEnvelopedRecipient(key).setProvider("BC");
            } else {
                continue;
            }
            Files.write(Paths.get(out), info.getContent(recipient));
            return;
        }
        throw new IllegalStateException("no key transport or key agreement recipient");
    }
}
