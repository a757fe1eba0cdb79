// p11fork-conformance: runs one fixed sequence of PKCS#11 calls against a module and prints a
// transcript, one line per step: "<step> <CKR_...> <outputs>". The conformance test runs it
// directly against the real module and through libp11fork.so on the same token and requires
// identical transcripts. What legitimately differs between a module and a proxy is
// normalised: outputs made from random or generated keys are
// recorded as lengths and as a verification done in the same run. Deterministic outputs
// (digests, AES ciphertext under an imported key, info structures, attributes) are printed.
//
//   p11fork-conformance --module PATH --token LABEL --pin PIN [--slot ID]
// With --slot, the first calls after C_Initialize use that slot ID, never listed before.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <p11-kit-1/p11-kit/pkcs11.h>
#include "tool_support.h"
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static CK_FUNCTION_LIST_PTR p;
static const char *token_label, *pin;

// MARK: output

static int step_number;

static void line(const char *step, CK_RV rv, const char *format, ...) __attribute__((format(printf, 3, 4)));
static void line(const char *step, CK_RV rv, const char *format, ...) {
    char details[2048] = "";
    va_list args;
    va_start(args, format);
    vsnprintf(details, sizeof details, format, args);
    va_end(args);
    printf("%02d %s %s%s%s\n", ++step_number, step, tool_rv_name(rv), details[0] ? " " : "", details);
    fflush(stdout);
}

static const char *hex_of(const unsigned char *bytes, CK_ULONG length) {
    static char buffers[4][2 * 1024 + 1];
    static int next;
    char *out = buffers[next++ % 4];
    if (length > 1024) length = 1024;
    for (CK_ULONG i = 0; i < length; i++) sprintf(out + 2 * i, "%02x", bytes[i]);
    out[2 * length] = 0;
    return out;
}

static const char *text_of(const unsigned char *bytes, size_t length) {
    static char buffers[4][129];
    static int next;
    char *out = buffers[next++ % 4];
    if (length > 128) length = 128;
    memcpy(out, bytes, length);
    out[length] = 0;
    return out;
}

// Slot IDs are printed as they are, session and object handles as their value after an ordinal
// in order of first appearance, per kind (session#2=0x5): all must be the module's values.
enum { SLOT, SESSION, OBJECT };
static CK_ULONG seen[3][256];
static int seen_count[3];

static const char *ordinal(int kind, CK_ULONG value) {
    static char buffers[8][32];
    static int next;
    static const char *names[] = { "slot", "session", "object" };
    char *out = buffers[next++ % 8];
    if (kind == SLOT) { snprintf(out, 32, "slot=0x%lx", value); return out; }
    int i;
    for (i = 0; i < seen_count[kind]; i++) if (seen[kind][i] == value) break;
    if (i == seen_count[kind] && i < 256) seen[kind][seen_count[kind]++] = value;
    snprintf(out, 32, "%s#%d=0x%lx", names[kind], i + 1, value);
    return out;
}

// Application mutex callbacks (CK_C_INITIALIZE_ARGS), counting their use.
#include <pthread.h>
static int mutex_calls;
static CK_RV create_mutex(CK_VOID_PTR_PTR mutex) {
    pthread_mutex_t *m = malloc(sizeof *m);
    pthread_mutex_init(m, NULL);
    *mutex = m;
    __sync_fetch_and_add(&mutex_calls, 1);
    return CKR_OK;
}
static CK_RV destroy_mutex(CK_VOID_PTR mutex) { pthread_mutex_destroy(mutex); free(mutex); return CKR_OK; }
static CK_RV lock_mutex(CK_VOID_PTR mutex) { pthread_mutex_lock(mutex); __sync_fetch_and_add(&mutex_calls, 1); return CKR_OK; }
static CK_RV unlock_mutex(CK_VOID_PTR mutex) { pthread_mutex_unlock(mutex); return CKR_OK; }

// MARK: the sequence

static const unsigned char aes_value[32] = { 0x60, 0x3d, 0xeb, 0x10, 0x15, 0xca, 0x71, 0xbe, 0x2b, 0x73, 0xae, 0xf0, 0x85, 0x7d,
                                             0x77, 0x81, 0x1f, 0x35, 0x2c, 0x07, 0x3b, 0x61, 0x08, 0xd7, 0x2d, 0x98, 0x10, 0xa3,
                                             0x09, 0x14, 0xdf, 0xf4 };
static const unsigned char iv[16] = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 };
static const unsigned char plaintext[] = "conformance: the same bytes in, the same bytes out";
static unsigned char digest32[32] = "0123456789abcdef0123456789abcdef";
static CK_BBOOL yes = CK_TRUE, no = CK_FALSE;

