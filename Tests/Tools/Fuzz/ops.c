// p11fuzz operations: one function per PKCS#11 call. Each builds its arguments from the input's
// bytes (the same choices on both sides; only handle values differ), makes the call on `side`,
// and registers what it gives back for harness.c to compare. Byte 0 is always the plain, valid
// choice; the other values are the hostile ones: NULL pointers, wrong and huge lengths, unknown,
// stale and wrong-kind handles, malformed templates and mechanism parameters.
#define _GNU_SOURCE
#include "p11fuzz.h"
#include "keys.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern int allow_lies;

// The function list of `side`; with P11FUZZ_VERBOSE, first says which call is about to be made
// (so that a crash report names it).
#define F announce(side)

static const CK_ULONG huge_values[] = { 0xFFFFFFFFUL, 0x100000000UL, 0x7FFFFFFFFFFFFFFFUL, ~0UL,
                                        0x80000000UL, 0x10001UL,     1UL << 40,            ~0UL - 15 };
static CK_ULONG huge(uint8_t b) { return huge_values[b % 8]; }

static CK_BBOOL false_value = CK_FALSE;

// Deterministic filler; data that may be secret starts with SECRET_MARK, which the trace must
// never show.
static void fill(uint8_t *p, size_t n, int secret) {
    for (size_t k = 0; k < n; k++) p[k] = (uint8_t)(0x41 + k * 7);
    if (secret && n >= 6) memcpy(p, SECRET_MARK, 6);
}

// MARK: byte arguments

enum { D_MSG, D_BLOCK, D_PREV, D_SEED };

// An input buffer and its length (pData/ulDataLen and the like).
static void data_in(Rd *r, int side, CK_BYTE_PTR *p, CK_ULONG *len, int kind, const char *name) {
    uint8_t b = rd_u8(r);
    size_t n = 32;
    *p = NULL;
    *len = 0;
    switch (b % 16) {
    case 1: {
        n = rd_u8(r);
        uint8_t *q = arena_alloc(side, n);
        rd_bytes(r, q, n);
        if (kind != D_PREV && n >= 6) memcpy(q, SECRET_MARK, 6);
        *p = q;
        *len = n;
        break;
    }
    case 2:
        goto previous;
    case 3: *len = 1 + rd_u8(r); break;
    case 4: *p = arena_alloc(side, 1); break;
    case 5: break;
    case 6: *len = huge(rd_u8(r)); break;
    case 7:
        n = 256 + rd_u16(r) % 8192;
        *p = arena_alloc(side, n);
        fill(*p, n, kind != D_PREV);
        *len = n;
        break;
    case 8: {
        static const int tweak[4] = { 0, 1, 15, 8 };
        n = 16 * (rd_u8(r) % 9) + tweak[rd_u8(r) % 4];
        *p = arena_alloc(side, n);
        fill(*p, n, kind != D_PREV);
        *len = n;
        break;
    }
    case 9:
        if (allow_lies) {
            // A length far past the buffer: only with P11FUZZ_LIES (SoftHSM reads what it is told).
            *p = arena_alloc(side, 16);
            *len = huge(rd_u8(r));
        } else {
            *len = huge(rd_u8(r));
        }
        break;
    case 10: {
        static const int sizes[6] = { 20, 28, 32, 48, 64, 35 };
        n = sizes[rd_u8(r) % 6];
        *p = arena_alloc(side, n);
        fill(*p, n, kind != D_PREV);
        *len = n;
        break;
    }
    case 11:
        n = rd_u8(r);
        *p = arena_alloc(side, n);
        fill(*p, n, kind != D_PREV);
        *len = n;
        break;
    default:
        if (kind == D_PREV) goto previous;
        n = kind == D_SEED ? 16 : 32;
        *p = arena_alloc(side, n);
        fill(*p, n, 1);
        *len = n;
        break;
    }
    if (side == FORK) note("%s=%s%lu", name, *p ? "" : "NULL/", *len);
    if (*p && *len <= 65536) reg(side, IT_INPUT, *p, NULL, *len, 0);
    return;
previous:
    if (!last_out_len[side] && !last_out_len[!side]) {
        n = 32;
        *p = arena_alloc(side, n);
        fill(*p, n, 0);
        *len = n;
    } else {
        *p = arena_dup(side, last_out[side], last_out_len[side]);
        *len = last_out_len[side];
        if (!last_out_same) raise_level(2);
    }
    if (side == FORK) note("%s=previous output/%lu%s", name, *len, last_out_same ? "" : "(differs)");
    if (*len <= 65536) reg(side, IT_INPUT, *p, NULL, *len, 0);
}

// An output buffer and its length pointer.
static void out_buf(Rd *r, int side, CK_BYTE_PTR *p, CK_ULONG_PTR *lenp, int flags, const char *name) {
    uint8_t b = rd_u8(r);
    size_t cap = 0;
    CK_ULONG want = 0;
    int has_len = 1;
    switch (b % 8) {
    case 0: cap = 4096; want = 4096; break;
    case 1: cap = 0; want = rd_u8(r) % 3 == 0 ? 0 : 4096; break;  // length query
    case 2: cap = 16; want = 0; break;
    case 3: want = rd_u8(r); cap = want; break;
    case 4: cap = 4096; has_len = 0; break;
    case 5: cap = 0; has_len = 0; break;
    case 6: cap = 65536; want = huge(rd_u8(r)); break;  // more room claimed than given: modules write what they need
    case 7: want = rd_u16(r) % 8192; cap = want; break;
    }
    *p = (b % 8 == 1 || b % 8 == 5) ? NULL : arena_alloc(side, cap ? cap : 1);
    if (*p) memset(*p, 0xa5, cap);
    *lenp = has_len ? arena_alloc(side, sizeof(CK_ULONG)) : NULL;
    if (*lenp) **lenp = want;
    if (side == FORK) note("%s=%s(room %lu)", name, *p ? "buf" : "NULL", has_len ? want : 0);
    reg(side, IT_OUTBUF, *p, *lenp, *p ? cap : 0, flags);
}

// A pointer/length pair inside a structure (an IV, AAD, shared data, a PIN...).
static void bytes_field(Rd *r, int side, void **p, CK_ULONG *len, size_t deflen, const void *defbytes) {
    uint8_t b = rd_u8(r);
    size_t n = deflen;
    *p = NULL;
    *len = 0;
    switch (b % 16) {
    case 1:
        n = rd_u8(r);
        *p = arena_alloc(side, n);
        rd_bytes(r, *p, n);
        *len = n;
        break;
    case 2: *len = deflen ? deflen : 12; break;
    case 3: *p = arena_alloc(side, 8); break;
    case 4: break;
    case 5: *len = huge(rd_u8(r)); break;
    case 6:
        n = deflen + 8;
        *p = arena_alloc(side, n);
        fill(*p, n, 0);
        *len = n;
        break;
    case 7:
        if (allow_lies) *p = arena_alloc(side, 16);
        *len = huge(rd_u8(r));
        break;
    case 8:
        n = 1024 + rd_u16(r) % 4096;
        *p = arena_alloc(side, n);
        fill(*p, n, 0);
        *len = n;
        break;
    case 9:
        n = 1 + rd_u8(r) % 4;
        *p = arena_alloc(side, n);
        fill(*p, n, 0);
        *len = n;
        break;
    default:
        if (!deflen) break;
        *p = arena_alloc(side, deflen);
        if (defbytes) memcpy(*p, defbytes, deflen);
        else fill(*p, deflen, 0);
        *len = deflen;
        break;
    }
    if (!*p && *len) C.null_field = 1;
    if (*p && *len <= 65536) reg(side, IT_INPUT, *p, NULL, *len, 0);
}

// MARK: mechanisms

enum {
    PK_NONE, PK_IV16, PK_IV8, PK_CTR, PK_GCM, PK_CCM, PK_KWIV, PK_OAEP, PK_PSS, PK_ECDH, PK_STR, PK_AESCBCDATA,
    PK_DESCBCDATA, PK_KEYHANDLE, PK_HKDF, PK_ULONG, PK_RAW
};

// Parameter structures as PKCS#11 lays them out (the fields the fuzzer fills by name).
typedef struct { void *pIv; CK_ULONG ulIvLen, ulIvBits; void *pAAD; CK_ULONG ulAADLen, ulTagBits; } FzGcm;
typedef struct { CK_ULONG ulDataLen; void *pNonce; CK_ULONG ulNonceLen; void *pAAD; CK_ULONG ulAADLen, ulMACLen; } FzCcm;
typedef struct { CK_ULONG hashAlg, mgf, source; void *pSourceData; CK_ULONG ulSourceDataLen; } FzOaep;
typedef struct { CK_ULONG hashAlg, mgf, sLen; } FzPss;
typedef struct { CK_ULONG ulCounterBits; uint8_t cb[16]; } FzCtr;
typedef struct { CK_ULONG kdf, ulSharedDataLen; void *pSharedData; CK_ULONG ulPublicDataLen; void *pPublicData; } FzEcdh;
typedef struct { void *pData; CK_ULONG ulLen; } FzStr;
typedef struct { uint8_t iv[16]; void *pData; CK_ULONG length; } FzAesCbcData;
typedef struct { uint8_t iv[8]; void *pData; CK_ULONG length; } FzDesCbcData;
typedef struct {
    CK_BBOOL bExtract, bExpand;
    CK_ULONG prfHashMechanism, ulSaltType;
    void *pSalt;
    CK_ULONG ulSaltLen;
    CK_OBJECT_HANDLE hSaltKey;
    void *pInfo;
    CK_ULONG ulInfoLen;
} FzHkdf;

#define B(u) (1u << (u))
#define RND_ENC 1   // encryption and wrapping give random output
#define RND_SIGN 2  // signatures are random

typedef struct {
    CK_MECHANISM_TYPE type;
    const char *name;
    unsigned usage;
    int pk;
    int key_pub, key_priv;  // token keys it is used with (public side: encrypt, verify, wrap)
    int rnd;
} Mech;

