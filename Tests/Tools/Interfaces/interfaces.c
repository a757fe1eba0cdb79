// p11fork-interfaces: the PKCS#11 3.0 interface calls, and a few 3.0 functions reached through
// a 3.0 function list (message-based AES-GCM encryption, C_SessionCancel), printed as a
// transcript like p11fork-conformance's. Run against NSS's softoken (a 3.0 module) directly and
// through p11fork, the transcripts must match; against a 2.40 module p11fork offers 2.40 only.
// When a 3.2 interface is offered, every 3.2 function follows, through the 3.2 list (logged in
// with --pin): signature-first verification, validation flags, key encapsulation (the NetHSM
// test module's ECDH P-256 KEM), the async calls, authenticated wrapping.
// Each interface's flags are on a line of their own ("flags ..."): p11fork adds
// CKF_INTERFACE_FORK_SAFE, so those lines are compared apart.
//
//   p11fork-interfaces --module PATH [--nss-nodb] [--pin PIN] [--reserved TEXT]
// --reserved: C_Initialize's pReserved (p11fork's settings, "p11fork: module=..."); the interface
// list is then asked again after it, on a line "after C_Initialize: ..."
#include <CPKCS11.h>
#include <nethsm.h>
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int step;
static void line(const char *name, CK_RV rv, const char *format, ...) {
    char details[1024] = "";
    va_list args;
    va_start(args, format);
    vsnprintf(details, sizeof details, format, args);
    va_end(args);
    printf("%02d %s rv=0x%lx%s%s\n", ++step, name, rv, details[0] ? " " : "", details);
}

