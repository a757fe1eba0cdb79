// NetHSM test module: AES (ECB/CBC blocks, RFC 3394 key wrap) and P-256 (key pairs, ECDH) through
// OpenSSL 3's libcrypto. Only EVP interfaces: the deprecated low-level ones are hidden below, so
// using one by mistake does not compile. Everything here is stateless: the operation state
// (chaining value, buffered input) stays in the server's session record, and every call makes
// and frees its own EVP contexts, so nothing process-local outlives a call.
#define OPENSSL_API_COMPAT 30000
#define OPENSSL_NO_DEPRECATED
#include "nethsm_internal.h"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <string.h>

const uint8_t nh_p256_oid[10] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};

// MARK: AES

static const EVP_CIPHER *aes_cipher(size_t key_len, int cbc) {
    switch (key_len) {
    case 16: return cbc ? EVP_aes_128_cbc() : EVP_aes_128_ecb();
    case 24: return cbc ? EVP_aes_192_cbc() : EVP_aes_192_ecb();
    case 32: return cbc ? EVP_aes_256_cbc() : EVP_aes_256_ecb();
    default: return NULL;
    }
}

static const EVP_CIPHER *aes_wrap_cipher(size_t key_len) {
    switch (key_len) {
    case 16: return EVP_aes_128_wrap();
    case 24: return EVP_aes_192_wrap();
    case 32: return EVP_aes_256_wrap();
    default: return NULL;
    }
}

int nh_aes_blocks(int encrypt, const uint8_t *key, size_t key_len, const uint8_t *iv, const uint8_t *in, size_t len,
                  uint8_t *out) {
    const EVP_CIPHER *cipher = aes_cipher(key_len, iv != NULL);
    if (cipher == NULL || len % NH_AES_BLOCK != 0 || len > (size_t)0x7ffffff0) return -1;
    if (len == 0) return 0;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) return -1;
    int ok = 0, n = 0, tail = 0;
    if (EVP_CipherInit_ex(ctx, cipher, NULL, key, iv, encrypt ? 1 : 0) == 1 && EVP_CIPHER_CTX_set_padding(ctx, 0) == 1 &&
        EVP_CipherUpdate(ctx, out, &n, in, (int)len) == 1 && EVP_CipherFinal_ex(ctx, out + n, &tail) == 1)
        ok = (size_t)n + (size_t)tail == len;
    EVP_CIPHER_CTX_free(ctx);
    return ok ? 0 : -1;
}

// One RFC 3394 wrap or unwrap. Returns the output length, or -1.
static int aes_kw(int wrap, const uint8_t *kek, size_t kek_len, const uint8_t *iv, const uint8_t *in, size_t len,
                  uint8_t *out) {
    const EVP_CIPHER *cipher = aes_wrap_cipher(kek_len);
    if (cipher == NULL || len % 8 != 0 || len > NH_MAX_VALUE + 8) return -1;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) return -1;
    EVP_CIPHER_CTX_set_flags(ctx, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
    int n = 0, tail = 0, result = -1;
    if (EVP_CipherInit_ex(ctx, cipher, NULL, kek, iv, wrap ? 1 : 0) == 1 &&
        EVP_CipherUpdate(ctx, out, &n, in, (int)len) == 1 && n >= 0 && EVP_CipherFinal_ex(ctx, out + n, &tail) == 1)
        result = n + tail;
    EVP_CIPHER_CTX_free(ctx);
    return result;
}

int nh_aes_wrap(const uint8_t *kek, size_t kek_len, const uint8_t *iv, const uint8_t *in, size_t len, uint8_t *out) {
    if (len < 16) return -1;
    return aes_kw(1, kek, kek_len, iv, in, len, out) == (int)(len + 8) ? 0 : -1;
}

int nh_aes_unwrap(const uint8_t *kek, size_t kek_len, const uint8_t *iv, const uint8_t *in, size_t len, uint8_t *out) {
    if (len < 24 || aes_wrap_cipher(kek_len) == NULL || len % 8 != 0 || len > NH_MAX_VALUE + 8) return -1;
    // The arguments are fine, so a failure is the integrity check (OpenSSL wipes the output).
    return aes_kw(0, kek, kek_len, iv, in, len, out) == (int)(len - 8) ? 0 : 1;
}

// MARK: P-256

// The group order n, big-endian.
static const uint8_t p256_order[NH_EC_SCALAR] = {
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
};