// The first mechanism of each use is the default one (a record with no argument bytes).
static const Mech mechs[] = {
    { CKM_AES_CBC_PAD, "CKM_AES_CBC_PAD", B(U_ENC) | B(U_DEC) | B(U_WRAP) | B(U_UNWRAP), PK_IV16, K_AES, K_AES, 0 },
    { CKM_SHA256, "CKM_SHA256", B(U_DIG), PK_NONE, -1, -1, 0 },
    { CKM_SHA256_RSA_PKCS, "CKM_SHA256_RSA_PKCS", B(U_SIGN) | B(U_VER), PK_NONE, K_RSA_PUB, K_RSA, 0 },
    { CKM_RSA_PKCS, "CKM_RSA_PKCS", B(U_SREC) | B(U_VREC) | B(U_ENC) | B(U_DEC) | B(U_SIGN) | B(U_VER) | B(U_WRAP) | B(U_UNWRAP),
      PK_NONE, K_RSA_PUB, K_RSA, RND_ENC },
    { CKM_AES_KEY_GEN, "CKM_AES_KEY_GEN", B(U_GEN), PK_NONE, -1, -1, 0 },
    { CKM_EC_KEY_PAIR_GEN, "CKM_EC_KEY_PAIR_GEN", B(U_GENPAIR), PK_NONE, -1, -1, 0 },
    { CKM_ECDH1_DERIVE, "CKM_ECDH1_DERIVE", B(U_DERIVE), PK_ECDH, K_EC, K_EC, 0 },
    { CKM_AES_ECB, "CKM_AES_ECB", B(U_ENC) | B(U_DEC) | B(U_WRAP) | B(U_UNWRAP), PK_NONE, K_AES, K_AES, 0 },
    { CKM_AES_CBC, "CKM_AES_CBC", B(U_ENC) | B(U_DEC) | B(U_WRAP) | B(U_UNWRAP), PK_IV16, K_AES, K_AES, 0 },
    { CKM_AES_CTR, "CKM_AES_CTR", B(U_ENC) | B(U_DEC), PK_CTR, K_AES, K_AES, 0 },
    { CKM_AES_GCM, "CKM_AES_GCM", B(U_ENC) | B(U_DEC), PK_GCM, K_AES, K_AES, 0 },
    { CKM_AES_CCM, "CKM_AES_CCM", B(U_ENC) | B(U_DEC), PK_CCM, K_AES, K_AES, 0 },
    { CKM_AES_KEY_WRAP, "CKM_AES_KEY_WRAP", B(U_WRAP) | B(U_UNWRAP) | B(U_ENC) | B(U_DEC), PK_KWIV, K_AES, K_AES, 0 },
    { CKM_AES_KEY_WRAP_PAD, "CKM_AES_KEY_WRAP_PAD", B(U_WRAP) | B(U_UNWRAP) | B(U_ENC) | B(U_DEC), PK_KWIV, K_AES, K_AES, 0 },
    { CKM_AES_CMAC, "CKM_AES_CMAC", B(U_SIGN) | B(U_VER), PK_NONE, K_AES, K_AES, 0 },
    { CKM_DES3_ECB, "CKM_DES3_ECB", B(U_ENC) | B(U_DEC), PK_NONE, K_DES3, K_DES3, 0 },
    { CKM_DES3_CBC, "CKM_DES3_CBC", B(U_ENC) | B(U_DEC) | B(U_WRAP), PK_IV8, K_DES3, K_DES3, 0 },
    { CKM_DES3_CBC_PAD, "CKM_DES3_CBC_PAD", B(U_ENC) | B(U_DEC), PK_IV8, K_DES3, K_DES3, 0 },
    { CKM_DES3_CMAC, "CKM_DES3_CMAC", B(U_SIGN) | B(U_VER), PK_NONE, K_DES3, K_DES3, 0 },
    { CKM_RSA_X_509, "CKM_RSA_X_509", B(U_ENC) | B(U_DEC) | B(U_SIGN) | B(U_VER), PK_NONE, K_RSA_PUB, K_RSA, 0 },
    { CKM_RSA_PKCS_OAEP, "CKM_RSA_PKCS_OAEP", B(U_ENC) | B(U_DEC) | B(U_WRAP) | B(U_UNWRAP), PK_OAEP, K_RSA_PUB, K_RSA, RND_ENC },
    { CKM_RSA_PKCS_PSS, "CKM_RSA_PKCS_PSS", B(U_SIGN) | B(U_VER), PK_PSS, K_RSA_PUB, K_RSA, RND_SIGN },
    { CKM_SHA256_RSA_PKCS_PSS, "CKM_SHA256_RSA_PKCS_PSS", B(U_SIGN) | B(U_VER), PK_PSS, K_RSA_PUB, K_RSA, RND_SIGN },
    { CKM_SHA1_RSA_PKCS, "CKM_SHA1_RSA_PKCS", B(U_SIGN) | B(U_VER), PK_NONE, K_RSA_PUB, K_RSA, 0 },
    { CKM_SHA512_RSA_PKCS, "CKM_SHA512_RSA_PKCS", B(U_SIGN) | B(U_VER), PK_NONE, K_RSA_PUB, K_RSA, 0 },
    { CKM_ECDSA, "CKM_ECDSA", B(U_SIGN) | B(U_VER), PK_NONE, K_EC_PUB, K_EC, RND_SIGN },
    { CKM_ECDSA_SHA256, "CKM_ECDSA_SHA256", B(U_SIGN) | B(U_VER), PK_NONE, K_EC_PUB, K_EC, RND_SIGN },
    { CKM_DSA, "CKM_DSA", B(U_SIGN) | B(U_VER), PK_NONE, -1, -1, RND_SIGN },
    { 0x1057 /* CKM_EDDSA */, "CKM_EDDSA", B(U_SIGN) | B(U_VER), PK_NONE, K_EC_PUB, K_EC, 0 },
    { CKM_SHA256_HMAC, "CKM_SHA256_HMAC", B(U_SIGN) | B(U_VER), PK_NONE, K_HMAC, K_HMAC, 0 },
    { CKM_SHA_1_HMAC, "CKM_SHA_1_HMAC", B(U_SIGN) | B(U_VER), PK_NONE, K_HMAC, K_HMAC, 0 },
    { CKM_SHA512_HMAC, "CKM_SHA512_HMAC", B(U_SIGN) | B(U_VER), PK_NONE, K_HMAC, K_HMAC, 0 },
    { CKM_SHA256_HMAC_GENERAL, "CKM_SHA256_HMAC_GENERAL", B(U_SIGN) | B(U_VER), PK_ULONG, K_HMAC, K_HMAC, 0 },
    { CKM_SHA_1, "CKM_SHA_1", B(U_DIG), PK_NONE, -1, -1, 0 },
    { CKM_SHA224, "CKM_SHA224", B(U_DIG), PK_NONE, -1, -1, 0 },
    { CKM_SHA384, "CKM_SHA384", B(U_DIG), PK_NONE, -1, -1, 0 },
    { CKM_SHA512, "CKM_SHA512", B(U_DIG), PK_NONE, -1, -1, 0 },
    { CKM_MD5, "CKM_MD5", B(U_DIG), PK_NONE, -1, -1, 0 },
    { CKM_GENERIC_SECRET_KEY_GEN, "CKM_GENERIC_SECRET_KEY_GEN", B(U_GEN), PK_NONE, -1, -1, 0 },
    { CKM_DES3_KEY_GEN, "CKM_DES3_KEY_GEN", B(U_GEN), PK_NONE, -1, -1, 0 },
    { CKM_DSA_PARAMETER_GEN, "CKM_DSA_PARAMETER_GEN", B(U_GEN), PK_NONE, -1, -1, 0 },
    { CKM_DH_PKCS_PARAMETER_GEN, "CKM_DH_PKCS_PARAMETER_GEN", B(U_GEN), PK_NONE, -1, -1, 0 },
    { CKM_RSA_PKCS_KEY_PAIR_GEN, "CKM_RSA_PKCS_KEY_PAIR_GEN", B(U_GENPAIR), PK_NONE, -1, -1, 0 },
    { 0x1055 /* CKM_EC_EDWARDS_KEY_PAIR_GEN */, "CKM_EC_EDWARDS_KEY_PAIR_GEN", B(U_GENPAIR), PK_NONE, -1, -1, 0 },
    { CKM_DSA_KEY_PAIR_GEN, "CKM_DSA_KEY_PAIR_GEN", B(U_GENPAIR), PK_NONE, -1, -1, 0 },
    { CKM_DH_PKCS_KEY_PAIR_GEN, "CKM_DH_PKCS_KEY_PAIR_GEN", B(U_GENPAIR), PK_NONE, -1, -1, 0 },
    { CKM_ECDH1_COFACTOR_DERIVE, "CKM_ECDH1_COFACTOR_DERIVE", B(U_DERIVE), PK_ECDH, K_EC, K_EC, 0 },
    { CKM_AES_ECB_ENCRYPT_DATA, "CKM_AES_ECB_ENCRYPT_DATA", B(U_DERIVE), PK_STR, K_AES, K_AES, 0 },
    { CKM_AES_CBC_ENCRYPT_DATA, "CKM_AES_CBC_ENCRYPT_DATA", B(U_DERIVE), PK_AESCBCDATA, K_AES, K_AES, 0 },
    { CKM_DES3_ECB_ENCRYPT_DATA, "CKM_DES3_ECB_ENCRYPT_DATA", B(U_DERIVE), PK_STR, K_DES3, K_DES3, 0 },
    { CKM_DES3_CBC_ENCRYPT_DATA, "CKM_DES3_CBC_ENCRYPT_DATA", B(U_DERIVE), PK_DESCBCDATA, K_DES3, K_DES3, 0 },
    { CKM_CONCATENATE_BASE_AND_DATA, "CKM_CONCATENATE_BASE_AND_DATA", B(U_DERIVE), PK_STR, K_HMAC, K_HMAC, 0 },
    { CKM_CONCATENATE_DATA_AND_BASE, "CKM_CONCATENATE_DATA_AND_BASE", B(U_DERIVE), PK_STR, K_HMAC, K_HMAC, 0 },
    { CKM_XOR_BASE_AND_DATA, "CKM_XOR_BASE_AND_DATA", B(U_DERIVE), PK_STR, K_HMAC, K_HMAC, 0 },
    { CKM_CONCATENATE_BASE_AND_KEY, "CKM_CONCATENATE_BASE_AND_KEY", B(U_DERIVE), PK_KEYHANDLE, K_HMAC, K_HMAC, 0 },
    { 0x402a /* CKM_HKDF_DERIVE */, "CKM_HKDF_DERIVE", B(U_DERIVE), PK_HKDF, K_HMAC, K_HMAC, 0 },
    { CKM_SHA256_KEY_DERIVATION, "CKM_SHA256_KEY_DERIVATION", B(U_DERIVE), PK_NONE, K_HMAC, K_HMAC, 0 },
    { CKM_ECMQV_DERIVE, "CKM_ECMQV_DERIVE", B(U_DERIVE), PK_RAW, K_EC, K_EC, 0 },
};
static const int nmechs = sizeof mechs / sizeof *mechs;

static const char *mech_name(CK_MECHANISM_TYPE t) {
    for (int k = 0; k < nmechs; k++)
        if (mechs[k].type == t) return mechs[k].name;
    static char hex[4][24];
    static int next;
    char *out = hex[next++ % 4];
    snprintf(out, 24, "0x%lx", t);
    return out;
}

static const uint8_t ec_p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
static const uint8_t ec_p384[] = { 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22 };
static const uint8_t ec_ed25519[] = { 0x06, 0x03, 0x2b, 0x65, 0x70 };
static const uint8_t ec_ed_name[] = { 0x13, 0x0c, 'e', 'd', 'w', 'a', 'r', 'd', 's', '2', '5', '5', '1', '9' };

static void param_for(Rd *r, int side, int pk, CK_MECHANISM_TYPE type, CK_MECHANISM *m) {
    void *s = NULL;
    size_t size = 0;
    switch (pk) {
    case PK_NONE: break;
    case PK_IV16:
    case PK_IV8:
        size = pk == PK_IV16 ? 16 : 8;
        s = arena_alloc(side, size);
        rd_bytes(r, s, size);
        break;
    case PK_KWIV:
        if (rd_u8(r) & 1) {
            size = 8;
            s = arena_alloc(side, size);
            rd_bytes(r, s, size);
        }
        break;
    case PK_CTR: {
        FzCtr *c = arena_alloc(side, size = sizeof *c);
        static const CK_ULONG bits[8] = { 128, 0, 129, 64, 1, 32, 127, 0xFFFFFFFFUL };
        c->ulCounterBits = bits[rd_u8(r) % 8];
        rd_bytes(r, c->cb, 16);
        s = c;
        break;
    }
    case PK_GCM: {
        FzGcm *g = arena_alloc(side, size = sizeof *g);
        static const uint8_t iv[13] = "p11fuzz-iv12";
        bytes_field(r, side, &g->pIv, &g->ulIvLen, 12, iv);
        uint8_t b = rd_u8(r);
        g->ulIvBits = b % 4 == 0 ? g->ulIvLen * 8 : b % 4 == 1 ? 0 : b % 4 == 2 ? huge(b) : 96;
        bytes_field(r, side, &g->pAAD, &g->ulAADLen, 0, NULL);
        static const CK_ULONG tags[8] = { 128, 96, 0, 7, 129, 64, 120, 0xFFFFFFFFFFFFFFFFUL };
        g->ulTagBits = tags[rd_u8(r) % 8];
        s = g;
        break;
    }
    case PK_CCM: {
        FzCcm *c = arena_alloc(side, size = sizeof *c);
        c->ulDataLen = rd_u8(r);
        bytes_field(r, side, &c->pNonce, &c->ulNonceLen, 12, NULL);
        bytes_field(r, side, &c->pAAD, &c->ulAADLen, 0, NULL);
        static const CK_ULONG macs[6] = { 16, 0, 3, 17, 8, ~0UL };
        c->ulMACLen = macs[rd_u8(r) % 6];
        s = c;
        break;
    }
    case PK_OAEP: {
        FzOaep *o = arena_alloc(side, size = sizeof *o);
        static const CK_ULONG hashes[6] = { CKM_SHA_1, CKM_SHA256, CKM_SHA512, CKM_MD5, 0x7fff, ~0UL };
        static const CK_ULONG mgfs[6] = { CKG_MGF1_SHA1, CKG_MGF1_SHA256, 0, 99, CKG_MGF1_SHA512, ~0UL };
        uint8_t b = rd_u8(r);
        o->hashAlg = hashes[b % 6];
        o->mgf = mgfs[(b / 6) % 6];
        o->source = rd_u8(r) % 4 == 3 ? 2 : 1;
        if ((b & 0x80) == 0 && o->hashAlg == CKM_SHA256) o->mgf = CKG_MGF1_SHA256;
        bytes_field(r, side, &o->pSourceData, &o->ulSourceDataLen, 0, NULL);
        s = o;
        break;
    }
    case PK_PSS: {
        FzPss *p = arena_alloc(side, size = sizeof *p);
        static const CK_ULONG hashes[4] = { CKM_SHA256, CKM_SHA_1, CKM_SHA512, 0x7fff };
        static const CK_ULONG mgfs[4] = { CKG_MGF1_SHA256, CKG_MGF1_SHA1, 0, 99 };
        static const CK_ULONG slens[6] = { 32, 0, 20, 1000, 0xFFFFFFFFFFFFFFFFUL, 64 };
        uint8_t b = rd_u8(r);
        p->hashAlg = hashes[b % 4];
        p->mgf = mgfs[(b / 4) % 4];
        p->sLen = slens[(b / 16) % 6];
        s = p;
        break;
    }
    case PK_ECDH: {
        FzEcdh *e = arena_alloc(side, size = sizeof *e);
        static const CK_ULONG kdfs[6] = { CKD_NULL, CKD_SHA1_KDF, 0, 99, CKD_SHA256_KDF, ~0UL };
        e->kdf = kdfs[rd_u8(r) % 6];
        bytes_field(r, side, &e->pSharedData, &e->ulSharedDataLen, 0, NULL);
        uint8_t b = rd_u8(r);
        if (b % 4 == 1) {
            // The point wrapped in its DER OCTET STRING (some modules take either form).
            e->pPublicData = arena_dup(side, ec_point_der, sizeof ec_point_der);
            e->ulPublicDataLen = sizeof ec_point_der;
            reg(side, IT_INPUT, e->pPublicData, NULL, e->ulPublicDataLen, 0);
        } else if (b % 4 == 2) {
            bytes_field(r, side, &e->pPublicData, &e->ulPublicDataLen, 65, ec_point_der + 2);
        } else {
            e->pPublicData = arena_dup(side, ec_point_der + 2, sizeof ec_point_der - 2);
            e->ulPublicDataLen = sizeof ec_point_der - 2;
            reg(side, IT_INPUT, e->pPublicData, NULL, e->ulPublicDataLen, 0);
        }
        s = e;
        break;
    }
    case PK_STR: {
        FzStr *d = arena_alloc(side, size = sizeof *d);
        size_t n = type == CKM_DES3_ECB_ENCRYPT_DATA ? 16 : 32;
        bytes_field(r, side, &d->pData, &d->ulLen, n, NULL);
        s = d;
        break;
    }
    case PK_AESCBCDATA: {
        FzAesCbcData *d = arena_alloc(side, size = sizeof *d);
        rd_bytes(r, d->iv, 16);
        bytes_field(r, side, &d->pData, &d->length, 32, NULL);
        s = d;
        break;
    }
    case PK_DESCBCDATA: {
        FzDesCbcData *d = arena_alloc(side, size = sizeof *d);
        rd_bytes(r, d->iv, 8);
        bytes_field(r, side, &d->pData, &d->length, 16, NULL);
        s = d;
        break;
    }
    case PK_KEYHANDLE: {
        CK_OBJECT_HANDLE *h = arena_alloc(side, size = sizeof *h);
        *h = pick_object(r, side, K_AES_OPEN);
        s = h;
        break;
    }
    case PK_HKDF: {
        FzHkdf *h = arena_alloc(side, size = sizeof *h);
        uint8_t b = rd_u8(r);
        h->bExtract = !(b & 1);
        h->bExpand = !(b & 2);
        static const CK_ULONG prfs[4] = { CKM_SHA256, CKM_SHA_1, 0, CKM_SHA512 };
        h->prfHashMechanism = prfs[(b >> 2) % 4];
        static const CK_ULONG salts[5] = { 2 /* data */, 1 /* null */, 3 /* key */, 0, 9 };
        h->ulSaltType = salts[(b >> 4) % 5];
        bytes_field(r, side, &h->pSalt, &h->ulSaltLen, 16, NULL);
        h->hSaltKey = (b & 0x80) ? pick_object(r, side, K_HMAC) : CK_INVALID_HANDLE;
        bytes_field(r, side, &h->pInfo, &h->ulInfoLen, 8, NULL);
        s = h;
        break;
    }
    case PK_ULONG: {
        CK_ULONG *v = arena_alloc(side, size = sizeof *v);
        static const CK_ULONG lens[6] = { 16, 32, 0, 65, 0xFFFFFFFFUL, 8 };
        *v = lens[rd_u8(r) % 6];
        s = v;
        break;
    }
    case PK_RAW:
        size = rd_u8(r) % 96;
        s = arena_alloc(side, size);
        rd_bytes(r, s, size);
        break;
    }
    // The structure itself: its length, or no structure at all.
    uint8_t b = rd_u8(r);
    m->pParameter = size ? s : NULL;
    m->ulParameterLen = size;
    switch (b % 16) {
    case 1:
        if (size) m->ulParameterLen = size - 1;
        else { m->pParameter = arena_alloc(side, 8); m->ulParameterLen = 8; }
        break;
    case 2: {
        void *bigger = arena_alloc(side, size + 8);
        if (size) memcpy(bigger, s, size);
        m->pParameter = bigger;
        m->ulParameterLen = size + 8;
        break;
    }
    case 3: m->pParameter = size ? s : arena_alloc(side, 8); m->ulParameterLen = 0; break;
    case 4: m->pParameter = NULL; m->ulParameterLen = size ? size : 16; break;
    case 5: m->pParameter = NULL; m->ulParameterLen = 0; break;
    case 6: m->pParameter = size ? s : arena_alloc(side, 8); m->ulParameterLen = 1; break;
    case 7: m->pParameter = NULL; m->ulParameterLen = huge(rd_u8(r)); break;
    case 8:
        if (allow_lies) {
            m->pParameter = size ? s : arena_alloc(side, 8);
        } else {
            m->pParameter = NULL;
        }
        m->ulParameterLen = huge(rd_u8(r));
        break;
    default: break;
    }
    if (m->pParameter && m->ulParameterLen && m->ulParameterLen <= size)
        reg(side, IT_INPUT, m->pParameter, NULL, m->ulParameterLen, 0);
    if (side == FORK && (b % 16) && (b % 16) < 9) note("param=%s%lu", m->pParameter ? "" : "NULL/", m->ulParameterLen);
}

