// NetHSM test module: declarations shared by the module's own .c files (never installed).
//
// The "server" is one file, $NETHSM_DIR/nethsm.state, mapped MAP_SHARED by every process and
// every loaded copy of the module, and guarded by a process-shared robust mutex that lives in
// the file. Everything a network HSM keeps on its side lives there: the token, its objects,
// the connections, their sessions (with their operation state) and their login state.
#ifndef NETHSM_INTERNAL_H
#define NETHSM_INTERNAL_H

#include "nethsm.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

// Everything declared from here on stays inside the .so (only C_GetFunctionList is exported).
#pragma GCC visibility push(hidden)

#define NH_INTERNAL __attribute__((visibility("hidden")))

// MARK: limits (bounded sizes everywhere)

#define NH_MAX_CONNECTIONS 64
#define NH_MAX_SESSIONS 64      // server-wide
#define NH_MAX_OBJECTS 256      // server-wide, token and session objects together
#define NH_MAX_VALUE 4096       // CKA_VALUE
#define NH_MAX_SHORT 256        // CKA_LABEL, CKA_ID, CKA_APPLICATION
#define NH_MIN_PIN 4
#define NH_MAX_PIN 64
#define NH_PIN_TRIES 3          // consecutive failures that lock a PIN
#define NH_ID_BITS 20           // server ids of sessions and objects: 1 ... 2^20-1
#define NH_ID_MASK ((1u << NH_ID_BITS) - 1)
#define NH_HMAC_LEN 32
#define NH_AES_BLOCK 16
#define NH_AES_MAX_KEY 32
#define NH_EC_SCALAR 32         // P-256 private key (CKA_VALUE of an EC private key)
#define NH_EC_POINT 65          // P-256 uncompressed point: 04 || x || y
#define NH_EC_POINT_DER 67      // CKA_EC_POINT: DER OCTET STRING 04 41 <point>
#define NH_MAX_EC_PARAMS 64     // CKA_EC_PARAMS

// MARK: SHA-256 and HMAC-SHA-256 (sha256.c)

struct nh_sha256 {
    uint32_t h[8];
    uint64_t total;       // bytes hashed so far
    uint8_t block[64];
    uint32_t used;        // bytes waiting in block
};

struct nh_hmac {
    struct nh_sha256 inner;
    uint8_t outer_key[64];  // key block XOR opad, for the final outer hash
};

NH_INTERNAL void nh_sha256_init(struct nh_sha256 *c);
NH_INTERNAL void nh_sha256_update(struct nh_sha256 *c, const void *data, size_t len);
NH_INTERNAL void nh_sha256_final(struct nh_sha256 *c, uint8_t out[32]);
NH_INTERNAL void nh_sha256(const void *data, size_t len, uint8_t out[32]);
NH_INTERNAL void nh_hmac_init(struct nh_hmac *c, const uint8_t *key, size_t key_len);
NH_INTERNAL void nh_hmac_update(struct nh_hmac *c, const void *data, size_t len);
NH_INTERNAL void nh_hmac_final(struct nh_hmac *c, uint8_t out[32]);

// MARK: AES and P-256 through OpenSSL's libcrypto (crypto.c; EVP interfaces only)

// Whole blocks (len a multiple of 16): ECB when iv is NULL, else CBC from iv. in and out may
// be the same buffer. 0 on success.
NH_INTERNAL int nh_aes_blocks(int encrypt, const uint8_t *key, size_t key_len, const uint8_t *iv,
                              const uint8_t *in, size_t len, uint8_t *out);
// RFC 3394 key wrap (AES-KW): len a multiple of 8 and >= 16; out gets len + 8 bytes. iv is the
// 8-byte initial value, NULL for the default A6A6A6A6A6A6A6A6. 0 on success.
NH_INTERNAL int nh_aes_wrap(const uint8_t *kek, size_t kek_len, const uint8_t *iv, const uint8_t *in, size_t len,
                            uint8_t *out);