int nh_ec_scalar_valid(const uint8_t scalar[NH_EC_SCALAR]) {
    uint8_t any = 0;
    for (int i = 0; i < NH_EC_SCALAR; i++) any |= scalar[i];
    return any != 0 && memcmp(scalar, p256_order, NH_EC_SCALAR) < 0;  // big-endian: memcmp orders numbers
}

// An EVP_PKEY from a scalar (private key) or an uncompressed point (public key). OpenSSL
// checks that a point lies on the curve while importing it. NULL on failure.
static EVP_PKEY *p256_key(const uint8_t *scalar, const uint8_t *point) {
    OSSL_PARAM_BLD *build = OSSL_PARAM_BLD_new();
    BIGNUM *d = NULL;
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *key = NULL;
    if (build == NULL || !OSSL_PARAM_BLD_push_utf8_string(build, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0))
        goto out;
    if (scalar != NULL) {
        d = BN_secure_new();
        if (d == NULL || BN_bin2bn(scalar, NH_EC_SCALAR, d) == NULL ||
            !OSSL_PARAM_BLD_push_BN(build, OSSL_PKEY_PARAM_PRIV_KEY, d))
            goto out;
    }
    if (point != NULL && !OSSL_PARAM_BLD_push_octet_string(build, OSSL_PKEY_PARAM_PUB_KEY, point, NH_EC_POINT))
        goto out;
    params = OSSL_PARAM_BLD_to_param(build);
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    if (params == NULL || ctx == NULL || EVP_PKEY_fromdata_init(ctx) != 1 ||
        EVP_PKEY_fromdata(ctx, &key, scalar != NULL ? EVP_PKEY_KEYPAIR : EVP_PKEY_PUBLIC_KEY, params) != 1)
        key = NULL;
out:
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);  // OSSL_PARAM_BLD_to_param keeps BIGNUMs in secure memory when given secure ones
    OSSL_PARAM_BLD_free(build);
    BN_clear_free(d);
    return key;
}

int nh_ec_point_valid(const uint8_t point[NH_EC_POINT]) {
    if (point[0] != 0x04) return 0;  // uncompressed only
    EVP_PKEY *key = p256_key(NULL, point);
    if (key == NULL) return 0;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, key, NULL);
    int ok = ctx != NULL && EVP_PKEY_public_check(ctx) == 1;
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(key);
    return ok;
}

int nh_ec_generate(uint8_t scalar[NH_EC_SCALAR], uint8_t point[NH_EC_POINT]) {
    EVP_PKEY *key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    BIGNUM *d = NULL;
    size_t point_len = 0;
    int ok = key != NULL && EVP_PKEY_get_bn_param(key, OSSL_PKEY_PARAM_PRIV_KEY, &d) == 1 &&
             BN_bn2binpad(d, scalar, NH_EC_SCALAR) == NH_EC_SCALAR &&
             EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_PUB_KEY, point, NH_EC_POINT, &point_len) == 1 &&
             point_len == NH_EC_POINT && point[0] == 0x04;
    BN_clear_free(d);
    EVP_PKEY_free(key);
    if (!ok) {
        OPENSSL_cleanse(scalar, NH_EC_SCALAR);
        return -1;
    }
    return 0;
}

int nh_ecdh(const uint8_t scalar[NH_EC_SCALAR], const uint8_t peer[NH_EC_POINT], uint8_t x[NH_EC_SCALAR]) {
    if (peer[0] != 0x04) return 1;
    EVP_PKEY *theirs = p256_key(NULL, peer);
    if (theirs == NULL) return 1;  // not on the curve
    EVP_PKEY *ours = p256_key(scalar, NULL);
    EVP_PKEY_CTX *ctx = ours != NULL ? EVP_PKEY_CTX_new_from_pkey(NULL, ours, NULL) : NULL;
    int result = -1;
    size_t len = NH_EC_SCALAR;
    if (ctx != NULL && EVP_PKEY_derive_init(ctx) == 1) {
        if (EVP_PKEY_derive_set_peer(ctx, theirs) != 1)  // also validates the peer's key
            result = 1;
        else if (EVP_PKEY_derive(ctx, x, &len) == 1 && len == NH_EC_SCALAR)
            result = 0;
    }
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(ours);
    EVP_PKEY_free(theirs);
    if (result != 0) OPENSSL_cleanse(x, NH_EC_SCALAR);
    return result;
}