// Picks a mechanism: bytes below 0x80 one made for `usage` (0: the usual one), 0x80-0xEF any in
// the table, 0xF0-0xFE a type no module knows, 0xFF a NULL mechanism. Returns its table entry
// (NULL for an unknown type or none).
static const Mech *pick_mech(Rd *r, int side, int usage, CK_MECHANISM_PTR *out) {
    uint8_t b = rd_u8(r);
    const Mech *m = NULL;
    CK_MECHANISM_TYPE type = 0;
    if (b == 0xFF) {
        *out = NULL;
        if (side == FORK) note("mech=NULL");
        return NULL;
    }
    if (b < 0x80) {
        int n = 0;
        for (int k = 0; k < nmechs; k++) n += (mechs[k].usage & B(usage)) != 0;
        int want = b % n;
        for (int k = 0; k < nmechs; k++)
            if ((mechs[k].usage & B(usage)) && want-- == 0) { m = &mechs[k]; break; }
    } else if (b < 0xF0) {
        m = &mechs[(b - 0x80) % nmechs];  // any mechanism, whatever its use
    } else {
        static const CK_MECHANISM_TYPE odd[4] = { 0x7fffffffUL, ~0UL, CKM_VENDOR_DEFINED | 0x1234, 0x1234 };
        type = b & 4 ? (CKM_VENDOR_DEFINED | rd_u16(r)) : odd[b % 4];
    }
    if (m) type = m->type;
    CK_MECHANISM *mp = arena_alloc(side, sizeof *mp);
    mp->mechanism = type;
    if (side == FORK) note("mech=%s", mech_name(type));
    C.null_field = 0;
    param_for(r, side, m ? m->pk : PK_RAW, type, mp);
    // SoftHSM 2.6.1 copies the buffers inside the parameters of the mechanisms it implements
    // without looking at the pointers: a NULL one with a length crashes it (seen: the IV of
    // CKM_AES_GCM). Such calls are not made; the same parameters with mechanisms SoftHSM
    // refuses by type still are.
    if (C.null_field && mp->pParameter) {
        static const CK_MECHANISM_TYPE derefs[] = { CKM_AES_GCM, CKM_RSA_PKCS_OAEP, CKM_ECDH1_DERIVE, CKM_AES_ECB_ENCRYPT_DATA,
                                                    CKM_DES3_ECB_ENCRYPT_DATA, CKM_AES_CBC_ENCRYPT_DATA, CKM_DES3_CBC_ENCRYPT_DATA,
                                                    CKM_DES_ECB_ENCRYPT_DATA, CKM_DES_CBC_ENCRYPT_DATA };
        for (size_t k = 0; k < sizeof derefs / sizeof *derefs; k++)
            if (derefs[k] == type) C.param_crashes_softhsm = 1;
    }
    *out = mp;
    return m;
}

// MARK: templates

enum { V_BOOL, V_FALSE, V_CLASS, V_KEYTYPE, V_VALUELEN, V_MODBITS, V_PRIMEBITS, V_PUBEXP, V_ECPARAMS, V_ECPOINT, V_KEYBYTES,
       V_BYTES, V_LABEL, V_DATE, V_NESTED, V_MECHS };

static const struct { CK_ATTRIBUTE_TYPE type; int vk; } attr_types[] = {
    { CKA_CLASS, V_CLASS }, { CKA_KEY_TYPE, V_KEYTYPE }, { CKA_TOKEN, V_FALSE }, { CKA_PRIVATE, V_BOOL },
    { CKA_LABEL, V_LABEL }, { CKA_ID, V_BYTES }, { CKA_VALUE, V_KEYBYTES }, { CKA_VALUE_LEN, V_VALUELEN },
    { CKA_SENSITIVE, V_BOOL }, { CKA_EXTRACTABLE, V_BOOL }, { CKA_ENCRYPT, V_BOOL }, { CKA_DECRYPT, V_BOOL },
    { CKA_SIGN, V_BOOL }, { CKA_VERIFY, V_BOOL }, { CKA_WRAP, V_BOOL }, { CKA_UNWRAP, V_BOOL }, { CKA_DERIVE, V_BOOL },
    { CKA_MODULUS_BITS, V_MODBITS }, { CKA_PUBLIC_EXPONENT, V_PUBEXP }, { CKA_MODULUS, V_BYTES },
    { CKA_PRIVATE_EXPONENT, V_KEYBYTES }, { CKA_EC_PARAMS, V_ECPARAMS }, { CKA_EC_POINT, V_ECPOINT },
    { CKA_WRAP_TEMPLATE, V_NESTED }, { CKA_UNWRAP_TEMPLATE, V_NESTED }, { CKA_DERIVE_TEMPLATE, V_NESTED },
    { CKA_ALWAYS_AUTHENTICATE, V_BOOL }, { CKA_MODIFIABLE, V_BOOL }, { CKA_COPYABLE, V_BOOL },
    { CKA_DESTROYABLE, V_BOOL }, { CKA_WRAP_WITH_TRUSTED, V_BOOL }, { CKA_TRUSTED, V_BOOL }, { CKA_START_DATE, V_DATE },
    { CKA_APPLICATION, V_LABEL }, { CKA_OBJECT_ID, V_BYTES }, { CKA_CHECK_VALUE, V_BYTES }, { 0x4 /* CKA_UNIQUE_ID */, V_BYTES },
    { CKA_PRIME_BITS, V_PRIMEBITS }, { CKA_ALLOWED_MECHANISMS, V_MECHS }, { CKA_LOCAL, V_BOOL },
    { CKA_SIGN_RECOVER, V_BOOL }, { CKA_VERIFY_RECOVER, V_BOOL }, { CKA_VENDOR_DEFINED | 1, V_BYTES }, { 0x7fff1234, V_BYTES },
};
static const int nattr_types = sizeof attr_types / sizeof *attr_types;

static void attribute(Rd *r, int side, CK_ATTRIBUTE *a, int depth);

// The attribute's well-formed value; returns its length.
static size_t attr_value(Rd *r, int side, int vk, uint8_t **out, int depth) {
    uint8_t b = rd_u8(r);
    uint8_t *v = NULL;
    size_t n = 0;
#define ULONG_VALUE(x) do { n = sizeof(CK_ULONG); v = arena_alloc(side, n); *(CK_ULONG *)v = (x); } while (0)
    switch (vk) {
    case V_BOOL: n = 1; v = arena_alloc(side, 1); *v = b & 1; break;
    case V_FALSE: n = 1; v = arena_alloc(side, 1); break;  // never a token object: the token stays as made
    case V_CLASS: {
        static const CK_ULONG c[7] = { CKO_SECRET_KEY, CKO_PRIVATE_KEY, CKO_PUBLIC_KEY, CKO_DATA, CKO_CERTIFICATE, 99, ~0UL };
        ULONG_VALUE(c[b % 7]);
        break;
    }
    case V_KEYTYPE: {
        static const CK_ULONG t[8] = { CKK_AES, CKK_RSA, CKK_EC, CKK_GENERIC_SECRET, CKK_DES3, CKK_DSA, CKK_DH, 0x7777 };
        ULONG_VALUE(t[b % 8]);
        break;
    }
    case V_VALUELEN: {
        static const CK_ULONG l[10] = { 32, 16, 24, 0, 1, 64, 4096, ~0UL, 1UL << 40, 17 };
        ULONG_VALUE(l[b % 10]);
        break;
    }
    case V_MODBITS: {
        // Only small valid sizes: a 16384-bit key would take minutes to make on each side.
        static const CK_ULONG m[6] = { 512, 1024, 0, 1, 16385, ~0UL };
        ULONG_VALUE(m[b % 6]);
        break;
    }
    case V_PRIMEBITS: {
        // Only invalid sizes: making DSA or DH domain parameters takes seconds.
        static const CK_ULONG p[4] = { 0, 1, ~0UL, 100000 };
        ULONG_VALUE(p[b % 4]);
        break;
    }
    case V_PUBEXP: {
        static const uint8_t e3[] = { 3 }, e65537[] = { 1, 0, 1 }, big[9] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
        const uint8_t *src = b % 4 == 0 ? e65537 : b % 4 == 1 ? e3 : b % 4 == 2 ? big : e65537;
        n = b % 4 == 0 ? 3 : b % 4 == 1 ? 1 : b % 4 == 2 ? 9 : 0;
        v = arena_dup(side, src, n ? n : 1);
        break;
    }
    case V_ECPARAMS: {
        const uint8_t *src = ec_p256;
        n = sizeof ec_p256;
        switch (b % 6) {
        case 1: src = ec_p384; n = sizeof ec_p384; break;
        case 2: src = ec_ed25519; n = sizeof ec_ed25519; break;
        case 3: src = ec_ed_name; n = sizeof ec_ed_name; break;
        case 4:
            n = rd_u8(r) % 24;
            v = arena_alloc(side, n + 1);
            rd_bytes(r, v, n);
            for (size_t k = 1; k < n; k++) v[k] |= 0x80;  // shown by a full trace: see V_BYTES
            break;
        }
        if (!v) v = arena_dup(side, src, n);
        break;
    }
    case V_ECPOINT:
        if (b % 3 == 0) { n = sizeof ec_point_der; v = arena_dup(side, ec_point_der, n); }
        else if (b % 3 == 1) { n = sizeof ec_point_der - 2; v = arena_dup(side, ec_point_der + 2, n); }
        else {
            n = rd_u8(r) % 80;
            v = arena_alloc(side, n + 1);
            rd_bytes(r, v, n);
            for (size_t k = 1; k < n; k++) v[k] |= 0x80;
        }
        break;
    case V_KEYBYTES: {
        static const size_t l[6] = { 32, 16, 24, 8, 0, 33 };
        n = l[b % 6];
        v = arena_alloc(side, n + 1);
        rd_bytes(r, v, n);
        if (n >= 6) memcpy(v, SECRET_MARK, 6);
        break;
    }
    case V_BYTES:
        // Values a full trace may show (IDs and the like): high bit set, so that no byte of them
        // spells a secret marker.
        n = b % 40;
        v = arena_alloc(side, n + 1);
        rd_bytes(r, v, n);
        for (size_t k = 0; k < n; k++) v[k] |= 0x80;
        break;
    case V_LABEL: {
        static const char *const labels[7] = { "made", "copy", "aes", "rsa", "", "a label that is longer than 32 chars", ("\xc3\xbcnic\xc3\xb8" "de") };
        const char *l = labels[b % 7];
        n = strlen(l);
        v = arena_dup(side, l, n + 1);
        break;
    }
    case V_DATE:
        n = 8;
        v = arena_dup(side, b & 1 ? "20240229" : "99999999", 8);
        break;
    case V_NESTED: {
        size_t k = depth < 2 ? b % 4 : 0;
        CK_ATTRIBUTE *inner = arena_alloc(side, (k ? k : 1) * sizeof *inner);
        for (size_t i = 0; i < k; i++) attribute(r, side, &inner[i], depth + 1);
        v = (uint8_t *)inner;
        n = k * sizeof *inner;
        break;
    }
    case V_MECHS: {
        size_t k = 1 + b % 3;
        CK_MECHANISM_TYPE *t = arena_alloc(side, k * sizeof *t);
        for (size_t i = 0; i < k; i++) t[i] = mechs[rd_u8(r) % nmechs].type;
        v = (uint8_t *)t;
        n = k * sizeof *t;
        break;
    }
    }
#undef ULONG_VALUE
    *out = v;
    return n;
}

