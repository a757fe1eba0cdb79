// p11fork-forksafe: the "fork safe" scenarios of PKCS#11 3.0 (session objects, session states
// and operations in progress carried into a forked child), run against a module directly (to
// show what is lost) and through libp11fork.so (to show it kept).
//
//   p11fork-forksafe --module PATH --token LABEL --pin PIN --key LABEL [--mechanism rsa|hmac]
//                    [--fork-safe] SCENARIO
//
// --fork-safe takes the function list from C_GetInterface(NULL, NULL, &i, CKF_INTERFACE_FORK_SAFE)
// (and fails if the module has no such interface); the child then never calls C_Initialize.
// Scenarios: create-object, unwrap-derive, ecdh, generated-lost, sign-update, decrypt-update,
// digest-update, find, context-login; and over a PKCS#11 3.2 module (the NetHSM test module),
// verify-signature-update, decapsulate and async-pending. In each, the parent computes the expected result, forks one child under
// alarm(); the child does the same work with the inherited handles and exits 0 when its result
// equals the parent's, else with a status saying what failed; for operations in progress the
// parent then finishes its own operation and checks it too. Last line: "result: ok ..." (exit 0)
// or "result: fail ..." (exit 1); usage errors exit 2.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <CPKCS11.h>
#include <nethsm.h>
#include "tool_support.h"
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CKF_INTERFACE_FORK_SAFE
#define CKF_INTERFACE_FORK_SAFE 0x00000001UL
#endif
typedef struct { CK_UTF8CHAR *name; void *list; CK_FLAGS flags; } interface_t;
typedef CK_RV (*get_interface_t)(CK_UTF8CHAR *, CK_VERSION *, interface_t **, CK_FLAGS);

#define CHILD_TIMEOUT 20

static CK_FUNCTION_LIST_PTR p11;
static CK_FUNCTION_LIST_3_2_PTR p32;  // the module's 3.2 list, when it offers one
static const char *token_label, *pin, *key_label, *mechanism_name = "rsa";
static CK_SESSION_HANDLE session;

// Child exit statuses.
enum { CHILD_OK = 0, CHILD_CALL_FAILED = 3, CHILD_DIFFERENT = 4, CHILD_WRONG_ERROR = 5 };