// The inverse: len a multiple of 8 and >= 24; out gets len - 8 bytes. 0 on success, 1 when the
// integrity check fails (wrong key, wrong IV or damaged data), -1 on other errors.
NH_INTERNAL int nh_aes_unwrap(const uint8_t *kek, size_t kek_len, const uint8_t *iv, const uint8_t *in, size_t len,
                              uint8_t *out);
// A fresh P-256 key pair. 0 on success.
NH_INTERNAL int nh_ec_generate(uint8_t scalar[NH_EC_SCALAR], uint8_t point[NH_EC_POINT]);
// 1 when scalar (big-endian, NH_EC_SCALAR bytes) is in [1, n-1].
NH_INTERNAL int nh_ec_scalar_valid(const uint8_t scalar[NH_EC_SCALAR]);
// 1 when point is an uncompressed point on P-256 (not the point at infinity).
NH_INTERNAL int nh_ec_point_valid(const uint8_t point[NH_EC_POINT]);
// ECDH: the x coordinate of scalar * peer. 0 on success, 1 when peer is no valid point, -1 on
// other errors.
NH_INTERNAL int nh_ecdh(const uint8_t scalar[NH_EC_SCALAR], const uint8_t peer[NH_EC_POINT],
                        uint8_t x[NH_EC_SCALAR]);
// DER of the prime256v1 (P-256) OID, the only CKA_EC_PARAMS this module knows.
extern const uint8_t nh_p256_oid[10];

// MARK: the server state (server.c)

enum nh_login { NH_LOGIN_NONE = 0, NH_LOGIN_USER = 1, NH_LOGIN_SO = 2 };
enum nh_op { NH_OP_NONE = 0, NH_OP_FIND, NH_OP_SIGN, NH_OP_VERIFY, NH_OP_DIGEST, NH_OP_ENCRYPT, NH_OP_DECRYPT,
             NH_OP_VERIFY_SIGNATURE };

struct nh_connection {
    uint32_t in_use;
    uint32_t id;
    int32_t pid;            // the process that made it
    uint32_t tag;           // handle prefix: handle = tag << NH_ID_BITS | server id (1 ... 0xfff)
    uint64_t slot;          // this connection's slot ID (100 ... 999)
    uint32_t login;         // enum nh_login
};

// The state of a multi-part AES encryption or decryption (CKM_AES_ECB, CKM_AES_CBC,
// CKM_AES_CBC_PAD), kept on the server between calls.
struct nh_cipher {
    uint64_t mechanism;
    uint32_t key_len;
    uint8_t key[NH_AES_MAX_KEY];    // a copy: the operation goes on even if the key object goes
    uint8_t iv[NH_AES_BLOCK];       // CBC: the chaining value (the last ciphertext block)
    uint8_t buffer[NH_AES_BLOCK];   // input not yet processed: a partial block, or for CBC_PAD
    uint32_t buffered;              // decryption the last full block (it may hold the padding)
};

struct nh_session {
    uint32_t in_use;
    uint32_t id;
    uint32_t conn;          // owning connection id
    uint32_t rw;
    // The one active operation (find, sign, verify, digest, encrypt or decrypt).
    uint32_t op;            // enum nh_op
    uint32_t op_parts;      // 1 once C_*Update was called: C_Sign/C_Verify/C_Digest/C_Encrypt/C_Decrypt refused
    uint32_t op_key;        // server id of the key (sign, verify, encrypt, decrypt)
    uint32_t op_key_private;
    uint32_t op_needs_context_login;  // CKA_ALWAYS_AUTHENTICATE key, C_Login(CKU_CONTEXT_SPECIFIC) not yet done
    struct nh_hmac hmac;
    uint8_t op_signature[NH_HMAC_LEN];  // the signature C_VerifySignatureInit was given (3.2)
    uint64_t validation_flags;          // C_GetSessionValidationFlags(CKS_LAST_VALIDATION_OK)
    // An asynchronous session (CKF_ASYNC_SESSION, 3.2): the one result waiting for C_AsyncComplete.
    uint32_t async, async_pending, async_id;
    uint64_t async_rv;
    char async_function[32];
    struct nh_sha256 digest;
    struct nh_cipher cipher;
    uint32_t find_count, find_next;
    uint32_t find_ids[NH_MAX_OBJECTS];
};