static void attribute(Rd *r, int side, CK_ATTRIBUTE *a, int depth) {
    int t = rd_u8(r) % nattr_types;
    uint8_t form = rd_u8(r);
    a->type = attr_types[t].type;
    uint8_t *v;
    size_t n = attr_value(r, side, attr_types[t].vk, &v, depth);
    a->pValue = v;
    a->ulValueLen = n;
    switch (form % 16) {
    case 1: a->pValue = NULL; break;
    case 2: a->ulValueLen = 0; break;
    case 3: {
        // The wrong size for the type (a CK_BBOOL given 8 bytes, a CK_ULONG 4, a template one
        // byte more than its attributes).
        size_t wrong = n == 1 ? 8 : n == sizeof(CK_ULONG) ? 4 : n + 1;
        uint8_t *w = arena_alloc(side, wrong > n ? wrong : n);
        if (n) memcpy(w, v, n);
        a->pValue = w;
        a->ulValueLen = wrong;
        break;
    }
    case 4: a->pValue = NULL; a->ulValueLen = huge(form); break;
    case 5:
        if (!allow_lies) a->pValue = NULL;
        a->ulValueLen = huge(form);
        break;
    case 6: if (n) a->ulValueLen = n - 1; break;
    default: break;
    }
}

enum { T_CREATE, T_FIND, T_SET, T_GEN, T_PUB, T_PRIV, T_UNWRAP, T_DERIVE, T_COPY };

// The default templates, for the purpose and the mechanism.
static CK_ULONG default_template(int side, int purpose, CK_MECHANISM_TYPE mech, uint8_t variant, CK_ATTRIBUTE *t) {
    static CK_OBJECT_CLASS secret = CKO_SECRET_KEY, data = CKO_DATA, pub = CKO_PUBLIC_KEY;
    static CK_KEY_TYPE aes = CKK_AES, generic = CKK_GENERIC_SECRET, ec = CKK_EC;
    static CK_BBOOL yes = CK_TRUE;
    static CK_ULONG len32 = 32, len16 = 16, bits512 = 512;
    static const uint8_t e65537[] = { 1, 0, 1 };
    CK_ULONG n = 0;
    // Values are copied for each side, so that a write into one side's template shows.
#define A(ty, pv, ln) (t[n].type = (ty), t[n].pValue = arena_dup(side, (pv), (ln) ? (ln) : 1), t[n].ulValueLen = (ln), n++)
    switch (purpose) {
    case T_CREATE:
        switch (variant % 4) {
        case 0: {
            uint8_t *key = arena_alloc(side, 32);
            fill(key, 32, 1);
            A(CKA_CLASS, &secret, sizeof secret); A(CKA_KEY_TYPE, &aes, sizeof aes); A(CKA_VALUE, key, 32);
            A(CKA_ENCRYPT, &yes, 1); A(CKA_DECRYPT, &yes, 1); A(CKA_SIGN, &yes, 1); A(CKA_WRAP, &yes, 1);
            A(CKA_UNWRAP, &yes, 1); A(CKA_EXTRACTABLE, &yes, 1); A(CKA_LABEL, "made", 4);
            break;
        }
        case 1: {
            uint8_t *val = arena_alloc(side, 24);
            fill(val, 24, 1);
            A(CKA_CLASS, &data, sizeof data); A(CKA_VALUE, val, 24); A(CKA_LABEL, "made", 4);
            break;
        }
        case 2:
            A(CKA_CLASS, &pub, sizeof pub); A(CKA_KEY_TYPE, &ec, sizeof ec); A(CKA_EC_PARAMS, ec_p256, sizeof ec_p256);
            A(CKA_EC_POINT, ec_point_der, sizeof ec_point_der); A(CKA_VERIFY, &yes, 1);
            break;
        default: {
            uint8_t *key = arena_alloc(side, 32);
            fill(key, 32, 1);
            A(CKA_CLASS, &secret, sizeof secret); A(CKA_KEY_TYPE, &generic, sizeof generic); A(CKA_VALUE, key, 32);
            A(CKA_DERIVE, &yes, 1); A(CKA_SIGN, &yes, 1); A(CKA_VERIFY, &yes, 1);
            break;
        }
        }
        break;
    case T_FIND:
        switch (variant % 3) {
        case 1: A(CKA_CLASS, &secret, sizeof secret); break;
        case 2: A(CKA_LABEL, "aes", 3); break;
        }
        break;
    case T_SET: A(CKA_LABEL, "renamed", 7); break;
    case T_GEN:
        if (mech == CKM_AES_KEY_GEN || mech == CKM_GENERIC_SECRET_KEY_GEN) { A(CKA_VALUE_LEN, &len32, sizeof len32); }
        A(CKA_ENCRYPT, &yes, 1); A(CKA_DECRYPT, &yes, 1); A(CKA_EXTRACTABLE, &yes, 1);
        if (mech == CKM_GENERIC_SECRET_KEY_GEN) { A(CKA_DERIVE, &yes, 1); A(CKA_SIGN, &yes, 1); }
        break;
    case T_PUB:
        if (mech == CKM_RSA_PKCS_KEY_PAIR_GEN) { A(CKA_MODULUS_BITS, &bits512, sizeof bits512); A(CKA_PUBLIC_EXPONENT, e65537, 3); }
        else if (mech == 0x1055) { A(CKA_EC_PARAMS, ec_ed25519, sizeof ec_ed25519); }
        else { A(CKA_EC_PARAMS, ec_p256, sizeof ec_p256); }
        A(CKA_VERIFY, &yes, 1); A(CKA_ENCRYPT, &yes, 1);
        break;
    case T_PRIV:
        A(CKA_SIGN, &yes, 1); A(CKA_DERIVE, &yes, 1); A(CKA_EXTRACTABLE, &yes, 1);
        break;
    case T_UNWRAP:
        A(CKA_CLASS, &secret, sizeof secret); A(CKA_KEY_TYPE, &aes, sizeof aes); A(CKA_ENCRYPT, &yes, 1);
        A(CKA_EXTRACTABLE, &yes, 1);
        break;
    case T_DERIVE:
        A(CKA_CLASS, &secret, sizeof secret); A(CKA_KEY_TYPE, &generic, sizeof generic);
        A(CKA_VALUE_LEN, mech == CKM_AES_ECB_ENCRYPT_DATA ? &len16 : &len32, sizeof len32);
        A(CKA_EXTRACTABLE, &yes, 1); A(CKA_SENSITIVE, &false_value, 1); A(CKA_SIGN, &yes, 1); A(CKA_VERIFY, &yes, 1);
        break;
    case T_COPY: A(CKA_LABEL, "copy", 4); break;
    }
#undef A
    return n;
}

// An input template: the default one, the default with extra attributes, random attributes, or
// a NULL pointer with a count.
static CK_ATTRIBUTE *template_in(Rd *r, int side, int purpose, CK_MECHANISM_TYPE mech, CK_ULONG *count, const char *name) {
    uint8_t b = rd_u8(r);
    CK_ATTRIBUTE *t = NULL;
    *count = 0;
    if (b & 0x80) {
        *count = b == 0xFF ? huge(rd_u8(r)) : (b & 0x7f) % 9;
        if (side == FORK) note("%s=NULL/%lu", name, *count);
        return NULL;
    }
    t = arena_alloc(side, 24 * sizeof *t);
    CK_ULONG n = 0;
    if (b < 0x40) n = default_template(side, purpose, mech, rd_u8(r), t);
    if (b) {
        CK_ULONG extra = 1 + b % 8;
        for (CK_ULONG k = 0; k < extra && n < 24; k++) attribute(r, side, &t[n++], 0);
    }
    *count = n;
    if (side == FORK) note("%s=%lu attrs%s", name, n, b ? "" : "(default)");
    if (n == 0 && purpose == T_FIND && (rd_u8(r) & 1)) t = NULL;
    reg(side, IT_TEMPLATE_IN, t, NULL, n, 0);
    return t;
}

// C_GetAttributeValue's template: buffers of chosen sizes, or length queries.
static CK_ATTRIBUTE *template_out(Rd *r, int side, CK_ULONG *count) {
    uint8_t b = rd_u8(r);
    if (b & 0x80) {
        *count = b == 0xFF ? huge(rd_u8(r)) : b & 0x7f;
        if (side == FORK) note("template=NULL/%lu", *count);
        return NULL;
    }
    static const CK_ATTRIBUTE_TYPE defaults[5] = { CKA_CLASS, CKA_KEY_TYPE, CKA_LABEL, CKA_ID, CKA_VALUE };
    CK_ULONG n = b == 0 ? 5 : 1 + b % 10;
    CK_ATTRIBUTE *t = arena_alloc(side, n * sizeof *t);
    for (CK_ULONG k = 0; k < n; k++) {
        if (b == 0) {
            t[k].type = defaults[k];
            t[k].ulValueLen = k < 2 ? sizeof(CK_ULONG) : 128;
            t[k].pValue = arena_alloc(side, t[k].ulValueLen);
            continue;
        }
        t[k].type = attr_types[rd_u8(r) % nattr_types].type;
        uint8_t c = rd_u8(r);
        size_t cap = 0;
        switch (c % 8) {
        case 0: t[k].ulValueLen = 0; break;  // length query
        case 1: cap = 8; break;
        case 2: cap = 4096; break;
        case 3: cap = 0; t[k].pValue = arena_alloc(side, 1); break;
        case 4: cap = 1; break;
        case 5: { static const size_t s[4] = { 16, 32, 64, 128 }; cap = s[(c >> 3) % 4]; break; }
        case 6: t[k].pValue = arena_alloc(side, 4096); t[k].ulValueLen = huge(c >> 3); break;
        case 7: cap = 2; break;
        }
        if (cap) {
            t[k].pValue = arena_alloc(side, cap);
            t[k].ulValueLen = cap;
        }
        if (c % 8 == 0 && (c & 0x80)) t[k].ulValueLen = 64;  // NULL pointer, with a length
    }
    *count = n;
    if (side == FORK) note("template=%lu attrs%s", n, b ? "" : "(default)");
    reg(side, IT_ATTRS, t, NULL, n, 0);
    return t;
}

// MARK: the operations

// Inputs that crash SoftHSM itself are not made on either side: the point is p11fork, and a
// module that dies cannot be compared with. Each use says which input and why.
static unsigned long n_excluded;
static void exclude(const char *why) {
    C.nocompare = why;
    C.excluded = 1;
    n_excluded++;
}
unsigned long excluded_calls(void) { return n_excluded; }
#define EXCLUDE(why) do { exclude(why); return; } while (0)

// SoftHSM looks at a call's session before its templates, mechanism parameters and keys: with
// a session it refuses (stale, unknown, of another kind, or no library), the inputs that would
// crash it are safe to make, and p11fork's handling of them (its trace) is still exercised.
static int session_live(void) {
    return C.sess_pair >= 0 && pairs[C.sess_pair].kind == H_SESSION && pairs[C.sess_pair].live;
}
#define PARAM_CRASH "SoftHSM crashes on a NULL buffer with a length inside a mechanism parameter"

// SoftHSM 2.6.1 starts an RSA, DSA, EC or EdDSA operation (sign, verify, encrypt, decrypt, wrap,
// unwrap) without checking that the key is of that algorithm, or private where it must be, and
// then dies on it (seen: CKM_RSA_X_509 with a secret key: C_SignInit answers CKR_OK and C_Sign
// ends the process from its fatal-exception handler). Such operations are started only with a
// key the harness knows to be the right kind, or with a handle SoftHSM rejects anyway.
enum { ALG_NONE, ALG_RSA, ALG_EC, ALG_ED, ALG_DSA };

