// p11fuzz32: a differential fuzzer (libFuzzer) for the PKCS#11 3.2 functions p11fork forwards.
//
// The main fuzzer (Tests/Tools/Fuzz) compares p11fork with SoftHSM 2.6, which has no 3.2
// functions, so it cannot reach them. This one puts the NetHSM test module (a 3.2 module) on both
// sides: side FORK is libp11fork.so over NetHSM with server directory A, side DIRECT a second
// instance of NetHSM (a copy of the file, so that it is loaded apart) with server directory B.
// Each input is a sequence of 3.2 calls with hostile arguments, made on both sides with the same
// choices; the return codes and the outputs that do not depend on randomness must be the same.
// docs/RELIABILITY.md ("Hostile input (fuzzing)") says how to run it: scripts/fuzz.sh --v32.
//
// Environment (scripts/fuzz.sh sets it): P11FUZZ_P11FORK (libp11fork.so), P11FUZZ_NETHSM (the
// NetHSM test module), P11FUZZ_DIR (an empty work directory).
#define _GNU_SOURCE
#include <CPKCS11.h>
#include <nethsm.h>
#include "tool_support.h"
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { FORK = 0, DIRECT = 1 };
#define PIN "fuzz32-PIN-8642"

static CK_FUNCTION_LIST_3_2_PTR list[2];
static CK_SLOT_ID slot[2];

// What one input works with, on each side: sessions (plain and asynchronous), keys, and the keys
// the input's calls made.
#define MAX_KEYS 32
static struct {
    CK_SESSION_HANDLE session, async;
    CK_OBJECT_HANDLE mac, priv, pub, plain_pub;
    CK_OBJECT_HANDLE made[MAX_KEYS];
    int deterministic[MAX_KEYS];  // the key's value is the same on both sides (a decapsulation of a fixed ciphertext)
    int nmade;
    unsigned char ciphertext[128];  // the last encapsulation's
    CK_ULONG ciphertext_len;
} side[2];

static const char *call_name;
static char call_args[256];

static void finding(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void finding(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "p11fuzz32: FINDING in %s(%s): ", call_name ? call_name : "set-up", call_args);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    abort();
}

static void must(CK_RV rv, const char *what, int s) {
    if (rv != CKR_OK) {
        fprintf(stderr, "p11fuzz32: %s on side %s: %s\n", what, s == FORK ? "p11fork" : "NetHSM", tool_rv_name(rv));
        exit(2);
    }
}

// MARK: input bytes (past the end every read is 0: the plain, valid choice)

typedef struct { const uint8_t *d; size_t n, i; } Rd;
static uint8_t rd(Rd *r) { return r->i < r->n ? r->d[r->i++] : 0; }

// MARK: fixed material

static const unsigned char p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
// The P-256 generator as a DER OCTET STRING: a valid public key (the one of the scalar 1).
static const unsigned char generator[67] = {
    0x04, 0x41, 0x04, 0x6b, 0x17, 0xd1, 0xf2, 0xe1, 0x2c, 0x42, 0x47, 0xf8, 0xbc, 0xe6, 0xe5, 0x63, 0xa4, 0x40,
    0xf2, 0x77, 0x03, 0x7d, 0x81, 0x2d, 0xeb, 0x33, 0xa0, 0xf4, 0xa1, 0x39, 0x45, 0xd8, 0x98, 0xc2, 0x96,
    0x4f, 0xe3, 0x42, 0xe2, 0xfe, 0x1a, 0x7f, 0x9b, 0x8e, 0xe7, 0xeb, 0x4a, 0x7c, 0x0f, 0x9e, 0x16,
    0x2b, 0xce, 0x33, 0x57, 0x6b, 0x31, 0x5e, 0xce, 0xcb, 0xb6, 0x40, 0x68, 0x37, 0xbf, 0x51, 0xf5 };
static const unsigned char mac_value[32] = "p11fuzz32 HMAC key, 32 bytes...";
static const unsigned char message[64] = "p11fuzz32: the data every verification is made over.........";
static unsigned char good_signature[32];  // HMAC-SHA256(mac_value, message), made at set-up