static void info_steps(void) {
    CK_INFO info;
    CK_RV rv = p->C_GetInfo(&info);
    line("C_GetInfo", rv, "cryptoki=%d.%d manufacturer='%s' flags=0x%lx library='%s' version=%d.%d", info.cryptokiVersion.major,
         info.cryptokiVersion.minor, text_of(info.manufacturerID, 32), info.flags, text_of(info.libraryDescription, 32),
         info.libraryVersion.major, info.libraryVersion.minor);
    line("C_GetInfo(NULL)", p->C_GetInfo(NULL), "%s", "");
}

static CK_SLOT_ID slot_steps(void) {
    CK_ULONG count = 0;
    CK_RV rv = p->C_GetSlotList(CK_FALSE, NULL, &count);
    line("C_GetSlotList(all, NULL)", rv, "count=%lu", count);
    CK_SLOT_ID slots[64];
    CK_ULONG small = 0;
    rv = p->C_GetSlotList(CK_FALSE, slots, &small);
    line("C_GetSlotList(all, 0 room)", rv, "count=%lu", small);
    CK_ULONG n = 64;
    rv = p->C_GetSlotList(CK_TRUE, slots, &n);
    char list[512] = "";
    for (CK_ULONG i = 0; i < n; i++) { strcat(list, " "); strcat(list, ordinal(SLOT, slots[i])); }
    line("C_GetSlotList(present)", rv, "count=%lu%s", n, list);
    line("C_GetSlotList(NULL count)", p->C_GetSlotList(CK_TRUE, slots, NULL), "%s", "");

    CK_SLOT_ID slot = (CK_SLOT_ID)-2;
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO token;
        if (p->C_GetTokenInfo(slots[i], &token) != CKR_OK) continue;
        size_t len = strlen(token_label);
        if (!memcmp(token.label, token_label, len) && (len == 32 || token.label[len] == ' ')) {
            slot = slots[i];
            line("C_GetTokenInfo", CKR_OK, "%s label='%s' manufacturer='%s' model='%s' serial='%s' flags=0x%lx pin=%lu..%lu",
                 ordinal(SLOT, slot), text_of(token.label, 32), text_of(token.manufacturerID, 32), text_of(token.model, 16),
                 text_of(token.serialNumber, 16), token.flags, token.ulMinPinLen, token.ulMaxPinLen);
        }
    }
    CK_SLOT_INFO slot_info;
    rv = p->C_GetSlotInfo(slot, &slot_info);
    line("C_GetSlotInfo", rv, "description='%s' flags=0x%lx", text_of(slot_info.slotDescription, 64), slot_info.flags);
    line("C_GetSlotInfo(unknown slot)", p->C_GetSlotInfo(0x7777, &slot_info), "%s", "");
    line("C_GetTokenInfo(NULL)", p->C_GetTokenInfo(slot, NULL), "%s", "");

    CK_ULONG mechanisms = 0;
    CK_MECHANISM_TYPE three[3];
    CK_ULONG three_room = 3;
    rv = p->C_GetMechanismList(slot, three, &three_room);
    line("C_GetMechanismList(3 room)", rv, "count=%lu", three_room);
    rv = p->C_GetMechanismList(slot, NULL, &mechanisms);
    CK_MECHANISM_TYPE types[512];
    CK_ULONG room = 512;
    CK_RV rv2 = p->C_GetMechanismList(slot, types, &room);
    unsigned long sum = 0;
    for (CK_ULONG i = 0; i < room; i++) sum = sum * 31 + types[i];
    line("C_GetMechanismList", rv, "count=%lu then %s count=%lu checksum=%lx", mechanisms, tool_rv_name(rv2), room, sum);
    CK_MECHANISM_INFO mi;
    CK_MECHANISM_TYPE probe[] = { CKM_RSA_PKCS, CKM_ECDSA, CKM_AES_CBC_PAD, CKM_SHA256 };
    for (int i = 0; i < 4; i++) {
        rv = p->C_GetMechanismInfo(slot, probe[i], &mi);
        line("C_GetMechanismInfo", rv, "0x%lx min=%lu max=%lu flags=0x%lx", probe[i], mi.ulMinKeySize, mi.ulMaxKeySize, mi.flags);
    }
    line("C_GetMechanismInfo(unknown)", p->C_GetMechanismInfo(slot, 0x7ffffff0, &mi), "%s", "");
    return slot;
}

static void session_info(const char *step, CK_SESSION_HANDLE s) {
    CK_SESSION_INFO info;
    CK_RV rv = p->C_GetSessionInfo(s, &info);
    if (rv == CKR_OK) line(step, rv, "%s state=%lu flags=0x%lx error=%lu", ordinal(SLOT, info.slotID), info.state, info.flags, info.ulDeviceError);
    else line(step, rv, "%s", "");
}

static CK_RV find(CK_SESSION_HANDLE s, const char *label, CK_OBJECT_HANDLE *found, CK_ULONG *count) {
    CK_ATTRIBUTE t[] = { { CKA_LABEL, (void *)label, strlen(label) } };
    CK_RV rv = p->C_FindObjectsInit(s, t, 1);
    if (rv != CKR_OK) return rv;
    rv = p->C_FindObjects(s, found, 8, count);
    p->C_FindObjectsFinal(s);
    return rv;
}