static int asym_alg(CK_MECHANISM_TYPE t) {
    switch (t) {
    case CKM_RSA_PKCS: case CKM_RSA_X_509: case CKM_RSA_PKCS_OAEP: case CKM_RSA_PKCS_PSS: case CKM_MD5_RSA_PKCS:
    case CKM_SHA1_RSA_PKCS: case CKM_SHA224_RSA_PKCS: case CKM_SHA256_RSA_PKCS: case CKM_SHA384_RSA_PKCS:
    case CKM_SHA512_RSA_PKCS: case CKM_SHA1_RSA_PKCS_PSS: case CKM_SHA224_RSA_PKCS_PSS: case CKM_SHA256_RSA_PKCS_PSS:
    case CKM_SHA384_RSA_PKCS_PSS: case CKM_SHA512_RSA_PKCS_PSS:
        return ALG_RSA;
    case CKM_ECDSA: case CKM_ECDSA_SHA1: case CKM_ECDSA_SHA224: case CKM_ECDSA_SHA256: case CKM_ECDSA_SHA384:
    case CKM_ECDSA_SHA512:
        return ALG_EC;
    case 0x1057: return ALG_ED;
    case CKM_DSA: case CKM_DSA_SHA1: case CKM_DSA_SHA224: case CKM_DSA_SHA256: case CKM_DSA_SHA384: case CKM_DSA_SHA512:
        return ALG_DSA;
    }
    return ALG_NONE;
}

// 1 when SoftHSM would start `mech` for `usage` on the key of pair `k` and then crash.
static int wrong_key_kind(CK_MECHANISM_PTR mech, int usage, int k) {
    if (!mech || k < 0 || !pairs[k].live || !session_live()) return 0;  // refused before the key is used
    int alg = asym_alg(mech->mechanism);
    if (alg == ALG_NONE) return 0;
    int public_side = usage == U_ENC || usage == U_VER || usage == U_VREC || usage == U_WRAP;
    int want = alg == ALG_RSA ? (public_side ? KK_RSA_PUB : KK_RSA_PRIV)
             : alg == ALG_EC  ? (public_side ? KK_EC_PUB : KK_EC_PRIV)
             : alg == ALG_ED  ? (public_side ? KK_ED_PUB : KK_ED_PRIV) : -1;
    return pairs[k].keykind != want;
}
#define KEY_CRASH "SoftHSM starts an asymmetric operation with a key of another kind, then crashes"

// SoftHSM 2.6.1 pads raw RSA (CKM_RSA_X_509) input to the modulus size by subtracting the
// input's length from it: a longer input wraps around and its exception handler ends the
// process. The harness's RSA keys have at least 64-byte moduli.
static int raw_rsa_too_long(int usage, CK_ULONG len) {
    return C.sess_pair >= 0 && pairs[C.sess_pair].kind == H_SESSION && pairs[C.sess_pair].opmech[usage] == CKM_RSA_X_509 &&
           len > 64;
}
#define RAW_RSA_CRASH "SoftHSM crashes on raw RSA input longer than the modulus"

static CK_FUNCTION_LIST_3_0 *announce(int side) {
    if (verbose_calls()) fprintf(stderr, "p11fuzz:    making %s(%s) %s\n", C.fn, C.args, side == FORK ? "through p11fork" : "directly");
    return fn(side);
}

static int null_value_with_length(const CK_ATTRIBUTE *t, CK_ULONG n) {
    for (CK_ULONG k = 0; k < n && k < 64; k++)
        if (!t[k].pValue && t[k].ulValueLen) return 1;
    return 0;
}

// SoftHSM 2.6.1 reads the values of the templates it is given before it checks the pointers:
// a NULL value with a length crashes it (seen: CKA_KEY_TYPE in C_CreateObject, CKA_EC_PARAMS
// and the like in C_GenerateKeyPair, any attribute in C_FindObjectsInit).
static int null_decisive_value(const CK_ATTRIBUTE *t, CK_ULONG n) {
    return t && null_value_with_length(t, n);
}
#define TEMPLATE_CRASH "SoftHSM crashes on a NULL attribute value with a length in a template"

static int level_for(int usage, int key_det, const Mech *m) {
    int level = 0;
    int produces = usage == U_ENC || usage == U_SIGN || usage == U_WRAP || usage == U_SREC || usage == U_DIG;
    if (!key_det) level = produces ? 1 : 2;
    if (m && (((m->rnd & RND_ENC) && (usage == U_ENC || usage == U_WRAP)) || ((m->rnd & RND_SIGN) && usage == U_SIGN)))
        if (level < 1) level = 1;
    return level;
}

// The level an operation in progress on the chosen session gives this call.
static void use_op(int usage) {
    if (C.sess_pair >= 0 && pairs[C.sess_pair].kind == H_SESSION) raise_level(pairs[C.sess_pair].opdet[usage]);
}

static void post_op_init(void) {
    if (C.sess_pair < 0 || C.excluded || (C.rv[FORK] != CKR_OK && C.rv[DIRECT] != CKR_OK)) return;
    pairs[C.sess_pair].opdet[C.usage] = C.op_level;
    pairs[C.sess_pair].opmech[C.usage] = C.op_mech;
}

static void op_init_common(Rd *r, int side, int usage, CK_RV (*call)(int, CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE)) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_MECHANISM_PTR m;
    const Mech *me = pick_mech(r, side, usage, &m);
    int pref = me ? ((usage == U_ENC || usage == U_VER || usage == U_VREC || usage == U_WRAP) ? me->key_pub : me->key_priv) : -1;
    CK_OBJECT_HANDLE key = pick_object(r, side, pref);
    C.usage = usage;
    C.op_level = level_for(usage, C.obj_pair >= 0 ? pairs[C.obj_pair].det : 1, me);
    C.op_mech = m ? m->mechanism : 0;
    if (C.param_crashes_softhsm && session_live()) EXCLUDE(PARAM_CRASH);
    if (wrong_key_kind(m, usage, C.obj_pair)) EXCLUDE(KEY_CRASH);
    C.rv[side] = call(side, s, m, key);
}

#define INIT_OP(NAME, USAGE)                                                                                    \
    static CK_RV call_##NAME(int side, CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {          \
        return F->NAME(s, m, k);                                                                                \
    }                                                                                                           \
    static void op_##NAME(Rd *r, int side) { op_init_common(r, side, USAGE, call_##NAME); }

INIT_OP(C_EncryptInit, U_ENC)
INIT_OP(C_DecryptInit, U_DEC)
INIT_OP(C_SignInit, U_SIGN)
INIT_OP(C_VerifyInit, U_VER)
INIT_OP(C_SignRecoverInit, U_SREC)
INIT_OP(C_VerifyRecoverInit, U_VREC)

static void op_C_DigestInit(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_MECHANISM_PTR m;
    pick_mech(r, side, U_DIG, &m);
    C.usage = U_DIG;
    if (C.param_crashes_softhsm && session_live()) EXCLUDE(PARAM_CRASH);
    C.rv[side] = F->C_DigestInit(s, m);
}

// Single-part and update calls with data in and data out.
#define INOUT_OP(NAME, USAGE, KIND)                                                   \
    static void op_##NAME(Rd *r, int side) {                                          \
        CK_SESSION_HANDLE s = pick_session(r, side);                                  \
        use_op(USAGE);                                                                \
        CK_BYTE_PTR in, out;                                                          \
        CK_ULONG inlen, *outlen;                                                      \
        data_in(r, side, &in, &inlen, KIND, "in");                                    \
        out_buf(r, side, &out, &outlen, 0, "out");                                    \
        if (raw_rsa_too_long(USAGE, inlen)) EXCLUDE(RAW_RSA_CRASH);                   \
        C.rv[side] = F->NAME(s, in, inlen, out, outlen);                              \
    }

INOUT_OP(C_Encrypt, U_ENC, D_MSG)
INOUT_OP(C_EncryptUpdate, U_ENC, D_BLOCK)
INOUT_OP(C_Decrypt, U_DEC, D_PREV)
INOUT_OP(C_DecryptUpdate, U_DEC, D_PREV)
INOUT_OP(C_Digest, U_DIG, D_MSG)
INOUT_OP(C_Sign, U_SIGN, D_MSG)
INOUT_OP(C_SignRecover, U_SREC, D_MSG)
INOUT_OP(C_VerifyRecover, U_VREC, D_PREV)
INOUT_OP(C_DigestEncryptUpdate, U_ENC, D_BLOCK)
INOUT_OP(C_DecryptDigestUpdate, U_DEC, D_PREV)
INOUT_OP(C_SignEncryptUpdate, U_ENC, D_BLOCK)
INOUT_OP(C_DecryptVerifyUpdate, U_DEC, D_PREV)

// Final calls: data out only.
#define OUT_OP(NAME, USAGE)                                     \
    static void op_##NAME(Rd *r, int side) {                    \
        CK_SESSION_HANDLE s = pick_session(r, side);            \
        use_op(USAGE);                                          \
        CK_BYTE_PTR out;                                        \
        CK_ULONG *outlen;                                       \
        out_buf(r, side, &out, &outlen, 0, "out");              \
        C.rv[side] = F->NAME(s, out, outlen);                   \
    }

OUT_OP(C_EncryptFinal, U_ENC)
OUT_OP(C_DecryptFinal, U_DEC)
OUT_OP(C_DigestFinal, U_DIG)
OUT_OP(C_SignFinal, U_SIGN)

// Updates with data in only.
#define IN_OP(NAME, USAGE, KIND)                                \
    static void op_##NAME(Rd *r, int side) {                    \
        CK_SESSION_HANDLE s = pick_session(r, side);            \
        use_op(USAGE);                                          \
        CK_BYTE_PTR in;                                         \
        CK_ULONG inlen;                                         \
        data_in(r, side, &in, &inlen, KIND, "in");              \
        C.rv[side] = F->NAME(s, in, inlen);                     \
    }

IN_OP(C_DigestUpdate, U_DIG, D_MSG)
IN_OP(C_SignUpdate, U_SIGN, D_MSG)
IN_OP(C_VerifyUpdate, U_VER, D_MSG)
IN_OP(C_VerifyFinal, U_VER, D_PREV)
IN_OP(C_SeedRandom, U_DIG, D_SEED)

static void op_C_Verify(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    use_op(U_VER);
    CK_BYTE_PTR data, sig;
    CK_ULONG dlen, slen;
    data_in(r, side, &data, &dlen, D_MSG, "data");
    data_in(r, side, &sig, &slen, D_PREV, "sig");
    if (raw_rsa_too_long(U_VER, dlen)) EXCLUDE(RAW_RSA_CRASH);
    C.rv[side] = F->C_Verify(s, data, dlen, sig, slen);
}

static void op_C_DigestKey(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_OBJECT_HANDLE k = pick_object(r, side, K_AES_OPEN);
    C.usage = U_DIG;
    C.rv[side] = F->C_DigestKey(s, k);
}

static void post_digest_key(void) {
    if (C.sess_pair < 0 || C.rv[FORK] != CKR_OK || C.obj_pair < 0) return;
    if (!pairs[C.obj_pair].det) pairs[C.sess_pair].opdet[U_DIG] = 1;
}

// MARK: general, slots and tokens

static CK_RV create_mutex(CK_VOID_PTR_PTR m) {
    if (!m) return CKR_ARGUMENTS_BAD;
    *m = malloc(1);
    return CKR_OK;
}
static CK_RV destroy_mutex(CK_VOID_PTR m) { free(m); return CKR_OK; }
static CK_RV lock_mutex(CK_VOID_PTR m) { (void)m; return CKR_OK; }
static CK_RV unlock_mutex(CK_VOID_PTR m) { (void)m; return CKR_OK; }

static void op_C_Initialize(Rd *r, int side) {
    uint8_t b = rd_u8(r);
    CK_C_INITIALIZE_ARGS *a = NULL;
    if (b % 8) {
        a = arena_alloc(side, sizeof *a);
        switch (b % 8) {
        case 2: a->flags = CKF_OS_LOCKING_OK; break;
        case 3: case 6:
            a->CreateMutex = create_mutex; a->DestroyMutex = destroy_mutex; a->LockMutex = lock_mutex; a->UnlockMutex = unlock_mutex;
            a->flags = b % 8 == 6 ? CKF_OS_LOCKING_OK : 0;
            break;
        case 4:
            a->CreateMutex = create_mutex; a->LockMutex = lock_mutex;  // some callbacks only
            if (b & 8) a->DestroyMutex = destroy_mutex;
            break;
        case 5: a->pReserved = a; break;
        case 7: a->flags = (CK_FLAGS)rd_u8(r) | ((CK_FLAGS)rd_u8(r) << 8); break;
        }
    }
    if (side == FORK) note("args=%s(variant %d)", a ? "ptr" : "NULL", b % 8);
    C.rv[side] = F->C_Initialize(a);
}

static void post_finalize(void) {
    if (C.rv[FORK] != CKR_OK && C.rv[DIRECT] != CKR_OK) return;
    for (int k = 0; k < npairs; k++)
        if (pairs[k].kind != H_SLOT) pairs[k].live = 0;
    cur_epoch++;
    cur_session = -1;
    searches_forget();
}

static void op_C_Finalize(Rd *r, int side) {
    uint8_t b = rd_u8(r);
    void *reserved = b % 4 == 1 ? arena_alloc(side, 8) : NULL;
    if (side == FORK) note("reserved=%s", reserved ? "ptr" : "NULL");
    C.rv[side] = F->C_Finalize(reserved);
}

static void op_C_GetInfo(Rd *r, int side) {
    CK_INFO *info = rd_u8(r) % 4 == 1 ? NULL : arena_alloc(side, sizeof *info);
    if (side == FORK) note("info=%s", info ? "ptr" : "NULL");
    C.rv[side] = F->C_GetInfo(info);
    reg(side, IT_BYTES, info, NULL, sizeof *info, 0);
}