static const char *hex(const unsigned char *b, CK_ULONG n) {
    static char out[512];
    if (n > 200) n = 200;
    for (CK_ULONG i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", b[i]);
    out[2 * n] = 0;
    return out;
}

// PKCS#11 3.0 section 2.9.5 (AES-GCM message parameters).
typedef struct {
    CK_BYTE_PTR pIv;
    CK_ULONG ulIvLen;
    CK_ULONG ulIvFixedBits;
    CK_ULONG ivGenerator;
    CK_BYTE_PTR pTag;
    CK_ULONG ulTagBits;
} GCM_MESSAGE_PARAMS;

// MARK: PKCS#11 3.2

static CK_FUNCTION_LIST_3_2_PTR q;
static CK_SESSION_HANDLE s32;

static CK_OBJECT_HANDLE create(CK_ATTRIBUTE *t, CK_ULONG n, const char *what) {
    CK_OBJECT_HANDLE h = 0;
    line(what, q->C_CreateObject(s32, t, n, &h), "%s", "");
    return h;
}

static void value_of(const char *what, CK_OBJECT_HANDLE key, unsigned char *value, CK_ULONG *len) {
    CK_ATTRIBUTE a = { CKA_VALUE, value, *len };
    CK_RV rv = q->C_GetAttributeValue(s32, key, &a, 1);
    *len = rv == CKR_OK ? a.ulValueLen : 0;
    line(what, rv, "len=%lu", *len);
}

static int through32(CK_C_GetInterface get, const char *pin) {
    CK_INTERFACE_PTR chosen = NULL;
    CK_VERSION v32 = { 3, 2 };
    CK_RV rv = get((CK_UTF8CHAR_PTR)"PKCS 11", &v32, &chosen, 0);
    line("C_GetInterface('PKCS 11', 3.2)", rv, "%s", "");
    if (rv != CKR_OK) return 1;
    q = chosen->pFunctionList;
    line("C_Initialize (3.2 list)", q->C_Initialize(NULL), "%s", "");
    CK_SLOT_ID slot = 0;
    CK_ULONG n = 1;
    line("C_GetSlotList", q->C_GetSlotList(CK_TRUE, &slot, &n), "count=%lu", n);
    CK_SESSION_HANDLE async = 0;
    line("C_OpenSession(CKF_ASYNC_SESSION)", q->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_ASYNC_SESSION, NULL, NULL, &async), "%s", "");
    line("C_OpenSession", q->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s32), "%s", "");
    if (pin) line("C_Login", q->C_Login(s32, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)), "%s", "");

    // Signature-first verification (HMAC-SHA256 over a created key; the signature made by C_Sign).
    static const unsigned char mac_value[32] = "p11fork 3.2 verification key...";
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_KEY_TYPE generic = CKK_GENERIC_SECRET;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE mac_t[] = { { CKA_CLASS, &secret, sizeof secret }, { CKA_KEY_TYPE, &generic, sizeof generic },
                             { CKA_VALUE, (void *)mac_value, 32 }, { CKA_SIGN, &yes, 1 }, { CKA_VERIFY, &yes, 1 } };
    CK_OBJECT_HANDLE mac = create(mac_t, 5, "C_CreateObject(HMAC key)");
    CK_MECHANISM hmac = { CKM_SHA256_HMAC, NULL, 0 };
    unsigned char good[32], bad[32];
    CK_ULONG len = sizeof good;
    line("C_SignInit", q->C_SignInit(s32, &hmac, mac), "%s", "");
    rv = q->C_Sign(s32, (CK_BYTE_PTR)"hello", 5, good, &len);
    line("C_Sign", rv, "%s", hex(good, rv == CKR_OK ? len : 0));
    memcpy(bad, good, sizeof bad);
    bad[0] ^= 1;
    CK_FLAGS flags = 0;
    line("C_VerifySignatureFinal(not initialised)", q->C_VerifySignatureFinal(s32), "%s", "");
    line("C_VerifySignatureInit(31 bytes)", q->C_VerifySignatureInit(s32, &hmac, mac, good, 31), "%s", "");
    line("C_VerifySignatureInit(unknown session)", q->C_VerifySignatureInit(0x7777, &hmac, mac, good, 32), "%s", "");
    line("C_VerifySignatureInit", q->C_VerifySignatureInit(s32, &hmac, mac, good, 32), "%s", "");
    line("C_VerifySignature", q->C_VerifySignature(s32, (CK_BYTE_PTR)"hello", 5), "%s", "");
    rv = q->C_GetSessionValidationFlags(s32, CKS_LAST_VALIDATION_OK, &flags);
    line("C_GetSessionValidationFlags", rv, "flags=0x%lx", flags);
    line("C_VerifySignatureInit", q->C_VerifySignatureInit(s32, &hmac, mac, good, 32), "%s", "");
    line("C_VerifySignatureUpdate", q->C_VerifySignatureUpdate(s32, (CK_BYTE_PTR)"hel", 3), "%s", "");
    line("C_VerifySignature(after update)", q->C_VerifySignature(s32, (CK_BYTE_PTR)"lo", 2), "%s", "");
    line("C_VerifySignatureUpdate", q->C_VerifySignatureUpdate(s32, (CK_BYTE_PTR)"lo", 2), "%s", "");
    line("C_VerifySignatureFinal", q->C_VerifySignatureFinal(s32), "%s", "");
    line("C_VerifySignatureInit(wrong signature)", q->C_VerifySignatureInit(s32, &hmac, mac, bad, 32), "%s", "");
    line("C_VerifySignature", q->C_VerifySignature(s32, (CK_BYTE_PTR)"hello", 5), "%s", "");
    flags = 99;
    rv = q->C_GetSessionValidationFlags(s32, CKS_LAST_VALIDATION_OK, &flags);
    line("C_GetSessionValidationFlags", rv, "flags=0x%lx", flags);
    line("C_GetSessionValidationFlags(unknown type)", q->C_GetSessionValidationFlags(s32, 0x77, &flags), "%s", "");

    // Key encapsulation: a private key from a fixed scalar decapsulates the P-256 generator
    // (a fixed ciphertext: a fixed key), then a round trip with a generated pair.
    CK_MECHANISM kem = { CKM_NETHSM_ECDH_P256_KEM, NULL, 0 };
    static const unsigned char p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
    static const unsigned char generator[65] = {
        0x04, 0x6b, 0x17, 0xd1, 0xf2, 0xe1, 0x2c, 0x42, 0x47, 0xf8, 0xbc, 0xe6, 0xe5, 0x63, 0xa4, 0x40, 0xf2,
        0x77, 0x03, 0x7d, 0x81, 0x2d, 0xeb, 0x33, 0xa0, 0xf4, 0xa1, 0x39, 0x45, 0xd8, 0x98, 0xc2, 0x96,
        0x4f, 0xe3, 0x42, 0xe2, 0xfe, 0x1a, 0x7f, 0x9b, 0x8e, 0xe7, 0xeb, 0x4a, 0x7c, 0x0f, 0x9e, 0x16,
        0x2b, 0xce, 0x33, 0x57, 0x6b, 0x31, 0x5e, 0xce, 0xcb, 0xb6, 0x40, 0x68, 0x37, 0xbf, 0x51, 0xf5 };
    unsigned char scalar[32];
    for (int i = 0; i < 32; i++) scalar[i] = (unsigned char)(i + 1);
    CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY, public_class = CKO_PUBLIC_KEY;
    CK_KEY_TYPE ec = CKK_EC;
    CK_ATTRIBUTE fixed_t[] = { { CKA_CLASS, &private_class, sizeof private_class }, { CKA_KEY_TYPE, &ec, sizeof ec },
                               { CKA_EC_PARAMS, (void *)p256, sizeof p256 }, { CKA_VALUE, scalar, 32 },
                               { CKA_DECAPSULATE, &yes, 1 } };
    CK_OBJECT_HANDLE fixed = create(fixed_t, 5, "C_CreateObject(EC private key)");
    CK_ATTRIBUTE shared_t[] = { { CKA_SENSITIVE, &no, 1 }, { CKA_EXTRACTABLE, &yes, 1 } };
    CK_OBJECT_HANDLE k1 = 0, k2 = 0;
    rv = q->C_DecapsulateKey(s32, &kem, fixed, shared_t, 2, (CK_BYTE_PTR)generator, sizeof generator, &k1);
    line("C_DecapsulateKey(generator)", rv, "%s", "");
    unsigned char v1[64], v2[64];
    CK_ULONG l1 = sizeof v1, l2 = sizeof v2;
    value_of("C_GetAttributeValue(decapsulated)", k1, v1, &l1);
    printf("decapsulated value %s\n", hex(v1, l1));
    line("C_DecapsulateKey(64 bytes)", q->C_DecapsulateKey(s32, &kem, fixed, shared_t, 2, (CK_BYTE_PTR)generator, 64, &k2), "%s", "");
    line("C_DecapsulateKey(unknown key)", q->C_DecapsulateKey(s32, &kem, 0x7777, shared_t, 2, (CK_BYTE_PTR)generator, 65, &k2), "%s", "");

    CK_MECHANISM pair = { CKM_EC_KEY_PAIR_GEN, NULL, 0 };
    CK_ATTRIBUTE pub_t[] = { { CKA_EC_PARAMS, (void *)p256, sizeof p256 }, { CKA_ENCAPSULATE, &yes, 1 }, { CKA_TOKEN, &no, 1 } };
    CK_ATTRIBUTE priv_t[] = { { CKA_DECAPSULATE, &yes, 1 }, { CKA_TOKEN, &no, 1 } };
    CK_OBJECT_HANDLE pub = 0, priv = 0;
    line("C_GenerateKeyPair(EC)", q->C_GenerateKeyPair(s32, &pair, pub_t, 3, priv_t, 2, &pub, &priv), "%s", "");
    unsigned char ciphertext[128];
    len = 0;
    rv = q->C_EncapsulateKey(s32, &kem, pub, shared_t, 2, NULL, &len, &k1);
    line("C_EncapsulateKey(NULL)", rv, "len=%lu", len);
    len = 10;
    rv = q->C_EncapsulateKey(s32, &kem, pub, shared_t, 2, ciphertext, &len, &k1);
    line("C_EncapsulateKey(10 bytes)", rv, "len=%lu", len);
    len = sizeof ciphertext;
    rv = q->C_EncapsulateKey(s32, &kem, pub, shared_t, 2, ciphertext, &len, &k1);
    line("C_EncapsulateKey", rv, "len=%lu", len);
    rv = q->C_DecapsulateKey(s32, &kem, priv, shared_t, 2, ciphertext, len, &k2);
    line("C_DecapsulateKey", rv, "%s", "");
    l1 = sizeof v1;
    value_of("C_GetAttributeValue(encapsulated)", k1, v1, &l1);
    value_of("C_GetAttributeValue(decapsulated)", k2, v2, &l2);
    printf("the two keys agree: %s\n", l1 == 32 && l1 == l2 && !memcmp(v1, v2, l1) ? "yes" : "no");
    line("C_EncapsulateKey(private key)", q->C_EncapsulateKey(s32, &kem, priv, shared_t, 2, ciphertext, &len, &k1), "%s", "");

    // An asynchronous session: the answer waits for C_AsyncComplete (CKR_PENDING passes through
    // p11fork untouched); then the async calls with nothing under way; authenticated wrapping.
    CK_ASYNC_DATA result = { 0 };
    CK_ULONG id = 0;
    line("C_VerifySignatureInit(async session)", q->C_VerifySignatureInit(async, &hmac, mac, good, 32), "%s", "");
    line("C_VerifySignature(async session)", q->C_VerifySignature(async, (CK_BYTE_PTR)"hello", 5), "%s", "");
    rv = q->C_AsyncGetID(async, (CK_UTF8CHAR_PTR)"C_VerifySignature", &id);
    line("C_AsyncGetID", rv, "id=%s", id ? "given" : "none");
    line("C_AsyncJoin(another ID)", q->C_AsyncJoin(s32, (CK_UTF8CHAR_PTR)"C_VerifySignature", id + 1000, NULL, 0), "%s", "");
    line("C_AsyncComplete", q->C_AsyncComplete(async, (CK_UTF8CHAR_PTR)"C_VerifySignature", &result), "%s", "");
    line("C_AsyncComplete(again)", q->C_AsyncComplete(async, (CK_UTF8CHAR_PTR)"C_VerifySignature", &result), "%s", "");
    line("C_AsyncComplete(nothing under way)", q->C_AsyncComplete(s32, (CK_UTF8CHAR_PTR)"C_Sign", &result), "%s", "");
    line("C_AsyncGetID(nothing under way)", q->C_AsyncGetID(s32, (CK_UTF8CHAR_PTR)"C_Sign", &id), "%s", "");
    line("C_AsyncComplete(unknown session)", q->C_AsyncComplete(0x7777, (CK_UTF8CHAR_PTR)"C_Sign", &result), "%s", "");
    line("C_CloseSession(async session)", q->C_CloseSession(async), "%s", "");
    len = sizeof ciphertext;
    line("C_WrapKeyAuthenticated", q->C_WrapKeyAuthenticated(s32, &hmac, mac, mac, NULL, 0, ciphertext, &len), "%s", "");
    line("C_UnwrapKeyAuthenticated",
         q->C_UnwrapKeyAuthenticated(s32, &hmac, mac, ciphertext, 16, mac_t, 2, NULL, 0, &k1), "%s", "");
    line("C_CloseSession", q->C_CloseSession(s32), "%s", "");
    line("C_Finalize", q->C_Finalize(NULL), "%s", "");
    return 0;
}