static CK_BBOOL yes = CK_TRUE, no = CK_FALSE;

// MARK: set-up

static void begin_input(void) {
    static CK_OBJECT_CLASS secret = CKO_SECRET_KEY, private_class = CKO_PRIVATE_KEY, public_class = CKO_PUBLIC_KEY;
    static CK_KEY_TYPE generic = CKK_GENERIC_SECRET, ec = CKK_EC;
    unsigned char scalar[32];
    for (int k = 0; k < 32; k++) scalar[k] = (unsigned char)(0x40 + k);
    for (int s = 0; s < 2; s++) {
        CK_FUNCTION_LIST_3_2_PTR f = list[s];
        memset(&side[s], 0, sizeof side[s]);
        must(f->C_OpenSession(slot[s], CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &side[s].session), "C_OpenSession", s);
        must(f->C_OpenSession(slot[s], CKF_SERIAL_SESSION | CKF_ASYNC_SESSION, NULL, NULL, &side[s].async), "C_OpenSession(async)", s);
        CK_RV rv = f->C_Login(side[s].session, CKU_USER, (CK_UTF8CHAR_PTR)PIN, strlen(PIN));
        if (rv != CKR_USER_ALREADY_LOGGED_IN) must(rv, "C_Login", s);
        CK_ATTRIBUTE mac_t[] = { { CKA_CLASS, &secret, sizeof secret }, { CKA_KEY_TYPE, &generic, sizeof generic },
                                 { CKA_VALUE, (void *)mac_value, 32 }, { CKA_SIGN, &yes, 1 }, { CKA_VERIFY, &yes, 1 } };
        must(f->C_CreateObject(side[s].session, mac_t, 5, &side[s].mac), "C_CreateObject(HMAC)", s);
        CK_ATTRIBUTE priv_t[] = { { CKA_CLASS, &private_class, sizeof private_class }, { CKA_KEY_TYPE, &ec, sizeof ec },
                                  { CKA_EC_PARAMS, (void *)p256, sizeof p256 }, { CKA_VALUE, scalar, 32 },
                                  { CKA_DECAPSULATE, &yes, 1 } };
        must(f->C_CreateObject(side[s].session, priv_t, 5, &side[s].priv), "C_CreateObject(EC private)", s);
        CK_ATTRIBUTE pub_t[] = { { CKA_CLASS, &public_class, sizeof public_class }, { CKA_KEY_TYPE, &ec, sizeof ec },
                                 { CKA_EC_PARAMS, (void *)p256, sizeof p256 }, { CKA_EC_POINT, (void *)generator, 67 },
                                 { CKA_ENCAPSULATE, &yes, 1 } };
        must(f->C_CreateObject(side[s].session, pub_t, 5, &side[s].pub), "C_CreateObject(EC public)", s);
        must(f->C_CreateObject(side[s].session, pub_t, 4, &side[s].plain_pub), "C_CreateObject(EC public, no encapsulation)", s);
    }
}

static void end_input(void) {
    for (int s = 0; s < 2; s++) must(list[s]->C_CloseAllSessions(slot[s]), "C_CloseAllSessions", s);
}

// MARK: argument choices (the same byte gives the same choice on both sides)

static CK_SESSION_HANDLE pick_session(uint8_t b, int s) {
    switch (b % 8) {
    case 5: return side[s].async;
    case 6: return 0;
    case 7: return 0x7777;
    default: return side[s].session;
    }
}

static CK_OBJECT_HANDLE pick_key(uint8_t b, int s) {
    switch (b % 9) {
    case 0: return side[s].mac;
    case 1: return side[s].priv;
    case 2: return side[s].pub;
    case 3: return side[s].plain_pub;
    case 4: return side[s].nmade ? side[s].made[(b / 9) % side[s].nmade] : side[s].mac;
    case 5: return 0;
    case 6: return 0x7777;
    case 7: return CK_INVALID_HANDLE - 1;  // ~0
    default: return side[s].mac;
    }
}