struct nh_object {
    uint32_t in_use;
    uint32_t id;
    uint64_t seq;           // creation order
    uint32_t session;       // owning server session id for session objects, 0 for token objects
    uint32_t conn;          // owning connection id for session objects
    uint64_t klass;         // CKO_SECRET_KEY, CKO_PRIVATE_KEY, CKO_PUBLIC_KEY or CKO_DATA
    uint64_t key_type;      // keys: CKK_GENERIC_SECRET or CKK_AES (secret), CKK_EC (private, public)
    uint8_t token, private_, modifiable;
    uint8_t sensitive, extractable, sign, verify, always_authenticate;
    uint8_t encrypt, decrypt, wrap, unwrap, derive;
    uint8_t local, always_sensitive, never_extractable;
    uint8_t encapsulate, decapsulate;  // EC public / private keys (3.2)
    uint32_t label_len, ckaid_len, application_len, value_len;
    uint32_t ec_params_len, ec_point_len;
    uint8_t label[NH_MAX_SHORT];
    uint8_t ckaid[NH_MAX_SHORT];
    uint8_t application[NH_MAX_SHORT];
    uint8_t ec_params[NH_MAX_EC_PARAMS];  // EC keys: DER OID (P-256 only)
    uint8_t ec_point[NH_EC_POINT_DER];    // EC public keys: DER OCTET STRING of the uncompressed point
    uint8_t value[NH_MAX_VALUE];          // secret keys and data: the value; EC private keys: the scalar
};

#define NH_MAGIC 0x31305f4d53484e4eULL  // "NNHSM_01"
#define NH_LAYOUT 3

struct nh_state {
    uint64_t magic;         // written last when the file is created
    uint32_t layout;
    uint32_t size;          // sizeof(struct nh_state): refuses a file made by another build
    pthread_mutex_t lock;   // process-shared, robust
    uint8_t label[32];      // blank padded
    uint8_t serial[16];     // blank padded, random at creation
    uint8_t user_pin[NH_MAX_PIN];
    uint32_t user_pin_len;
    uint8_t so_pin[NH_MAX_PIN];
    uint32_t so_pin_len;
    uint32_t user_failures;  // consecutive wrong user PINs (locked at NH_PIN_TRIES)
    uint32_t so_failures;
    uint32_t next_connection, next_session, next_object, next_async_id;
    uint64_t next_seq;
    struct nh_connection connections[NH_MAX_CONNECTIONS];
    struct nh_session sessions[NH_MAX_SESSIONS];
    struct nh_object objects[NH_MAX_OBJECTS];
};

// Opens (or creates) the state in dir and maps it. On failure writes a one-line reason to why.
NH_INTERNAL struct nh_state *nh_server_open(const char *dir, char *why, size_t why_size);
NH_INTERNAL void nh_server_close(struct nh_state *s);
NH_INTERNAL int nh_server_lock(struct nh_state *s);      // 0 on success
NH_INTERNAL void nh_server_unlock(struct nh_state *s);

NH_INTERNAL struct nh_connection *nh_connection_open(struct nh_state *s, pid_t pid);
NH_INTERNAL struct nh_connection *nh_connection_find(struct nh_state *s, uint32_t id);
// Closes every session of the connection (and their session objects) and logs it out.
// Returns the number of sessions closed.
NH_INTERNAL unsigned nh_connection_reset(struct nh_state *s, struct nh_connection *c);
NH_INTERNAL void nh_connection_close(struct nh_state *s, struct nh_connection *c);
// Drops connections whose process is gone (a server would time them out).
NH_INTERNAL void nh_reap_dead_connections(struct nh_state *s);

