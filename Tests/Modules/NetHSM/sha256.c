// NetHSM test module: SHA-256 (FIPS 180-4) and HMAC-SHA-256 (RFC 2104), so that the module
// needs nothing but libc. Written for clarity, not speed.
#include "nethsm_internal.h"

#include <string.h>

static const uint32_t round_constants[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t rotate_right(uint32_t x, unsigned n) { return (x >> n) | (x << (32 - n)); }

// Mixes one 64-byte block into the hash state.
static void compress(uint32_t h[8], const uint8_t block[64]) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 |
               (uint32_t)block[4 * i + 2] << 8 | (uint32_t)block[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = rotate_right(w[i - 15], 7) ^ rotate_right(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = rotate_right(w[i - 2], 17) ^ rotate_right(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t sum1 = rotate_right(e, 6) ^ rotate_right(e, 11) ^ rotate_right(e, 25);
        uint32_t choose = (e & f) ^ (~e & g);
        uint32_t t1 = k + sum1 + choose + round_constants[i] + w[i];
        uint32_t sum0 = rotate_right(a, 2) ^ rotate_right(a, 13) ^ rotate_right(a, 22);
        uint32_t majority = (a & b) ^ (a & c) ^ (b & c);
        uint32_t t2 = sum0 + majority;
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d;
    h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

void nh_sha256_init(struct nh_sha256 *c) {
    static const uint32_t initial[8] = {
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    };
    memcpy(c->h, initial, sizeof initial);
    c->total = 0;
    c->used = 0;
    memset(c->block, 0, sizeof c->block);
}

void nh_sha256_update(struct nh_sha256 *c, const void *data, size_t len) {
    const uint8_t *p = data;
    c->total += len;
    while (len > 0) {
        size_t take = 64 - c->used;
        if (take > len) take = len;
        memcpy(c->block + c->used, p, take);
        c->used += (uint32_t)take;
        p += take;
        len -= take;
        if (c->used == 64) {
            compress(c->h, c->block);
            c->used = 0;
        }
    }
}

void nh_sha256_final(struct nh_sha256 *c, uint8_t out[32]) {
    uint64_t bits = c->total * 8;
    // Padding: 0x80, zeros up to 56 mod 64, then the message length in bits, big endian.
    c->block[c->used++] = 0x80;
    if (c->used > 56) {
        memset(c->block + c->used, 0, 64 - c->used);
        compress(c->h, c->block);
        c->used = 0;
    }
    memset(c->block + c->used, 0, 56 - c->used);
    for (int i = 0; i < 8; i++) c->block[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
    compress(c->h, c->block);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(c->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(c->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)c->h[i];
    }
    memset(c, 0, sizeof *c);
}

void nh_sha256(const void *data, size_t len, uint8_t out[32]) {
    struct nh_sha256 c;
    nh_sha256_init(&c);
    nh_sha256_update(&c, data, len);
    nh_sha256_final(&c, out);
}

// HMAC(K, m) = H((K' ^ opad) || H((K' ^ ipad) || m)), K' = K (or H(K) when longer than a block)
// zero-padded to the 64-byte block.
void nh_hmac_init(struct nh_hmac *c, const uint8_t *key, size_t key_len) {
    uint8_t block[64] = {0};
    if (key_len > 64)
        nh_sha256(key, key_len, block);
    else if (key_len > 0)
        memcpy(block, key, key_len);
    uint8_t inner_key[64];
    for (int i = 0; i < 64; i++) {
        inner_key[i] = block[i] ^ 0x36;
        c->outer_key[i] = block[i] ^ 0x5c;
    }
    nh_sha256_init(&c->inner);
    nh_sha256_update(&c->inner, inner_key, sizeof inner_key);
    memset(block, 0, sizeof block);
    memset(inner_key, 0, sizeof inner_key);
}

void nh_hmac_update(struct nh_hmac *c, const void *data, size_t len) { nh_sha256_update(&c->inner, data, len); }

void nh_hmac_final(struct nh_hmac *c, uint8_t out[32]) {
    uint8_t inner_hash[32];
    nh_sha256_final(&c->inner, inner_hash);
    struct nh_sha256 outer;
    nh_sha256_init(&outer);
    nh_sha256_update(&outer, c->outer_key, sizeof c->outer_key);
    nh_sha256_update(&outer, inner_hash, sizeof inner_hash);
    nh_sha256_final(&outer, out);
    memset(c, 0, sizeof *c);
}