static void sign_verify(const char *name, CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE private_key,
                        CK_OBJECT_HANDLE public_key, const unsigned char *data, CK_ULONG data_len) {
    char step[96];
    unsigned char signature[1024];
    CK_ULONG length = 0;
    CK_RV rv = p->C_SignInit(s, m, private_key);
    snprintf(step, sizeof step, "%s C_SignInit", name);
    line(step, rv, "%s", "");
    rv = p->C_Sign(s, (CK_BYTE_PTR)data, data_len, NULL, &length);
    snprintf(step, sizeof step, "%s C_Sign(NULL)", name);
    line(step, rv, "len=%lu", length);
    CK_ULONG tiny = 8;
    rv = p->C_Sign(s, (CK_BYTE_PTR)data, data_len, signature, &tiny);
    snprintf(step, sizeof step, "%s C_Sign(8 bytes)", name);
    line(step, rv, "len=%lu", tiny);
    length = sizeof signature;
    rv = p->C_Sign(s, (CK_BYTE_PTR)data, data_len, signature, &length);
    snprintf(step, sizeof step, "%s C_Sign", name);
    line(step, rv, "len=%lu", length);
    rv = p->C_VerifyInit(s, m, public_key);
    if (rv == CKR_OK) rv = p->C_Verify(s, (CK_BYTE_PTR)data, data_len, signature, length);
    snprintf(step, sizeof step, "%s C_Verify", name);
    line(step, rv, "%s", "");
    signature[length / 2] ^= 0x01;
    rv = p->C_VerifyInit(s, m, public_key);
    if (rv == CKR_OK) rv = p->C_Verify(s, (CK_BYTE_PTR)data, data_len, signature, length);
    snprintf(step, sizeof step, "%s C_Verify(corrupted)", name);
    line(step, rv, "%s", "");
}