static CK_MECHANISM mechanisms[] = {
    { CKM_SHA256_HMAC, NULL, 0 }, { CKM_NETHSM_ECDH_P256_KEM, NULL, 0 }, { CKM_SHA256, NULL, 0 },
    { CKM_SHA256_HMAC, (void *)mac_value, 4 }, { CKM_ML_KEM, NULL, 0 }, { CKM_ML_DSA, NULL, 0 },
};
static CK_MECHANISM_PTR pick_mechanism(uint8_t b) {
    if (b % 8 == 7) return NULL;
    return &mechanisms[(b % 8) % (sizeof mechanisms / sizeof *mechanisms)];
}

// A template for a new secret key: none, the key type, a length, sensitive or not.
static CK_ATTRIBUTE *pick_template(uint8_t b, CK_ULONG *count) {
    static CK_KEY_TYPE aes = CKK_AES, generic = CKK_GENERIC_SECRET, rsa = CKK_RSA;
    static CK_ULONG lengths[] = { 32, 16, 24, 1, 0, 33, 4096 };
    static CK_ATTRIBUTE t[4];
    CK_ULONG n = 0;
    if (b & 1) t[n++] = (CK_ATTRIBUTE){ CKA_SENSITIVE, &no, 1 };
    if (b & 2) t[n++] = (CK_ATTRIBUTE){ CKA_KEY_TYPE, (b & 4) ? &aes : (b & 8) ? &rsa : &generic, sizeof(CK_KEY_TYPE) };
    if (b & 16) t[n++] = (CK_ATTRIBUTE){ CKA_VALUE_LEN, &lengths[(b >> 5) % 7], sizeof(CK_ULONG) };
    if ((b & 0xe0) == 0xe0) t[n++] = (CK_ATTRIBUTE){ CKA_VALUE, (void *)mac_value, 32 };  // not allowed
    *count = n;
    return n ? t : ((b & 0x40) ? NULL : t);
}

// Data for an update or a single-part call: the message, half of it, empty, NULL with a length.
static void pick_data(uint8_t b, CK_BYTE_PTR *p, CK_ULONG *len) {
    switch (b % 5) {
    case 0: *p = (CK_BYTE_PTR)message; *len = 64; break;
    case 1: *p = (CK_BYTE_PTR)message; *len = 32; break;
    case 2: *p = (CK_BYTE_PTR)message + 32; *len = 32; break;
    case 3: *p = (CK_BYTE_PTR)message; *len = 0; break;
    default: *p = NULL; *len = 16; break;
    }
}

static const char *const function_names[] = { "C_VerifySignature", "C_VerifySignatureFinal", "C_Sign", "", NULL };

// MARK: comparing

static void same_rv(const CK_RV rv[2]) {
    if (rv[FORK] != rv[DIRECT])
        finding("p11fork answered %s, NetHSM %s", tool_rv_name(rv[FORK]), tool_rv_name(rv[DIRECT]));
}

static void made_key(int s, CK_OBJECT_HANDLE h, int deterministic) {
    if (side[s].nmade < MAX_KEYS) {
        side[s].deterministic[side[s].nmade] = deterministic;
        side[s].made[side[s].nmade++] = h;
    }
}

// The values of the new keys made on both sides by the same call: equal when deterministic.
static void same_value(const CK_OBJECT_HANDLE h[2]) {
    unsigned char v[2][64];
    CK_ULONG len[2];
    CK_RV rv[2];
    for (int s = 0; s < 2; s++) {
        CK_ATTRIBUTE a = { CKA_VALUE, v[s], sizeof v[s] };
        rv[s] = list[s]->C_GetAttributeValue(side[s].session, h[s], &a, 1);
        len[s] = a.ulValueLen;
    }
    same_rv(rv);
    if (rv[FORK] == CKR_OK && (len[FORK] != len[DIRECT] || memcmp(v[FORK], v[DIRECT], len[FORK])))
        finding("the new keys' values differ (%lu and %lu bytes)", len[FORK], len[DIRECT]);
}

// MARK: the operations