NH_INTERNAL struct nh_session *nh_session_new(struct nh_state *s, struct nh_connection *c, int rw);
NH_INTERNAL struct nh_session *nh_session_find(struct nh_state *s, uint32_t conn, uint32_t id);
NH_INTERNAL void nh_session_close(struct nh_state *s, struct nh_session *se);
NH_INTERNAL unsigned nh_session_count(struct nh_state *s, uint32_t conn, int rw_only);

NH_INTERNAL struct nh_object *nh_object_new(struct nh_state *s);
// NETHSM_HANDLES=reuse: the lowest id that no other live session of the same connection has /
// that no other live object has, so a value is given again as soon as it is free.
NH_INTERNAL uint32_t nh_session_lowest_id(struct nh_state *s, const struct nh_session *self);
NH_INTERNAL uint32_t nh_object_lowest_id(struct nh_state *s, const struct nh_object *self);
NH_INTERNAL struct nh_object *nh_object_find(struct nh_state *s, uint32_t id);
NH_INTERNAL void nh_object_free(struct nh_object *o);

NH_INTERNAL int nh_random(void *buf, size_t len);  // 0 on success
// Appends one line (single write) to path; no-op when path is empty.
NH_INTERNAL void nh_log(const char *path, const char *format, ...) __attribute__((format(printf, 2, 3)));

// MARK: attributes (objects.c)

// NH_CREATE: C_CreateObject; NH_COPY: C_CopyObject; NH_GENERATE: C_GenerateKey and both halves of
// C_GenerateKeyPair; NH_DERIVE: C_DeriveKey; NH_UNWRAP: C_UnwrapKey, C_EncapsulateKey, C_DecapsulateKey.
enum nh_template_mode { NH_CREATE, NH_GENERATE, NH_COPY, NH_DERIVE, NH_UNWRAP };

// "The template chooses": the class of C_CreateObject, the key type of a derived or unwrapped
// secret key (CKK_GENERIC_SECRET unless the template asks for CKK_AES).
#define NH_FROM_TEMPLATE ((CK_ULONG)-1)

// Builds *o from a template. For NH_COPY, *o holds the source object's copy on entry and klass
// and key_type are ignored. Otherwise klass and key_type are what the operation makes (the
// template may repeat them; anything else is CKR_TEMPLATE_INCONSISTENT), or NH_FROM_TEMPLATE.
// The value is the caller's job for NH_GENERATE (o->value_len = CKA_VALUE_LEN, which is
// required for secret keys), NH_DERIVE and NH_UNWRAP (o->value_len = CKA_VALUE_LEN if given,
// else 0; checked against the key type); CKA_VALUE in those templates is CKR_TEMPLATE_INCONSISTENT.
NH_INTERNAL CK_RV nh_template_apply(struct nh_object *o, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count,
                                    enum nh_template_mode mode, CK_ULONG klass, CK_ULONG key_type);
// Is len a valid CKA_VALUE length for a secret key of this type (AES: 16, 24, 32; generic: 1-4096)?
NH_INTERNAL int nh_secret_length_ok(CK_ULONG key_type, CK_ULONG len);
// Reads one attribute: CKR_OK with *value/*len (pointing into o or into scratch),
// CKR_ATTRIBUTE_TYPE_INVALID, or CKR_ATTRIBUTE_SENSITIVE.
NH_INTERNAL CK_RV nh_attribute_read(const struct nh_object *o, CK_ATTRIBUTE_TYPE type,
                                    const void **value, CK_ULONG *len, uint8_t scratch[sizeof(CK_ULONG)]);
NH_INTERNAL int nh_object_matches(const struct nh_object *o, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count);
// CKA_LABEL / CKA_ID changes (validated first, then applied all together).
NH_INTERNAL CK_RV nh_attributes_set(struct nh_object *o, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count);
NH_INTERNAL CK_RV nh_template_check_pointers(CK_ATTRIBUTE_PTR tmpl, CK_ULONG count);

#pragma GCC visibility pop

#endif