static void op_C_GetFunctionList(Rd *r, int side) {
    CK_FUNCTION_LIST_PTR list = NULL;
    int null = rd_u8(r) % 2;
    if (side == FORK) note("list=%s", null ? "NULL" : "ptr");
    C.rv[side] = F->C_GetFunctionList(null ? NULL : &list);
}

static void op_C_GetSlotList(Rd *r, int side) {
    uint8_t b = rd_u8(r);
    CK_BBOOL present = (b >> 4) & 1;
    CK_SLOT_ID *list = NULL;
    CK_ULONG *n = arena_alloc(side, sizeof *n);
    size_t cap = 0;
    switch (b % 8) {
    case 0: cap = 16; *n = 16; break;
    case 1: *n = 0; break;                  // count query
    case 2: cap = 16; *n = 0; break;        // no room
    case 3: cap = 1; *n = 1; break;
    case 4: n = NULL; break;
    case 5: cap = 64; *n = huge(b); break;  // more room claimed than given
    case 6: cap = 16; n = NULL; break;
    case 7: *n = huge(b); break;
    }
    if (cap) list = arena_alloc(side, cap * sizeof *list);
    if (side == FORK) note("present=%d list=%s count=%s", present, list ? "buf" : "NULL", n ? "ptr" : "NULL");
    C.rv[side] = F->C_GetSlotList(present, list, n);
    reg(side, IT_ULONG, n, NULL, 0, 0);
    reg(side, IT_SLOTLIST, list, n, cap, 0);
}

static void op_C_GetSlotInfo(Rd *r, int side) {
    CK_SLOT_ID slot = pick_slot(r, side);
    CK_SLOT_INFO *info = rd_u8(r) % 4 == 1 ? NULL : arena_alloc(side, sizeof *info);
    C.rv[side] = F->C_GetSlotInfo(slot, info);
    reg(side, IT_BYTES, info, NULL, sizeof *info, 0);
}

static void op_C_GetTokenInfo(Rd *r, int side) {
    CK_SLOT_ID slot = pick_slot(r, side);
    CK_TOKEN_INFO *info = rd_u8(r) % 4 == 1 ? NULL : arena_alloc(side, sizeof *info);
    C.rv[side] = F->C_GetTokenInfo(slot, info);
    reg(side, IT_BYTES, info, NULL, sizeof *info, 0);
}

static void op_C_GetMechanismList(Rd *r, int side) {
    CK_SLOT_ID slot = pick_slot(r, side);
    uint8_t b = rd_u8(r);
    CK_MECHANISM_TYPE *list = NULL;
    CK_ULONG *n = arena_alloc(side, sizeof *n);
    size_t cap = 0;
    switch (b % 8) {
    case 0: cap = 256; *n = 256; break;
    case 1: *n = 0; break;
    case 2: cap = 4; *n = 3; break;
    case 3: cap = 8; *n = 0; break;
    case 4: n = NULL; break;
    case 5: cap = 256; *n = huge(b); break;
    case 6: cap = 8; n = NULL; break;
    case 7: *n = huge(b); break;
    }
    if (cap) list = arena_alloc(side, cap * sizeof *list);
    if (side == FORK) note("list=%s count=%s", list ? "buf" : "NULL", n ? "ptr" : "NULL");
    C.rv[side] = F->C_GetMechanismList(slot, list, n);
    reg(side, IT_ULONG, n, NULL, 0, 0);
    reg(side, IT_MECHLIST, list, n, cap, 0);
}

static void op_C_GetMechanismInfo(Rd *r, int side) {
    CK_SLOT_ID slot = pick_slot(r, side);
    uint8_t b = rd_u8(r);
    CK_MECHANISM_TYPE type = b < 0xF0 ? mechs[b % nmechs].type : (b & 1 ? ~0UL : 0x80001234UL);
    CK_MECHANISM_INFO *info = rd_u8(r) % 4 == 1 ? NULL : arena_alloc(side, sizeof *info);
    if (side == FORK) note("mech=%s info=%s", mech_name(type), info ? "ptr" : "NULL");
    C.rv[side] = F->C_GetMechanismInfo(slot, type, info);
    reg(side, IT_BYTES, info, NULL, sizeof *info, 0);
}

// A PIN argument. Never a new PIN other than the token's own (the token must stay as made):
// wrong PINs only where SoftHSM compares them, and only invalid lengths where a valid one
// would change something (C_InitToken on the empty slot makes a token).
enum { PIN_ANY, PIN_NEW, PIN_INVALID_ONLY };

static void pin_arg(Rd *r, int side, CK_UTF8CHAR_PTR *p, CK_ULONG *len, int mode, const char *name) {
    uint8_t b = rd_u8(r);
    const char *pin = USER_PIN;
    *p = NULL;
    *len = 0;
    int choice = b % 10;
    if (mode == PIN_INVALID_ONLY && (choice == 0 || choice == 1 || choice == 6 || choice == 9)) choice = 4;
    if (mode == PIN_NEW && (choice == 1 || choice == 6)) choice = 0;
    switch (choice) {
    case 0: break;
    case 1: pin = WRONG_PIN; break;
    case 2: *len = strlen(USER_PIN); pin = NULL; break;          // NULL with a length
    case 3: *p = arena_alloc(side, 1); pin = NULL; break;         // empty
    case 4: *p = arena_dup(side, "abc", 3); *len = 3; pin = NULL; break;  // too short
    case 5: *p = arena_alloc(side, 300); memset(*p, 'P', 300); *len = 300; pin = NULL; break;  // too long
    case 6: *p = arena_dup(side, USER_PIN, strlen(USER_PIN) - 1); *len = strlen(USER_PIN) - 1; pin = NULL; break;
    case 7: *len = huge(b); pin = NULL; break;
    case 8: pin = NULL; break;
    default: break;
    }
    if (pin) {
        *len = strlen(pin);
        *p = arena_dup(side, pin, *len);
    }
    if (side == FORK) note("%s=%s", name, choice == 0 ? "right" : choice == 1 ? "wrong" : *p ? "odd" : "NULL");
    if (*p && *len <= 65536) reg(side, IT_INPUT, *p, NULL, *len, 0);
}

static void op_C_InitToken(Rd *r, int side) {
    CK_SLOT_ID slot = pick_slot(r, side);
    // The token slot takes a wrong SO PIN (the right one would wipe the token); other slots only
    // PINs of invalid lengths (a valid one would make a new token).
    int token_slot = C.slot_pair == 0;
    CK_UTF8CHAR_PTR pin;
    CK_ULONG len;
    uint8_t b = rd_u8(r);
    if (token_slot && b % 2 == 0) {
        pin = arena_dup(side, WRONG_PIN, strlen(WRONG_PIN));
        len = strlen(WRONG_PIN);
        if (side == FORK) note("so-pin=wrong");
    } else {
        pin_arg(r, side, &pin, &len, PIN_INVALID_ONLY, "so-pin");
    }
    CK_UTF8CHAR *label = NULL;
    if (rd_u8(r) % 4 != 1) {
        label = arena_alloc(side, 32);
        memset(label, ' ', 32);
        memcpy(label, "p11fuzz", 7);
    }
    C.rv[side] = F->C_InitToken(slot, pin, len, label);
}

static void op_C_InitPIN(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_UTF8CHAR_PTR pin;
    CK_ULONG len;
    pin_arg(r, side, &pin, &len, PIN_NEW, "pin");
    C.rv[side] = F->C_InitPIN(s, pin, len);
}

static void op_C_SetPIN(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_UTF8CHAR_PTR old, new_pin;
    CK_ULONG oldlen, newlen;
    pin_arg(r, side, &old, &oldlen, PIN_ANY, "old");
    pin_arg(r, side, &new_pin, &newlen, PIN_NEW, "new");
    C.rv[side] = F->C_SetPIN(s, old, oldlen, new_pin, newlen);
}

static void op_C_WaitForSlotEvent(Rd *r, int side) {
    uint8_t b = rd_u8(r);
    CK_FLAGS flags = b % 3 == 0 ? CKF_DONT_BLOCK : b % 3 == 1 ? 0 : ~0UL;
    CK_SLOT_ID *slot = (b >> 2) % 3 == 1 ? NULL : arena_alloc(side, sizeof *slot);
    void *reserved = (b >> 4) % 4 == 1 ? arena_alloc(side, 8) : NULL;
    if (side == FORK) note("flags=0x%lx slot=%s reserved=%s", flags, slot ? "ptr" : "NULL", reserved ? "ptr" : "NULL");
    C.rv[side] = F->C_WaitForSlotEvent(flags, slot, reserved);
}

// MARK: sessions

static CK_RV notify(CK_SESSION_HANDLE s, CK_NOTIFICATION event, CK_VOID_PTR application) {
    (void)s;
    (void)event;
    (void)application;
    return CKR_OK;
}

static void op_C_OpenSession(Rd *r, int side) {
    CK_SLOT_ID slot = pick_slot(r, side);
    uint8_t b = rd_u8(r);
    static const CK_FLAGS flags[6] = { CKF_SERIAL_SESSION | CKF_RW_SESSION, CKF_SERIAL_SESSION, 0, CKF_RW_SESSION,
                                       CKF_SERIAL_SESSION | CKF_RW_SESSION | 0x100, ~0UL };
    CK_FLAGS f = flags[b % 6];
    void *app = (b >> 3) & 1 ? arena_alloc(side, 8) : NULL;
    CK_NOTIFY cb = (b >> 4) & 1 ? notify : NULL;
    CK_SESSION_HANDLE *h = (b >> 5) % 4 == 3 ? NULL : arena_alloc(side, sizeof *h);
    if (side == FORK) note("flags=0x%lx app=%s notify=%s out=%s", f, app ? "ptr" : "NULL", cb ? "yes" : "no", h ? "ptr" : "NULL");
    C.rv[side] = F->C_OpenSession(slot, f, app, cb, h);
    reg(side, IT_NEWSESSION, h, NULL, 0, 0);
}

static void kill_session(int k) {
    pairs[k].live = 0;
    for (int j = 0; j < npairs; j++)
        if (pairs[j].kind == H_OBJECT && pairs[j].owner == k) pairs[j].live = 0;
}

static void op_C_CloseSession(Rd *r, int side) { C.rv[side] = F->C_CloseSession(pick_session(r, side)); }

static void post_close_session(void) {
    if (C.sess_pair >= 0 && pairs[C.sess_pair].live && (C.rv[FORK] == CKR_OK || C.rv[DIRECT] == CKR_OK)) kill_session(C.sess_pair);
}

static void op_C_CloseAllSessions(Rd *r, int side) { C.rv[side] = F->C_CloseAllSessions(pick_slot(r, side)); }

static void post_close_all(void) {
    if (C.slot_pair < 0 || (C.rv[FORK] != CKR_OK && C.rv[DIRECT] != CKR_OK)) return;
    for (int k = 0; k < npairs; k++)
        if (pairs[k].kind == H_SESSION && pairs[k].live && pairs[k].slot == C.slot_pair) kill_session(k);
}

static void op_C_GetSessionInfo(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_SESSION_INFO *info = rd_u8(r) % 4 == 1 ? NULL : arena_alloc(side, sizeof *info);
    C.rv[side] = F->C_GetSessionInfo(s, info);
    reg(side, IT_SESSINFO, info, NULL, 0, 0);
}

static void op_C_GetOperationState(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_BYTE_PTR out;
    CK_ULONG *len;
    out_buf(r, side, &out, &len, ITEM_NO_BYTES, "state");
    C.rv[side] = F->C_GetOperationState(s, out, len);
}

static void op_C_SetOperationState(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_BYTE_PTR state;
    CK_ULONG len;
    data_in(r, side, &state, &len, D_PREV, "state");
    uint8_t b = rd_u8(r);
    CK_OBJECT_HANDLE enc = b & 1 ? pick_object(r, side, K_AES) : CK_INVALID_HANDLE;
    CK_OBJECT_HANDLE auth = b & 2 ? pick_object(r, side, K_HMAC) : CK_INVALID_HANDLE;
    C.rv[side] = F->C_SetOperationState(s, state, len, enc, auth);
}

static void op_C_Login(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    uint8_t b = rd_u8(r);
    static const CK_USER_TYPE users[6] = { CKU_USER, CKU_SO, CKU_CONTEXT_SPECIFIC, 3, ~0UL, CKU_USER };
    CK_USER_TYPE user = users[b % 6];
    CK_UTF8CHAR_PTR pin;
    CK_ULONG len;
    if (side == FORK) note("user=%lu", user);
    pin_arg(r, side, &pin, &len, PIN_ANY, "pin");
    C.rv[side] = F->C_Login(s, user, pin, len);
}

static void op_C_Logout(Rd *r, int side) { C.rv[side] = F->C_Logout(pick_session(r, side)); }

static void op_C_GetFunctionStatus(Rd *r, int side) { C.rv[side] = F->C_GetFunctionStatus(pick_session(r, side)); }
static void op_C_CancelFunction(Rd *r, int side) { C.rv[side] = F->C_CancelFunction(pick_session(r, side)); }

// MARK: objects

// Where a call puts a new handle (NULL now and then); `keykind` is what the object will be.
static CK_OBJECT_HANDLE *new_handle(Rd *r, int side, int kind_item, int keykind) {
    CK_OBJECT_HANDLE *h = rd_u8(r) % 8 == 7 ? NULL : arena_alloc(side, sizeof *h);
    reg(side, kind_item, h, NULL, 0, keykind);
    return h;
}