static void op_verify_signature_init(Rd *r) {
    uint8_t sb = rd(r), mb = rd(r), kb = rd(r), gb = rd(r);
    CK_RV rv[2];
    unsigned char bad[32];
    memcpy(bad, good_signature, 32);
    bad[gb % 32] ^= 1;
    call_name = "C_VerifySignatureInit";
    snprintf(call_args, sizeof call_args, "session %u, mechanism %u, key %u, signature %u", sb % 8, mb % 8, kb % 9, gb % 6);
    for (int s = 0; s < 2; s++) {
        CK_BYTE_PTR sig = good_signature;
        CK_ULONG len = 32;
        switch (gb % 6) {
        case 1: sig = bad; break;
        case 2: len = 31; break;
        case 3: sig = NULL; break;
        case 4: len = 0; break;
        case 5: len = 0x7FFFFFFFUL; sig = NULL; break;
        }
        rv[s] = list[s]->C_VerifySignatureInit(pick_session(sb, s), pick_mechanism(mb), pick_key(kb, s), sig, len);
    }
    same_rv(rv);
}

static void op_verify_signature(Rd *r) {
    uint8_t sb = rd(r), db = rd(r), which = rd(r) % 3;
    CK_RV rv[2];
    static const char *const names[3] = { "C_VerifySignature", "C_VerifySignatureUpdate", "C_VerifySignatureFinal" };
    call_name = names[which];
    snprintf(call_args, sizeof call_args, "session %u, data %u", sb % 8, db % 5);
    for (int s = 0; s < 2; s++) {
        CK_BYTE_PTR p;
        CK_ULONG len;
        pick_data(db, &p, &len);
        CK_SESSION_HANDLE h = pick_session(sb, s);
        rv[s] = which == 0 ? list[s]->C_VerifySignature(h, p, len)
              : which == 1 ? list[s]->C_VerifySignatureUpdate(h, p, len) : list[s]->C_VerifySignatureFinal(h);
    }
    same_rv(rv);
}

static void op_validation_flags(Rd *r) {
    uint8_t sb = rd(r), tb = rd(r);
    CK_RV rv[2];
    CK_FLAGS flags[2] = { 0x55, 0x55 };
    call_name = "C_GetSessionValidationFlags";
    snprintf(call_args, sizeof call_args, "session %u, type %u", sb % 8, tb % 4);
    for (int s = 0; s < 2; s++) {
        CK_SESSION_VALIDATION_FLAGS_TYPE type = tb % 4 == 1 ? 0 : tb % 4 == 2 ? ~0UL : CKS_LAST_VALIDATION_OK;
        rv[s] = list[s]->C_GetSessionValidationFlags(pick_session(sb, s), type, tb % 4 == 3 ? NULL : &flags[s]);
    }
    same_rv(rv);
    if (flags[FORK] != flags[DIRECT]) finding("flags 0x%lx and 0x%lx", flags[FORK], flags[DIRECT]);
}

static void op_encapsulate(Rd *r) {
    uint8_t sb = rd(r), mb = rd(r), kb = rd(r), tb = rd(r), bb = rd(r);
    CK_RV rv[2];
    CK_ULONG len[2];
    CK_OBJECT_HANDLE h[2] = { 0, 0 };
    call_name = "C_EncapsulateKey";
    snprintf(call_args, sizeof call_args, "session %u, mechanism %u, key %u, template 0x%x, buffer %u", sb % 8, mb % 8, kb % 9, tb, bb % 5);
    for (int s = 0; s < 2; s++) {
        CK_ULONG count;
        CK_ATTRIBUTE *t = pick_template(tb, &count);
        CK_BYTE_PTR out = side[s].ciphertext;
        len[s] = sizeof side[s].ciphertext;
        switch (bb % 5) {
        case 1: out = NULL; break;
        case 2: len[s] = 64; break;
        case 3: len[s] = 0; break;
        }
        // Case 4: no place for the length.
        rv[s] = list[s]->C_EncapsulateKey(pick_session(sb, s), pick_mechanism(mb), pick_key(kb, s), t, count, out,
                                          bb % 5 == 4 ? NULL : &len[s], &h[s]);
        if (rv[s] == CKR_OK && out) {
            side[s].ciphertext_len = len[s];
            made_key(s, h[s], 0);
        }
    }
    same_rv(rv);
    if (bb % 5 != 4 && len[FORK] != len[DIRECT]) finding("ciphertext lengths %lu and %lu", len[FORK], len[DIRECT]);
}