// A call that must succeed; in a child its failure is reported and becomes the exit status.
#define CHECK(call)                                                                              \
    do {                                                                                         \
        CK_RV rv_ = (call);                                                                      \
        if (rv_ != CKR_OK) {                                                                     \
            tool_say("%s (pid %d): %s -> 0x%lx", in_child ? "child" : "parent", getpid(), #call, rv_); \
            if (in_child) _exit(CHILD_CALL_FAILED);                                              \
            return 1;                                                                            \
        }                                                                                        \
    } while (0)

static int in_child;

// Forks one child running `body`, which returns its exit status; the parent checks it.
static int (*child_body)(void);
static int as_child(void *unused) {
    (void)unused;
    in_child = 1;
    return child_body();
}
static int run_child(const char *scenario, int (*body)(void)) {
    child_body = body;
    int status = tool_run_child(CHILD_TIMEOUT, as_child, NULL);
    if (status < 0) return tool_fail("%s: fork: %s", scenario, strerror(errno));
    if (status > TOOL_KILLED)
        return tool_fail("%s: child killed by signal %d%s", scenario, status - TOOL_KILLED, status == TOOL_KILLED + SIGALRM ? " (hung)" : "");
    if (status != 0) return tool_fail("%s: child exit status %d", scenario, status);
    return 0;
}

// MARK: helpers

static CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
static CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
static CK_KEY_TYPE aes_type = CKK_AES;
static unsigned char iv[16] = "p11fork-iv-16by";
static const unsigned char plaintext[64] = "p11fork fork-safe scenario: sixty-four bytes of plaintext.....";

static CK_RV has_mechanism(CK_MECHANISM_TYPE type) {
    CK_MECHANISM_INFO info;
    CK_SESSION_INFO s;
    CK_RV rv = p11->C_GetSessionInfo(session, &s);
    if (rv != CKR_OK) return rv;
    return p11->C_GetMechanismInfo(s.slotID, type, &info);
}

static CK_RV find_one(CK_OBJECT_CLASS class, const char *label, CK_OBJECT_HANDLE *out) {
    CK_ULONG n;
    return tool_find_objects(p11, session, class, label, out, 1, &n);
}

// AES-CBC over `plaintext` with `key`: 64 bytes out.
static CK_RV encrypt_with(CK_OBJECT_HANDLE key, unsigned char out[64]) {
    CK_MECHANISM cbc = { CKM_AES_CBC, iv, 16 };
    CK_ULONG n = 64;
    CK_RV rv = p11->C_EncryptInit(session, &cbc, key);
    if (rv == CKR_OK) rv = p11->C_Encrypt(session, (CK_BYTE_PTR)plaintext, 64, out, &n);
    return rv == CKR_OK && n != 64 ? CKR_GENERAL_ERROR : rv;
}

static CK_RV create_aes(const unsigned char *value, CK_BBOOL token, const char *label, CK_OBJECT_HANDLE *out) {
    CK_ATTRIBUTE t[] = { { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &aes_type, sizeof aes_type },
                         { CKA_TOKEN, &token, 1 }, { CKA_VALUE, (void *)value, 16 }, { CKA_ENCRYPT, &yes, 1 },
                         { CKA_DECRYPT, &yes, 1 }, { CKA_WRAP, &yes, 1 }, { CKA_UNWRAP, &yes, 1 },
                         { CKA_EXTRACTABLE, &yes, 1 }, { CKA_SENSITIVE, &no, 1 }, { CKA_DERIVE, &yes, 1 },
                         { CKA_LABEL, (void *)label, strlen(label) } };
    return p11->C_CreateObject(session, t, sizeof t / sizeof t[0], out);
}

// MARK: session objects

static CK_OBJECT_HANDLE key_a, key_b, key_c;
static unsigned char expected_a[64], expected_b[64], expected_c[64];

static int encrypts_alike(void) {
    unsigned char out[64];
    CHECK(encrypt_with(key_a, out));
    if (memcmp(out, expected_a, 64)) return CHILD_DIFFERENT;
    if (key_b) {
        CHECK(encrypt_with(key_b, out));
        if (memcmp(out, expected_b, 64)) return CHILD_DIFFERENT;
    }
    if (key_c) {
        CHECK(encrypt_with(key_c, out));
        if (memcmp(out, expected_c, 64)) return CHILD_DIFFERENT;
    }
    return CHILD_OK;
}

// An AES key made by C_CreateObject (session object), relabelled by C_SetAttributeValue, and a
// copy of it made by C_CopyObject.
static int create_object_child(void) {
    int status = encrypts_alike();
    if (status != CHILD_OK) return status;
    // The child has the parent's change: it finds the key by its new label, with the parent's handle.
    CK_OBJECT_HANDLE found = 0;
    CHECK(find_one(CKO_SECRET_KEY, "p11fork relabelled", &found));
    if (found != key_a) {
        tool_say("child: the relabelled key was found as 0x%lx, not the parent's 0x%lx", found, key_a);
        return CHILD_DIFFERENT;
    }
    return CHILD_OK;
}

static int scenario_create_object(void) {
    static const unsigned char value[16] = "0123456789abcdef";
    CHECK(create_aes(value, CK_FALSE, "p11fork session AES", &key_a));
    CK_ATTRIBUTE relabel = { CKA_LABEL, "p11fork relabelled", 18 };
    CHECK(p11->C_SetAttributeValue(session, key_a, &relabel, 1));
    CK_ATTRIBUTE copy_label = { CKA_LABEL, "p11fork copy", 12 };
    CHECK(p11->C_CopyObject(session, key_a, &copy_label, 1, &key_b));
    CHECK(encrypt_with(key_a, expected_a));
    CHECK(encrypt_with(key_b, expected_b));
    if (run_child("create-object", create_object_child)) return 1;
    tool_say("result: ok create-object: the created key and its copy encrypt alike in the child, which finds the key by its changed label");
    return 0;
}

// A session key unwrapped with a token key, then a key derived from the unwrapped one (a chain).
static int scenario_unwrap_derive(void) {
    static const unsigned char wrapping_value[16] = "wrapping-key-16b", inner_value[16] = "inner-key-value!";
    char label[64];
    snprintf(label, sizeof label, "p11fork wrapping %d", getpid());
    CK_OBJECT_HANDLE wrapping, inner;
    CHECK(create_aes(wrapping_value, CK_TRUE, label, &wrapping));
    CHECK(create_aes(inner_value, CK_FALSE, "p11fork inner", &inner));
    unsigned char wrapped[64];
    CK_ULONG wrapped_length = sizeof wrapped;
    CK_MECHANISM wrap = { CKM_AES_KEY_WRAP, NULL, 0 };
    CHECK(p11->C_WrapKey(session, &wrap, wrapping, inner, wrapped, &wrapped_length));
    CHECK(p11->C_DestroyObject(session, inner));
    CK_ATTRIBUTE t[] = { { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &aes_type, sizeof aes_type },
                         { CKA_TOKEN, &no, 1 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_DERIVE, &yes, 1 },
                         { CKA_LABEL, "p11fork unwrapped", 17 } };
    CHECK(p11->C_UnwrapKey(session, &wrap, wrapping, wrapped, wrapped_length, t, 6, &key_a));
    CHECK(encrypt_with(key_a, expected_a));

    unsigned char data[16] = "derivation-data!";
    CK_KEY_DERIVATION_STRING_DATA string = { data, 16 };
    CK_MECHANISM derive = { CKM_AES_ECB_ENCRYPT_DATA, &string, sizeof string };
    if (has_mechanism(CKM_AES_ECB_ENCRYPT_DATA) != CKR_OK) derive.mechanism = CKM_CONCATENATE_BASE_AND_DATA;
    CK_ULONG derived_length = derive.mechanism == CKM_AES_ECB_ENCRYPT_DATA ? 16 : 32;
    CK_ATTRIBUTE d[] = { { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &aes_type, sizeof aes_type },
                         { CKA_TOKEN, &no, 1 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_VALUE_LEN, &derived_length, sizeof derived_length } };
    CHECK(p11->C_DeriveKey(session, &derive, key_a, d, 5, &key_b));
    memset(data, 0, sizeof data);  // the application reuses its buffers: p11fork must have copied them
    CHECK(encrypt_with(key_b, expected_b));
    int failed = run_child("unwrap-derive", encrypts_alike);
    p11->C_DestroyObject(session, wrapping);
    if (failed) return 1;
    tool_say("result: ok unwrap-derive: the unwrapped key and the key derived from it encrypt alike in the child");
    return 0;
}

// An ECDH-derived session key from a token EC key and a peer's public point.
static int scenario_ecdh(void) {
    static const unsigned char p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
    char label[64];
    snprintf(label, sizeof label, "p11fork ecdh %d", getpid());
    CK_MECHANISM generate = { CKM_EC_KEY_PAIR_GEN, NULL, 0 };
    CK_ATTRIBUTE pub[] = { { CKA_EC_PARAMS, (void *)p256, sizeof p256 }, { CKA_TOKEN, &yes, 1 }, { CKA_LABEL, label, strlen(label) } };
    CK_ATTRIBUTE priv[] = { { CKA_TOKEN, &yes, 1 }, { CKA_DERIVE, &yes, 1 }, { CKA_PRIVATE, &yes, 1 },
                            { CKA_SENSITIVE, &yes, 1 }, { CKA_LABEL, label, strlen(label) } };
    CK_ATTRIBUTE peer_pub[] = { { CKA_EC_PARAMS, (void *)p256, sizeof p256 }, { CKA_TOKEN, &no, 1 } };
    CK_ATTRIBUTE peer_priv[] = { { CKA_TOKEN, &no, 1 }, { CKA_DERIVE, &yes, 1 } };
    CK_OBJECT_HANDLE token_public, token_private, peer_public, peer_private;
    CHECK(p11->C_GenerateKeyPair(session, &generate, pub, 3, priv, 5, &token_public, &token_private));
    CHECK(p11->C_GenerateKeyPair(session, &generate, peer_pub, 2, peer_priv, 2, &peer_public, &peer_private));
    unsigned char point[128];
    CK_ATTRIBUTE get = { CKA_EC_POINT, point, sizeof point };
    CHECK(p11->C_GetAttributeValue(session, peer_public, &get, 1));
    // CKA_EC_POINT is a DER OCTET STRING (04 41 04 x y): ECDH takes the raw point.
    unsigned char *raw = point;
    CK_ULONG raw_length = get.ulValueLen;
    if (raw_length == 67 && point[0] == 0x04 && point[1] == 0x41) { raw += 2; raw_length -= 2; }
    CK_ECDH1_DERIVE_PARAMS params = { CKD_NULL, 0, NULL, raw_length, raw };
    CK_MECHANISM ecdh = { CKM_ECDH1_DERIVE, &params, sizeof params };
    CK_ULONG length = 16;
    CK_ATTRIBUTE t[] = { { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &aes_type, sizeof aes_type },
                         { CKA_TOKEN, &no, 1 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_VALUE_LEN, &length, sizeof length } };
    CHECK(p11->C_DeriveKey(session, &ecdh, token_private, t, 5, &key_a));
    memset(point, 0, sizeof point);
    CHECK(encrypt_with(key_a, expected_a));
    int failed = run_child("ecdh", encrypts_alike);
    p11->C_DestroyObject(session, token_private);
    p11->C_DestroyObject(session, token_public);
    if (failed) return 1;
    tool_say("result: ok ecdh: the ECDH-derived session key encrypts alike in the child");
    return 0;
}

// A session key from C_GenerateKey cannot be made again: the child gets CKR_KEY_HANDLE_INVALID.
static CK_OBJECT_HANDLE generated;
static int generated_child(void) {
    unsigned char out[64];
    CK_RV rv = encrypt_with(generated, out);
    tool_say("child: encrypting with the generated session key -> 0x%lx", rv);
    // The other session objects are not affected.
    if (rv != CKR_KEY_HANDLE_INVALID && rv != CKR_OBJECT_HANDLE_INVALID) return CHILD_WRONG_ERROR;
    return encrypts_alike();
}

static int scenario_generated_lost(void) {
    static const unsigned char value[16] = "0123456789abcdef";
    CK_MECHANISM generate = { CKM_AES_KEY_GEN, NULL, 0 };
    CK_ULONG length = 16;
    CK_ATTRIBUTE t[] = { { CKA_TOKEN, &no, 1 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_VALUE_LEN, &length, sizeof length } };
    CHECK(p11->C_GenerateKey(session, &generate, t, 3, &generated));
    CHECK(create_aes(value, CK_FALSE, "p11fork session AES", &key_a));
    CHECK(encrypt_with(key_a, expected_a));
    if (run_child("generated-lost", generated_child)) return 1;
    tool_say("result: ok generated-lost: the generated key is reported lost (the module's answer for an invalid key handle), the created one works");
    return 0;
}

// MARK: operations in progress

static CK_OBJECT_HANDLE sign_key;
static unsigned char child_result[512];
static CK_ULONG child_result_length;
static int result_pipe[2];

static CK_MECHANISM sign_mechanism(void) {
    CK_MECHANISM m = { !strcmp(mechanism_name, "hmac") ? CKM_SHA256_HMAC : CKM_SHA256_RSA_PKCS, NULL, 0 };
    return m;
}

// What the child sends back: its result bytes.
static void send_result(const unsigned char *bytes, CK_ULONG length) {
    (void)!write(result_pipe[1], &length, sizeof length);
    (void)!write(result_pipe[1], bytes, length);
}

static int receive_result(void) {
    child_result_length = 0;
    if (read(result_pipe[0], &child_result_length, sizeof child_result_length) != sizeof child_result_length) return 0;
    if (child_result_length > sizeof child_result) return 0;
    return read(result_pipe[0], child_result, child_result_length) == (ssize_t)child_result_length;
}

static int run_child_with_result(const char *scenario, int (*body)(void)) {
    if (pipe(result_pipe) != 0) return tool_fail("pipe: %s", strerror(errno));
    int failed = run_child(scenario, body);
    close(result_pipe[1]);
    int received = receive_result();
    close(result_pipe[0]);
    if (failed) return 1;
    if (!received) return tool_fail("%s: the child sent no result", scenario);
    return 0;
}

static int sign_update_child(void) {
    unsigned char signature[512];
    CK_ULONG length = sizeof signature;
    CHECK(p11->C_SignUpdate(session, (CK_BYTE_PTR)plaintext + 32, 32));
    CHECK(p11->C_SignFinal(session, signature, &length));
    send_result(signature, length);
    return CHILD_OK;
}

static int scenario_sign_update(void) {
    CK_MECHANISM m = sign_mechanism();
    CHECK(find_one(!strcmp(mechanism_name, "hmac") ? CKO_SECRET_KEY : CKO_PRIVATE_KEY, key_label, &sign_key));
    // The whole data signed in one go, for reference.
    unsigned char whole[512];
    CK_ULONG whole_length = sizeof whole;
    CHECK(p11->C_SignInit(session, &m, sign_key));
    CHECK(p11->C_Sign(session, (CK_BYTE_PTR)plaintext, 64, whole, &whole_length));
    // Half of it fed before the fork.
    CHECK(p11->C_SignInit(session, &m, sign_key));
    CHECK(p11->C_SignUpdate(session, (CK_BYTE_PTR)plaintext, 32));
    if (run_child_with_result("sign-update", sign_update_child)) return 1;
    // The parent finishes its own operation.
    unsigned char mine[512];
    CK_ULONG mine_length = sizeof mine;
    CHECK(p11->C_SignUpdate(session, (CK_BYTE_PTR)plaintext + 32, 32));
    CHECK(p11->C_SignFinal(session, mine, &mine_length));
    if (mine_length != whole_length || memcmp(mine, whole, whole_length))
        return tool_fail("sign-update: the parent's own signature is not the signature of the whole data");
    if (child_result_length != whole_length || memcmp(child_result, whole, whole_length))
        return tool_fail("sign-update: the child's signature is not the signature of the whole data");
    tool_say("result: ok sign-update: the child finished the parent's signature (%lu bytes), equal to the whole data's; so did the parent", whole_length);
    return 0;
}

static unsigned char ciphertext[64];

static int decrypt_update_child(void) {
    unsigned char out[80];
    CK_ULONG n = sizeof out, last = 0;
    CHECK(p11->C_DecryptUpdate(session, ciphertext + 32, 32, out, &n));
    last = sizeof out - n;
    CHECK(p11->C_DecryptFinal(session, out + n, &last));
    send_result(out, n + last);
    return CHILD_OK;
}

static int scenario_decrypt_update(void) {
    static const unsigned char value[16] = "decrypt-key-16by";
    CHECK(create_aes(value, CK_FALSE, "p11fork decrypt", &key_a));
    CHECK(encrypt_with(key_a, ciphertext));
    CK_MECHANISM cbc = { CKM_AES_CBC, iv, 16 };
    unsigned char first[64];
    CK_ULONG n = sizeof first;
    CHECK(p11->C_DecryptInit(session, &cbc, key_a));
    memset(iv, 0, sizeof iv);  // the IV buffer is reused by the application
    CHECK(p11->C_DecryptUpdate(session, ciphertext, 32, first, &n));
    if (n != 32 || memcmp(first, plaintext, 32)) return tool_fail("decrypt-update: the first half does not decrypt in the parent");
    if (run_child_with_result("decrypt-update", decrypt_update_child)) return 1;
    unsigned char mine[80];
    CK_ULONG m = sizeof mine, last;
    CHECK(p11->C_DecryptUpdate(session, ciphertext + 32, 32, mine, &m));
    last = sizeof mine - m;
    CHECK(p11->C_DecryptFinal(session, mine + m, &last));
    if (m + last != 32 || memcmp(mine, plaintext + 32, 32)) return tool_fail("decrypt-update: the parent's second half is wrong");
    if (child_result_length != 32 || memcmp(child_result, plaintext + 32, 32))
        return tool_fail("decrypt-update: the child's second half is wrong (%lu bytes)", child_result_length);
    tool_say("result: ok decrypt-update: the child decrypted the second half of the parent's AES-CBC operation; so did the parent");
    return 0;
}

static int digest_update_child(void) {
    unsigned char digest[64];
    CK_ULONG n = sizeof digest;
    CHECK(p11->C_DigestUpdate(session, (CK_BYTE_PTR)plaintext + 32, 32));
    CHECK(p11->C_DigestFinal(session, digest, &n));
    send_result(digest, n);
    return CHILD_OK;
}

static int scenario_digest_update(void) {
    CK_MECHANISM sha = { CKM_SHA256, NULL, 0 };
    unsigned char whole[64];
    CK_ULONG whole_length = sizeof whole;
    CHECK(p11->C_DigestInit(session, &sha));
    CHECK(p11->C_Digest(session, (CK_BYTE_PTR)plaintext, 64, whole, &whole_length));
    CHECK(p11->C_DigestInit(session, &sha));
    CHECK(p11->C_DigestUpdate(session, (CK_BYTE_PTR)plaintext, 32));
    if (run_child_with_result("digest-update", digest_update_child)) return 1;
    unsigned char mine[64];
    CK_ULONG n = sizeof mine;
    CHECK(p11->C_DigestUpdate(session, (CK_BYTE_PTR)plaintext + 32, 32));
    CHECK(p11->C_DigestFinal(session, mine, &n));
    if (n != whole_length || memcmp(mine, whole, n)) return tool_fail("digest-update: the parent's digest is wrong");
    if (child_result_length != whole_length || memcmp(child_result, whole, whole_length)) return tool_fail("digest-update: the child's digest is wrong");
    tool_say("result: ok digest-update: the child finished the parent's SHA-256 digest; so did the parent");
    return 0;
}

// A search begun in the parent over five session data objects, two returned before the fork.
#define FOUND_TOTAL 5
static CK_OBJECT_HANDLE all_found[FOUND_TOTAL], first_found[2];

static int collect_rest(CK_OBJECT_HANDLE *rest, CK_ULONG *count) {
    *count = 0;
    for (;;) {
        CK_ULONG n = 0;
        CHECK(p11->C_FindObjects(session, rest + *count, 1, &n));
        if (n == 0) break;
        if (++*count > FOUND_TOTAL) break;
    }
    CHECK(p11->C_FindObjectsFinal(session));
    return 0;
}

static int find_child(void) {
    CK_OBJECT_HANDLE rest[FOUND_TOTAL + 1];
    CK_ULONG count;
    if (collect_rest(rest, &count)) return CHILD_CALL_FAILED;
    send_result((unsigned char *)rest, count * sizeof rest[0]);
    return CHILD_OK;
}

static int is_exactly_the_rest(const CK_OBJECT_HANDLE *rest, CK_ULONG count) {
    if (count != FOUND_TOTAL - 2) return 0;
    for (CK_ULONG i = 0; i < count; i++) {
        if (rest[i] == first_found[0] || rest[i] == first_found[1]) return 0;
        int known = 0;
        for (int k = 0; k < FOUND_TOTAL; k++) known |= all_found[k] == rest[i];
        for (CK_ULONG j = 0; j < i; j++) if (rest[j] == rest[i]) return 0;
        if (!known) return 0;
    }
    return 1;
}

static int scenario_find(void) {
    CK_OBJECT_CLASS data = CKO_DATA;
    const char *label = "p11fork search";
    for (int i = 0; i < FOUND_TOTAL; i++) {
        unsigned char value[8] = { 'v', 'a', 'l', 'u', 'e', (unsigned char)('0' + i), 0, 0 };
        CK_ATTRIBUTE t[] = { { CKA_CLASS, &data, sizeof data }, { CKA_TOKEN, &no, 1 },
                             { CKA_LABEL, (void *)label, strlen(label) }, { CKA_VALUE, value, 6 } };
        CHECK(p11->C_CreateObject(session, t, 4, &all_found[i]));
    }
    CK_ATTRIBUTE search[] = { { CKA_CLASS, &data, sizeof data }, { CKA_LABEL, (void *)label, strlen(label) } };
    CK_ULONG n = 0;
    CHECK(p11->C_FindObjectsInit(session, search, 2));
    CHECK(p11->C_FindObjects(session, first_found, 2, &n));
    if (n != 2) return tool_fail("find: the parent's first C_FindObjects returned %lu objects", n);
    if (run_child_with_result("find", find_child)) return 1;
    CK_OBJECT_HANDLE mine[FOUND_TOTAL + 1];
    CK_ULONG count;
    if (collect_rest(mine, &count)) return 1;
    if (!is_exactly_the_rest(mine, count)) return tool_fail("find: the parent's search went wrong after the fork (%lu more)", count);
    if (!is_exactly_the_rest((CK_OBJECT_HANDLE *)child_result, child_result_length / sizeof(CK_OBJECT_HANDLE)))
        return tool_fail("find: the child's search repeated or skipped objects (%lu more)", child_result_length / sizeof(CK_OBJECT_HANDLE));
    tool_say("result: ok find: the child continued the parent's search: the %d objects not yet returned, no repeat, none skipped", FOUND_TOTAL - 2);
    return 0;
}

// A CKA_ALWAYS_AUTHENTICATE key: C_SignInit and the context-specific login in the parent, the
// signature in the child (the login is replayed with the init).
static unsigned char expected_signature[512];
static CK_ULONG expected_signature_length;
static CK_OBJECT_HANDLE always_key;

static int context_login_child(void) {
    unsigned char signature[512];
    CK_ULONG length = sizeof signature;
    CHECK(p11->C_Sign(session, (CK_BYTE_PTR)plaintext, 64, signature, &length));
    send_result(signature, length);
    return CHILD_OK;
}

static int scenario_context_login(void) {
    char label[64];
    snprintf(label, sizeof label, "p11fork always-authenticate %d", getpid());
    CK_MECHANISM generate = { CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0 };
    CK_ULONG bits = 2048;
    CK_BYTE exponent[] = { 1, 0, 1 };
    CK_ATTRIBUTE pub[] = { { CKA_MODULUS_BITS, &bits, sizeof bits }, { CKA_PUBLIC_EXPONENT, exponent, 3 },
                           { CKA_TOKEN, &yes, 1 }, { CKA_VERIFY, &yes, 1 }, { CKA_LABEL, label, strlen(label) } };
    CK_ATTRIBUTE priv[] = { { CKA_TOKEN, &yes, 1 }, { CKA_SIGN, &yes, 1 }, { CKA_PRIVATE, &yes, 1 }, { CKA_SENSITIVE, &yes, 1 },
                            { CKA_ALWAYS_AUTHENTICATE, &yes, 1 }, { CKA_LABEL, label, strlen(label) } };
    CK_OBJECT_HANDLE public_key;
    CHECK(p11->C_GenerateKeyPair(session, &generate, pub, 5, priv, 6, &public_key, &always_key));
    CK_MECHANISM m = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    // Without the context-specific login the module refuses the signature: the key is what the scenario says.
    CHECK(p11->C_SignInit(session, &m, always_key));
    expected_signature_length = sizeof expected_signature;
    CK_RV refused = p11->C_Sign(session, (CK_BYTE_PTR)plaintext, 64, expected_signature, &expected_signature_length);
    if (refused == CKR_OK) return tool_fail("context-login: the module signs without a context-specific login");
    CHECK(p11->C_SignInit(session, &m, always_key));
    CHECK(p11->C_Login(session, CKU_CONTEXT_SPECIFIC, (CK_UTF8CHAR_PTR)pin, strlen(pin)));
    int failed = run_child_with_result("context-login", context_login_child);
    expected_signature_length = sizeof expected_signature;
    CK_RV mine = p11->C_Sign(session, (CK_BYTE_PTR)plaintext, 64, expected_signature, &expected_signature_length);
    p11->C_DestroyObject(session, always_key);
    p11->C_DestroyObject(session, public_key);
    if (failed) return 1;
    if (mine != CKR_OK) return tool_fail("context-login: the parent's own signature failed: 0x%lx", mine);
    if (child_result_length != expected_signature_length || memcmp(child_result, expected_signature, expected_signature_length))
        return tool_fail("context-login: the child's signature differs from the parent's");
    tool_say("result: ok context-login: the child signed with the parent's CKA_ALWAYS_AUTHENTICATE operation; so did the parent");
    return 0;
}

// MARK: PKCS#11 3.2

static int needs_32(const char *scenario) {
    if (p32) return 0;
    return tool_fail("%s: the module offers no 'PKCS 11' 3.2 interface", scenario);
}

// A signature-first verification (C_VerifySignatureInit) half fed before the fork: the child
// feeds the rest and the signature verifies; a wrong signature is then refused (the check is real).
static unsigned char good_signature[512];
static CK_ULONG good_signature_length;

static int verify_signature_child(void) {
    CHECK(p32->C_VerifySignatureUpdate(session, (CK_BYTE_PTR)plaintext + 32, 32));
    CHECK(p32->C_VerifySignatureFinal(session));
    unsigned char wrong[512];
    memcpy(wrong, good_signature, good_signature_length);
    wrong[0] ^= 1;
    CK_MECHANISM m = sign_mechanism();
    CHECK(p32->C_VerifySignatureInit(session, &m, sign_key, wrong, good_signature_length));
    CK_RV rv = p32->C_VerifySignature(session, (CK_BYTE_PTR)plaintext, 64);
    tool_say("child: the parent's verification finished with CKR_OK; a wrong signature -> 0x%lx", rv);
    return rv == CKR_SIGNATURE_INVALID ? CHILD_OK : CHILD_WRONG_ERROR;
}

static int scenario_verify_signature_update(void) {
    if (needs_32("verify-signature-update")) return 1;
    CK_MECHANISM m = sign_mechanism();
    CHECK(find_one(!strcmp(mechanism_name, "hmac") ? CKO_SECRET_KEY : CKO_PRIVATE_KEY, key_label, &sign_key));
    good_signature_length = sizeof good_signature;
    CHECK(p11->C_SignInit(session, &m, sign_key));
    CHECK(p11->C_Sign(session, (CK_BYTE_PTR)plaintext, 64, good_signature, &good_signature_length));
    CHECK(p32->C_VerifySignatureInit(session, &m, sign_key, good_signature, good_signature_length));
    CHECK(p32->C_VerifySignatureUpdate(session, (CK_BYTE_PTR)plaintext, 32));
    if (run_child("verify-signature-update", verify_signature_child)) return 1;
    // The parent finishes its own verification.
    CHECK(p32->C_VerifySignatureUpdate(session, (CK_BYTE_PTR)plaintext + 32, 32));
    CHECK(p32->C_VerifySignatureFinal(session));
    tool_say("result: ok verify-signature-update: the child finished the parent's verification (signature verified, a wrong one refused); so did the parent");
    return 0;
}

// Key encapsulation (the NetHSM test module's ECDH P-256 KEM) with a token key pair: the key
// C_DecapsulateKey made in the parent encrypts alike in the child; the one C_EncapsulateKey made
// (a random secret) is reported lost there.
static CK_OBJECT_HANDLE decapsulated, encapsulated;

static int decapsulate_child(void) {
    unsigned char out[64];
    CHECK(encrypt_with(decapsulated, out));
    if (memcmp(out, expected_a, 64)) return CHILD_DIFFERENT;
    CK_RV rv = encrypt_with(encapsulated, out);
    tool_say("child: the decapsulated key encrypts alike; encrypting with the encapsulated key -> 0x%lx", rv);
    return rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID ? CHILD_OK : CHILD_WRONG_ERROR;
}

static int scenario_decapsulate(void) {
    if (needs_32("decapsulate")) return 1;
    static const unsigned char p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
    CK_MECHANISM pair = { CKM_EC_KEY_PAIR_GEN, NULL, 0 }, kem = { CKM_NETHSM_ECDH_P256_KEM, NULL, 0 };
    const char *label = "p11fork kem pair";
    CK_ATTRIBUTE pub_t[] = { { CKA_EC_PARAMS, (void *)p256, sizeof p256 }, { CKA_ENCAPSULATE, &yes, 1 },
                             { CKA_TOKEN, &yes, 1 }, { CKA_LABEL, (void *)label, strlen(label) } };
    CK_ATTRIBUTE priv_t[] = { { CKA_DECAPSULATE, &yes, 1 }, { CKA_TOKEN, &yes, 1 }, { CKA_PRIVATE, &yes, 1 },
                              { CKA_LABEL, (void *)label, strlen(label) } };
    CK_OBJECT_HANDLE pub, priv;
    CHECK(p32->C_GenerateKeyPair(session, &pair, pub_t, 4, priv_t, 4, &pub, &priv));
    CK_ATTRIBUTE key_t[] = { { CKA_KEY_TYPE, &aes_type, sizeof aes_type }, { CKA_ENCRYPT, &yes, 1 }, { CKA_TOKEN, &no, 1 } };
    unsigned char kem_ciphertext[128];
    CK_ULONG length = sizeof kem_ciphertext;
    CHECK(p32->C_EncapsulateKey(session, &kem, pub, key_t, 3, kem_ciphertext, &length, &encapsulated));
    CHECK(p32->C_DecapsulateKey(session, &kem, priv, key_t, 3, kem_ciphertext, length, &decapsulated));
    CHECK(encrypt_with(decapsulated, expected_a));
    CHECK(encrypt_with(encapsulated, expected_b));
    int failed = memcmp(expected_a, expected_b, 64) != 0;
    if (failed) tool_fail("decapsulate: the encapsulated and decapsulated keys differ");
    else failed = run_child("decapsulate", decapsulate_child);
    p11->C_DestroyObject(session, pub);
    p11->C_DestroyObject(session, priv);
    if (failed) return 1;
    tool_say("result: ok decapsulate: the decapsulated session key encrypts alike in the child, the encapsulated one is reported lost");
    return 0;
}

// An asynchronous operation of the parent (a verification whose answer, CKR_PENDING, waits on an
// asynchronous session; its ID from C_AsyncGetID) stays the parent's: the child's C_AsyncComplete
// gets CKR_OPERATION_NOT_INITIALIZED and its C_AsyncJoin with the ID CKR_SAVED_STATE_INVALID; an
// operation of the child's own on the same session completes; the parent then gets its result.
static CK_SESSION_HANDLE async_session;
static CK_ULONG async_id;

static int async_child(void) {
    CK_UTF8CHAR_PTR name = (CK_UTF8CHAR_PTR)"C_VerifySignature";
    CK_RV complete = p32->C_AsyncComplete(async_session, name, NULL);
    CK_RV join = p32->C_AsyncJoin(session, name, async_id, NULL, 0);
    tool_say("child: C_AsyncComplete for the parent's operation -> 0x%lx, C_AsyncJoin with its ID -> 0x%lx", complete, join);
    if (complete != CKR_OPERATION_NOT_INITIALIZED || join != CKR_SAVED_STATE_INVALID) return CHILD_WRONG_ERROR;
    CK_MECHANISM m = sign_mechanism();
    CHECK(p32->C_VerifySignatureInit(async_session, &m, sign_key, good_signature, good_signature_length));
    CK_RV pending = p32->C_VerifySignature(async_session, (CK_BYTE_PTR)plaintext, 64);
    CK_RV own = p32->C_AsyncComplete(async_session, name, NULL);
    tool_say("child: its own verification -> 0x%lx, completed -> 0x%lx", pending, own);
    return pending == CKR_PENDING && own == CKR_OK ? CHILD_OK : CHILD_WRONG_ERROR;
}

static int scenario_async_pending(void) {
    if (needs_32("async-pending")) return 1;
    CK_MECHANISM m = sign_mechanism();
    CHECK(find_one(CKO_SECRET_KEY, key_label, &sign_key));
    good_signature_length = sizeof good_signature;
    CHECK(p11->C_SignInit(session, &m, sign_key));
    CHECK(p11->C_Sign(session, (CK_BYTE_PTR)plaintext, 64, good_signature, &good_signature_length));
    CK_SESSION_INFO info;
    CHECK(p11->C_GetSessionInfo(session, &info));
    CHECK(p32->C_OpenSession(info.slotID, CKF_SERIAL_SESSION | CKF_ASYNC_SESSION, NULL, NULL, &async_session));
    CHECK(p32->C_VerifySignatureInit(async_session, &m, sign_key, good_signature, good_signature_length));
    CK_RV rv = p32->C_VerifySignature(async_session, (CK_BYTE_PTR)plaintext, 64);
    if (rv != CKR_PENDING) return tool_fail("async-pending: the parent's C_VerifySignature answered 0x%lx, not CKR_PENDING", rv);
    CHECK(p32->C_AsyncGetID(async_session, (CK_UTF8CHAR_PTR)"C_VerifySignature", &async_id));
    if (run_child("async-pending", async_child)) return 1;
    CHECK(p32->C_AsyncComplete(async_session, (CK_UTF8CHAR_PTR)"C_VerifySignature", NULL));
    tool_say("result: ok async-pending: the parent's asynchronous operation stayed the parent's (it completed with CKR_OK after the child); the child's own completed");
    return 0;
}

// MARK: main

static int usage(const char *problem) {
    fprintf(stderr, "p11fork-forksafe: %s\nusage: p11fork-forksafe --module PATH --token LABEL --pin PIN --key LABEL "
                    "[--mechanism rsa|hmac] [--fork-safe] SCENARIO\nscenarios: create-object unwrap-derive ecdh "
                    "generated-lost sign-update decrypt-update digest-update find context-login "
                    "verify-signature-update decapsulate async-pending\n", problem);
    return 2;
}

int main(int argc, char **argv) {
    const char *module = NULL, *scenario = NULL;
    int fork_safe = 0;
    const struct tool_option options[] = {
        { "--module", &module }, { "--token", &token_label }, { "--pin", &pin }, { "--key", &key_label },
        { "--mechanism", &mechanism_name }, { "--fork-safe", .flag = &fork_safe }, { NULL },
    };
    if (tool_read_options(argc, argv, options, &scenario)) return usage("unknown argument");
    if (!module || !token_label || !pin || !key_label || !scenario) return usage("missing argument");
    if (strcmp(mechanism_name, "rsa") && strcmp(mechanism_name, "hmac")) return usage("bad --mechanism");
    alarm(120);
    void *library = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (!library) return tool_fail("dlopen: %s", dlerror());
    if (fork_safe) {
        get_interface_t get = (get_interface_t)dlsym(library, "C_GetInterface");
        interface_t *chosen = NULL;
        if (!get) return tool_fail("the module has no C_GetInterface");
        CK_RV rv = get(NULL, NULL, &chosen, CKF_INTERFACE_FORK_SAFE);
        if (rv != CKR_OK || !chosen) return tool_fail("C_GetInterface(CKF_INTERFACE_FORK_SAFE): 0x%lx", rv);
        p11 = chosen->list;
        tool_say("fork-safe interface: '%s' %d.%d", (char *)chosen->name, ((CK_VERSION *)p11)->major, ((CK_VERSION *)p11)->minor);
    } else {
        CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(library, "C_GetFunctionList");
        if (!get || get(&p11) != CKR_OK) return tool_fail("C_GetFunctionList");
    }
    // The 3.2 list, when the module has one (the same functions as p11's, and the 3.2 ones).
    get_interface_t get = (get_interface_t)dlsym(library, "C_GetInterface");
    interface_t *chosen32 = NULL;
    CK_VERSION v32 = { 3, 2 };
    if (get && get((CK_UTF8CHAR *)"PKCS 11", &v32, &chosen32, fork_safe ? CKF_INTERFACE_FORK_SAFE : 0) == CKR_OK && chosen32)
        p32 = chosen32->list;
    CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
    CHECK(p11->C_Initialize(&args));
    CK_SLOT_ID slot;
    CK_RV rv = tool_find_slot(p11, token_label, &slot);
    if (rv != CKR_OK) return tool_fail("no token labelled '%s': %s", token_label, tool_rv_name(rv));
    CHECK(p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session));
    CHECK(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)));
    if (!strcmp(scenario, "create-object")) return scenario_create_object();
    if (!strcmp(scenario, "unwrap-derive")) return scenario_unwrap_derive();
    if (!strcmp(scenario, "ecdh")) return scenario_ecdh();
    if (!strcmp(scenario, "generated-lost")) return scenario_generated_lost();
    if (!strcmp(scenario, "sign-update")) return scenario_sign_update();
    if (!strcmp(scenario, "decrypt-update")) return scenario_decrypt_update();
    if (!strcmp(scenario, "digest-update")) return scenario_digest_update();
    if (!strcmp(scenario, "find")) return scenario_find();
    if (!strcmp(scenario, "context-login")) return scenario_context_login();
    if (!strcmp(scenario, "verify-signature-update")) return scenario_verify_signature_update();
    if (!strcmp(scenario, "decapsulate")) return scenario_decapsulate();
    if (!strcmp(scenario, "async-pending")) return scenario_async_pending();
    return usage("unknown scenario");
}