static void op_C_CreateObject(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_ULONG n;
    CK_ATTRIBUTE *t = template_in(r, side, T_CREATE, 0, &n, "template");
    CK_OBJECT_HANDLE *h = new_handle(r, side, IT_NEWOBJECT, KK_UNKNOWN);
    if (session_live() && null_decisive_value(t, n)) EXCLUDE(TEMPLATE_CRASH);
    C.rv[side] = F->C_CreateObject(s, t, n, h);
}

// A copy of a token object is a token object unless told otherwise: always told.
static CK_ATTRIBUTE *session_only(int side, CK_ATTRIBUTE *t, CK_ULONG *n) {
    if (!t && *n) return t;
    for (CK_ULONG k = 0; k < *n && k < 64; k++)
        if (t[k].type == CKA_TOKEN) return t;
    CK_ATTRIBUTE *u = arena_alloc(side, (*n + 1) * sizeof *u);
    if (*n) memcpy(u, t, *n * sizeof *u);
    u[*n].type = CKA_TOKEN;
    u[*n].pValue = &false_value;
    u[*n].ulValueLen = 1;
    (*n)++;
    return u;
}

static void op_C_CopyObject(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_OBJECT_HANDLE o = pick_object(r, side, K_AES_OPEN);
    CK_ULONG n;
    CK_ATTRIBUTE *t = template_in(r, side, T_COPY, 0, &n, "template");
    if (n < 64) t = session_only(side, t, &n);
    CK_OBJECT_HANDLE *h = new_handle(r, side, IT_NEWOBJECT, C.obj_pair >= 0 ? pairs[C.obj_pair].keykind : KK_UNKNOWN);
    C.det_new = C.obj_pair >= 0 ? pairs[C.obj_pair].det : 1;
    if (session_live() && null_decisive_value(t, n)) EXCLUDE(TEMPLATE_CRASH);
    C.rv[side] = F->C_CopyObject(s, o, t, n, h);
}

static void op_C_DestroyObject(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    C.rv[side] = F->C_DestroyObject(s, pick_object(r, side, -1));
}

static void post_destroy(void) {
    if (C.obj_pair >= 0 && (C.rv[FORK] == CKR_OK || C.rv[DIRECT] == CKR_OK)) pairs[C.obj_pair].live = 0;
}

static void op_C_GetObjectSize(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_OBJECT_HANDLE o = pick_object(r, side, -1);
    if (C.obj_pair >= 0 && !pairs[C.obj_pair].det) raise_level(2);
    CK_ULONG *size = rd_u8(r) % 4 == 1 ? NULL : arena_alloc(side, sizeof *size);
    C.rv[side] = F->C_GetObjectSize(s, o, size);
    reg(side, IT_ULONG, size, NULL, 0, 0);
}

static void op_C_GetAttributeValue(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_OBJECT_HANDLE o = pick_object(r, side, -1);
    if (C.obj_pair >= 0 && !pairs[C.obj_pair].det) raise_level(2);
    CK_ULONG n;
    CK_ATTRIBUTE *t = template_out(r, side, &n);
    C.rv[side] = F->C_GetAttributeValue(s, o, t, n);
}

static void op_C_SetAttributeValue(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_OBJECT_HANDLE o = pick_object(r, side, -1);
    CK_ULONG n;
    CK_ATTRIBUTE *t = template_in(r, side, T_SET, 0, &n, "template");
    if (session_live() && null_decisive_value(t, n)) EXCLUDE(TEMPLATE_CRASH);
    C.rv[side] = F->C_SetAttributeValue(s, o, t, n);
}

static void op_C_FindObjectsInit(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_ULONG n;
    CK_ATTRIBUTE *t = template_in(r, side, T_FIND, 0, &n, "template");
    // SoftHSM 2.6.1 reads every search attribute's value without looking at the pointer: a NULL
    // value with a length crashes it (it is not p11fork's to protect against).
    if (session_live() && t && null_value_with_length(t, n)) EXCLUDE("SoftHSM crashes on a NULL attribute value in C_FindObjectsInit");
    C.rv[side] = F->C_FindObjectsInit(s, t, n);
}

static void op_C_FindObjects(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    uint8_t b = rd_u8(r);
    size_t cap = 0;
    CK_ULONG max = 0;
    switch (b % 8) {
    case 0: cap = 64; max = 64; break;
    case 1: cap = 1; max = 1; break;
    case 2: cap = 4; max = 0; break;
    case 3: cap = 0; max = 8; break;          // NULL array
    case 4: cap = 256; max = huge(b); break;  // more room claimed than given: at most the token's objects come back
    case 5: cap = 2; max = 2; break;
    case 6: cap = 64; max = 64; break;
    case 7: cap = 3; max = 3; break;
    }
    CK_OBJECT_HANDLE *found = cap ? arena_alloc(side, cap * sizeof *found) : NULL;
    CK_ULONG *n = (b >> 3) % 6 == 5 ? NULL : arena_alloc(side, sizeof *n);
    if (side == FORK) note("max=%lu found=%s count=%s", max, found ? "buf" : "NULL", n ? "ptr" : "NULL");
    C.find_max = max;
    C.rv[side] = F->C_FindObjects(s, found, max, n);
    reg(side, IT_FOUND, found, n, cap, 0);
}

static void op_C_FindObjectsFinal(Rd *r, int side) { C.rv[side] = F->C_FindObjectsFinal(pick_session(r, side)); }

// A search that ends, or a new one, closes what the previous one returned (harness.c). One
// stopped before its end is not compared: each copy of SoftHSM had its own order.
static void post_find_final(void) {
    if (C.sess_pair >= 0 && C.rv[FORK] == CKR_OK && C.rv[DIRECT] == CKR_OK) search_ended(C.sess_pair, 0);
}

static void post_find_init(void) {
    if (C.sess_pair >= 0 && C.rv[FORK] == CKR_OK && C.rv[DIRECT] == CKR_OK) search_ended(C.sess_pair, 0);
}

// MARK: keys

static void op_C_GenerateKey(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_MECHANISM_PTR m;
    pick_mech(r, side, U_GEN, &m);
    CK_ULONG n;
    CK_ATTRIBUTE *t = template_in(r, side, T_GEN, m ? m->mechanism : 0, &n, "template");
    CK_OBJECT_HANDLE *h = new_handle(r, side, IT_NEWOBJECT, KK_SECRET);
    C.det_new = 0;
    if (C.param_crashes_softhsm && session_live()) EXCLUDE(PARAM_CRASH);
    if (session_live() && null_decisive_value(t, n)) EXCLUDE(TEMPLATE_CRASH);
    C.rv[side] = F->C_GenerateKey(s, m, t, n, h);
}

static void op_C_GenerateKeyPair(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_MECHANISM_PTR m;
    pick_mech(r, side, U_GENPAIR, &m);
    CK_ULONG npub, npriv;
    CK_ATTRIBUTE *pub = template_in(r, side, T_PUB, m ? m->mechanism : 0, &npub, "public");
    CK_ATTRIBUTE *priv = template_in(r, side, T_PRIV, m ? m->mechanism : 0, &npriv, "private");
    CK_MECHANISM_TYPE type = m ? m->mechanism : 0;
    int pubkind = type == CKM_RSA_PKCS_KEY_PAIR_GEN ? KK_RSA_PUB : type == CKM_EC_KEY_PAIR_GEN ? KK_EC_PUB
                : type == 0x1055 ? KK_ED_PUB : KK_OTHER;
    CK_OBJECT_HANDLE *hpub = new_handle(r, side, IT_NEWOBJECT, pubkind);
    CK_OBJECT_HANDLE *hpriv = new_handle(r, side, IT_NEWOBJECT, pubkind == KK_OTHER ? KK_OTHER : pubkind + 1);
    C.det_new = 0;
    if (C.param_crashes_softhsm && session_live()) EXCLUDE(PARAM_CRASH);
    if (session_live() && (null_decisive_value(pub, npub) || null_decisive_value(priv, npriv))) EXCLUDE(TEMPLATE_CRASH);
    C.rv[side] = F->C_GenerateKeyPair(s, m, pub, npub, priv, npriv, hpub, hpriv);
}

static void op_C_WrapKey(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_MECHANISM_PTR m;
    const Mech *me = pick_mech(r, side, U_WRAP, &m);
    CK_OBJECT_HANDLE wrapping = pick_object(r, side, me ? me->key_pub : K_AES);
    int wrapping_pair = C.obj_pair;
    CK_OBJECT_HANDLE key = pick_object(r, side, K_AES_OPEN);
    int det = (C.obj_pair < 0 || pairs[C.obj_pair].det) && (C.obj2_pair < 0 || pairs[C.obj2_pair].det);
    raise_level(level_for(U_WRAP, det, me));
    CK_BYTE_PTR out;
    CK_ULONG *len;
    out_buf(r, side, &out, &len, 0, "wrapped");
    if (C.param_crashes_softhsm && session_live()) EXCLUDE(PARAM_CRASH);
    if (wrong_key_kind(m, U_WRAP, wrapping_pair)) EXCLUDE(KEY_CRASH);
    C.rv[side] = F->C_WrapKey(s, m, wrapping, key, out, len);
}

static void op_C_UnwrapKey(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_MECHANISM_PTR m;
    const Mech *me = pick_mech(r, side, U_UNWRAP, &m);
    CK_OBJECT_HANDLE unwrapping = pick_object(r, side, me ? me->key_priv : K_AES);
    CK_BYTE_PTR wrapped;
    CK_ULONG wlen;
    data_in(r, side, &wrapped, &wlen, D_PREV, "wrapped");
    CK_ULONG n;
    CK_ATTRIBUTE *t = template_in(r, side, T_UNWRAP, 0, &n, "template");
    CK_OBJECT_HANDLE *h = new_handle(r, side, IT_NEWOBJECT, KK_UNKNOWN);
    int det = C.obj_pair < 0 || pairs[C.obj_pair].det;
    if (!det) raise_level(2);
    C.det_new = det && C.level == 0;
    if (C.param_crashes_softhsm && session_live()) EXCLUDE(PARAM_CRASH);
    if (wrong_key_kind(m, U_UNWRAP, C.obj_pair)) EXCLUDE(KEY_CRASH);
    if (session_live() && null_decisive_value(t, n)) EXCLUDE(TEMPLATE_CRASH);
    C.rv[side] = F->C_UnwrapKey(s, m, unwrapping, wrapped, wlen, t, n, h);
}

static void op_C_DeriveKey(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_MECHANISM_PTR m;
    const Mech *me = pick_mech(r, side, U_DERIVE, &m);
    CK_OBJECT_HANDLE base = pick_object(r, side, me ? me->key_priv : K_HMAC);
    CK_ULONG n;
    CK_ATTRIBUTE *t = template_in(r, side, T_DERIVE, m ? m->mechanism : 0, &n, "template");
    CK_OBJECT_HANDLE *h = new_handle(r, side, IT_NEWOBJECT, KK_UNKNOWN);
    // obj_pair: a key inside the parameter (picked first) or the base key.
    int det = 1;
    if (C.obj_pair >= 0 && !pairs[C.obj_pair].det) det = 0;
    if (C.obj2_pair >= 0 && !pairs[C.obj2_pair].det) det = 0;
    if (!det) raise_level(1);
    C.det_new = det;
    if (C.param_crashes_softhsm && session_live()) EXCLUDE(PARAM_CRASH);
    if (session_live() && null_decisive_value(t, n)) EXCLUDE(TEMPLATE_CRASH);
    C.rv[side] = F->C_DeriveKey(s, m, base, t, n, h);
}

static void op_C_GenerateRandom(Rd *r, int side) {
    CK_SESSION_HANDLE s = pick_session(r, side);
    uint8_t b = rd_u8(r);
    CK_ULONG len = 32;
    CK_BYTE_PTR buf = NULL;
    switch (b % 6) {
    case 0: buf = arena_alloc(side, 32); break;
    case 1: break;                                   // NULL with a length
    case 2: len = 0; break;
    case 3: len = 0; buf = arena_alloc(side, 1); break;
    case 4: len = 4096; buf = arena_alloc(side, len); break;
    case 5: len = huge(b); break;                     // NULL with a huge length
    }
    if (side == FORK) note("buf=%s len=%lu", buf ? "buf" : "NULL", len);
    C.rv[side] = F->C_GenerateRandom(s, buf, len);
}

// MARK: p11fork's own functions (the 3.0 interface, which SoftHSM 2.6 lacks): checked by rules

static void op_GetInterfaceList(Rd *r, int side) {
    (void)side;
    CK_C_GetInterfaceList get = fork_get_interface_list();
    uint8_t b = rd_u8(r);
    CK_INTERFACE *list = NULL;
    CK_ULONG *n = arena_alloc(FORK, sizeof *n);
    size_t cap = 0;
    switch (b % 6) {
    case 0: cap = 8; *n = 8; break;
    case 1: *n = 0; break;
    case 2: cap = 1; *n = 1; break;
    case 3: n = NULL; break;
    case 4: cap = 2; *n = 2; break;
    case 5: cap = 8; n = NULL; break;
    }
    if (cap) list = arena_alloc(FORK, cap * sizeof *list);
    CK_ULONG room = n ? *n : 0;
    note("list=%s count=%s room=%lu", list ? "buf" : "NULL", n ? "ptr" : "NULL", room);
    CK_RV rv = C.rv[FORK] = get(list, n);
    CK_RV want = !n ? CKR_ARGUMENTS_BAD : (list && room < 2) ? CKR_BUFFER_TOO_SMALL : CKR_OK;
    if (rv != want) finding("C_GetInterfaceList answered %s, expected %s", tool_rv_name(rv), tool_rv_name(want));
    if (n && *n != 2) finding("C_GetInterfaceList counts %lu interfaces, expected 2", *n);
    if (rv == CKR_OK && list)
        for (int k = 0; k < 2; k++)
            if (!list[k].pInterfaceName || strcmp((char *)list[k].pInterfaceName, "PKCS 11") || !list[k].pFunctionList ||
                !(list[k].flags & CKF_INTERFACE_FORK_SAFE) || ((CK_VERSION *)list[k].pFunctionList)->minor == 2)
                finding("C_GetInterfaceList: interface %d is not a fork-safe \"PKCS 11\" 3.0 or 2.40 interface", k);
}