static void object_steps(CK_SESSION_HANDLE rw) {
    // Key pairs as session objects, so the token is left as it was.
    CK_ULONG bits = 2048;
    CK_BYTE exponent[] = { 1, 0, 1 };
    const char *rsa_label = "conformance-rsa";
    CK_ATTRIBUTE rsa_public[] = {
        { CKA_TOKEN, &no, 1 }, { CKA_MODULUS_BITS, &bits, sizeof bits }, { CKA_PUBLIC_EXPONENT, exponent, 3 },
        { CKA_VERIFY, &yes, 1 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_LABEL, (void *)rsa_label, strlen(rsa_label) },
    };
    CK_ATTRIBUTE rsa_private[] = {
        { CKA_TOKEN, &no, 1 }, { CKA_SIGN, &yes, 1 }, { CKA_DECRYPT, &yes, 1 }, { CKA_PRIVATE, &yes, 1 },
        { CKA_SENSITIVE, &yes, 1 }, { CKA_LABEL, (void *)rsa_label, strlen(rsa_label) },
    };
    CK_MECHANISM rsa_gen = { CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0 };
    CK_OBJECT_HANDLE rsa_pub = 0, rsa_priv = 0;
    CK_RV rv = p->C_GenerateKeyPair(rw, &rsa_gen, rsa_public, 6, rsa_private, 6, &rsa_pub, &rsa_priv);
    line("C_GenerateKeyPair(RSA)", rv, "%s %s", ordinal(OBJECT, rsa_pub), ordinal(OBJECT, rsa_priv));

    CK_BYTE p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
    const char *ec_label = "conformance-ec";
    CK_ATTRIBUTE ec_public[] = { { CKA_TOKEN, &no, 1 }, { CKA_EC_PARAMS, p256, sizeof p256 }, { CKA_VERIFY, &yes, 1 },
                                 { CKA_LABEL, (void *)ec_label, strlen(ec_label) } };
    CK_ATTRIBUTE ec_private[] = { { CKA_TOKEN, &no, 1 }, { CKA_SIGN, &yes, 1 }, { CKA_PRIVATE, &yes, 1 },
                                  { CKA_LABEL, (void *)ec_label, strlen(ec_label) } };
    CK_MECHANISM ec_gen = { CKM_EC_KEY_PAIR_GEN, NULL, 0 };
    CK_OBJECT_HANDLE ec_pub = 0, ec_priv = 0;
    rv = p->C_GenerateKeyPair(rw, &ec_gen, ec_public, 4, ec_private, 4, &ec_pub, &ec_priv);
    line("C_GenerateKeyPair(EC)", rv, "%s %s", ordinal(OBJECT, ec_pub), ordinal(OBJECT, ec_priv));

    CK_OBJECT_HANDLE found[8];
    CK_ULONG count = 0;
    rv = find(rw, rsa_label, found, &count);
    line("C_FindObjects(label)", rv, "count=%lu %s %s", count, count > 0 ? ordinal(OBJECT, found[0]) : "-",
         count > 1 ? ordinal(OBJECT, found[1]) : "-");
    rv = p->C_FindObjectsInit(rw, NULL, 1);
    line("C_FindObjectsInit(NULL template)", rv, "%s", "");
    if (rv == CKR_OK) p->C_FindObjectsFinal(rw);
    line("C_FindObjects(not initialised)", p->C_FindObjects(rw, found, 8, &count), "%s", "");
    if (p->C_FindObjectsInit(rw, NULL, 0) == CKR_OK) {
        line("C_FindObjects(NULL handles)", p->C_FindObjects(rw, NULL, 8, &count), "%s", "");
        line("C_FindObjects(NULL count)", p->C_FindObjects(rw, found, 8, NULL), "%s", "");
        p->C_FindObjectsFinal(rw);
    }

    CK_MECHANISM sha256_rsa = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    sign_verify("RSA-SHA256", rw, &sha256_rsa, rsa_priv, rsa_pub, plaintext, sizeof plaintext - 1);
    CK_RSA_PKCS_PSS_PARAMS pss = { CKM_SHA256, CKG_MGF1_SHA256, 32 };
    CK_MECHANISM sha256_pss = { CKM_SHA256_RSA_PKCS_PSS, &pss, sizeof pss };
    sign_verify("RSA-PSS", rw, &sha256_pss, rsa_priv, rsa_pub, plaintext, sizeof plaintext - 1);
    CK_MECHANISM ecdsa = { CKM_ECDSA, NULL, 0 };
    sign_verify("ECDSA", rw, &ecdsa, ec_priv, ec_pub, digest32, 32);

    // Multi-part signing.
    unsigned char signature[512];
    CK_ULONG length = sizeof signature;
    rv = p->C_SignInit(rw, &sha256_rsa, rsa_priv);
    if (rv == CKR_OK) rv = p->C_SignUpdate(rw, (CK_BYTE_PTR)plaintext, 10);
    if (rv == CKR_OK) rv = p->C_SignUpdate(rw, (CK_BYTE_PTR)plaintext + 10, sizeof plaintext - 11);
    if (rv == CKR_OK) rv = p->C_SignFinal(rw, signature, &length);
    line("C_SignUpdate/C_SignFinal", rv, "len=%lu", length);
    rv = p->C_VerifyInit(rw, &sha256_rsa, rsa_pub);
    if (rv == CKR_OK) rv = p->C_VerifyUpdate(rw, (CK_BYTE_PTR)plaintext, sizeof plaintext - 1);
    if (rv == CKR_OK) rv = p->C_VerifyFinal(rw, signature, length);
    line("C_VerifyUpdate/C_VerifyFinal", rv, "%s", "");
    line("C_SignInit(unknown key)", p->C_SignInit(rw, &sha256_rsa, 0x7777), "%s", "");
    line("C_SignUpdate(not initialised)", p->C_SignUpdate(rw, (CK_BYTE_PTR)plaintext, 4), "%s", "");

    // AES under an imported key: exact ciphertext.
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_KEY_TYPE aes = CKK_AES;
    const char *aes_label = "conformance-aes";
    CK_ATTRIBUTE aes_template[] = {
        { CKA_CLASS, &secret, sizeof secret }, { CKA_KEY_TYPE, &aes, sizeof aes }, { CKA_TOKEN, &no, 1 },
        { CKA_VALUE, (void *)aes_value, 32 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_DECRYPT, &yes, 1 },
        { CKA_EXTRACTABLE, &yes, 1 }, { CKA_SENSITIVE, &no, 1 }, { CKA_LABEL, (void *)aes_label, strlen(aes_label) },
    };
    CK_OBJECT_HANDLE aes_key = 0;
    rv = p->C_CreateObject(rw, aes_template, 9, &aes_key);
    line("C_CreateObject(AES)", rv, "%s", ordinal(OBJECT, aes_key));
    CK_MECHANISM cbc = { CKM_AES_CBC_PAD, (void *)iv, 16 };
    unsigned char ciphertext[256], decrypted[256];
    CK_ULONG c_len = sizeof ciphertext, d_len = sizeof decrypted;
    rv = p->C_EncryptInit(rw, &cbc, aes_key);
    if (rv == CKR_OK) rv = p->C_Encrypt(rw, (CK_BYTE_PTR)plaintext, sizeof plaintext - 1, ciphertext, &c_len);
    line("C_Encrypt(AES-CBC-PAD)", rv, "%s", hex_of(ciphertext, c_len));
    unsigned char parts[256];
    CK_ULONG total = 0, part = sizeof parts;
    rv = p->C_EncryptInit(rw, &cbc, aes_key);
    if (rv == CKR_OK) rv = p->C_EncryptUpdate(rw, (CK_BYTE_PTR)plaintext, 20, parts, &part);
    total = part;
    part = sizeof parts - total;
    if (rv == CKR_OK) rv = p->C_EncryptUpdate(rw, (CK_BYTE_PTR)plaintext + 20, sizeof plaintext - 21, parts + total, &part);
    total += part;
    part = sizeof parts - total;
    if (rv == CKR_OK) rv = p->C_EncryptFinal(rw, parts + total, &part);
    total += part;
    line("C_EncryptUpdate/C_EncryptFinal", rv, "%s", hex_of(parts, total));
    rv = p->C_DecryptInit(rw, &cbc, aes_key);
    if (rv == CKR_OK) rv = p->C_Decrypt(rw, ciphertext, c_len, decrypted, &d_len);
    line("C_Decrypt(AES-CBC-PAD)", rv, "'%s'", text_of(decrypted, d_len));
    d_len = 4;
    rv = p->C_DecryptInit(rw, &cbc, aes_key);
    if (rv == CKR_OK) rv = p->C_Decrypt(rw, ciphertext, c_len, decrypted, &d_len);
    line("C_Decrypt(4 bytes room)", rv, "len=%lu", d_len);
    p->C_DecryptInit(rw, &cbc, aes_key);
    d_len = sizeof decrypted;
    p->C_Decrypt(rw, ciphertext, c_len, decrypted, &d_len);

    // RSA-OAEP round trip.
    CK_RSA_PKCS_OAEP_PARAMS oaep_params = { CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, NULL, 0 };
    CK_MECHANISM oaep = { CKM_RSA_PKCS_OAEP, &oaep_params, sizeof oaep_params };
    c_len = sizeof ciphertext;
    rv = p->C_EncryptInit(rw, &oaep, rsa_pub);
    if (rv == CKR_OK) rv = p->C_Encrypt(rw, (CK_BYTE_PTR)plaintext, 16, ciphertext, &c_len);
    line("C_Encrypt(RSA-OAEP)", rv, "len=%lu", c_len);
    d_len = sizeof decrypted;
    rv = p->C_DecryptInit(rw, &oaep, rsa_priv);
    if (rv == CKR_OK) rv = p->C_Decrypt(rw, ciphertext, c_len, decrypted, &d_len);
    line("C_Decrypt(RSA-OAEP)", rv, "'%s'", text_of(decrypted, d_len));

    // Digests.
    CK_MECHANISM sha256 = { CKM_SHA256, NULL, 0 };
    unsigned char digest[64];
    CK_ULONG dg = 0;
    rv = p->C_DigestInit(rw, &sha256);
    if (rv == CKR_OK) rv = p->C_Digest(rw, (CK_BYTE_PTR)plaintext, sizeof plaintext - 1, NULL, &dg);
    line("C_Digest(NULL)", rv, "len=%lu", dg);
    dg = sizeof digest;
    if (rv == CKR_OK) rv = p->C_Digest(rw, (CK_BYTE_PTR)plaintext, sizeof plaintext - 1, digest, &dg);
    line("C_Digest(SHA256)", rv, "%s", hex_of(digest, dg));
    dg = sizeof digest;
    rv = p->C_DigestInit(rw, &sha256);
    if (rv == CKR_OK) rv = p->C_DigestUpdate(rw, (CK_BYTE_PTR)plaintext, 7);
    if (rv == CKR_OK) rv = p->C_DigestUpdate(rw, (CK_BYTE_PTR)plaintext + 7, sizeof plaintext - 8);
    if (rv == CKR_OK) rv = p->C_DigestFinal(rw, digest, &dg);
    line("C_DigestUpdate/C_DigestFinal", rv, "%s", hex_of(digest, dg));
    dg = sizeof digest;
    rv = p->C_DigestInit(rw, &sha256);
    if (rv == CKR_OK) rv = p->C_DigestKey(rw, aes_key);
    CK_RV final = p->C_DigestFinal(rw, digest, &dg);
    line("C_DigestKey", rv, "then %s %s", tool_rv_name(final), final == CKR_OK ? hex_of(digest, dg) : "");

    // Key generation, wrap and unwrap.
    CK_ULONG key_len = 32;
    CK_ATTRIBUTE kek_template[] = { { CKA_TOKEN, &no, 1 }, { CKA_VALUE_LEN, &key_len, sizeof key_len },
                                    { CKA_WRAP, &yes, 1 }, { CKA_UNWRAP, &yes, 1 }, { CKA_ENCRYPT, &yes, 1 } };
    CK_MECHANISM aes_gen = { CKM_AES_KEY_GEN, NULL, 0 };
    CK_OBJECT_HANDLE kek = 0;
    rv = p->C_GenerateKey(rw, &aes_gen, kek_template, 5, &kek);
    line("C_GenerateKey(AES)", rv, "%s", ordinal(OBJECT, kek));
    CK_MECHANISM wrap = { CKM_AES_KEY_WRAP_PAD, NULL, 0 };
    unsigned char wrapped[256];
    CK_ULONG w_len = 0;
    rv = p->C_WrapKey(rw, &wrap, kek, aes_key, NULL, &w_len);
    line("C_WrapKey(NULL)", rv, "len=%lu", w_len);
    w_len = sizeof wrapped;
    rv = p->C_WrapKey(rw, &wrap, kek, aes_key, wrapped, &w_len);
    line("C_WrapKey", rv, "len=%lu", w_len);
    line("C_WrapKey(unknown wrapping key)", p->C_WrapKey(rw, &wrap, 0x7777, aes_key, wrapped, &w_len), "%s", "");
    CK_ATTRIBUTE unwrap_template[] = { { CKA_CLASS, &secret, sizeof secret }, { CKA_KEY_TYPE, &aes, sizeof aes },
                                       { CKA_TOKEN, &no, 1 }, { CKA_ENCRYPT, &yes, 1 } };
    CK_OBJECT_HANDLE unwrapped = 0;
    rv = p->C_UnwrapKey(rw, &wrap, kek, wrapped, w_len, unwrap_template, 4, &unwrapped);
    line("C_UnwrapKey", rv, "%s", ordinal(OBJECT, unwrapped));
    unsigned char again[256];
    CK_ULONG a_len = sizeof again;
    c_len = sizeof ciphertext;
    p->C_EncryptInit(rw, &cbc, aes_key);
    p->C_Encrypt(rw, (CK_BYTE_PTR)plaintext, sizeof plaintext - 1, ciphertext, &c_len);
    rv = p->C_EncryptInit(rw, &cbc, unwrapped);
    if (rv == CKR_OK) rv = p->C_Encrypt(rw, (CK_BYTE_PTR)plaintext, sizeof plaintext - 1, again, &a_len);
    line("C_Encrypt(unwrapped key)", rv, "same=%s", a_len == c_len && !memcmp(again, ciphertext, c_len) ? "yes" : "no");

    // Attributes.
    unsigned char value[256];
    CK_ULONG value_len;
    CK_ATTRIBUTE read[] = { { CKA_LABEL, value, sizeof value }, { CKA_VALUE_LEN, &value_len, sizeof value_len } };
    rv = p->C_GetAttributeValue(rw, aes_key, read, 2);
    line("C_GetAttributeValue(label, value_len)", rv, "'%s' %lu", text_of(value, read[0].ulValueLen), value_len);
    CK_ATTRIBUTE query[] = { { CKA_LABEL, NULL, 0 }, { CKA_VALUE, NULL, 0 } };
    rv = p->C_GetAttributeValue(rw, aes_key, query, 2);
    line("C_GetAttributeValue(lengths)", rv, "%lu %lu", query[0].ulValueLen, query[1].ulValueLen);
    CK_ATTRIBUTE small[] = { { CKA_LABEL, value, 3 } };
    rv = p->C_GetAttributeValue(rw, aes_key, small, 1);
    line("C_GetAttributeValue(3 bytes room)", rv, "%ld", (long)small[0].ulValueLen);
    CK_ATTRIBUTE sensitive[] = { { CKA_PRIVATE_EXPONENT, value, sizeof value }, { CKA_MODULUS_BITS, &value_len, sizeof value_len } };
    rv = p->C_GetAttributeValue(rw, rsa_priv, sensitive, 2);
    line("C_GetAttributeValue(private exponent)", rv, "%ld", (long)sensitive[0].ulValueLen);
    CK_ATTRIBUTE unknown[] = { { 0x7fff0000, value, sizeof value } };
    rv = p->C_GetAttributeValue(rw, aes_key, unknown, 1);
    line("C_GetAttributeValue(unknown type)", rv, "%ld", (long)unknown[0].ulValueLen);
    line("C_GetAttributeValue(unknown object)", p->C_GetAttributeValue(rw, 0x7777, read, 2), "%s", "");
    const char *renamed = "conformance-renamed";
    CK_ATTRIBUTE rename[] = { { CKA_LABEL, (void *)renamed, strlen(renamed) } };
    rv = p->C_SetAttributeValue(rw, aes_key, rename, 1);
    read[0].ulValueLen = sizeof value;
    p->C_GetAttributeValue(rw, aes_key, read, 1);
    line("C_SetAttributeValue(label)", rv, "now '%s'", text_of(value, read[0].ulValueLen));
    CK_ULONG size = 0;
    rv = p->C_GetObjectSize(rw, aes_key, &size);
    line("C_GetObjectSize", rv, "%s", "");
    const char *copy_label = "conformance-copy";
    CK_ATTRIBUTE copy_template[] = { { CKA_LABEL, (void *)copy_label, strlen(copy_label) } };
    CK_OBJECT_HANDLE copy = 0;
    rv = p->C_CopyObject(rw, aes_key, copy_template, 1, &copy);
    line("C_CopyObject", rv, "%s", ordinal(OBJECT, copy));
    line("C_DestroyObject", p->C_DestroyObject(rw, copy), "%s", "");
    line("C_GetAttributeValue(destroyed)", p->C_GetAttributeValue(rw, copy, read, 1), "%s", "");
    line("C_DestroyObject(again)", p->C_DestroyObject(rw, copy), "%s", "");

    // Random.
    unsigned char random[32];
    line("C_GenerateRandom", p->C_GenerateRandom(rw, random, 32), "len=32");
    line("C_GenerateRandom(NULL)", p->C_GenerateRandom(rw, NULL, 32), "%s", "");
    CK_OBJECT_CLASS data_class = CKO_DATA;
    CK_ATTRIBUTE set_class[] = { { CKA_CLASS, &data_class, sizeof data_class } };
    line("C_SetAttributeValue(CKA_CLASS)", p->C_SetAttributeValue(rw, aes_key, set_class, 1), "%s", "");
    CK_MECHANISM sha256_rsa_again = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    p->C_SignInit(rw, &sha256_rsa_again, rsa_priv);
    line("C_SignInit(while active)", p->C_SignInit(rw, &sha256_rsa_again, rsa_priv), "%s", "");
    length = sizeof signature;
    p->C_Sign(rw, (CK_BYTE_PTR)plaintext, 4, signature, &length);
    line("C_SeedRandom", p->C_SeedRandom(rw, (CK_BYTE_PTR)"seed", 4), "%s", "");
    CK_ULONG state_len = 0;
    line("C_GetOperationState", p->C_GetOperationState(rw, NULL, &state_len), "%s", "");
    line("C_GetFunctionStatus", p->C_GetFunctionStatus(rw), "%s", "");
}