static void op_decapsulate(Rd *r) {
    uint8_t sb = rd(r), mb = rd(r), kb = rd(r), tb = rd(r), cb = rd(r);
    CK_RV rv[2];
    CK_OBJECT_HANDLE h[2] = { 0, 0 };
    // The generator (fixed: the same key on both sides), each side's last ciphertext (random:
    // only the codes compare), a damaged point, a short one, NULL.
    unsigned char damaged[65];
    memcpy(damaged, generator + 2, 65);
    damaged[40] ^= 1;
    call_name = "C_DecapsulateKey";
    snprintf(call_args, sizeof call_args, "session %u, mechanism %u, key %u, template 0x%x, ciphertext %u", sb % 8, mb % 8, kb % 9, tb, cb % 5);
    for (int s = 0; s < 2; s++) {
        CK_ULONG count;
        CK_ATTRIBUTE *t = pick_template(tb, &count);
        CK_BYTE_PTR in = (CK_BYTE_PTR)generator + 2;
        CK_ULONG len = 65;
        switch (cb % 5) {
        case 1: if (side[FORK].ciphertext_len && side[DIRECT].ciphertext_len) { in = side[s].ciphertext; len = side[s].ciphertext_len; } break;
        case 2: in = damaged; break;
        case 3: len = 64; break;
        case 4: in = NULL; break;
        }
        rv[s] = list[s]->C_DecapsulateKey(pick_session(sb, s), pick_mechanism(mb), pick_key(kb, s), t, count, in, len, &h[s]);
        if (rv[s] == CKR_OK) made_key(s, h[s], cb % 5 != 1);
    }
    same_rv(rv);
    if (rv[FORK] == CKR_OK && cb % 5 != 1) same_value(h);
}

static void op_async(Rd *r) {
    uint8_t sb = rd(r), nb = rd(r), which = rd(r) % 3, ib = rd(r);
    CK_RV rv[2];
    CK_ULONG id[2] = { 0, 0 };
    static const char *const names[3] = { "C_AsyncComplete", "C_AsyncGetID", "C_AsyncJoin" };
    const char *name = function_names[nb % 5];
    call_name = names[which];
    snprintf(call_args, sizeof call_args, "session %u, \"%s\", id %u", sb % 8, name ? name : "NULL", ib % 3);
    for (int s = 0; s < 2; s++) {
        CK_SESSION_HANDLE h = pick_session(sb, s);
        CK_ASYNC_DATA result = { 0 };
        if (which == 0) rv[s] = list[s]->C_AsyncComplete(h, (CK_UTF8CHAR_PTR)name, ib % 3 == 2 ? NULL : &result);
        else if (which == 1) rv[s] = list[s]->C_AsyncGetID(h, (CK_UTF8CHAR_PTR)name, ib % 3 == 2 ? NULL : &id[s]);
        else {
            // An ID the module gave this side, or none.
            CK_ULONG asked = 0;
            if (ib % 3 == 0) list[s]->C_AsyncGetID(side[s].async, (CK_UTF8CHAR_PTR)name, &asked);
            rv[s] = list[s]->C_AsyncJoin(h, (CK_UTF8CHAR_PTR)name, ib % 3 == 1 ? 0x7777 : asked, NULL, 0);
        }
    }
    same_rv(rv);
    if ((id[FORK] == 0) != (id[DIRECT] == 0)) finding("one side gave an ID, the other not");
}