static void op_GetInterface(Rd *r, int side) {
    (void)side;
    CK_C_GetInterface get = fork_get_interface();
    uint8_t b = rd_u8(r);
    static const char *const names[5] = { "PKCS 11", NULL, "PKCS 11 ", "", "Vendor" };
    const char *name = names[b % 5];
    CK_VERSION *version = NULL;
    uint8_t vb = rd_u8(r);
    static const CK_VERSION versions[6] = { { 3, 0 }, { 2, 40 }, { 3, 1 }, { 0, 0 }, { 2, 20 }, { 3, 2 } };
    if (vb % 7) {
        version = arena_alloc(FORK, sizeof *version);
        *version = versions[vb % 7 - 1];
    }
    CK_INTERFACE **out = (b >> 4) % 4 == 3 ? NULL : arena_alloc(FORK, sizeof *out);
    static const CK_FLAGS flagset[4] = { 0, CKF_INTERFACE_FORK_SAFE, 2, ~0UL };
    CK_FLAGS flags = flagset[rd_u8(r) % 4];
    CK_UTF8CHAR *name_copy = name ? arena_dup(FORK, name, strlen(name) + 1) : NULL;
    note("name=%s version=%s flags=0x%lx out=%s", name ? name : "NULL", version ? "ptr" : "NULL", flags, out ? "ptr" : "NULL");
    CK_RV rv = C.rv[FORK] = get(name_copy, version, out, flags);
    if (!out && rv != CKR_ARGUMENTS_BAD) finding("C_GetInterface with no place for the answer answered %s", tool_rv_name(rv));
    if (rv == CKR_OK) {
        CK_INTERFACE *i = *out;
        if (!i || !i->pFunctionList) {
            finding("C_GetInterface answered CKR_OK without an interface");
            return;
        }
        CK_VERSION *v = i->pFunctionList;
        if (version && (v->major != version->major || v->minor != version->minor))
            finding("C_GetInterface gave version %d.%d for %d.%d", v->major, v->minor, version->major, version->minor);
        if ((i->flags & flags) != flags) finding("C_GetInterface gave flags 0x%lx for 0x%lx", i->flags, flags);
        if (name && strcmp(name, "PKCS 11")) finding("C_GetInterface gave an interface for the name \"%s\"", name);
        // SoftHSM 2.6 has no 3.2 list: p11fork must not offer one it cannot back (docs/FORK.md "PKCS#11 3.0 and 3.2").
        if (v->major == 3 && v->minor == 2) finding("C_GetInterface offered a 3.2 list over a PKCS#11 2.40 module");
    } else if (out && name && !strcmp(name, "PKCS 11") && !version && !flags) {
        finding("C_GetInterface(\"PKCS 11\") answered %s", tool_rv_name(rv));
    }
}

// The 3.0 functions, through p11fork's 3.0 list over SoftHSM 2.6 (a 2.40 module): README says
// they answer CKR_FUNCTION_NOT_SUPPORTED, whatever the arguments.
static void op_v30(Rd *r, int side) {
    CK_FUNCTION_LIST_3_0 *l = fork_list30();
    uint8_t which = rd_u8(r) % 22;
    CK_SESSION_HANDLE s = pick_session(r, side);
    CK_RV rv = CKR_OK;
    CK_BYTE_PTR in, out;
    CK_ULONG inlen, *outlen;
    CK_MECHANISM_PTR m;
    void *param;
    CK_ULONG plen;
    bytes_field(r, side, &param, &plen, 12, NULL);
    switch (which) {
    case 0: {
        CK_UTF8CHAR_PTR pin;
        CK_ULONG len;
        pin_arg(r, side, &pin, &len, PIN_ANY, "pin");
        C.fn = "C_LoginUser";
        rv = l->C_LoginUser(s, CKU_USER, pin, len, (CK_UTF8CHAR_PTR) "user", 4);
        break;
    }
    case 1: C.fn = "C_SessionCancel"; rv = l->C_SessionCancel(s, rd_u8(r) & 1 ? ~0UL : CKF_ENCRYPT); break;
    case 2: pick_mech(r, side, U_ENC, &m); C.fn = "C_MessageEncryptInit"; rv = l->C_MessageEncryptInit(s, m, pick_object(r, side, K_AES)); break;
    case 3: pick_mech(r, side, U_DEC, &m); C.fn = "C_MessageDecryptInit"; rv = l->C_MessageDecryptInit(s, m, pick_object(r, side, K_AES)); break;
    case 4: pick_mech(r, side, U_SIGN, &m); C.fn = "C_MessageSignInit"; rv = l->C_MessageSignInit(s, m, pick_object(r, side, K_HMAC)); break;
    case 5: pick_mech(r, side, U_VER, &m); C.fn = "C_MessageVerifyInit"; rv = l->C_MessageVerifyInit(s, m, pick_object(r, side, K_HMAC)); break;
    case 6:
        data_in(r, side, &in, &inlen, D_MSG, "in");
        out_buf(r, side, &out, &outlen, 0, "out");
        C.fn = "C_EncryptMessage";
        rv = l->C_EncryptMessage(s, param, plen, NULL, 0, in, inlen, out, outlen);
        break;
    case 7:
        data_in(r, side, &in, &inlen, D_PREV, "in");
        out_buf(r, side, &out, &outlen, 0, "out");
        C.fn = "C_DecryptMessage";
        rv = l->C_DecryptMessage(s, param, plen, NULL, 0, in, inlen, out, outlen);
        break;
    case 8: C.fn = "C_EncryptMessageBegin"; rv = l->C_EncryptMessageBegin(s, param, plen, NULL, 0); break;
    case 9: C.fn = "C_DecryptMessageBegin"; rv = l->C_DecryptMessageBegin(s, param, plen, NULL, 0); break;
    case 10:
        data_in(r, side, &in, &inlen, D_MSG, "in");
        out_buf(r, side, &out, &outlen, 0, "out");
        C.fn = "C_EncryptMessageNext";
        rv = l->C_EncryptMessageNext(s, param, plen, in, inlen, out, outlen, rd_u8(r) & 1);
        break;
    case 11:
        data_in(r, side, &in, &inlen, D_PREV, "in");
        out_buf(r, side, &out, &outlen, 0, "out");
        C.fn = "C_DecryptMessageNext";
        rv = l->C_DecryptMessageNext(s, param, plen, in, inlen, out, outlen, rd_u8(r) & 1);
        break;
    case 12: C.fn = "C_MessageEncryptFinal"; rv = l->C_MessageEncryptFinal(s); break;
    case 13: C.fn = "C_MessageDecryptFinal"; rv = l->C_MessageDecryptFinal(s); break;
    case 14:
        data_in(r, side, &in, &inlen, D_MSG, "in");
        out_buf(r, side, &out, &outlen, 0, "sig");
        C.fn = "C_SignMessage";
        rv = l->C_SignMessage(s, param, plen, in, inlen, out, outlen);
        break;
    case 15: C.fn = "C_SignMessageBegin"; rv = l->C_SignMessageBegin(s, param, plen); break;
    case 16:
        data_in(r, side, &in, &inlen, D_MSG, "in");
        out_buf(r, side, &out, &outlen, 0, "sig");
        C.fn = "C_SignMessageNext";
        rv = l->C_SignMessageNext(s, param, plen, in, inlen, out, outlen);
        break;
    case 17: C.fn = "C_MessageSignFinal"; rv = l->C_MessageSignFinal(s); break;
    case 18: {
        CK_BYTE_PTR sig;
        CK_ULONG slen;
        data_in(r, side, &in, &inlen, D_MSG, "in");
        data_in(r, side, &sig, &slen, D_PREV, "sig");
        C.fn = "C_VerifyMessage";
        rv = l->C_VerifyMessage(s, param, plen, in, inlen, sig, slen);
        break;
    }
    case 19: C.fn = "C_VerifyMessageBegin"; rv = l->C_VerifyMessageBegin(s, param, plen); break;
    case 20: {
        CK_BYTE_PTR sig;
        CK_ULONG slen;
        data_in(r, side, &in, &inlen, D_MSG, "in");
        data_in(r, side, &sig, &slen, D_PREV, "sig");
        C.fn = "C_VerifyMessageNext";
        rv = l->C_VerifyMessageNext(s, param, plen, in, inlen, sig, slen);
        break;
    }
    default: C.fn = "C_MessageVerifyFinal"; rv = l->C_MessageVerifyFinal(s); break;
    }
    C.rv[FORK] = rv;
    if (rv != CKR_FUNCTION_NOT_SUPPORTED)
        finding("%s over a PKCS#11 2.40 module answered %s, not CKR_FUNCTION_NOT_SUPPORTED", C.fn, tool_rv_name(rv));
}

// MARK: the table

#define OP(name, post) { #name, op_##name, post, 0 }
const OpDef ops[] = {
    OP(C_Initialize, NULL), OP(C_Finalize, post_finalize), OP(C_GetInfo, NULL), OP(C_GetFunctionList, NULL),
    OP(C_GetSlotList, NULL), OP(C_GetSlotInfo, NULL), OP(C_GetTokenInfo, NULL), OP(C_GetMechanismList, NULL),
    OP(C_GetMechanismInfo, NULL), OP(C_InitToken, NULL), OP(C_InitPIN, NULL), OP(C_SetPIN, NULL),
    OP(C_WaitForSlotEvent, NULL), OP(C_OpenSession, NULL), OP(C_CloseSession, post_close_session),
    OP(C_CloseAllSessions, post_close_all), OP(C_GetSessionInfo, NULL), OP(C_GetOperationState, NULL),
    OP(C_SetOperationState, NULL), OP(C_Login, NULL), OP(C_Logout, NULL), OP(C_CreateObject, NULL),
    OP(C_CopyObject, NULL), OP(C_DestroyObject, post_destroy), OP(C_GetObjectSize, NULL),
    OP(C_GetAttributeValue, NULL), OP(C_SetAttributeValue, NULL), OP(C_FindObjectsInit, post_find_init), OP(C_FindObjects, NULL),
    OP(C_FindObjectsFinal, post_find_final), OP(C_EncryptInit, post_op_init), OP(C_Encrypt, NULL), OP(C_EncryptUpdate, NULL),
    OP(C_EncryptFinal, NULL), OP(C_DecryptInit, post_op_init), OP(C_Decrypt, NULL), OP(C_DecryptUpdate, NULL),
    OP(C_DecryptFinal, NULL), OP(C_DigestInit, post_op_init), OP(C_Digest, NULL), OP(C_DigestUpdate, NULL),
    OP(C_DigestKey, post_digest_key), OP(C_DigestFinal, NULL), OP(C_SignInit, post_op_init), OP(C_Sign, NULL),
    OP(C_SignUpdate, NULL), OP(C_SignFinal, NULL), OP(C_SignRecoverInit, post_op_init), OP(C_SignRecover, NULL),
    OP(C_VerifyInit, post_op_init), OP(C_Verify, NULL), OP(C_VerifyUpdate, NULL), OP(C_VerifyFinal, NULL),
    OP(C_VerifyRecoverInit, post_op_init), OP(C_VerifyRecover, NULL), OP(C_DigestEncryptUpdate, NULL),
    OP(C_DecryptDigestUpdate, NULL), OP(C_SignEncryptUpdate, NULL), OP(C_DecryptVerifyUpdate, NULL),
    OP(C_GenerateKey, NULL), OP(C_GenerateKeyPair, NULL), OP(C_WrapKey, NULL), OP(C_UnwrapKey, NULL),
    OP(C_DeriveKey, NULL), OP(C_SeedRandom, NULL), OP(C_GenerateRandom, NULL), OP(C_GetFunctionStatus, NULL),
    OP(C_CancelFunction, NULL),
    { "C_GetInterfaceList", op_GetInterfaceList, NULL, 1 },
    { "C_GetInterface", op_GetInterface, NULL, 1 },
    { "3.0-functions", op_v30, NULL, 1 },
};
const int nops = sizeof ops / sizeof *ops;

// For the seeds (harness.c): "@CKM_NAME" is the byte that picks that mechanism whatever the
// use, "#label" the byte that picks that token object.
int seed_byte(const char *token) {
    if (token[0] == '@') {
        for (int k = 0; k < nmechs; k++)
            if (!strcmp(mechs[k].name, token + 1)) return 0x80 + k;
    } else if (token[0] == '#') {
        for (int k = 0; k < K_COUNT; k++)
            if (!strcmp(token_labels[k], token + 1)) return 128 + k;
    }
    fprintf(stderr, "p11fuzz: unknown seed token %s\n", token);
    abort();
}

int op_index(const char *name) {
    for (int k = 0; k < nops; k++)
        if (!strcmp(ops[k].name, name)) return k;
    fprintf(stderr, "p11fuzz: no operation %s\n", name);
    abort();
}