// A slot named on the command line, used before anything lists slots (as configurations do).
static void named_slot_steps(CK_SLOT_ID slot) {
    CK_SLOT_INFO slot_info;
    CK_RV rv = p->C_GetSlotInfo(slot, &slot_info);
    line("C_GetSlotInfo(named slot, first call)", rv, "%s description='%s' flags=0x%lx", ordinal(SLOT, slot),
         rv == CKR_OK ? text_of(slot_info.slotDescription, 64) : "", rv == CKR_OK ? slot_info.flags : 0);
    CK_TOKEN_INFO token;
    rv = p->C_GetTokenInfo(slot, &token);
    line("C_GetTokenInfo(named slot)", rv, "label='%s'", rv == CKR_OK ? text_of(token.label, 32) : "");
    CK_SESSION_HANDLE session = 0;
    rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &session);
    line("C_OpenSession(named slot)", rv, "%s", ordinal(SESSION, session));
    CK_SESSION_INFO info;
    rv = p->C_GetSessionInfo(session, &info);
    line("C_GetSessionInfo(named slot)", rv, "%s", rv == CKR_OK ? ordinal(SLOT, info.slotID) : "");
    line("C_CloseSession(named slot)", p->C_CloseSession(session), "%s", "");
}

int main(int argc, char **argv) {
    const char *module = NULL, *named_slot = NULL;
    const struct tool_option options[] = {
        { "--module", &module }, { "--token", &token_label }, { "--pin", &pin }, { "--slot", &named_slot }, { NULL },
    };
    if (tool_read_options(argc, argv, options, NULL) || !module || !token_label || !pin) {
        fprintf(stderr, "usage: p11fork-conformance --module PATH --token LABEL --pin PIN [--slot ID]\n");
        return 2;
    }
    alarm(60);
    const char *problem;
    if (!(p = tool_load_module(module, NULL, &problem))) { fprintf(stderr, "%s: %s\n", module, problem); return 1; }
    line("C_GetFunctionList", CKR_OK, "version=%d.%d", p->version.major, p->version.minor);

    CK_INFO info;
    CK_SLOT_ID slots[8];
    CK_ULONG n = 8;
    line("C_GetInfo(before C_Initialize)", p->C_GetInfo(&info), "%s", "");
    line("C_GetSlotList(before C_Initialize)", p->C_GetSlotList(CK_TRUE, slots, &n), "%s", "");
    line("C_Finalize(before C_Initialize)", p->C_Finalize(NULL), "%s", "");
    CK_C_INITIALIZE_ARGS reserved = { .flags = CKF_OS_LOCKING_OK, .pReserved = (void *)"x" };
    line("C_Initialize(pReserved set)", p->C_Initialize(&reserved), "%s", "");
    CK_C_INITIALIZE_ARGS half = { .CreateMutex = (CK_CREATEMUTEX)(void *)1 };
    line("C_Initialize(one mutex callback only)", p->C_Initialize(&half), "%s", "");
    CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
    line("C_Initialize(CKF_OS_LOCKING_OK)", p->C_Initialize(&args), "%s", "");
    line("C_Initialize(again)", p->C_Initialize(NULL), "%s", "");
    if (named_slot) named_slot_steps(strtoul(named_slot, NULL, 0));

    info_steps();
    CK_SLOT_ID slot = slot_steps();

    CK_SESSION_HANDLE ro = 0, rw = 0;
    line("C_OpenSession(no serial flag)", p->C_OpenSession(slot, 0, NULL, NULL, &ro), "%s", "");
    line("C_OpenSession(NULL handle)", p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, NULL), "%s", "");
    line("C_OpenSession(unknown slot)", p->C_OpenSession(0x7777, CKF_SERIAL_SESSION, NULL, NULL, &ro), "%s", "");
    CK_RV rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &ro);
    line("C_OpenSession(RO)", rv, "%s", ordinal(SESSION, ro));
    rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &rw);
    line("C_OpenSession(RW)", rv, "%s", ordinal(SESSION, rw));
    session_info("C_GetSessionInfo(RO)", ro);
    session_info("C_GetSessionInfo(unknown)", 0x7777);
    line("C_GetSessionInfo(NULL)", p->C_GetSessionInfo(rw, NULL), "%s", "");
    line("C_Login(wrong PIN)", p->C_Login(rw, CKU_USER, (CK_UTF8CHAR_PTR)"not-the-pin", 11), "%s", "");
    line("C_Login(bad user type)", p->C_Login(rw, 77, (CK_UTF8CHAR_PTR)pin, strlen(pin)), "%s", "");
    line("C_Login", p->C_Login(rw, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)), "%s", "");
    line("C_Login(again)", p->C_Login(rw, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)), "%s", "");
    session_info("C_GetSessionInfo(RO, logged in)", ro);
    session_info("C_GetSessionInfo(RW, logged in)", rw);
    line("C_Login(unknown session)", p->C_Login(0x7777, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)), "%s", "");
    CK_OBJECT_CLASS data = CKO_DATA;
    CK_ATTRIBUTE token_object[] = { { CKA_CLASS, &data, sizeof data }, { CKA_TOKEN, &yes, 1 } };
    CK_OBJECT_HANDLE not_made = 0;
    line("C_CreateObject(token object, RO session)", p->C_CreateObject(ro, token_object, 2, &not_made), "%s", "");

    object_steps(rw);

    line("C_Logout", p->C_Logout(rw), "%s", "");
    line("C_Logout(again)", p->C_Logout(rw), "%s", "");
    line("C_CloseSession(RO)", p->C_CloseSession(ro), "%s", "");
    session_info("C_GetSessionInfo(closed)", ro);
    line("C_CloseSession(again)", p->C_CloseSession(ro), "%s", "");
    line("C_CloseAllSessions", p->C_CloseAllSessions(slot), "%s", "");
    session_info("C_GetSessionInfo(after close all)", rw);
    line("C_CloseAllSessions(unknown slot)", p->C_CloseAllSessions(0x7777), "%s", "");
    line("C_Finalize(non-NULL)", p->C_Finalize((void *)"x"), "%s", "");
    line("C_Finalize", p->C_Finalize(NULL), "%s", "");
    line("C_GetInfo(after C_Finalize)", p->C_GetInfo(&info), "%s", "");
    session_info("C_GetSessionInfo(after C_Finalize)", rw);
    line("C_Finalize(again)", p->C_Finalize(NULL), "%s", "");
    line("C_Initialize(once more)", p->C_Initialize(NULL), "%s", "");
    // A module may number sessions and objects from 1 again, p11fork does not: labels restart.
    seen_count[SESSION] = seen_count[OBJECT] = 0;
    CK_SESSION_HANDLE fresh = 0;
    rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &fresh);
    line("C_OpenSession(after re-initialising)", rv, "%s", ordinal(SESSION, fresh));
    // (A handle from before C_Finalize is not tried here: the module may have given its number
    // to the new session, while p11fork's stays invalid. docs/FORK.md and README say so.)
    n = 8;
    rv = p->C_GetSlotList(CK_TRUE, slots, &n);
    line("C_GetSlotList(after re-initialising)", rv, "count=%lu %s", n, n ? ordinal(SLOT, slots[0]) : "");
    line("C_Finalize(last)", p->C_Finalize(NULL), "%s", "");
    CK_C_INITIALIZE_ARGS callbacks = { .CreateMutex = create_mutex, .DestroyMutex = destroy_mutex,
                                       .LockMutex = lock_mutex, .UnlockMutex = unlock_mutex };
    line("C_Initialize(mutex callbacks)", p->C_Initialize(&callbacks), "%s", "");
    n = 8;
    rv = p->C_GetSlotList(CK_TRUE, slots, &n);
    line("C_GetSlotList(with callbacks)", rv, "count=%lu callbacks used=%s", n, mutex_calls > 0 ? "yes" : "no");
    line("C_Finalize(after callbacks)", p->C_Finalize(NULL), "%s", "");
    return 0;
}