int main(int argc, char **argv) {
    const char *module = NULL;
    const char *pin = NULL, *reserved = NULL;
    int nss = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--module") && i + 1 < argc) module = argv[++i];
        else if (!strcmp(argv[i], "--pin") && i + 1 < argc) pin = argv[++i];
        else if (!strcmp(argv[i], "--reserved") && i + 1 < argc) reserved = argv[++i];
        else if (!strcmp(argv[i], "--nss-nodb")) nss = 1;
    }
    if (!module) { fprintf(stderr, "usage: p11fork-interfaces --module PATH [--nss-nodb]\n"); return 2; }
    alarm(60);
    setvbuf(stdout, NULL, _IONBF, 0);
    void *library = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (!library) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    CK_C_GetInterfaceList list = (CK_C_GetInterfaceList)dlsym(library, "C_GetInterfaceList");
    CK_C_GetInterface get = (CK_C_GetInterface)dlsym(library, "C_GetInterface");
    if (!list || !get) { printf("no 3.0 entry points\n"); return 1; }

    // Only the standard "PKCS 11" interfaces are compared: p11fork does not offer a module's
    // vendor interfaces, so the raw counts differ where a module has some.
    CK_ULONG count = 0;
    CK_RV rv = list(NULL, &count);
    line("C_GetInterfaceList(NULL)", rv, "%s", count > 0 ? "some" : "none");
    CK_INTERFACE interfaces[8];
    CK_ULONG none = 0;
    line("C_GetInterfaceList(0 room)", list(interfaces, &none), "%s", "");
    // NSS's softoken crashes on these NULL pointers, so they are asked only of other modules.
    if (!nss) line("C_GetInterfaceList(NULL count)", list(interfaces, NULL), "%s", "");
    count = 8;
    rv = list(interfaces, &count);
    int has30 = 0, has32 = 0;
    for (CK_ULONG i = 0; i < count && rv == CKR_OK; i++) {
        CK_VERSION *version = (CK_VERSION *)interfaces[i].pFunctionList;
        if (strcmp((char *)interfaces[i].pInterfaceName, "PKCS 11")) continue;  // vendor interfaces are not compared
        line("interface", rv, "'%s' %d.%d", (char *)interfaces[i].pInterfaceName, version->major, version->minor);
        printf("flags 'PKCS 11' %d.%d 0x%lx\n", version->major, version->minor, interfaces[i].flags);
        if (version->major == 3) has30 = 1;
        if (version->major == 3 && version->minor == 2) has32 = 1;
    }
    CK_INTERFACE_PTR chosen = NULL;
    CK_VERSION v30 = { 3, 0 }, v240 = { 2, 40 };
    line("C_GetInterface('PKCS 11', 3.0)", get((CK_UTF8CHAR_PTR)"PKCS 11", &v30, &chosen, 0), "%s", "");
    line("C_GetInterface('PKCS 11', 2.40)", get((CK_UTF8CHAR_PTR)"PKCS 11", &v240, &chosen, 0), "%s", "");
    if (!nss) line("C_GetInterface(NULL, NULL, NULL)", get(NULL, NULL, NULL, 0), "%s", "");
    line("C_GetInterface('Vendor X')", get((CK_UTF8CHAR_PTR)"Vendor X", NULL, &chosen, 0), "%s", "");
    if (!nss) line("C_GetInterface(fork safe)", get(NULL, NULL, &chosen, CKF_INTERFACE_FORK_SAFE), "%s", "");
    rv = get((CK_UTF8CHAR_PTR)"PKCS 11", NULL, &chosen, 0);
    CK_VERSION *version = chosen ? (CK_VERSION *)chosen->pFunctionList : NULL;
    line("C_GetInterface('PKCS 11', any)", rv, "%d.%d", version ? version->major : 0, version ? version->minor : 0);
    if (!has30) return 0;

    // Through the 3.0 list.
    rv = get((CK_UTF8CHAR_PTR)"PKCS 11", &v30, &chosen, 0);
    if (rv != CKR_OK) return 1;
    CK_FUNCTION_LIST_3_0_PTR p = (CK_FUNCTION_LIST_3_0_PTR)chosen->pFunctionList;
    CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
    if (nss) args.pReserved = "configdir='' certPrefix='' keyPrefix='' secmod='' flags=readOnly,noCertDB,noModDB,forceOpen,optimizeSpace";
    if (reserved) args.pReserved = (void *)reserved;
    line("C_Initialize (3.0 list)", p->C_Initialize(&args), "%s", "");
    if (reserved) {
        CK_ULONG after = 8;
        rv = list(interfaces, &after);
        printf("after C_Initialize: %lu interface(s), the first %d.%d\n", after, ((CK_VERSION *)interfaces[0].pFunctionList)->major,
               ((CK_VERSION *)interfaces[0].pFunctionList)->minor);
    }
    CK_SLOT_ID slots[8];
    CK_ULONG n = 8;
    rv = p->C_GetSlotList(CK_FALSE, slots, &n);
    line("C_GetSlotList", rv, "count=%lu", n);
    CK_SESSION_HANDLE s = 0;
    line("C_OpenSession", p->C_OpenSession(slots[0], CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s), "%s", "");

    static const unsigned char value[16] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 };
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_KEY_TYPE aes = CKK_AES;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE t[] = { { CKA_CLASS, &secret, sizeof secret }, { CKA_KEY_TYPE, &aes, sizeof aes }, { CKA_TOKEN, &no, 1 },
                         { CKA_VALUE, (void *)value, 16 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_DECRYPT, &yes, 1 } };
    CK_OBJECT_HANDLE key = 0;
    line("C_CreateObject(AES)", p->C_CreateObject(s, t, 6, &key), "%s", "");

    CK_MECHANISM gcm = { CKM_AES_GCM, NULL, 0 };
    rv = p->C_MessageEncryptInit(s, &gcm, key);
    line("C_MessageEncryptInit", rv, "%s", "");
    if (rv == CKR_OK) {
        unsigned char iv[12] = { 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9 }, tag[16];
        GCM_MESSAGE_PARAMS params = { iv, 12, 0, 0 /* CKG_NO_GENERATE */, tag, 128 };
        unsigned char out[64];
        CK_ULONG out_len = sizeof out;
        static const unsigned char aad[] = "header", text[] = "message-based encryption";
        rv = p->C_EncryptMessage(s, &params, sizeof params, (CK_BYTE_PTR)aad, 6, (CK_BYTE_PTR)text, sizeof text - 1, out, &out_len);
        char ciphertext[512];
        snprintf(ciphertext, sizeof ciphertext, "%s", hex(out, out_len));
        line("C_EncryptMessage", rv, "%s tag=%s", ciphertext, rv == CKR_OK ? hex(tag, 16) : "");
        line("C_MessageEncryptFinal", p->C_MessageEncryptFinal(s), "%s", "");
    }
    unsigned char scratch[64];
    CK_ULONG scratch_len = sizeof scratch;
    line("C_EncryptMessage(not initialised)",
         p->C_EncryptMessage(s, scratch, 8, scratch, 1, scratch, 1, scratch, &scratch_len), "%s", "");
    line("C_SessionCancel", p->C_SessionCancel(s, CKF_MESSAGE_ENCRYPT), "%s", "");
    line("C_SessionCancel(unknown session)", p->C_SessionCancel(0x7777, CKF_MESSAGE_ENCRYPT), "%s", "");
    line("C_LoginUser(unknown session)", p->C_LoginUser(0x7777, CKU_USER, (CK_UTF8CHAR_PTR)"x", 1, (CK_UTF8CHAR_PTR)"u", 1), "%s", "");
    line("C_CloseSession", p->C_CloseSession(s), "%s", "");
    line("C_Finalize", p->C_Finalize(NULL), "%s", "");
    return has32 ? through32(get, pin) : 0;
}