static void op_authenticated(Rd *r) {
    uint8_t sb = rd(r), mb = rd(r), kb = rd(r), which = rd(r) & 1;
    CK_RV rv[2];
    call_name = which ? "C_UnwrapKeyAuthenticated" : "C_WrapKeyAuthenticated";
    snprintf(call_args, sizeof call_args, "session %u, mechanism %u, key %u", sb % 8, mb % 8, kb % 9);
    for (int s = 0; s < 2; s++) {
        unsigned char out[64];
        CK_ULONG len = sizeof out;
        CK_OBJECT_HANDLE h = 0;
        CK_ULONG count;
        CK_ATTRIBUTE *t = pick_template(kb, &count);
        rv[s] = which ? list[s]->C_UnwrapKeyAuthenticated(pick_session(sb, s), pick_mechanism(mb), pick_key(kb, s), out, 24, t, count,
                                                          (CK_BYTE_PTR)message, 8, &h)
                      : list[s]->C_WrapKeyAuthenticated(pick_session(sb, s), pick_mechanism(mb), pick_key(kb, s), pick_key(kb / 9, s),
                                                        (CK_BYTE_PTR)message, 8, out, &len);
    }
    same_rv(rv);
}

static void (*const ops[])(Rd *) = {
    op_verify_signature_init, op_verify_signature, op_validation_flags, op_encapsulate, op_decapsulate, op_async, op_authenticated,
};

// MARK: libFuzzer

static void load(int s, const char *path) {
    void *library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!library) { fprintf(stderr, "p11fuzz32: %s\n", dlerror()); exit(2); }
    CK_C_GetInterface get = (CK_C_GetInterface)dlsym(library, "C_GetInterface");
    CK_INTERFACE_PTR chosen = NULL;
    if (!get || get((CK_UTF8CHAR_PTR)"PKCS 11", &(CK_VERSION){ 3, 2 }, &chosen, 0) != CKR_OK || !chosen) {
        fprintf(stderr, "p11fuzz32: %s offers no 'PKCS 11' 3.2 interface\n", path);
        exit(2);
    }
    list[s] = chosen->pFunctionList;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    const char *p11fork = getenv("P11FUZZ_P11FORK"), *nethsm = getenv("P11FUZZ_NETHSM"), *dir = getenv("P11FUZZ_DIR");
    if (!p11fork || !nethsm || !dir) { fprintf(stderr, "p11fuzz32: set P11FUZZ_P11FORK, P11FUZZ_NETHSM, P11FUZZ_DIR\n"); exit(2); }
    // A copy of the module's file: dlopen gives a second, separate instance for the direct side.
    char copy[4096], command[9000], server[4096];
    snprintf(copy, sizeof copy, "%s/nethsm-direct.so", dir);
    snprintf(command, sizeof command, "cp '%s' '%s'", nethsm, copy);
    if (system(command) != 0) { fprintf(stderr, "p11fuzz32: cannot copy %s\n", nethsm); exit(2); }
    setenv("NETHSM_PIN", PIN, 1);
    setenv("NETHSM_LABEL", "fuzz32", 1);
    setenv("P11FORK_MODULE", nethsm, 1);
    load(FORK, p11fork);
    load(DIRECT, copy);
    for (int s = 0; s < 2; s++) {
        snprintf(server, sizeof server, "%s/server-%s", dir, s == FORK ? "fork" : "direct");
        setenv("NETHSM_DIR", server, 1);  // read by the module's C_Initialize
        must(list[s]->C_Initialize(NULL), "C_Initialize", s);
        CK_ULONG n = 1;
        must(list[s]->C_GetSlotList(CK_TRUE, &slot[s], &n), "C_GetSlotList", s);
    }
    // The good signature, made once (HMAC-SHA256 is deterministic: the same on both sides).
    begin_input();
    CK_MECHANISM hmac = { CKM_SHA256_HMAC, NULL, 0 };
    CK_ULONG len = sizeof good_signature;
    must(list[DIRECT]->C_SignInit(side[DIRECT].session, &hmac, side[DIRECT].mac), "C_SignInit", DIRECT);
    must(list[DIRECT]->C_Sign(side[DIRECT].session, (CK_BYTE_PTR)message, 64, good_signature, &len), "C_Sign", DIRECT);
    end_input();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    begin_input();
    Rd r = { data, size, 0 };
    for (int calls = 0; r.i < r.n && calls < 64; calls++) {
        uint8_t op = rd(&r);
        call_name = NULL;
        call_args[0] = 0;
        ops[op % (sizeof ops / sizeof *ops)](&r);
    }
    end_input();
    return 0;
}
