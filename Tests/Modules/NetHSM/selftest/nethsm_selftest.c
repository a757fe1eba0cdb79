// Self-test of the NetHSM test module. Built by run.sh with gcc (-DNETHSM_SELFTEST), not by
// SwiftPM: without that macro this file compiles to nothing, so it is harmless if a build tool
// picks it up with the module's sources.
//
//   nethsm_selftest MODULE [EXPECTED_HMAC_HEX]
//
// Needs NETHSM_DIR (a fresh, empty directory) and NETHSM_LOG (a file path) in the environment.
// Every child arms alarm() and _exit()s with its failure count; the parent checks every
// status. Last line: "selftest: ok (N checks)" and exit 0, or "selftest: FAILED ..." and exit 1.
#ifdef NETHSM_SELFTEST
#define _GNU_SOURCE
#include <dlfcn.h>
#include <CPKCS11.h>
#include <nethsm.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

// HMAC-SHA-256(key = "0123456789abcdef0123456789abcdef", "hello"), from
// `printf hello | openssl dgst -sha256 -hmac 0123456789abcdef0123456789abcdef`.
#define KEY_VALUE "0123456789abcdef0123456789abcdef"
#define HELLO_HMAC "db68b47b63c2397eac785025b1c9c2103ae06c28998234a783b3eb6453d1ad70"
#define KEY_LABEL "selftest-hmac"
#define PIN "1234"
#define SO_PIN "5678"

static const char *module_path;
static CK_FUNCTION_LIST_PTR p11;
static int checks, failures;

static const char *rv_name(CK_RV rv) {
    switch (rv) {
#define N(x) case x: return #x;
        N(CKR_OK) N(CKR_ARGUMENTS_BAD) N(CKR_ATTRIBUTE_SENSITIVE) N(CKR_ATTRIBUTE_TYPE_INVALID)
        N(CKR_ATTRIBUTE_READ_ONLY) N(CKR_ATTRIBUTE_VALUE_INVALID) N(CKR_BUFFER_TOO_SMALL) N(CKR_CANT_LOCK)
        N(CKR_CRYPTOKI_ALREADY_INITIALIZED) N(CKR_CRYPTOKI_NOT_INITIALIZED) N(CKR_DEVICE_ERROR)
        N(CKR_FUNCTION_NOT_SUPPORTED) N(CKR_FUNCTION_NOT_PARALLEL) N(CKR_GENERAL_ERROR) N(CKR_KEY_HANDLE_INVALID)
        N(CKR_KEY_FUNCTION_NOT_PERMITTED) N(CKR_MECHANISM_INVALID) N(CKR_OBJECT_HANDLE_INVALID)
        N(CKR_OPERATION_ACTIVE) N(CKR_OPERATION_NOT_INITIALIZED) N(CKR_PIN_INCORRECT) N(CKR_PIN_LOCKED)
        N(CKR_PIN_LEN_RANGE) N(CKR_RANDOM_SEED_NOT_SUPPORTED) N(CKR_SESSION_HANDLE_INVALID)
        N(CKR_SESSION_PARALLEL_NOT_SUPPORTED) N(CKR_SESSION_READ_ONLY) N(CKR_SIGNATURE_INVALID)
        N(CKR_SIGNATURE_LEN_RANGE) N(CKR_SLOT_ID_INVALID) N(CKR_TEMPLATE_INCOMPLETE) N(CKR_TEMPLATE_INCONSISTENT)
        N(CKR_USER_ALREADY_LOGGED_IN) N(CKR_USER_NOT_LOGGED_IN) N(CKR_USER_TYPE_INVALID)
        N(CKR_SESSION_READ_ONLY_EXISTS) N(CKR_USER_ANOTHER_ALREADY_LOGGED_IN) N(CKR_DATA_LEN_RANGE)
        N(CKR_ENCRYPTED_DATA_LEN_RANGE) N(CKR_ENCRYPTED_DATA_INVALID) N(CKR_KEY_TYPE_INCONSISTENT)
        N(CKR_MECHANISM_PARAM_INVALID) N(CKR_WRAPPED_KEY_INVALID) N(CKR_WRAPPED_KEY_LEN_RANGE)
        N(CKR_KEY_UNEXTRACTABLE) N(CKR_KEY_NOT_WRAPPABLE) N(CKR_KEY_SIZE_RANGE) N(CKR_CURVE_NOT_SUPPORTED)
        N(CKR_WRAPPING_KEY_TYPE_INCONSISTENT) N(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT)
        N(CKR_WRAPPING_KEY_HANDLE_INVALID) N(CKR_UNWRAPPING_KEY_HANDLE_INVALID) N(CKR_HOST_MEMORY)
        N(CKR_DEVICE_MEMORY)
#undef N
    }
    static char hex[32];
    snprintf(hex, sizeof hex, "0x%lx", rv);
    return hex;
}

static void expect_rv(int line, const char *what, CK_RV got, CK_RV want) {
    checks++;
    if (got == want) return;
    failures++;
    printf("FAIL [pid %d] line %d: %s returned %s, expected %s\n", (int)getpid(), line, what, rv_name(got),
           rv_name(want));
}

static void expect_true(int line, const char *what, int ok) {
    checks++;
    if (ok) return;
    failures++;
    printf("FAIL [pid %d] line %d: %s\n", (int)getpid(), line, what);
}

#define EXPECT(call, want) expect_rv(__LINE__, #call, (call), (want))
#define EXPECT_TRUE(cond) expect_true(__LINE__, #cond, (cond))

static void hex(const unsigned char *bytes, size_t len, char *out) {
    for (size_t i = 0; i < len; i++) sprintf(out + 2 * i, "%02x", bytes[i]);
    out[2 * len] = '\0';
}

static CK_FUNCTION_LIST_PTR load(int fresh_namespace) {
    void *lib = fresh_namespace ? dlmopen(LM_ID_NEWLM, module_path, RTLD_NOW | RTLD_LOCAL)
                                : dlopen(module_path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        printf("cannot load %s: %s\n", module_path, dlerror());
        return NULL;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    CK_FUNCTION_LIST_PTR list = NULL;
    if (get == NULL || get(&list) != CKR_OK) return NULL;
    return list;
}

// Runs fn in a forked child under alarm(10); returns the child's failure count (or 100+ for a crash).
static int in_child(const char *name, int (*fn)(void *), void *arg) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(10);
        checks = failures = 0;
        int child_failures = fn(arg);
        fflush(stdout);
        _exit(child_failures > 99 ? 99 : child_failures);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    int result = WIFEXITED(status) ? WEXITSTATUS(status) : 100 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    checks++;
    if (result != 0) {
        failures++;
        printf("FAIL child '%s' (pid %d) ended with %d%s\n", name, (int)pid, result,
               result >= 100 ? " (killed by a signal; 14 = alarm: it hung)" : " failures");
    } else {
        printf("ok   child '%s'\n", name);
    }
    return result;
}

// MARK: helpers on a function list

static CK_SLOT_ID first_slot(CK_FUNCTION_LIST_PTR f) {
    CK_SLOT_ID slots[4];
    CK_ULONG n = 4;
    EXPECT(f->C_GetSlotList(CK_TRUE, slots, &n), CKR_OK);
    EXPECT_TRUE(n == 1);
    return slots[0];
}

static CK_OBJECT_HANDLE find_one(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, CK_OBJECT_CLASS klass, const char *label,
                                 CK_ULONG *count) {
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &klass, sizeof klass},
        {CKA_LABEL, (void *)label, strlen(label)},
    };
    CK_OBJECT_HANDLE found[8] = {0};
    CK_ULONG n = 0;
    EXPECT(f->C_FindObjectsInit(s, tmpl, 2), CKR_OK);
    EXPECT(f->C_FindObjects(s, found, 8, &n), CKR_OK);
    EXPECT(f->C_FindObjectsFinal(s), CKR_OK);
    *count = n;
    return n > 0 ? found[0] : CK_INVALID_HANDLE;
}

static CK_RV sign_hello(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, char out_hex[65]) {
    CK_MECHANISM mech = {CKM_SHA256_HMAC, NULL, 0};
    unsigned char mac[32];
    CK_ULONG len = sizeof mac;
    out_hex[0] = '\0';
    CK_RV rv = f->C_SignInit(s, &mech, key);
    if (rv != CKR_OK) return rv;
    rv = f->C_Sign(s, (CK_BYTE_PTR) "hello", 5, mac, &len);
    if (rv == CKR_OK) hex(mac, len, out_hex);
    return rv;
}

static int log_contains(const char *needle) {
    const char *path = getenv("NETHSM_LOG");
    FILE *file = path ? fopen(path, "r") : NULL;
    if (file == NULL) return 0;
    char line[1200];
    int found = 0;
    while (!found && fgets(line, sizeof line, file)) found = strstr(line, needle) != NULL;
    fclose(file);
    return found;
}

static CK_FLAGS token_flags(CK_SLOT_ID slot) {
    CK_TOKEN_INFO info;
    EXPECT(p11->C_GetTokenInfo(slot, &info), CKR_OK);
    return info.flags;
}

// MARK: the parent's state at fork time

static CK_SLOT_ID slot;
static CK_SESSION_HANDLE session;
static CK_OBJECT_HANDLE key;
static CK_TOKEN_INFO parent_token;
static CK_SESSION_HANDLE encrypt_session;  // a multi-part encryption is under way on it at fork time
static char expected_hmac[65] = HELLO_HMAC;

// MARK: children

// Child 1: the inherited copy is a broken shared connection.
static int child_inherited(void *arg) {
    (void)arg;
    unsigned char mac[32];
    CK_ULONG len = sizeof mac;
    CK_INFO info;
    CK_TOKEN_INFO token;
    CK_ULONG n = 1;
    CK_SLOT_ID slots[1];
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "hello", 5, mac, &len), CKR_DEVICE_ERROR);
    EXPECT(p11->C_Initialize(NULL), CKR_CRYPTOKI_ALREADY_INITIALIZED);
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "hello", 5, mac, &len), CKR_DEVICE_ERROR);  // stays broken
    unsigned char out[64];
    CK_ULONG out_len = sizeof out;
    EXPECT(p11->C_EncryptUpdate(encrypt_session, (CK_BYTE_PTR) "0123456789abcdef", 16, out, &out_len), CKR_DEVICE_ERROR);
    EXPECT(p11->C_EncryptFinal(encrypt_session, out, &out_len), CKR_DEVICE_ERROR);
    EXPECT(p11->C_GetInfo(&info), CKR_DEVICE_ERROR);
    EXPECT(p11->C_GetSlotList(CK_TRUE, slots, &n), CKR_DEVICE_ERROR);
    EXPECT(p11->C_GetSlotInfo(slot, &(CK_SLOT_INFO){0}), CKR_DEVICE_ERROR);
    EXPECT(p11->C_GetTokenInfo(slot, &token), CKR_DEVICE_ERROR);
    EXPECT(p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &(CK_SESSION_HANDLE){0}), CKR_DEVICE_ERROR);
    return failures;
}

// Child 2: a fresh copy (dlmopen) is a new connection to the same server.
static int child_fresh_copy(void *arg) {
    (void)arg;
    CK_FUNCTION_LIST_PTR f = load(1);
    if (f == NULL) return 1;
    EXPECT_TRUE(f != p11);
    EXPECT(f->C_Initialize(NULL), CKR_OK);
    CK_SLOT_ID my_slot = first_slot(f);
    EXPECT_TRUE(my_slot != slot);  // slot IDs are per connection
    CK_TOKEN_INFO token;
    EXPECT(f->C_GetTokenInfo(my_slot, &token), CKR_OK);
    EXPECT_TRUE(memcmp(token.label, parent_token.label, 32) == 0);
    EXPECT_TRUE(memcmp(token.serialNumber, parent_token.serialNumber, 16) == 0);
    EXPECT_TRUE(memcmp(token.manufacturerID, parent_token.manufacturerID, 32) == 0);
    EXPECT_TRUE(memcmp(token.model, parent_token.model, 16) == 0);
    EXPECT(f->C_GetTokenInfo(slot, &token), CKR_SLOT_ID_INVALID);
    CK_SESSION_HANDLE s;
    EXPECT(f->C_OpenSession(my_slot, CKF_SERIAL_SESSION, NULL, NULL, &s), CKR_OK);
    EXPECT_TRUE(s != session);
    CK_SESSION_INFO info;
    EXPECT(f->C_GetSessionInfo(session, &info), CKR_SESSION_HANDLE_INVALID);  // the parent's handle
    EXPECT(f->C_GetSessionInfo(s, &info), CKR_OK);
    EXPECT_TRUE(info.state == CKS_RO_PUBLIC_SESSION);  // the parent's login is not ours
    CK_ULONG n;
    find_one(f, s, CKO_SECRET_KEY, KEY_LABEL, &n);
    EXPECT_TRUE(n == 0);  // private: invisible before login
    EXPECT(f->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)PIN, 4), CKR_OK);
    EXPECT(f->C_GetSessionInfo(s, &info), CKR_OK);
    EXPECT_TRUE(info.state == CKS_RO_USER_FUNCTIONS);
    CK_OBJECT_HANDLE k = find_one(f, s, CKO_SECRET_KEY, KEY_LABEL, &n);
    EXPECT_TRUE(n == 1);
    EXPECT_TRUE(k != key);  // object handles are per connection too
    CK_BYTE label[64];
    CK_ATTRIBUTE a = {CKA_LABEL, label, sizeof label};
    EXPECT(f->C_GetAttributeValue(s, key, &a, 1), CKR_OBJECT_HANDLE_INVALID);
    char mac[65];
    EXPECT(sign_hello(f, s, k, mac), CKR_OK);
    EXPECT_TRUE(strcmp(mac, expected_hmac) == 0);
    EXPECT(f->C_Finalize(NULL), CKR_OK);
    return failures;
}

// Child 3: C_Logout then C_Finalize on the inherited copy reach the server and kill the
// parent's login and sessions.
static int child_teardown(void *arg) {
    (void)arg;
    EXPECT(p11->C_Logout(session), CKR_OK);
    EXPECT(p11->C_Finalize(NULL), CKR_OK);
    EXPECT(p11->C_GetInfo(&(CK_INFO){0}), CKR_CRYPTOKI_NOT_INITIALIZED);  // finalized here
    return failures;
}

static int child_logout(void *arg) {
    (void)arg;
    EXPECT(p11->C_Logout(session), CKR_OK);
    return failures;
}

static int child_close_session(void *arg) {
    (void)arg;
    EXPECT(p11->C_CloseSession(session), CKR_OK);
    return failures;
}

static int child_close_all(void *arg) {
    (void)arg;
    EXPECT(p11->C_CloseAllSessions(slot), CKR_OK);
    return failures;
}

// Child: the old-spec way (C_Finalize, C_Initialize, log in again) works in the child —
// at the parent's expense, since the C_Finalize went to the shared connection.
static int child_reinitialize(void *arg) {
    (void)arg;
    EXPECT(p11->C_Finalize(NULL), CKR_OK);
    EXPECT(p11->C_Initialize(NULL), CKR_OK);
    CK_SLOT_ID my_slot = first_slot(p11);
    CK_SESSION_HANDLE s;
    EXPECT(p11->C_OpenSession(my_slot, CKF_SERIAL_SESSION, NULL, NULL, &s), CKR_OK);
    EXPECT(p11->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)PIN, 4), CKR_OK);
    CK_ULONG n;
    CK_OBJECT_HANDLE k = find_one(p11, s, CKO_SECRET_KEY, KEY_LABEL, &n);
    EXPECT_TRUE(n == 1);
    char mac[65];
    EXPECT(sign_hello(p11, s, k, mac), CKR_OK);
    EXPECT_TRUE(strcmp(mac, expected_hmac) == 0);
    EXPECT(p11->C_Finalize(NULL), CKR_OK);
    return failures;
}

// MARK: threads

struct worker {
    CK_SESSION_HANDLE session;
    int bad;
};

static void *worker_main(void *arg) {
    struct worker *w = arg;
    for (int i = 0; i < 200; i++) {
        char mac[65];
        if (sign_hello(p11, w->session, key, mac) != CKR_OK || strcmp(mac, expected_hmac) != 0) w->bad++;
    }
    return NULL;
}

// MARK: the test

static void login_fresh_session(void) {
    EXPECT(p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session), CKR_OK);
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)PIN, 4), CKR_OK);
}

static void test_basics(void) {
    CK_INFO info;
    EXPECT(p11->C_GetInfo(&info), CKR_CRYPTOKI_NOT_INITIALIZED);
    CK_C_INITIALIZE_ARGS bad = {.flags = CKF_OS_LOCKING_OK, .pReserved = (void *)1};
    EXPECT(p11->C_Initialize(&bad), CKR_ARGUMENTS_BAD);
    CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
    EXPECT(p11->C_Initialize(&args), CKR_OK);
    EXPECT(p11->C_Initialize(NULL), CKR_CRYPTOKI_ALREADY_INITIALIZED);
    EXPECT(p11->C_GetInfo(NULL), CKR_ARGUMENTS_BAD);
    EXPECT(p11->C_GetInfo(&info), CKR_OK);
    EXPECT_TRUE(info.cryptokiVersion.major == 3 && info.cryptokiVersion.minor == 2);
    EXPECT_TRUE(memcmp(info.manufacturerID, "p11fork test                    ", 32) == 0);
    EXPECT_TRUE(memcmp(info.libraryDescription, "NetHSM test module              ", 32) == 0);

    // Every entry of the function list is present.
    CK_VOID_PTR *entries = (CK_VOID_PTR *)&p11->C_Initialize;
    size_t count = (sizeof *p11 - offsetof(CK_FUNCTION_LIST, C_Initialize)) / sizeof(CK_VOID_PTR);
    int all = count == 68;
    for (size_t i = 0; i < count; i++) all = all && entries[i] != NULL;
    EXPECT_TRUE(all);

    CK_ULONG n = 0;
    EXPECT(p11->C_GetSlotList(CK_TRUE, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(p11->C_GetSlotList(CK_TRUE, NULL, &n), CKR_OK);
    EXPECT_TRUE(n == 1);
    CK_SLOT_ID none[1];
    n = 0;
    EXPECT(p11->C_GetSlotList(CK_TRUE, none, &n), CKR_BUFFER_TOO_SMALL);
    EXPECT_TRUE(n == 1);
    slot = first_slot(p11);
    EXPECT_TRUE(slot >= 100 && slot < 1000);
    EXPECT(p11->C_GetTokenInfo(slot + 1000, &parent_token), CKR_SLOT_ID_INVALID);
    EXPECT(p11->C_GetTokenInfo(slot, &parent_token), CKR_OK);
    EXPECT_TRUE(memcmp(parent_token.label, "nethsm                          ", 32) == 0);
    EXPECT_TRUE(memcmp(parent_token.model, "NetHSM          ", 16) == 0);
    EXPECT_TRUE((parent_token.flags & CKF_PROTECTED_AUTHENTICATION_PATH) == 0);
    EXPECT_TRUE((parent_token.flags & (CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_LOCKED)) == 0);

    CK_MECHANISM_TYPE mechs[16];
    static const CK_MECHANISM_TYPE expected_mechs[] = {
        CKM_SHA256,      CKM_SHA256_HMAC,  CKM_GENERIC_SECRET_KEY_GEN, CKM_AES_KEY_GEN,
        CKM_AES_ECB,     CKM_AES_CBC,      CKM_AES_CBC_PAD,            CKM_AES_KEY_WRAP,
        CKM_EC_KEY_PAIR_GEN, CKM_ECDH1_DERIVE, CKM_CONCATENATE_BASE_AND_DATA, CKM_SHA256_KEY_DERIVATION,
        CKM_NETHSM_ECDH_P256_KEM,
    };
    n = 0;
    EXPECT(p11->C_GetMechanismList(slot, NULL, &n), CKR_OK);
    EXPECT_TRUE(n == 13);
    n = 3;
    EXPECT(p11->C_GetMechanismList(slot, mechs, &n), CKR_BUFFER_TOO_SMALL);
    EXPECT_TRUE(n == 13);
    n = 16;
    EXPECT(p11->C_GetMechanismList(slot, mechs, &n), CKR_OK);
    EXPECT_TRUE(n == 13);
    for (size_t i = 0; i < 13; i++) EXPECT_TRUE(n == 13 && mechs[i] == expected_mechs[i]);
    CK_MECHANISM_INFO mi;
    EXPECT(p11->C_GetMechanismInfo(slot, CKM_AES_CBC_PAD, &mi), CKR_OK);
    EXPECT_TRUE(mi.ulMinKeySize == 16 && mi.ulMaxKeySize == 32 && mi.flags == (CKF_ENCRYPT | CKF_DECRYPT));
    EXPECT(p11->C_GetMechanismInfo(slot, CKM_AES_KEY_WRAP, &mi), CKR_OK);
    EXPECT_TRUE(mi.flags == (CKF_WRAP | CKF_UNWRAP));
    EXPECT(p11->C_GetMechanismInfo(slot, CKM_AES_KEY_GEN, &mi), CKR_OK);
    EXPECT_TRUE(mi.ulMinKeySize == 16 && mi.ulMaxKeySize == 32 && mi.flags == CKF_GENERATE);
    EXPECT(p11->C_GetMechanismInfo(slot, CKM_EC_KEY_PAIR_GEN, &mi), CKR_OK);
    EXPECT_TRUE(mi.ulMinKeySize == 256 && mi.ulMaxKeySize == 256 && (mi.flags & CKF_GENERATE_KEY_PAIR) &&
                (mi.flags & CKF_EC_NAMEDCURVE) && (mi.flags & CKF_EC_UNCOMPRESS));
    EXPECT(p11->C_GetMechanismInfo(slot, CKM_ECDH1_DERIVE, &mi), CKR_OK);
    EXPECT_TRUE(mi.ulMinKeySize == 256 && (mi.flags & CKF_DERIVE));
    EXPECT(p11->C_GetMechanismInfo(slot, CKM_SHA256_KEY_DERIVATION, &mi), CKR_OK);
    EXPECT_TRUE(mi.flags == CKF_DERIVE);
    EXPECT(p11->C_GetMechanismInfo(slot, CKM_AES_CTR, &mi), CKR_MECHANISM_INVALID);

    CK_SESSION_HANDLE s;
    EXPECT(p11->C_OpenSession(slot, 0, NULL, NULL, &s), CKR_SESSION_PARALLEL_NOT_SUPPORTED);
    EXPECT(p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session), CKR_OK);
    EXPECT(p11->C_Logout(session), CKR_USER_NOT_LOGGED_IN);
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)PIN, 4), CKR_OK);
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)PIN, 4), CKR_USER_ALREADY_LOGGED_IN);
    EXPECT(p11->C_Login(session, CKU_CONTEXT_SPECIFIC, (CK_UTF8CHAR_PTR)PIN, 4), CKR_OPERATION_NOT_INITIALIZED);
    EXPECT(p11->C_Login(session, 77, (CK_UTF8CHAR_PTR)PIN, 4), CKR_USER_TYPE_INVALID);
    CK_SESSION_INFO si;
    EXPECT(p11->C_GetSessionInfo(session, &si), CKR_OK);
    EXPECT_TRUE(si.state == CKS_RW_USER_FUNCTIONS && si.slotID == slot);
    EXPECT(p11->C_GetSessionInfo(session ^ 0x1000000, &si), CKR_SESSION_HANDLE_INVALID);

    unsigned char random[64];
    EXPECT(p11->C_GenerateRandom(session, random, sizeof random), CKR_OK);
    EXPECT(p11->C_SeedRandom(session, random, 8), CKR_RANDOM_SEED_NOT_SUPPORTED);
    EXPECT(p11->C_EncryptInit(session, NULL, 0), CKR_ARGUMENTS_BAD);
    EXPECT(p11->C_SignRecoverInit(session, NULL, 0), CKR_FUNCTION_NOT_SUPPORTED);
    EXPECT(p11->C_WaitForSlotEvent(0, NULL, NULL), CKR_FUNCTION_NOT_SUPPORTED);
}

static void test_objects_and_crypto(const char *openssl_hmac) {
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY, data = CKO_DATA;
    CK_KEY_TYPE generic = CKK_GENERIC_SECRET;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE key_tmpl[] = {
        {CKA_CLASS, &secret, sizeof secret},      {CKA_KEY_TYPE, &generic, sizeof generic},
        {CKA_TOKEN, &yes, sizeof yes},            {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_SIGN, &yes, sizeof yes},             {CKA_VERIFY, &yes, sizeof yes},
        {CKA_LABEL, KEY_LABEL, strlen(KEY_LABEL)}, {CKA_ID, "k1", 2},
        {CKA_VALUE, KEY_VALUE, 32},
    };
    EXPECT(p11->C_CreateObject(session, key_tmpl, 8, &key), CKR_TEMPLATE_INCOMPLETE);  // no CKA_VALUE
    EXPECT(p11->C_CreateObject(session, key_tmpl, 9, &key), CKR_OK);

    // A public data object with the same label: a look-alike.
    CK_OBJECT_HANDLE data_object;
    CK_ATTRIBUTE data_tmpl[] = {
        {CKA_CLASS, &data, sizeof data}, {CKA_LABEL, KEY_LABEL, strlen(KEY_LABEL)},
        {CKA_APPLICATION, "selftest", 8}, {CKA_VALUE, "payload", 7},
    };
    EXPECT(p11->C_CreateObject(session, data_tmpl, 4, &data_object), CKR_OK);

    // C_GetAttributeValue, 2.40 semantics: all attributes processed.
    CK_BYTE label[64], value[64], check[3];
    CK_ULONG value_len = 0;
    CK_ATTRIBUTE get[] = {
        {CKA_LABEL, NULL, 0},          {CKA_VALUE, value, sizeof value}, {CKA_MODULUS, value, sizeof value},
        {CKA_VALUE_LEN, &value_len, sizeof value_len}, {CKA_CHECK_VALUE, check, sizeof check},
    };
    CK_RV rv = p11->C_GetAttributeValue(session, key, get, 5);
    EXPECT_TRUE(rv == CKR_ATTRIBUTE_SENSITIVE || rv == CKR_ATTRIBUTE_TYPE_INVALID);
    EXPECT_TRUE(get[0].ulValueLen == strlen(KEY_LABEL));
    EXPECT_TRUE(get[1].ulValueLen == CK_UNAVAILABLE_INFORMATION);
    EXPECT_TRUE(get[2].ulValueLen == CK_UNAVAILABLE_INFORMATION);
    EXPECT_TRUE(get[3].ulValueLen == sizeof(CK_ULONG) && value_len == 32);
    EXPECT_TRUE(get[4].ulValueLen == 3 && check[0] == 0x3e && check[1] == 0xb1 && check[2] == 0xbd);
    CK_ATTRIBUTE small = {CKA_LABEL, label, 3};
    EXPECT(p11->C_GetAttributeValue(session, key, &small, 1), CKR_BUFFER_TOO_SMALL);
    EXPECT_TRUE(small.ulValueLen == CK_UNAVAILABLE_INFORMATION);
    CK_ATTRIBUTE unique = {0x4UL /* CKA_UNIQUE_ID (3.0) */, label, sizeof label};
    EXPECT(p11->C_GetAttributeValue(session, key, &unique, 1), CKR_ATTRIBUTE_TYPE_INVALID);
    CK_ATTRIBUTE data_value = {CKA_VALUE, value, sizeof value};
    EXPECT(p11->C_GetAttributeValue(session, data_object, &data_value, 1), CKR_OK);
    EXPECT_TRUE(data_value.ulValueLen == 7 && memcmp(value, "payload", 7) == 0);
    CK_BBOOL encrypt = CK_TRUE;
    CK_ATTRIBUTE usage = {CKA_ENCRYPT, &encrypt, sizeof encrypt};  // accepted, stored, unused: default false
    EXPECT(p11->C_GetAttributeValue(session, key, &usage, 1), CKR_OK);
    EXPECT_TRUE(encrypt == CK_FALSE);
    CK_ATTRIBUTE rename = {CKA_ID, "k2", 2}, forbidden = {CKA_SIGN, &yes, sizeof yes};
    EXPECT(p11->C_SetAttributeValue(session, key, &forbidden, 1), CKR_ATTRIBUTE_READ_ONLY);
    EXPECT(p11->C_SetAttributeValue(session, key, &rename, 1), CKR_OK);

    // Find: by class and label, in creation order.
    CK_ULONG n;
    EXPECT_TRUE(find_one(p11, session, CKO_SECRET_KEY, KEY_LABEL, &n) == key && n == 1);
    EXPECT_TRUE(find_one(p11, session, CKO_DATA, KEY_LABEL, &n) == data_object && n == 1);
    CK_ATTRIBUTE by_label = {CKA_LABEL, KEY_LABEL, strlen(KEY_LABEL)};
    CK_OBJECT_HANDLE found[4];
    EXPECT(p11->C_FindObjectsInit(session, &by_label, 1), CKR_OK);
    EXPECT(p11->C_FindObjectsInit(session, &by_label, 1), CKR_OPERATION_ACTIVE);
    EXPECT(p11->C_FindObjects(session, found, 4, &n), CKR_OK);
    EXPECT_TRUE(n == 2 && found[0] == key && found[1] == data_object);
    EXPECT(p11->C_FindObjectsFinal(session), CKR_OK);
    EXPECT(p11->C_FindObjectsFinal(session), CKR_OPERATION_NOT_INITIALIZED);

    // HMAC: length query, too small a buffer (operation stays), the real thing.
    CK_MECHANISM hmac = {CKM_SHA256_HMAC, NULL, 0};
    unsigned char mac[32];
    char mac_hex[65];
    CK_ULONG len = 0;
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "hello", 5, mac, &len), CKR_OPERATION_NOT_INITIALIZED);
    EXPECT(p11->C_SignInit(session, &hmac, data_object), CKR_KEY_HANDLE_INVALID);
    EXPECT(p11->C_SignInit(session, &hmac, key), CKR_OK);
    EXPECT(p11->C_SignInit(session, &hmac, key), CKR_OPERATION_ACTIVE);
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "hello", 5, NULL, &len), CKR_OK);
    EXPECT_TRUE(len == 32);
    len = 31;
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "hello", 5, mac, &len), CKR_BUFFER_TOO_SMALL);
    EXPECT_TRUE(len == 32);
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "hello", 5, mac, &len), CKR_OK);
    hex(mac, 32, mac_hex);
    EXPECT_TRUE(strcmp(mac_hex, HELLO_HMAC) == 0);
    if (openssl_hmac != NULL) EXPECT_TRUE(strcmp(mac_hex, openssl_hmac) == 0);
    printf("HMAC-SHA256(key, \"hello\") = %s\n", mac_hex);

    // Multi-part sign and verify.
    EXPECT(p11->C_SignInit(session, &hmac, key), CKR_OK);
    EXPECT(p11->C_SignUpdate(session, (CK_BYTE_PTR) "hel", 3), CKR_OK);
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "lo", 2, mac, &len), CKR_OPERATION_ACTIVE);
    EXPECT(p11->C_SignUpdate(session, (CK_BYTE_PTR) "lo", 2), CKR_OK);
    len = sizeof mac;
    EXPECT(p11->C_SignFinal(session, mac, &len), CKR_OK);
    hex(mac, 32, mac_hex);
    EXPECT_TRUE(strcmp(mac_hex, HELLO_HMAC) == 0);
    EXPECT(p11->C_VerifyInit(session, &hmac, key), CKR_OK);
    EXPECT(p11->C_Verify(session, (CK_BYTE_PTR) "hello", 5, mac, 32), CKR_OK);
    EXPECT(p11->C_VerifyInit(session, &hmac, key), CKR_OK);
    EXPECT(p11->C_VerifyUpdate(session, (CK_BYTE_PTR) "hell", 4), CKR_OK);
    EXPECT(p11->C_VerifyUpdate(session, (CK_BYTE_PTR) "o", 1), CKR_OK);
    EXPECT(p11->C_VerifyFinal(session, mac, 32), CKR_OK);
    mac[0] ^= 1;
    EXPECT(p11->C_VerifyInit(session, &hmac, key), CKR_OK);
    EXPECT(p11->C_Verify(session, (CK_BYTE_PTR) "hello", 5, mac, 32), CKR_SIGNATURE_INVALID);
    EXPECT(p11->C_VerifyInit(session, &hmac, key), CKR_OK);
    EXPECT(p11->C_Verify(session, (CK_BYTE_PTR) "hello", 5, mac, 31), CKR_SIGNATURE_LEN_RANGE);

    // RFC 4231 test cases 2 and 6 (a key longer than the block), as session objects.
    static const struct {
        const char *key;
        size_t key_len;
        const char *data, *mac;
    } rfc4231[] = {
        {"Jefe", 4, "what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"},
        {NULL, 131, "Test Using Larger Than Block-Size Key - Hash Key First",
         "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"},
    };
    for (size_t i = 0; i < 2; i++) {
        unsigned char key_bytes[131];
        if (rfc4231[i].key)
            memcpy(key_bytes, rfc4231[i].key, rfc4231[i].key_len);
        else
            memset(key_bytes, 0xaa, sizeof key_bytes);
        CK_ATTRIBUTE tmpl[] = {
            {CKA_CLASS, &secret, sizeof secret}, {CKA_KEY_TYPE, &generic, sizeof generic},
            {CKA_VALUE, key_bytes, rfc4231[i].key_len},
        };
        CK_OBJECT_HANDLE k;
        EXPECT(p11->C_CreateObject(session, tmpl, 3, &k), CKR_OK);
        EXPECT(p11->C_SignInit(session, &hmac, k), CKR_OK);
        len = sizeof mac;
        EXPECT(p11->C_Sign(session, (CK_BYTE_PTR)rfc4231[i].data, strlen(rfc4231[i].data), mac, &len), CKR_OK);
        hex(mac, 32, mac_hex);
        EXPECT_TRUE(strcmp(mac_hex, rfc4231[i].mac) == 0);
        EXPECT(p11->C_DestroyObject(session, k), CKR_OK);
        EXPECT(p11->C_SignInit(session, &hmac, k), CKR_KEY_HANDLE_INVALID);
    }

    // SHA-256 digest, single and multi-part (FIPS 180-2 "abc").
    CK_MECHANISM sha = {CKM_SHA256, NULL, 0};
    const char *abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    EXPECT(p11->C_DigestInit(session, &sha), CKR_OK);
    len = sizeof mac;
    EXPECT(p11->C_Digest(session, (CK_BYTE_PTR) "abc", 3, mac, &len), CKR_OK);
    hex(mac, 32, mac_hex);
    EXPECT_TRUE(strcmp(mac_hex, abc) == 0);
    EXPECT(p11->C_DigestInit(session, &sha), CKR_OK);
    EXPECT(p11->C_DigestUpdate(session, (CK_BYTE_PTR) "a", 1), CKR_OK);
    EXPECT(p11->C_DigestUpdate(session, (CK_BYTE_PTR) "bc", 2), CKR_OK);
    len = 0;
    EXPECT(p11->C_DigestFinal(session, NULL, &len), CKR_OK);
    EXPECT_TRUE(len == 32);
    EXPECT(p11->C_DigestFinal(session, mac, &len), CKR_OK);
    hex(mac, 32, mac_hex);
    EXPECT_TRUE(strcmp(mac_hex, abc) == 0);

    // Generated key: sign and verify round trip; CKA_VALUE_LEN required.
    CK_MECHANISM gen = {CKM_GENERIC_SECRET_KEY_GEN, NULL, 0};
    CK_ULONG bytes = 48;
    CK_ATTRIBUTE gen_tmpl[] = {{CKA_VALUE_LEN, &bytes, sizeof bytes}, {CKA_LABEL, "generated", 9}};
    CK_OBJECT_HANDLE generated;
    EXPECT(p11->C_GenerateKey(session, &gen, gen_tmpl + 1, 1, &generated), CKR_TEMPLATE_INCOMPLETE);
    EXPECT(p11->C_GenerateKey(session, &gen, gen_tmpl, 2, &generated), CKR_OK);
    EXPECT(p11->C_SignInit(session, &hmac, generated), CKR_OK);
    len = sizeof mac;
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "x", 1, mac, &len), CKR_OK);
    EXPECT(p11->C_VerifyInit(session, &hmac, generated), CKR_OK);
    EXPECT(p11->C_Verify(session, (CK_BYTE_PTR) "x", 1, mac, 32), CKR_OK);
    CK_OBJECT_HANDLE copy;
    CK_ATTRIBUTE copy_tmpl = {CKA_LABEL, "copy", 4};
    EXPECT(p11->C_CopyObject(session, generated, &copy_tmpl, 1, &copy), CKR_OK);
    EXPECT(p11->C_DestroyObject(session, copy), CKR_OK);

    // Bad input never crashes.
    EXPECT(p11->C_SignInit(session, NULL, key), CKR_ARGUMENTS_BAD);
    EXPECT(p11->C_CreateObject(session, NULL, 3, &copy), CKR_ARGUMENTS_BAD);
    CK_ATTRIBUTE null_value = {CKA_LABEL, NULL, 5};
    EXPECT(p11->C_FindObjectsInit(session, &null_value, 1), CKR_ARGUMENTS_BAD);
    EXPECT(p11->C_GetAttributeValue(session, 0, get, 1), CKR_OBJECT_HANDLE_INVALID);
    EXPECT(p11->C_GetAttributeValue(session, ~(CK_ULONG)0, get, 1), CKR_OBJECT_HANDLE_INVALID);
}

// MARK: AES, key wrap, EC and derivation

static size_t unhex(const char *text, unsigned char *out) {
    size_t n = strlen(text) / 2;
    for (size_t i = 0; i < n; i++) sscanf(text + 2 * i, "%2hhx", &out[i]);
    return n;
}

static int bytes_are(const unsigned char *bytes, size_t len, const char *want_hex) {
    char got[2 * 4096 + 1];
    if (2 * len != strlen(want_hex) || len > 4096) return 0;
    hex(bytes, len, got);
    return strcmp(got, want_hex) == 0;
}

// A session secret key from a value, with extra attributes.
static CK_OBJECT_HANDLE make_secret(CK_KEY_TYPE type, const unsigned char *value, CK_ULONG len,
                                    const CK_ATTRIBUTE *extra, CK_ULONG extra_count) {
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_ATTRIBUTE tmpl[16] = {
        {CKA_CLASS, &secret, sizeof secret}, {CKA_KEY_TYPE, &type, sizeof type}, {CKA_VALUE, (void *)value, len},
    };
    for (CK_ULONG i = 0; i < extra_count && i < 13; i++) tmpl[3 + i] = extra[i];
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    EXPECT(p11->C_CreateObject(session, tmpl, 3 + extra_count, &h), CKR_OK);
    return h;
}

// Reads CKA_VALUE (or another byte attribute); returns its length, or (CK_ULONG)-1.
static CK_ULONG read_bytes(CK_OBJECT_HANDLE h, CK_ATTRIBUTE_TYPE type, unsigned char *out, CK_ULONG size) {
    CK_ATTRIBUTE a = {type, out, size};
    if (p11->C_GetAttributeValue(session, h, &a, 1) != CKR_OK) return (CK_ULONG)-1;
    return a.ulValueLen;
}

static CK_BBOOL read_bool(CK_OBJECT_HANDLE h, CK_ATTRIBUTE_TYPE type) {
    CK_BBOOL v = 0xee;
    CK_ATTRIBUTE a = {type, &v, sizeof v};
    if (p11->C_GetAttributeValue(session, h, &a, 1) != CKR_OK) return 0xee;
    return v;
}

static CK_ULONG read_ulong(CK_OBJECT_HANDLE h, CK_ATTRIBUTE_TYPE type) {
    CK_ULONG v = (CK_ULONG)-1;
    CK_ATTRIBUTE a = {type, &v, sizeof v};
    if (p11->C_GetAttributeValue(session, h, &a, 1) != CKR_OK) return (CK_ULONG)-1;
    return v;
}

// Single-part encryption or decryption.
static CK_RV crypt_once(int encrypt, CK_MECHANISM *m, CK_OBJECT_HANDLE k, const unsigned char *in, CK_ULONG in_len,
                        unsigned char *out, CK_ULONG *out_len) {
    CK_RV rv = encrypt ? p11->C_EncryptInit(session, m, k) : p11->C_DecryptInit(session, m, k);
    if (rv != CKR_OK) return rv;
    return encrypt ? p11->C_Encrypt(session, (CK_BYTE_PTR)in, in_len, out, out_len)
                   : p11->C_Decrypt(session, (CK_BYTE_PTR)in, in_len, out, out_len);
}

// Multi-part: updates of the sizes in chunks (cycled; 0 included), each given exactly the room
// left, then the final call.
static CK_RV crypt_parts(int encrypt, CK_MECHANISM *m, CK_OBJECT_HANDLE k, const unsigned char *in, CK_ULONG in_len,
                         unsigned char *out, CK_ULONG *out_len) {
    static const CK_ULONG chunks[] = {1, 0, 5, 16, 3, 31, 7, 64, 15};
    CK_RV rv = encrypt ? p11->C_EncryptInit(session, m, k) : p11->C_DecryptInit(session, m, k);
    if (rv != CKR_OK) return rv;
    CK_ULONG at = 0, done = 0;
    for (size_t c = 0; at < in_len; c++) {
        CK_ULONG n = chunks[c % (sizeof chunks / sizeof chunks[0])];
        if (n > in_len - at) n = in_len - at;
        CK_ULONG room = *out_len - done;
        rv = encrypt ? p11->C_EncryptUpdate(session, (CK_BYTE_PTR)in + at, n, out + done, &room)
                     : p11->C_DecryptUpdate(session, (CK_BYTE_PTR)in + at, n, out + done, &room);
        if (rv != CKR_OK) return rv;
        at += n;
        done += room;
    }
    CK_ULONG room = *out_len - done;
    rv = encrypt ? p11->C_EncryptFinal(session, out + done, &room) : p11->C_DecryptFinal(session, out + done, &room);
    if (rv != CKR_OK) return rv;
    *out_len = done + room;
    return CKR_OK;
}

static const unsigned char iv0[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

static void test_aes(void) {
    CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
    unsigned char kv[32], in[512], out[600], back[600];
    CK_ULONG len, len2;
    for (int i = 0; i < 32; i++) kv[i] = (unsigned char)i;  // FIPS-197 appendix C keys: 00 01 02 ...

    // Created AES keys: defaults, check value, bad sizes.
    CK_OBJECT_HANDLE k128 = make_secret(CKK_AES, kv, 16, NULL, 0);
    CK_OBJECT_HANDLE k192 = make_secret(CKK_AES, kv, 24, NULL, 0);
    CK_OBJECT_HANDLE k256 = make_secret(CKK_AES, kv, 32, NULL, 0);
    EXPECT_TRUE(read_bool(k128, CKA_ENCRYPT) == CK_TRUE && read_bool(k128, CKA_DECRYPT) == CK_TRUE);
    EXPECT_TRUE(read_bool(k128, CKA_WRAP) == CK_TRUE && read_bool(k128, CKA_UNWRAP) == CK_TRUE);
    EXPECT_TRUE(read_bool(k128, CKA_SIGN) == CK_FALSE && read_bool(k128, CKA_DERIVE) == CK_FALSE);
    EXPECT_TRUE(read_ulong(k128, CKA_KEY_TYPE) == CKK_AES && read_ulong(k256, CKA_VALUE_LEN) == 32);
    unsigned char check[3];
    EXPECT_TRUE(read_bytes(k128, CKA_CHECK_VALUE, check, 3) == 3 && bytes_are(check, 3, "c6a13b"));  // E(0^128)
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_KEY_TYPE aes = CKK_AES, generic = CKK_GENERIC_SECRET;
    CK_OBJECT_HANDLE h;
    CK_ATTRIBUTE bad_aes[] = {{CKA_CLASS, &secret, sizeof secret}, {CKA_KEY_TYPE, &aes, sizeof aes}, {CKA_VALUE, kv, 15}};
    EXPECT(p11->C_CreateObject(session, bad_aes, 3, &h), CKR_ATTRIBUTE_VALUE_INVALID);
    bad_aes[2].ulValueLen = 16;
    CK_ATTRIBUTE checked[] = {bad_aes[0], bad_aes[1], bad_aes[2], {CKA_CHECK_VALUE, "\xc6\xa1\x3c", 3}};
    EXPECT(p11->C_CreateObject(session, checked, 4, &h), CKR_ATTRIBUTE_VALUE_INVALID);
    checked[3].pValue = "\xc6\xa1\x3b";
    EXPECT(p11->C_CreateObject(session, checked, 4, &h), CKR_OK);
    EXPECT(p11->C_DestroyObject(session, h), CKR_OK);

    // Known answers: FIPS-197 appendix C.1-C.3 and appendix B (ECB), SP 800-38A F.2.1 (CBC).
    CK_MECHANISM ecb = {CKM_AES_ECB, NULL, 0};
    CK_MECHANISM cbc = {CKM_AES_CBC, (void *)iv0, 16};
    CK_MECHANISM cbc_pad = {CKM_AES_CBC_PAD, (void *)iv0, 16};
    unhex("00112233445566778899aabbccddeeff", in);
    const struct {
        CK_OBJECT_HANDLE key;
        const char *cipher;
    } fips197[] = {
        {k128, "69c4e0d86a7b0430d8cdb78070b4c55a"},
        {k192, "dda97ca4864cdfe06eaf70a0ec0d7191"},
        {k256, "8ea2b7ca516745bfeafc49904b496089"},
    };
    for (size_t i = 0; i < 3; i++) {
        len = sizeof out;
        EXPECT(crypt_once(1, &ecb, fips197[i].key, in, 16, out, &len), CKR_OK);
        EXPECT_TRUE(len == 16 && bytes_are(out, 16, fips197[i].cipher));
        len2 = sizeof back;
        EXPECT(crypt_once(0, &ecb, fips197[i].key, out, 16, back, &len2), CKR_OK);
        EXPECT_TRUE(len2 == 16 && memcmp(back, in, 16) == 0);
    }
    unsigned char kb[16];
    unhex("2b7e151628aed2a6abf7158809cf4f3c", kb);
    CK_OBJECT_HANDLE k_sp = make_secret(CKK_AES, kb, 16, NULL, 0);
    unhex("3243f6a8885a308d313198a2e0370734", in);
    len = sizeof out;
    EXPECT(crypt_once(1, &ecb, k_sp, in, 16, out, &len), CKR_OK);
    EXPECT_TRUE(len == 16 && bytes_are(out, 16, "3925841d02dc09fbdc118597196a0b32"));
    unhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51", in);
    len = sizeof out;
    EXPECT(crypt_parts(1, &cbc, k_sp, in, 32, out, &len), CKR_OK);
    EXPECT_TRUE(len == 32 && bytes_are(out, 32, "7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2"));
    len = sizeof out;  // from `openssl enc -aes-128-cbc` (PKCS#7 padding)
    EXPECT(crypt_once(1, &cbc_pad, k_sp, (const unsigned char *)"hello", 5, out, &len), CKR_OK);
    EXPECT_TRUE(len == 16 && bytes_are(out, 16, "d8666ea8aad65cc08354b4bc43d4ff56"));
    printf("AES: FIPS-197 C.1-C.3 and B, SP 800-38A CBC, CBC_PAD(\"hello\") known answers checked\n");

    // Multi-part (updates of 0, 1, 3, 5, 7, 15, 16, 31, 64 bytes) == single-part, both ways, for
    // every mechanism and key size.
    for (size_t i = 0; i < sizeof in; i++) in[i] = (unsigned char)(i * 7 + 3);
    CK_MECHANISM *mechanisms[] = {&ecb, &cbc, &cbc_pad};
    CK_OBJECT_HANDLE keys[] = {k128, k192, k256};
    static const CK_ULONG lengths[] = {0, 1, 15, 16, 17, 31, 32, 33, 100, 256, 511};
    int mismatches = 0, runs = 0;
    for (size_t m = 0; m < 3; m++)
        for (size_t k = 0; k < 3; k++)
            for (size_t l = 0; l < sizeof lengths / sizeof lengths[0]; l++) {
                CK_ULONG n = lengths[l];
                if (mechanisms[m] != &cbc_pad && n % 16 != 0) continue;
                unsigned char one[600], parts[600];
                CK_ULONG one_len = sizeof one, parts_len = sizeof parts, back_len = sizeof back;
                runs++;
                if (crypt_once(1, mechanisms[m], keys[k], in, n, one, &one_len) != CKR_OK ||
                    crypt_parts(1, mechanisms[m], keys[k], in, n, parts, &parts_len) != CKR_OK ||
                    one_len != parts_len || memcmp(one, parts, one_len) != 0 ||
                    one_len != (mechanisms[m] == &cbc_pad ? (n / 16 + 1) * 16 : n)) {
                    mismatches++;
                    continue;
                }
                if (crypt_parts(0, mechanisms[m], keys[k], one, one_len, back, &back_len) != CKR_OK || back_len != n ||
                    memcmp(back, in, n) != 0)
                    mismatches++;
                back_len = sizeof back;
                if (crypt_once(0, mechanisms[m], keys[k], one, one_len, back, &back_len) != CKR_OK || back_len != n ||
                    memcmp(back, in, n) != 0)
                    mismatches++;
            }
    EXPECT_TRUE(mismatches == 0);
    printf("AES: %d multi-part/single-part round trips agree\n", runs);

    // Output conventions, CBC_PAD, 20 bytes of data -> 32 bytes.
    unsigned char reference[32];
    len = sizeof reference;
    EXPECT(crypt_once(1, &cbc_pad, k128, in, 20, reference, &len), CKR_OK);
    EXPECT(p11->C_Encrypt(session, in, 20, out, &len), CKR_OPERATION_NOT_INITIALIZED);  // that one ended it
    EXPECT(p11->C_EncryptInit(session, &cbc_pad, k128), CKR_OK);
    EXPECT(p11->C_EncryptInit(session, &cbc_pad, k128), CKR_OPERATION_ACTIVE);
    EXPECT(p11->C_DecryptInit(session, &cbc_pad, k128), CKR_OPERATION_ACTIVE);
    EXPECT(p11->C_DigestInit(session, &(CK_MECHANISM){CKM_SHA256, NULL, 0}), CKR_OPERATION_ACTIVE);
    EXPECT(p11->C_DecryptUpdate(session, in, 16, out, &len), CKR_OPERATION_NOT_INITIALIZED);
    len = 0;
    EXPECT(p11->C_Encrypt(session, in, 20, NULL, &len), CKR_OK);  // length query: stays
    EXPECT_TRUE(len == 32);
    len = 31;
    EXPECT(p11->C_Encrypt(session, in, 20, out, &len), CKR_BUFFER_TOO_SMALL);  // stays
    EXPECT_TRUE(len == 32);
    EXPECT(p11->C_Encrypt(session, in, 20, out, &len), CKR_OK);
    EXPECT_TRUE(len == 32 && memcmp(out, reference, 32) == 0);
    EXPECT(p11->C_Encrypt(session, in, 20, out, &len), CKR_OPERATION_NOT_INITIALIZED);
    // Multi-part with queries and short buffers in between: nothing is lost.
    EXPECT(p11->C_EncryptInit(session, &cbc_pad, k128), CKR_OK);
    len = 0;
    EXPECT(p11->C_EncryptUpdate(session, in, 20, NULL, &len), CKR_OK);
    EXPECT_TRUE(len == 16);
    len = 15;
    EXPECT(p11->C_EncryptUpdate(session, in, 20, out, &len), CKR_BUFFER_TOO_SMALL);
    EXPECT_TRUE(len == 16);
    EXPECT(p11->C_EncryptUpdate(session, in, 20, out, &len), CKR_OK);
    EXPECT_TRUE(len == 16);
    EXPECT(p11->C_Encrypt(session, in, 20, out + 16, &len), CKR_OPERATION_ACTIVE);  // multi-part under way
    len = 0;
    EXPECT(p11->C_EncryptFinal(session, NULL, &len), CKR_OK);
    EXPECT_TRUE(len == 16);
    len = 8;
    EXPECT(p11->C_EncryptFinal(session, out + 16, &len), CKR_BUFFER_TOO_SMALL);
    EXPECT_TRUE(len == 16);
    EXPECT(p11->C_EncryptFinal(session, out + 16, &len), CKR_OK);
    EXPECT_TRUE(len == 16 && memcmp(out, reference, 32) == 0);
    EXPECT(p11->C_EncryptFinal(session, out, &len), CKR_OPERATION_NOT_INITIALIZED);
    // Decryption reports the exact length (the padding removed), even for a length query.
    EXPECT(p11->C_DecryptInit(session, &cbc_pad, k128), CKR_OK);
    len = 0;
    EXPECT(p11->C_Decrypt(session, reference, 32, NULL, &len), CKR_OK);
    EXPECT_TRUE(len == 20);
    len = 19;
    EXPECT(p11->C_Decrypt(session, reference, 32, back, &len), CKR_BUFFER_TOO_SMALL);
    EXPECT_TRUE(len == 20);
    EXPECT(p11->C_Decrypt(session, reference, 32, back, &len), CKR_OK);  // a 20-byte buffer is enough
    EXPECT_TRUE(len == 20 && memcmp(back, in, 20) == 0);
    EXPECT(p11->C_DecryptInit(session, &cbc_pad, k128), CKR_OK);
    len = 0;
    EXPECT(p11->C_DecryptUpdate(session, reference, 32, NULL, &len), CKR_OK);
    EXPECT_TRUE(len == 16);  // the last block is held back: it holds the padding
    len = 16;
    EXPECT(p11->C_DecryptUpdate(session, reference, 32, back, &len), CKR_OK);
    EXPECT(p11->C_Decrypt(session, reference, 32, back, &len), CKR_OPERATION_ACTIVE);
    len2 = 0;
    EXPECT(p11->C_DecryptFinal(session, NULL, &len2), CKR_OK);
    EXPECT_TRUE(len2 == 4);
    len2 = 3;
    EXPECT(p11->C_DecryptFinal(session, back + 16, &len2), CKR_BUFFER_TOO_SMALL);
    EXPECT_TRUE(len2 == 4);
    EXPECT(p11->C_DecryptFinal(session, back + 16, &len2), CKR_OK);
    EXPECT_TRUE(len == 16 && len2 == 4 && memcmp(back, in, 20) == 0);
    // In place (input and output the same buffer).
    memcpy(back, in, 48);
    len = 48;
    EXPECT(crypt_once(1, &cbc, k256, back, 48, back, &len), CKR_OK);
    len2 = sizeof out;
    EXPECT(crypt_once(1, &cbc, k256, in, 48, out, &len2), CKR_OK);
    EXPECT_TRUE(len == 48 && len2 == 48 && memcmp(back, out, 48) == 0);

    // Errors end the operation.
    len = sizeof out;
    EXPECT(crypt_once(1, &ecb, k128, in, 15, out, &len), CKR_DATA_LEN_RANGE);
    EXPECT(p11->C_Encrypt(session, in, 16, out, &len), CKR_OPERATION_NOT_INITIALIZED);
    EXPECT(p11->C_EncryptInit(session, &cbc, k128), CKR_OK);
    len = sizeof out;
    EXPECT(p11->C_EncryptUpdate(session, in, 17, out, &len), CKR_OK);
    EXPECT_TRUE(len == 16);
    len = sizeof out;
    EXPECT(p11->C_EncryptFinal(session, out, &len), CKR_DATA_LEN_RANGE);  // a partial block is left
    EXPECT(p11->C_EncryptFinal(session, out, &len), CKR_OPERATION_NOT_INITIALIZED);
    len = sizeof out;
    EXPECT(crypt_once(0, &ecb, k128, in, 15, out, &len), CKR_ENCRYPTED_DATA_LEN_RANGE);
    len = sizeof out;
    EXPECT(crypt_once(0, &cbc_pad, k128, in, 0, out, &len), CKR_ENCRYPTED_DATA_LEN_RANGE);
    memset(back, 0, 16);  // CBC of a zero block, decrypted with CBC_PAD: pad byte 0 is invalid
    len = sizeof out;
    EXPECT(crypt_once(1, &cbc, k128, back, 16, out, &len), CKR_OK);
    len = sizeof back;
    EXPECT(crypt_once(0, &cbc_pad, k128, out, 16, back, &len), CKR_ENCRYPTED_DATA_INVALID);
    EXPECT(p11->C_Decrypt(session, out, 16, back, &len), CKR_OPERATION_NOT_INITIALIZED);
    memset(back, 0x11, 16);  // pad byte 17
    len = sizeof out;
    EXPECT(crypt_once(1, &cbc, k128, back, 16, out, &len), CKR_OK);
    EXPECT(p11->C_DecryptInit(session, &cbc_pad, k128), CKR_OK);
    len = 0;
    EXPECT(p11->C_DecryptUpdate(session, out, 16, NULL, &len), CKR_OK);
    EXPECT_TRUE(len == 0);
    EXPECT(p11->C_DecryptUpdate(session, out, 16, back, &len), CKR_OK);
    len = 0;
    EXPECT(p11->C_DecryptFinal(session, NULL, &len), CKR_ENCRYPTED_DATA_INVALID);  // found on the query: ends it
    EXPECT(p11->C_DecryptFinal(session, back, &len), CKR_OPERATION_NOT_INITIALIZED);
    EXPECT(p11->C_EncryptInit(session, &ecb, k128), CKR_OK);
    EXPECT(p11->C_Encrypt(session, in, 16, out, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(p11->C_Encrypt(session, in, 16, out, &len), CKR_OPERATION_NOT_INITIALIZED);

    // Keys and mechanisms that do not fit.
    CK_ATTRIBUTE no_encrypt[] = {{CKA_ENCRYPT, &no, sizeof no}, {CKA_LABEL, "aes-no-encrypt", 14}};
    CK_OBJECT_HANDLE k_decrypt_only = make_secret(CKK_AES, kv, 16, no_encrypt, 2);
    EXPECT(p11->C_EncryptInit(session, &ecb, k_decrypt_only), CKR_KEY_FUNCTION_NOT_PERMITTED);
    EXPECT(p11->C_DecryptInit(session, &ecb, k_decrypt_only), CKR_OK);
    len = sizeof back;
    EXPECT(p11->C_Decrypt(session, reference, 16, back, &len), CKR_OK);
    EXPECT(p11->C_EncryptInit(session, &ecb, key), CKR_KEY_TYPE_INCONSISTENT);
    EXPECT(p11->C_EncryptInit(session, &ecb, 0), CKR_KEY_HANDLE_INVALID);
    EXPECT(p11->C_EncryptInit(session, &(CK_MECHANISM){CKM_AES_CBC, (void *)iv0, 8}, k128), CKR_MECHANISM_PARAM_INVALID);
    EXPECT(p11->C_EncryptInit(session, &(CK_MECHANISM){CKM_AES_CBC_PAD, NULL, 16}, k128), CKR_MECHANISM_PARAM_INVALID);
    EXPECT(p11->C_EncryptInit(session, &(CK_MECHANISM){CKM_AES_ECB, (void *)iv0, 16}, k128), CKR_MECHANISM_PARAM_INVALID);
    EXPECT(p11->C_EncryptInit(session, &(CK_MECHANISM){CKM_AES_CTR, (void *)iv0, 16}, k128), CKR_MECHANISM_INVALID);
    EXPECT(p11->C_SignInit(session, &(CK_MECHANISM){CKM_SHA256_HMAC, NULL, 0}, k128), CKR_KEY_TYPE_INCONSISTENT);

    // CKA_ALWAYS_AUTHENTICATE applies to decryption too.
    CK_ATTRIBUTE always[] = {{CKA_ALWAYS_AUTHENTICATE, &yes, sizeof yes}};
    CK_OBJECT_HANDLE k_always = make_secret(CKK_AES, kv, 16, always, 1);
    EXPECT(p11->C_EncryptInit(session, &ecb, k_always), CKR_OK);  // no PIN needed to encrypt
    len = sizeof out;
    EXPECT(p11->C_Encrypt(session, in, 16, out, &len), CKR_OK);
    EXPECT(p11->C_DecryptInit(session, &ecb, k_always), CKR_OK);
    len2 = sizeof back;
    EXPECT(p11->C_Decrypt(session, out, 16, back, &len2), CKR_USER_NOT_LOGGED_IN);
    EXPECT(p11->C_Login(session, CKU_CONTEXT_SPECIFIC, (CK_UTF8CHAR_PTR)PIN, 4), CKR_OK);
    EXPECT(p11->C_Decrypt(session, out, 16, back, &len2), CKR_OK);
    EXPECT_TRUE(len2 == 16 && memcmp(back, in, 16) == 0);

    // A logout ends an operation with a private key (the server checks on every call).
    EXPECT(p11->C_EncryptInit(session, &cbc, k128), CKR_OK);
    len = sizeof out;
    EXPECT(p11->C_EncryptUpdate(session, in, 32, out, &len), CKR_OK);
    EXPECT(p11->C_Logout(session), CKR_OK);
    EXPECT(p11->C_EncryptUpdate(session, in, 32, out, &len), CKR_USER_NOT_LOGGED_IN);
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)PIN, 4), CKR_OK);
    EXPECT(p11->C_EncryptFinal(session, out, &len), CKR_OPERATION_NOT_INITIALIZED);

    // CKM_AES_KEY_GEN.
    CK_MECHANISM aes_gen = {CKM_AES_KEY_GEN, NULL, 0};
    CK_ULONG bytes = 32;
    CK_ATTRIBUTE gen[] = {{CKA_VALUE_LEN, &bytes, sizeof bytes}, {CKA_LABEL, "aes-generated", 13},
                          {CKA_KEY_TYPE, &aes, sizeof aes}};
    CK_OBJECT_HANDLE generated;
    EXPECT(p11->C_GenerateKey(session, &aes_gen, gen + 1, 1, &generated), CKR_TEMPLATE_INCOMPLETE);
    bytes = 20;
    EXPECT(p11->C_GenerateKey(session, &aes_gen, gen, 2, &generated), CKR_ATTRIBUTE_VALUE_INVALID);
    bytes = 32;
    gen[2].pValue = &generic;
    EXPECT(p11->C_GenerateKey(session, &aes_gen, gen, 3, &generated), CKR_TEMPLATE_INCONSISTENT);
    gen[2].pValue = &aes;
    EXPECT(p11->C_GenerateKey(session, &(CK_MECHANISM){CKM_AES_KEY_GEN, (void *)iv0, 16}, gen, 3, &generated),
           CKR_MECHANISM_PARAM_INVALID);
    EXPECT(p11->C_GenerateKey(session, &aes_gen, gen, 3, &generated), CKR_OK);
    EXPECT_TRUE(read_ulong(generated, CKA_KEY_TYPE) == CKK_AES && read_ulong(generated, CKA_VALUE_LEN) == 32);
    EXPECT_TRUE(read_bool(generated, CKA_LOCAL) == CK_TRUE && read_bool(generated, CKA_ENCRYPT) == CK_TRUE);
    len = sizeof out;
    EXPECT(crypt_parts(1, &cbc_pad, generated, in, 77, out, &len), CKR_OK);
    len2 = sizeof back;
    EXPECT(crypt_once(0, &cbc_pad, generated, out, len, back, &len2), CKR_OK);
    EXPECT_TRUE(len == 80 && len2 == 77 && memcmp(back, in, 77) == 0);
}

static void test_key_wrap(void) {
    CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
    unsigned char kek_value[16], key_value[16], wrapped[64], value[64];
    unhex("000102030405060708090A0B0C0D0E0F", kek_value);
    unhex("00112233445566778899AABBCCDDEEFF", key_value);
    CK_ATTRIBUTE label_kek[] = {{CKA_LABEL, "kek", 3}};
    CK_OBJECT_HANDLE kek = make_secret(CKK_AES, kek_value, 16, label_kek, 1);
    CK_ATTRIBUTE sensitive[] = {{CKA_SENSITIVE, &yes, sizeof yes}};
    CK_OBJECT_HANDLE target = make_secret(CKK_AES, key_value, 16, sensitive, 1);  // wrapping needs no readable value
    CK_MECHANISM kw = {CKM_AES_KEY_WRAP, NULL, 0};

    // RFC 3394 section 4.1, with the length query and a short buffer first.
    CK_ULONG len = 0;
    EXPECT(p11->C_WrapKey(session, &kw, kek, target, NULL, &len), CKR_OK);
    EXPECT_TRUE(len == 24);
    len = 23;
    EXPECT(p11->C_WrapKey(session, &kw, kek, target, wrapped, &len), CKR_BUFFER_TOO_SMALL);
    EXPECT_TRUE(len == 24);
    EXPECT(p11->C_WrapKey(session, &kw, kek, target, wrapped, &len), CKR_OK);
    EXPECT_TRUE(len == 24 && bytes_are(wrapped, 24, "1fa68b0a8112b447aef34bd8fb5a7b829d3e862371d2cfe5"));
    unsigned char default_iv[8];
    memset(default_iv, 0xa6, 8);
    CK_MECHANISM kw_iv = {CKM_AES_KEY_WRAP, default_iv, 8};
    unsigned char again[64];
    CK_ULONG again_len = sizeof again;
    EXPECT(p11->C_WrapKey(session, &kw_iv, kek, target, again, &again_len), CKR_OK);  // the default IV, explicitly
    EXPECT_TRUE(again_len == 24 && memcmp(again, wrapped, 24) == 0);
    char wrapped_hex[2 * 24 + 1];
    hex(wrapped, 24, wrapped_hex);
    printf("RFC 3394 4.1: AES-KW(KEK, 00112233445566778899aabbccddeeff) = %s\n", wrapped_hex);

    // Unwrap: the template gives the attributes.
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_KEY_TYPE aes = CKK_AES, generic = CKK_GENERIC_SECRET;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &secret, sizeof secret}, {CKA_KEY_TYPE, &aes, sizeof aes}, {CKA_LABEL, "unwrapped", 9},
        {CKA_ID, "u1", 2}, {CKA_SENSITIVE, &no, sizeof no}, {CKA_TOKEN, &no, sizeof no},
    };
    CK_OBJECT_HANDLE unwrapped;
    EXPECT(p11->C_UnwrapKey(session, &kw, kek, wrapped, 24, tmpl, 6, &unwrapped), CKR_OK);
    EXPECT_TRUE(read_bytes(unwrapped, CKA_VALUE, value, sizeof value) == 16 && memcmp(value, key_value, 16) == 0);
    EXPECT_TRUE(read_ulong(unwrapped, CKA_KEY_TYPE) == CKK_AES && read_ulong(unwrapped, CKA_CLASS) == CKO_SECRET_KEY);
    EXPECT_TRUE(read_bytes(unwrapped, CKA_LABEL, value, sizeof value) == 9 && memcmp(value, "unwrapped", 9) == 0);
    EXPECT_TRUE(read_bytes(unwrapped, CKA_ID, value, sizeof value) == 2 && memcmp(value, "u1", 2) == 0);
    EXPECT_TRUE(read_bool(unwrapped, CKA_LOCAL) == CK_FALSE && read_bool(unwrapped, CKA_NEVER_EXTRACTABLE) == CK_FALSE);
    EXPECT_TRUE(read_bool(unwrapped, CKA_ENCRYPT) == CK_TRUE);  // AES defaults
    CK_ULONG n;
    EXPECT_TRUE(find_one(p11, session, CKO_SECRET_KEY, "unwrapped", &n) == unwrapped && n == 1);

    // unwrap(wrap(k)) == k for a generated generic secret key (48 bytes), with an IV of our own.
    CK_MECHANISM gen = {CKM_GENERIC_SECRET_KEY_GEN, NULL, 0};
    CK_ULONG bytes = 48;
    CK_ATTRIBUTE gen_tmpl[] = {{CKA_VALUE_LEN, &bytes, sizeof bytes}};
    CK_OBJECT_HANDLE g;
    EXPECT(p11->C_GenerateKey(session, &gen, gen_tmpl, 1, &g), CKR_OK);
    unsigned char original[48];
    EXPECT_TRUE(read_bytes(g, CKA_VALUE, original, sizeof original) == 48);
    unsigned char my_iv[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    CK_MECHANISM kw_mine = {CKM_AES_KEY_WRAP, my_iv, 8};
    len = sizeof wrapped;
    EXPECT(p11->C_WrapKey(session, &kw_mine, kek, g, wrapped, &len), CKR_OK);
    EXPECT_TRUE(len == 56);
    CK_ATTRIBUTE generic_tmpl[] = {{CKA_LABEL, "unwrapped-generic", 17}, {CKA_VALUE_LEN, &bytes, sizeof bytes}};
    EXPECT(p11->C_UnwrapKey(session, &kw_mine, kek, wrapped, len, generic_tmpl, 2, &unwrapped), CKR_OK);
    EXPECT_TRUE(read_ulong(unwrapped, CKA_KEY_TYPE) == CKK_GENERIC_SECRET);  // the default without CKA_KEY_TYPE
    EXPECT_TRUE(read_bytes(unwrapped, CKA_VALUE, value, sizeof value) == 48 && memcmp(value, original, 48) == 0);
    EXPECT_TRUE(read_bool(unwrapped, CKA_SIGN) == CK_TRUE);  // generic defaults: usable for HMAC at once
    EXPECT(p11->C_UnwrapKey(session, &kw, kek, wrapped, len, generic_tmpl, 1, &unwrapped), CKR_WRAPPED_KEY_INVALID);
    wrapped[20] ^= 1;
    EXPECT(p11->C_UnwrapKey(session, &kw_mine, kek, wrapped, len, generic_tmpl, 1, &unwrapped), CKR_WRAPPED_KEY_INVALID);
    wrapped[20] ^= 1;
    EXPECT(p11->C_UnwrapKey(session, &kw_mine, kek, wrapped, len - 4, generic_tmpl, 1, &unwrapped),
           CKR_WRAPPED_KEY_LEN_RANGE);
    EXPECT(p11->C_UnwrapKey(session, &kw_mine, kek, wrapped, 16, generic_tmpl, 1, &unwrapped), CKR_WRAPPED_KEY_LEN_RANGE);
    EXPECT(p11->C_UnwrapKey(session, &kw_mine, kek, wrapped, len, tmpl, 2, &unwrapped),
           CKR_WRAPPED_KEY_LEN_RANGE);  // 48 bytes cannot be an AES key
    bytes = 32;
    EXPECT(p11->C_UnwrapKey(session, &kw_mine, kek, wrapped, len, generic_tmpl, 2, &unwrapped), CKR_TEMPLATE_INCONSISTENT);
    CK_ATTRIBUTE with_value[] = {{CKA_VALUE, original, 48}};
    EXPECT(p11->C_UnwrapKey(session, &kw_mine, kek, wrapped, len, with_value, 1, &unwrapped), CKR_TEMPLATE_INCONSISTENT);
    CK_OBJECT_CLASS data = CKO_DATA;
    CK_ATTRIBUTE as_data[] = {{CKA_CLASS, &data, sizeof data}};
    EXPECT(p11->C_UnwrapKey(session, &kw_mine, kek, wrapped, len, as_data, 1, &unwrapped), CKR_TEMPLATE_INCONSISTENT);

    // What may not be wrapped, and what may not wrap.
    CK_ATTRIBUTE unextractable[] = {{CKA_EXTRACTABLE, &no, sizeof no}};
    CK_OBJECT_HANDLE locked = make_secret(CKK_AES, key_value, 16, unextractable, 1);
    EXPECT(p11->C_WrapKey(session, &kw, kek, locked, wrapped, &len), CKR_KEY_UNEXTRACTABLE);
    CK_OBJECT_HANDLE odd = make_secret(CKK_GENERIC_SECRET, (const unsigned char *)"twenty bytes long!!!", 20, NULL, 0);
    len = sizeof wrapped;
    EXPECT(p11->C_WrapKey(session, &kw, kek, odd, wrapped, &len), CKR_KEY_SIZE_RANGE);
    CK_ATTRIBUTE no_wrap[] = {{CKA_WRAP, &no, sizeof no}, {CKA_UNWRAP, &no, sizeof no}};
    CK_OBJECT_HANDLE kek2 = make_secret(CKK_AES, kek_value, 16, no_wrap, 2);
    EXPECT(p11->C_WrapKey(session, &kw, kek2, target, wrapped, &len), CKR_KEY_FUNCTION_NOT_PERMITTED);
    EXPECT(p11->C_UnwrapKey(session, &kw, kek2, wrapped, 24, tmpl, 6, &unwrapped), CKR_KEY_FUNCTION_NOT_PERMITTED);
    EXPECT(p11->C_WrapKey(session, &kw, key, target, wrapped, &len), CKR_WRAPPING_KEY_TYPE_INCONSISTENT);
    EXPECT(p11->C_UnwrapKey(session, &kw, key, wrapped, 24, tmpl, 6, &unwrapped),
           CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT);
    EXPECT(p11->C_WrapKey(session, &kw, 0, target, wrapped, &len), CKR_WRAPPING_KEY_HANDLE_INVALID);
    EXPECT(p11->C_UnwrapKey(session, &kw, 0, wrapped, 24, tmpl, 6, &unwrapped), CKR_UNWRAPPING_KEY_HANDLE_INVALID);
    EXPECT(p11->C_WrapKey(session, &kw, kek, 0, wrapped, &len), CKR_KEY_HANDLE_INVALID);
    EXPECT(p11->C_WrapKey(session, &(CK_MECHANISM){CKM_AES_KEY_WRAP, my_iv, 4}, kek, target, wrapped, &len),
           CKR_MECHANISM_PARAM_INVALID);
    EXPECT(p11->C_WrapKey(session, &(CK_MECHANISM){CKM_AES_ECB, NULL, 0}, kek, target, wrapped, &len),
           CKR_MECHANISM_INVALID);
    EXPECT(p11->C_WrapKey(session, &kw, kek, target, wrapped, NULL), CKR_ARGUMENTS_BAD);
    (void)generic;
}

// P-256 test vector: NIST CAVS "KAS ECC CDH primitive" P-256, count 0.
#define CAVS_PEER "04700c48f77f56584c5cc632ca65640db91b6bacce3a4df6b42ce7cc838833d287" \
                  "db71e509e3fd9b060ddb20ba5c51dcc5948d46fbf640dfe0441782cab85fa4ac"
#define CAVS_D "7d7dc5f71eb29ddaf80d6214632eeae03d9058af1fb6d22ed80badb62bc1a534"
#define CAVS_Q "04ead218590119e8876b29146ff89ca61770c4edbbf97d38ce385ed281d8a6b230" \
               "28af61281fd35e2fa7002523acc85a429cb06ee6648325389f59edfce1405141"
#define CAVS_Z "46fc62106420ff012e54a434fbdd2d25ccc5852060561e68040dd7778997bd7b"

static const unsigned char p256_oid[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
static const unsigned char p384_oid[] = {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22};

static CK_RV ecdh(CK_OBJECT_HANDLE base, const unsigned char *peer, CK_ULONG peer_len, CK_KEY_TYPE type,
                  CK_ULONG value_len, CK_OBJECT_HANDLE *out) {
    CK_ECDH1_DERIVE_PARAMS params = {CKD_NULL, 0, NULL, peer_len, (CK_BYTE_PTR)peer};
    CK_MECHANISM m = {CKM_ECDH1_DERIVE, &params, sizeof params};
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &secret, sizeof secret}, {CKA_KEY_TYPE, &type, sizeof type},
                           {CKA_DERIVE, &yes, sizeof yes}, {CKA_VALUE_LEN, &value_len, sizeof value_len}};
    return p11->C_DeriveKey(session, &m, base, tmpl, value_len ? 4 : 3, out);
}

static CK_RV derive_plain(CK_MECHANISM_TYPE type, void *param, CK_ULONG param_len, CK_OBJECT_HANDLE base,
                          CK_KEY_TYPE key_type, CK_ULONG value_len, CK_OBJECT_HANDLE *out) {
    CK_MECHANISM m = {type, param, param_len};
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE tmpl[] = {{CKA_KEY_TYPE, &key_type, sizeof key_type}, {CKA_DERIVE, &yes, sizeof yes},
                           {CKA_VALUE_LEN, &value_len, sizeof value_len}};
    return p11->C_DeriveKey(session, &m, base, tmpl, value_len ? 3 : 2, out);
}

static void test_ec_and_derive(void) {
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_OBJECT_CLASS priv_class = CKO_PRIVATE_KEY, pub_class = CKO_PUBLIC_KEY;
    CK_KEY_TYPE ec = CKK_EC, aes = CKK_AES, generic = CKK_GENERIC_SECRET;
    unsigned char value[128], point[80], peer[80], d[32];
    CK_ULONG len;

    // Key pairs.
    CK_MECHANISM gen = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    CK_ATTRIBUTE pub_tmpl[] = {{CKA_EC_PARAMS, (void *)p256_oid, sizeof p256_oid}, {CKA_LABEL, "ec-a", 4},
                               {CKA_TOKEN, &no, sizeof no}};
    CK_ATTRIBUTE priv_tmpl[] = {{CKA_DERIVE, &yes, sizeof yes}, {CKA_LABEL, "ec-a", 4}, {CKA_ID, "ec", 2}};
    CK_OBJECT_HANDLE pub_a, priv_a, pub_b, priv_b;
    EXPECT(p11->C_GenerateKeyPair(session, &gen, pub_tmpl, 3, priv_tmpl, 3, &pub_a, &priv_a), CKR_OK);
    EXPECT(p11->C_GenerateKeyPair(session, &gen, pub_tmpl, 1, priv_tmpl, 1, &pub_b, &priv_b), CKR_OK);
    len = read_bytes(pub_a, CKA_EC_POINT, point, sizeof point);
    EXPECT_TRUE(len == 67 && point[0] == 0x04 && point[1] == 0x41 && point[2] == 0x04);  // DER OCTET STRING
    EXPECT_TRUE(read_ulong(pub_a, CKA_CLASS) == CKO_PUBLIC_KEY && read_ulong(pub_a, CKA_KEY_TYPE) == CKK_EC);
    EXPECT_TRUE(read_ulong(priv_a, CKA_CLASS) == CKO_PRIVATE_KEY && read_ulong(priv_a, CKA_KEY_TYPE) == CKK_EC);
    EXPECT_TRUE(read_bytes(priv_a, CKA_EC_PARAMS, value, sizeof value) == sizeof p256_oid &&
                memcmp(value, p256_oid, sizeof p256_oid) == 0);
    EXPECT(p11->C_GetAttributeValue(session, priv_a, &(CK_ATTRIBUTE){CKA_VALUE, value, sizeof value}, 1),
           CKR_ATTRIBUTE_SENSITIVE);
    EXPECT(p11->C_GetAttributeValue(session, pub_a, &(CK_ATTRIBUTE){CKA_VALUE, value, sizeof value}, 1),
           CKR_ATTRIBUTE_TYPE_INVALID);
    EXPECT_TRUE(read_bool(priv_a, CKA_LOCAL) == CK_TRUE && read_bool(pub_a, CKA_LOCAL) == CK_TRUE);
    EXPECT_TRUE(read_bool(priv_a, CKA_ALWAYS_SENSITIVE) == CK_TRUE && read_bool(priv_a, CKA_PRIVATE) == CK_TRUE);
    EXPECT_TRUE(read_bool(pub_a, CKA_PRIVATE) == CK_FALSE && read_bool(priv_b, CKA_DERIVE) == CK_TRUE);
    EXPECT_TRUE(read_bytes(pub_b, CKA_EC_POINT, peer, sizeof peer) == 67 && memcmp(peer, point, 67) != 0);
    CK_ULONG n;
    EXPECT_TRUE(find_one(p11, session, CKO_PRIVATE_KEY, "ec-a", &n) == priv_a && n == 1);
    EXPECT_TRUE(find_one(p11, session, CKO_PUBLIC_KEY, "ec-a", &n) == pub_a && n == 1);  // pair B has no label

    CK_OBJECT_HANDLE h1, h2;
    CK_ATTRIBUTE p384[] = {{CKA_EC_PARAMS, (void *)p384_oid, sizeof p384_oid}};
    EXPECT(p11->C_GenerateKeyPair(session, &gen, p384, 1, priv_tmpl, 1, &h1, &h2), CKR_CURVE_NOT_SUPPORTED);
    EXPECT(p11->C_GenerateKeyPair(session, &gen, pub_tmpl + 1, 1, priv_tmpl, 1, &h1, &h2), CKR_TEMPLATE_INCOMPLETE);
    CK_ATTRIBUTE with_point[] = {pub_tmpl[0], {CKA_EC_POINT, point, 67}};
    EXPECT(p11->C_GenerateKeyPair(session, &gen, with_point, 2, priv_tmpl, 1, &h1, &h2), CKR_TEMPLATE_INCONSISTENT);
    CK_ATTRIBUTE with_value[] = {{CKA_VALUE, value, 32}};
    EXPECT(p11->C_GenerateKeyPair(session, &gen, pub_tmpl, 1, with_value, 1, &h1, &h2), CKR_TEMPLATE_INCONSISTENT);
    CK_ATTRIBUTE wrong_class[] = {{CKA_CLASS, &pub_class, sizeof pub_class}};
    EXPECT(p11->C_GenerateKeyPair(session, &gen, pub_tmpl, 1, wrong_class, 1, &h1, &h2), CKR_TEMPLATE_INCONSISTENT);
    EXPECT(p11->C_GenerateKeyPair(session, &gen, pub_tmpl, 1, priv_tmpl, 1, NULL, &h2), CKR_ARGUMENTS_BAD);

    // ECDH from both sides: the same key, whichever form the peer's point takes.
    CK_OBJECT_HANDLE ab, ba;
    EXPECT(ecdh(priv_a, peer, 67, aes, 32, &ab), CKR_OK);           // DER OCTET STRING
    EXPECT(ecdh(priv_b, point + 2, 65, aes, 32, &ba), CKR_OK);      // raw point
    unsigned char key_ab[32], key_ba[32];
    EXPECT_TRUE(read_bytes(ab, CKA_VALUE, key_ab, 32) == 32 && read_bytes(ba, CKA_VALUE, key_ba, 32) == 32);
    EXPECT_TRUE(memcmp(key_ab, key_ba, 32) == 0);
    EXPECT_TRUE(read_ulong(ab, CKA_KEY_TYPE) == CKK_AES && read_bool(ab, CKA_LOCAL) == CK_FALSE);
    EXPECT_TRUE(read_bool(ab, CKA_ALWAYS_SENSITIVE) == CK_FALSE);  // the derived key is not sensitive
    CK_MECHANISM cbc_pad = {CKM_AES_CBC_PAD, (void *)iv0, 16};
    unsigned char msg[40], out[64], back[64];
    memcpy(msg, "a message from A to B, through ECDH keys", 40);
    CK_ULONG out_len = sizeof out, back_len = sizeof back;
    EXPECT(crypt_once(1, &cbc_pad, ab, msg, 40, out, &out_len), CKR_OK);
    EXPECT(crypt_once(0, &cbc_pad, ba, out, out_len, back, &back_len), CKR_OK);
    EXPECT_TRUE(back_len == 40 && memcmp(back, msg, 40) == 0);

    // Known answer (NIST CAVS), with created keys. The x coordinate is 32 bytes; a shorter key
    // is its trailing part, as SoftHSM does.
    CK_ATTRIBUTE priv_create[] = {
        {CKA_CLASS, &priv_class, sizeof priv_class}, {CKA_KEY_TYPE, &ec, sizeof ec},
        {CKA_EC_PARAMS, (void *)p256_oid, sizeof p256_oid}, {CKA_VALUE, d, unhex(CAVS_D, d)},
        {CKA_DERIVE, &yes, sizeof yes}, {CKA_LABEL, "cavs", 4},
    };
    CK_OBJECT_HANDLE cavs;
    EXPECT(p11->C_CreateObject(session, priv_create, 6, &cavs), CKR_OK);
    EXPECT_TRUE(read_bool(cavs, CKA_SENSITIVE) == CK_TRUE && read_bool(cavs, CKA_LOCAL) == CK_FALSE);
    unsigned char cavs_peer[65], der_peer[67];
    unhex(CAVS_PEER, cavs_peer);
    der_peer[0] = 0x04;
    der_peer[1] = 0x41;
    memcpy(der_peer + 2, cavs_peer, 65);
    EXPECT(ecdh(cavs, cavs_peer, 65, generic, 0, &h1), CKR_OK);
    EXPECT_TRUE(read_bytes(h1, CKA_VALUE, value, sizeof value) == 32 && bytes_are(value, 32, CAVS_Z));
    EXPECT(ecdh(cavs, der_peer, 67, aes, 16, &h1), CKR_OK);
    EXPECT_TRUE(read_bytes(h1, CKA_VALUE, value, sizeof value) == 16 && bytes_are(value, 16, CAVS_Z + 32));
    EXPECT(ecdh(cavs, der_peer, 67, generic, 5, &h1), CKR_OK);
    EXPECT_TRUE(read_bytes(h1, CKA_VALUE, value, sizeof value) == 5 && bytes_are(value, 5, CAVS_Z + 54));
    EXPECT(ecdh(cavs, cavs_peer, 65, aes, 0, &h1), CKR_OK);  // AES without CKA_VALUE_LEN: 32 bytes
    EXPECT_TRUE(read_ulong(h1, CKA_VALUE_LEN) == 32);
    printf("ECDH P-256: NIST CAVS count 0 known answer checked; generated pairs agree from both sides\n");
    EXPECT(ecdh(cavs, cavs_peer, 65, generic, 33, &h1), CKR_TEMPLATE_INCONSISTENT);
    EXPECT(ecdh(cavs, cavs_peer, 65, aes, 20, &h1), CKR_ATTRIBUTE_VALUE_INVALID);
    cavs_peer[40] ^= 1;  // no longer on the curve
    EXPECT(ecdh(cavs, cavs_peer, 65, generic, 0, &h1), CKR_MECHANISM_PARAM_INVALID);
    EXPECT(ecdh(cavs, der_peer, 66, generic, 0, &h1), CKR_MECHANISM_PARAM_INVALID);
    CK_ECDH1_DERIVE_PARAMS sha1_kdf = {CKD_SHA1_KDF, 0, NULL, 67, der_peer};
    CK_MECHANISM m_kdf = {CKM_ECDH1_DERIVE, &sha1_kdf, sizeof sha1_kdf};
    EXPECT(p11->C_DeriveKey(session, &m_kdf, cavs, NULL, 0, &h1), CKR_MECHANISM_PARAM_INVALID);
    EXPECT(p11->C_DeriveKey(session, &(CK_MECHANISM){CKM_ECDH1_DERIVE, NULL, 0}, cavs, NULL, 0, &h1),
           CKR_MECHANISM_PARAM_INVALID);
    EXPECT(ecdh(priv_a, peer, 67, ec, 0, &h1), CKR_TEMPLATE_INCONSISTENT);
    EXPECT(ecdh(pub_a, peer, 67, generic, 0, &h1), CKR_KEY_TYPE_INCONSISTENT);
    EXPECT(ecdh(ab, peer, 67, generic, 0, &h1), CKR_KEY_TYPE_INCONSISTENT);

    // Created EC keys: checks.
    unsigned char q[67] = {0x04, 0x41};
    unhex(CAVS_Q, q + 2);
    CK_ATTRIBUTE pub_create[] = {
        {CKA_CLASS, &pub_class, sizeof pub_class}, {CKA_KEY_TYPE, &ec, sizeof ec},
        {CKA_EC_PARAMS, (void *)p256_oid, sizeof p256_oid}, {CKA_EC_POINT, q, 67}, {CKA_LABEL, "cavs", 4},
    };
    EXPECT(p11->C_CreateObject(session, pub_create, 5, &h1), CKR_OK);
    EXPECT_TRUE(read_bytes(h1, CKA_EC_POINT, value, sizeof value) == 67 && memcmp(value, q, 67) == 0);
    EXPECT(p11->C_CreateObject(session, pub_create, 3, &h1), CKR_TEMPLATE_INCOMPLETE);
    pub_create[3].pValue = q + 2;
    pub_create[3].ulValueLen = 65;
    EXPECT(p11->C_CreateObject(session, pub_create, 5, &h1), CKR_ATTRIBUTE_VALUE_INVALID);  // raw: not DER
    q[40] ^= 1;
    pub_create[3].pValue = q;
    pub_create[3].ulValueLen = 67;
    EXPECT(p11->C_CreateObject(session, pub_create, 5, &h1), CKR_ATTRIBUTE_VALUE_INVALID);  // off the curve
    pub_create[2].pValue = (void *)p384_oid;
    pub_create[2].ulValueLen = sizeof p384_oid;
    EXPECT(p11->C_CreateObject(session, pub_create, 5, &h1), CKR_CURVE_NOT_SUPPORTED);
    pub_create[2].pValue = "garbage";
    pub_create[2].ulValueLen = 7;
    EXPECT(p11->C_CreateObject(session, pub_create, 5, &h1), CKR_ATTRIBUTE_VALUE_INVALID);
    memset(d, 0, 32);
    priv_create[3].ulValueLen = 32;
    EXPECT(p11->C_CreateObject(session, priv_create, 6, &h1), CKR_ATTRIBUTE_VALUE_INVALID);  // scalar 0
    unhex("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551", d);
    EXPECT(p11->C_CreateObject(session, priv_create, 6, &h1), CKR_ATTRIBUTE_VALUE_INVALID);  // scalar n
    CK_KEY_TYPE aes_on_private = CKK_AES;
    priv_create[1].pValue = &aes_on_private;
    EXPECT(p11->C_CreateObject(session, priv_create, 6, &h1), CKR_TEMPLATE_INCONSISTENT);
    len = sizeof value;
    EXPECT(p11->C_WrapKey(session, &(CK_MECHANISM){CKM_AES_KEY_WRAP, NULL, 0}, ab, cavs, value, &len),
           CKR_KEY_NOT_WRAPPABLE);

    // CKM_SHA256_KEY_DERIVATION and CKM_CONCATENATE_BASE_AND_DATA: known answers.
    CK_ATTRIBUTE derive_on[] = {{CKA_DERIVE, &yes, sizeof yes}};
    CK_OBJECT_HANDLE abc = make_secret(CKK_GENERIC_SECRET, (const unsigned char *)"abc", 3, derive_on, 1);
    EXPECT(derive_plain(CKM_SHA256_KEY_DERIVATION, NULL, 0, abc, generic, 0, &h1), CKR_OK);
    EXPECT_TRUE(read_bytes(h1, CKA_VALUE, value, sizeof value) == 32 &&
                bytes_are(value, 32, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
    EXPECT(derive_plain(CKM_SHA256_KEY_DERIVATION, NULL, 0, abc, aes, 16, &h1), CKR_OK);
    EXPECT_TRUE(read_bytes(h1, CKA_VALUE, value, sizeof value) == 16 &&
                bytes_are(value, 16, "ba7816bf8f01cfea414140de5dae2223"));  // the leading bytes
    EXPECT(derive_plain(CKM_SHA256_KEY_DERIVATION, NULL, 0, abc, aes, 0, &h1), CKR_TEMPLATE_INCOMPLETE);
    EXPECT(derive_plain(CKM_SHA256_KEY_DERIVATION, NULL, 0, abc, generic, 33, &h1), CKR_TEMPLATE_INCONSISTENT);
    EXPECT(derive_plain(CKM_SHA256_KEY_DERIVATION, (void *)iv0, 16, abc, generic, 0, &h1), CKR_MECHANISM_PARAM_INVALID);
    CK_KEY_DERIVATION_STRING_DATA defgh = {(CK_BYTE_PTR) "defgh", 5};
    EXPECT(derive_plain(CKM_CONCATENATE_BASE_AND_DATA, &defgh, sizeof defgh, abc, generic, 0, &h1), CKR_OK);
    EXPECT_TRUE(read_bytes(h1, CKA_VALUE, value, sizeof value) == 8 && memcmp(value, "abcdefgh", 8) == 0);
    EXPECT(derive_plain(CKM_CONCATENATE_BASE_AND_DATA, &defgh, sizeof defgh, abc, generic, 4, &h1), CKR_OK);
    EXPECT_TRUE(read_bytes(h1, CKA_VALUE, value, sizeof value) == 4 && memcmp(value, "abcd", 4) == 0);
    EXPECT(derive_plain(CKM_CONCATENATE_BASE_AND_DATA, &defgh, sizeof defgh, abc, generic, 9, &h1),
           CKR_TEMPLATE_INCONSISTENT);
    EXPECT(derive_plain(CKM_CONCATENATE_BASE_AND_DATA, &defgh, sizeof defgh, abc, aes, 0, &h1), CKR_TEMPLATE_INCOMPLETE);
    EXPECT(derive_plain(CKM_CONCATENATE_BASE_AND_DATA, NULL, 0, abc, generic, 0, &h1), CKR_MECHANISM_PARAM_INVALID);
    EXPECT(derive_plain(CKM_CONCATENATE_BASE_AND_DATA, &defgh, sizeof defgh, cavs, generic, 0, &h1),
           CKR_KEY_TYPE_INCONSISTENT);
    EXPECT(derive_plain(CKM_CONCATENATE_BASE_AND_DATA, &defgh, sizeof defgh, key, generic, 0, &h1),
           CKR_KEY_FUNCTION_NOT_PERMITTED);  // CKA_DERIVE is false by default
    EXPECT(derive_plain(CKM_AES_ECB_ENCRYPT_DATA, &defgh, sizeof defgh, abc, generic, 0, &h1), CKR_MECHANISM_INVALID);
    CK_ATTRIBUTE derive_value[] = {{CKA_VALUE, "x", 1}};
    EXPECT(p11->C_DeriveKey(session, &(CK_MECHANISM){CKM_SHA256_KEY_DERIVATION, NULL, 0}, abc, derive_value, 1, &h1),
           CKR_TEMPLATE_INCONSISTENT);

    // A chain from both sides: ECDH (generic, 32) -> SHA-256 -> || "chain" -> AES-128; A encrypts,
    // B decrypts.
    CK_OBJECT_HANDLE chain[2];
    const unsigned char *peers[2] = {peer, point};
    CK_OBJECT_HANDLE privs[2] = {priv_a, priv_b};
    CK_KEY_DERIVATION_STRING_DATA tag = {(CK_BYTE_PTR) "chain", 5};
    for (int side = 0; side < 2; side++) {
        CK_OBJECT_HANDLE shared, hashed;
        EXPECT(ecdh(privs[side], peers[side], 67, generic, 0, &shared), CKR_OK);
        EXPECT(derive_plain(CKM_SHA256_KEY_DERIVATION, NULL, 0, shared, generic, 0, &hashed), CKR_OK);
        EXPECT(derive_plain(CKM_CONCATENATE_BASE_AND_DATA, &tag, sizeof tag, hashed, aes, 16, &chain[side]), CKR_OK);
    }
    unsigned char c0[16], c1[16];
    EXPECT_TRUE(read_bytes(chain[0], CKA_VALUE, c0, 16) == 16 && read_bytes(chain[1], CKA_VALUE, c1, 16) == 16 &&
                memcmp(c0, c1, 16) == 0);
    out_len = sizeof out;
    back_len = sizeof back;
    EXPECT(crypt_once(1, &cbc_pad, chain[0], msg, 40, out, &out_len), CKR_OK);
    EXPECT(crypt_once(0, &cbc_pad, chain[1], out, out_len, back, &back_len), CKR_OK);
    EXPECT_TRUE(back_len == 40 && memcmp(back, msg, 40) == 0);
    (void)no;
}

// SHA-256 of CAVS_Z, the key C_DecapsulateKey makes from CAVS_D and the ciphertext CAVS_PEER
// (from `echo CAVS_Z | xxd -r -p | openssl dgst -sha256`).
#define CAVS_KEM_SECRET "e46c7bcebfe1f3f3014251b1ac7358d1568e0c50c1bf6db17d13a33c024794ec"

static CK_FUNCTION_LIST_3_2 *p11_32;  // the module's 3.2 list (test_v32)

static CK_RV kem(int encapsulate, CK_OBJECT_HANDLE k, unsigned char *ciphertext, CK_ULONG *len, CK_ULONG value_len,
                 CK_OBJECT_HANDLE *out) {
    CK_MECHANISM m = {CKM_NETHSM_ECDH_P256_KEM, NULL, 0};
    CK_BBOOL no = CK_FALSE;
    CK_ATTRIBUTE tmpl[] = {{CKA_SENSITIVE, &no, sizeof no}, {CKA_VALUE_LEN, &value_len, sizeof value_len}};
    return encapsulate ? p11_32->C_EncapsulateKey(session, &m, k, tmpl, value_len ? 2 : 1, ciphertext, len, out)
                       : p11_32->C_DecapsulateKey(session, &m, k, tmpl, value_len ? 2 : 1, ciphertext, *len, out);
}

// PKCS#11 3.2: the interfaces, C_VerifySignature*, C_GetSessionValidationFlags, the ECDH P-256 KEM.
static void test_v32(void) {
    void *loaded = dlopen(module_path, RTLD_NOW | RTLD_NOLOAD);
    CK_C_GetInterfaceList list = (CK_C_GetInterfaceList)dlsym(loaded, "C_GetInterfaceList");
    CK_C_GetInterface get = (CK_C_GetInterface)dlsym(loaded, "C_GetInterface");
    EXPECT_TRUE(list != NULL && get != NULL);
    if (list == NULL || get == NULL) return;
    CK_INTERFACE interfaces[4];
    CK_ULONG n = 0;
    EXPECT(list(NULL, &n), CKR_OK);
    EXPECT_TRUE(n == 3);
    n = 2;
    EXPECT(list(interfaces, &n), CKR_BUFFER_TOO_SMALL);
    n = 4;
    EXPECT(list(interfaces, &n), CKR_OK);
    static const CK_VERSION versions[] = {{3, 2}, {3, 0}, {2, 40}};
    for (CK_ULONG i = 0; i < 3 && n == 3; i++) {
        const CK_VERSION *v = interfaces[i].pFunctionList;
        EXPECT_TRUE(strcmp((char *)interfaces[i].pInterfaceName, "PKCS 11") == 0 && interfaces[i].flags == 0 &&
                    v->major == versions[i].major && v->minor == versions[i].minor);
    }
    CK_INTERFACE_PTR chosen = NULL;
    EXPECT(get(NULL, NULL, &chosen, 0), CKR_OK);
    EXPECT_TRUE(chosen == NULL ? 0 : ((CK_VERSION *)chosen->pFunctionList)->minor == 2);
    EXPECT(get(NULL, NULL, &chosen, CKF_INTERFACE_FORK_SAFE), CKR_ARGUMENTS_BAD);  // not fork safe
    EXPECT(get((CK_UTF8CHAR_PTR)"PKCS 11", &(CK_VERSION){3, 2}, &chosen, 0), CKR_OK);
    CK_FUNCTION_LIST_3_2 *f = p11_32 = chosen->pFunctionList;
    CK_VOID_PTR *entries = (CK_VOID_PTR *)&f->C_Initialize;
    int all = (sizeof *f - offsetof(CK_FUNCTION_LIST_3_2, C_Initialize)) / sizeof(CK_VOID_PTR) == 104;
    for (size_t i = 0; i < 104; i++) all = all && entries[i] != NULL;
    EXPECT_TRUE(all);

    // C_VerifySignature*: the known HMAC of "hello", whole and in parts; flags after each.
    CK_OBJECT_HANDLE mac_key = make_secret(CKK_GENERIC_SECRET, (const unsigned char *)KEY_VALUE, 32, NULL, 0);
    CK_MECHANISM hmac = {CKM_SHA256_HMAC, NULL, 0};
    unsigned char good[32], bad[32];
    unhex(HELLO_HMAC, good);
    memcpy(bad, good, 32);
    bad[0] ^= 1;
    CK_FLAGS flags = 99;
    EXPECT(f->C_GetSessionValidationFlags(session, CKS_LAST_VALIDATION_OK, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(f->C_GetSessionValidationFlags(session, 7, &flags), CKR_ARGUMENTS_BAD);
    EXPECT(f->C_VerifySignature(session, (CK_BYTE_PTR)"hello", 5), CKR_OPERATION_NOT_INITIALIZED);
    EXPECT(f->C_VerifySignatureInit(session, &hmac, mac_key, good, 31), CKR_SIGNATURE_LEN_RANGE);
    EXPECT(f->C_VerifySignatureInit(session, &hmac, mac_key, good, 32), CKR_OK);
    EXPECT(f->C_VerifySignatureInit(session, &hmac, mac_key, good, 32), CKR_OPERATION_ACTIVE);
    EXPECT(f->C_VerifySignature(session, (CK_BYTE_PTR)"hello", 5), CKR_OK);
    EXPECT(f->C_GetSessionValidationFlags(session, CKS_LAST_VALIDATION_OK, &flags), CKR_OK);
    EXPECT_TRUE(flags == CKS_LAST_VALIDATION_OK);
    EXPECT(f->C_VerifySignatureInit(session, &hmac, mac_key, good, 32), CKR_OK);
    EXPECT(f->C_VerifySignatureUpdate(session, (CK_BYTE_PTR)"hel", 3), CKR_OK);
    EXPECT(f->C_VerifySignature(session, (CK_BYTE_PTR)"lo", 2), CKR_OPERATION_ACTIVE);
    EXPECT(f->C_VerifySignatureUpdate(session, (CK_BYTE_PTR)"lo", 2), CKR_OK);
    EXPECT(f->C_VerifySignatureFinal(session), CKR_OK);
    EXPECT(f->C_VerifySignatureFinal(session), CKR_OPERATION_NOT_INITIALIZED);
    EXPECT(f->C_VerifySignatureInit(session, &hmac, mac_key, bad, 32), CKR_OK);
    EXPECT(f->C_VerifySignature(session, (CK_BYTE_PTR)"hello", 5), CKR_SIGNATURE_INVALID);
    EXPECT(f->C_GetSessionValidationFlags(session, CKS_LAST_VALIDATION_OK, &flags), CKR_OK);
    EXPECT_TRUE(flags == 0);
    EXPECT(f->C_VerifySignatureInit(session, &hmac, mac_key, good, 32), CKR_OK);
    EXPECT(f->C_VerifySignatureInit(session, NULL, 0, NULL, 0), CKR_OK);  // ends it
    EXPECT(f->C_VerifySignatureFinal(session), CKR_OPERATION_NOT_INITIALIZED);
    printf("C_VerifySignature: HMAC-SHA256(key, \"hello\") checked whole and in parts\n");

    // The KEM: the CAVS known answer, then a round trip, then the refusals.
    CK_BBOOL yes = CK_TRUE;
    CK_OBJECT_CLASS priv_class = CKO_PRIVATE_KEY, pub_class = CKO_PUBLIC_KEY;
    CK_KEY_TYPE ec = CKK_EC;
    unsigned char d[32], q[67] = {0x04, 0x41}, ciphertext[80], value[64], other[64];
    CK_ATTRIBUTE priv_create[] = {
        {CKA_CLASS, &priv_class, sizeof priv_class}, {CKA_KEY_TYPE, &ec, sizeof ec},
        {CKA_EC_PARAMS, (void *)p256_oid, sizeof p256_oid}, {CKA_VALUE, d, unhex(CAVS_D, d)},
        {CKA_DECAPSULATE, &yes, sizeof yes},
    };
    unhex(CAVS_Q, q + 2);
    CK_ATTRIBUTE pub_create[] = {
        {CKA_CLASS, &pub_class, sizeof pub_class}, {CKA_KEY_TYPE, &ec, sizeof ec},
        {CKA_EC_PARAMS, (void *)p256_oid, sizeof p256_oid}, {CKA_EC_POINT, q, 67}, {CKA_ENCAPSULATE, &yes, sizeof yes},
    };
    CK_OBJECT_HANDLE priv, pub, k1, k2, plain;
    EXPECT(p11->C_CreateObject(session, priv_create, 5, &priv), CKR_OK);
    EXPECT(p11->C_CreateObject(session, pub_create, 5, &pub), CKR_OK);
    EXPECT(p11->C_CreateObject(session, pub_create, 4, &plain), CKR_OK);  // CKA_ENCAPSULATE false
    EXPECT_TRUE(read_bool(pub, CKA_ENCAPSULATE) == CK_TRUE && read_bool(plain, CKA_ENCAPSULATE) == CK_FALSE);
    CK_ULONG len = unhex(CAVS_PEER, ciphertext);
    EXPECT(kem(0, priv, ciphertext, &len, 0, &k1), CKR_OK);
    EXPECT_TRUE(read_bytes(k1, CKA_VALUE, value, sizeof value) == 32 && bytes_are(value, 32, CAVS_KEM_SECRET));
    EXPECT(kem(0, priv, ciphertext, &len, 16, &k1), CKR_OK);
    EXPECT_TRUE(read_bytes(k1, CKA_VALUE, value, sizeof value) == 16 && bytes_are(value, 16, "e46c7bcebfe1f3f3014251b1ac7358d1"));
    printf("KEM (ECDH P-256): NIST CAVS count 0 decapsulation known answer checked\n");
    len = 0;
    EXPECT(kem(1, pub, NULL, &len, 0, &k1), CKR_OK);
    EXPECT_TRUE(len == 65);
    len = 64;
    EXPECT(kem(1, pub, ciphertext, &len, 0, &k1), CKR_BUFFER_TOO_SMALL);
    EXPECT_TRUE(len == 65);
    len = sizeof ciphertext;
    EXPECT(kem(1, pub, ciphertext, &len, 0, &k1), CKR_OK);
    EXPECT_TRUE(len == 65 && ciphertext[0] == 0x04);
    EXPECT(kem(0, priv, ciphertext, &len, 0, &k2), CKR_OK);
    EXPECT_TRUE(read_bytes(k1, CKA_VALUE, value, sizeof value) == 32 && read_bytes(k2, CKA_VALUE, other, sizeof other) == 32 &&
                memcmp(value, other, 32) == 0);
    EXPECT(kem(1, pub, ciphertext, &len, 0, &k2), CKR_OK);  // a fresh ephemeral key: another secret
    EXPECT_TRUE(read_bytes(k2, CKA_VALUE, other, sizeof other) == 32 && memcmp(value, other, 32) != 0);
    EXPECT(kem(1, plain, ciphertext, &len, 0, &k2), CKR_KEY_FUNCTION_NOT_PERMITTED);
    EXPECT(kem(1, priv, ciphertext, &len, 0, &k2), CKR_KEY_TYPE_INCONSISTENT);
    EXPECT(kem(1, pub, ciphertext, &len, 33, &k2), CKR_TEMPLATE_INCONSISTENT);
    len = 64;
    EXPECT(kem(0, priv, ciphertext, &len, 0, &k2), CKR_WRAPPED_KEY_LEN_RANGE);
    len = 65;
    ciphertext[40] ^= 1;  // no longer on the curve
    EXPECT(kem(0, priv, ciphertext, &len, 0, &k2), CKR_WRAPPED_KEY_INVALID);
    printf("KEM (ECDH P-256): encapsulated and decapsulated keys agree\n");

    // An asynchronous session: a verification's answer waits for C_AsyncComplete; its ID lets
    // another session take it over (C_AsyncJoin). Elsewhere the async calls find nothing.
    CK_SESSION_HANDLE async_session, joiner;
    CK_SESSION_INFO info;
    EXPECT_TRUE((token_flags(slot) & CKF_ASYNC_SESSION_SUPPORTED) != 0);
    EXPECT(f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_ASYNC_SESSION, NULL, NULL, &async_session), CKR_OK);
    EXPECT(f->C_GetSessionInfo(async_session, &info), CKR_OK);
    EXPECT_TRUE((info.flags & CKF_ASYNC_SESSION) != 0);
    EXPECT(f->C_VerifySignatureInit(async_session, &hmac, mac_key, good, 32), CKR_OK);
    EXPECT(f->C_VerifySignature(async_session, (CK_BYTE_PTR)"hello", 5), CKR_PENDING);
    EXPECT(f->C_AsyncComplete(async_session, (CK_UTF8CHAR_PTR)"C_Sign", NULL), CKR_OPERATION_NOT_INITIALIZED);
    EXPECT(f->C_AsyncComplete(async_session, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(f->C_AsyncComplete(async_session, (CK_UTF8CHAR_PTR)"C_VerifySignature", NULL), CKR_OK);
    EXPECT(f->C_AsyncComplete(async_session, (CK_UTF8CHAR_PTR)"C_VerifySignature", NULL), CKR_OPERATION_NOT_INITIALIZED);
    EXPECT(f->C_VerifySignatureInit(async_session, &hmac, mac_key, bad, 32), CKR_OK);
    EXPECT(f->C_VerifySignatureUpdate(async_session, (CK_BYTE_PTR)"hello", 5), CKR_OK);
    EXPECT(f->C_VerifySignatureFinal(async_session), CKR_PENDING);
    CK_ULONG id = 0;
    EXPECT(f->C_AsyncGetID(async_session, (CK_UTF8CHAR_PTR)"C_VerifySignatureFinal", &id), CKR_OK);
    EXPECT_TRUE(id != 0);
    EXPECT(f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &joiner), CKR_OK);
    EXPECT(f->C_AsyncJoin(joiner, (CK_UTF8CHAR_PTR)"C_VerifySignatureFinal", id + 1, NULL, 0), CKR_SAVED_STATE_INVALID);
    EXPECT(f->C_AsyncJoin(joiner, (CK_UTF8CHAR_PTR)"C_VerifySignature", id, NULL, 0), CKR_SAVED_STATE_INVALID);
    EXPECT(f->C_AsyncJoin(joiner, (CK_UTF8CHAR_PTR)"C_VerifySignatureFinal", id, NULL, 0), CKR_OK);
    EXPECT(f->C_AsyncComplete(async_session, (CK_UTF8CHAR_PTR)"C_VerifySignatureFinal", NULL), CKR_OPERATION_NOT_INITIALIZED);
    EXPECT(f->C_AsyncComplete(joiner, (CK_UTF8CHAR_PTR)"C_VerifySignatureFinal", NULL), CKR_SIGNATURE_INVALID);
    EXPECT(f->C_CloseSession(joiner), CKR_OK);
    EXPECT(f->C_CloseSession(async_session), CKR_OK);
    EXPECT(f->C_AsyncComplete(session, (CK_UTF8CHAR_PTR)"C_Sign", NULL), CKR_OPERATION_NOT_INITIALIZED);
    EXPECT(f->C_AsyncGetID(session, (CK_UTF8CHAR_PTR)"C_Sign", &n), CKR_OPERATION_NOT_INITIALIZED);
    printf("async session: C_VerifySignature answers CKR_PENDING, C_AsyncComplete the result; C_AsyncJoin takes it over by its ID\n");
    EXPECT(f->C_WrapKeyAuthenticated(session, &hmac, mac_key, mac_key, NULL, 0, NULL, &n), CKR_FUNCTION_NOT_SUPPORTED);
    EXPECT(f->C_MessageEncryptInit(session, &hmac, mac_key), CKR_FUNCTION_NOT_SUPPORTED);
}

static void test_threads(void) {
    struct worker workers[4] = {{0}};
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) {
        EXPECT(p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &workers[i].session), CKR_OK);
        pthread_create(&threads[i], NULL, worker_main, &workers[i]);
    }
    int bad = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(threads[i], NULL);
        bad += workers[i].bad;
        EXPECT(p11->C_CloseSession(workers[i].session), CKR_OK);
    }
    EXPECT_TRUE(bad == 0);
}

static void test_fork(void) {
    CK_MECHANISM hmac = {CKM_SHA256_HMAC, NULL, 0};
    unsigned char mac[32];
    char mac_hex[65];
    CK_ULONG len;

    // 1. Inherited state is broken; the parent is unaffected (its pending C_Sign still works, and
    // so does a multi-part encryption whose state, with 4 bytes buffered, is on the server).
    unsigned char data[50], parts[64], whole[64];
    CK_ULONG parts_len = 0, part_len, whole_len = sizeof whole;
    for (int i = 0; i < 50; i++) data[i] = (unsigned char)(i < 16 ? i : 3 * i);
    CK_OBJECT_HANDLE aes_key = make_secret(CKK_AES, data, 16, NULL, 0);
    CK_MECHANISM cbc_pad = {CKM_AES_CBC_PAD, (void *)iv0, 16};
    EXPECT(p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &encrypt_session), CKR_OK);
    EXPECT(p11->C_EncryptInit(encrypt_session, &cbc_pad, aes_key), CKR_OK);
    part_len = sizeof parts;
    EXPECT(p11->C_EncryptUpdate(encrypt_session, data, 20, parts, &part_len), CKR_OK);
    parts_len += part_len;
    EXPECT(p11->C_SignInit(session, &hmac, key), CKR_OK);
    in_child("inherited copy: CKR_DEVICE_ERROR, C_Initialize ALREADY_INITIALIZED", child_inherited, NULL);
    len = sizeof mac;
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "hello", 5, mac, &len), CKR_OK);
    hex(mac, 32, mac_hex);
    EXPECT_TRUE(strcmp(mac_hex, expected_hmac) == 0);
    part_len = sizeof parts - parts_len;
    EXPECT(p11->C_EncryptUpdate(encrypt_session, data + 20, 30, parts + parts_len, &part_len), CKR_OK);
    parts_len += part_len;
    part_len = sizeof parts - parts_len;
    EXPECT(p11->C_EncryptFinal(encrypt_session, parts + parts_len, &part_len), CKR_OK);
    parts_len += part_len;
    EXPECT(p11->C_EncryptInit(encrypt_session, &cbc_pad, aes_key), CKR_OK);
    EXPECT(p11->C_Encrypt(encrypt_session, data, 50, whole, &whole_len), CKR_OK);
    EXPECT_TRUE(parts_len == 64 && whole_len == 64 && memcmp(parts, whole, 64) == 0);
    EXPECT(p11->C_CloseSession(encrypt_session), CKR_OK);
    EXPECT_TRUE(log_contains("inherited C_Sign: connection"));
    EXPECT_TRUE(log_contains("inherited C_Initialize: connection"));

    // 2. A fresh copy is a new connection to the same server.
    in_child("fresh copy (dlmopen): new connection, same key, same HMAC", child_fresh_copy, NULL);
    EXPECT(sign_hello(p11, session, key, mac_hex), CKR_OK);

    // 3. C_Logout + C_Finalize in a child kill the parent's login and sessions.
    EXPECT(p11->C_SignInit(session, &hmac, key), CKR_OK);
    in_child("inherited C_Logout + C_Finalize", child_teardown, NULL);
    len = sizeof mac;
    CK_RV rv = p11->C_Sign(session, (CK_BYTE_PTR) "hello", 5, mac, &len);
    EXPECT_TRUE(rv == CKR_USER_NOT_LOGGED_IN || rv == CKR_SESSION_HANDLE_INVALID);
    printf("     parent's C_Sign after the child's C_Logout + C_Finalize: %s\n", rv_name(rv));
    EXPECT(p11->C_GetSessionInfo(session, &(CK_SESSION_INFO){0}), CKR_SESSION_HANDLE_INVALID);
    EXPECT_TRUE(log_contains("inherited C_Logout: logged out connection"));
    EXPECT_TRUE(log_contains("inherited C_Finalize: killed connection"));

    // 4. C_Logout alone: the parent's session stays, its login is gone.
    login_fresh_session();
    EXPECT(p11->C_SignInit(session, &hmac, key), CKR_OK);
    in_child("inherited C_Logout", child_logout, NULL);
    len = sizeof mac;
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "hello", 5, mac, &len), CKR_USER_NOT_LOGGED_IN);
    EXPECT(p11->C_SignInit(session, &hmac, key), CKR_USER_NOT_LOGGED_IN);
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)PIN, 4), CKR_OK);
    EXPECT(sign_hello(p11, session, key, mac_hex), CKR_OK);

    // 5. C_CloseSession and C_CloseAllSessions on inherited handles close the parent's.
    in_child("inherited C_CloseSession", child_close_session, NULL);
    EXPECT(p11->C_GetSessionInfo(session, &(CK_SESSION_INFO){0}), CKR_SESSION_HANDLE_INVALID);
    login_fresh_session();
    in_child("inherited C_CloseAllSessions", child_close_all, NULL);
    EXPECT(p11->C_GetSessionInfo(session, &(CK_SESSION_INFO){0}), CKR_SESSION_HANDLE_INVALID);

    // 6. The old-spec child (C_Finalize, C_Initialize, login) works, and costs the parent its state.
    login_fresh_session();
    in_child("C_Finalize + C_Initialize in the child", child_reinitialize, NULL);
    EXPECT(p11->C_GetSessionInfo(session, &(CK_SESSION_INFO){0}), CKR_SESSION_HANDLE_INVALID);
    login_fresh_session();
    EXPECT(sign_hello(p11, session, key, mac_hex), CKR_OK);
    EXPECT_TRUE(strcmp(mac_hex, expected_hmac) == 0);
}

static void test_pin_lockout(void) {
    EXPECT(p11->C_Logout(session), CKR_OK);
    // A correct login resets the count.
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR) "0000", 4), CKR_PIN_INCORRECT);
    EXPECT_TRUE(token_flags(slot) & CKF_USER_PIN_COUNT_LOW);
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)PIN, 4), CKR_OK);
    EXPECT_TRUE((token_flags(slot) & (CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_LOCKED)) == 0);
    EXPECT(p11->C_Logout(session), CKR_OK);
    // Three wrong PINs in a row lock it.
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR) "0000", 4), CKR_PIN_INCORRECT);
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR) "00000", 5), CKR_PIN_INCORRECT);
    CK_FLAGS flags = token_flags(slot);
    EXPECT_TRUE((flags & CKF_USER_PIN_COUNT_LOW) && (flags & CKF_USER_PIN_FINAL_TRY) && !(flags & CKF_USER_PIN_LOCKED));
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR) "0000", 4), CKR_PIN_INCORRECT);
    EXPECT_TRUE(token_flags(slot) & CKF_USER_PIN_LOCKED);
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)PIN, 4), CKR_PIN_LOCKED);
    // The SO unlocks it with C_InitPIN; then the user changes it with C_SetPIN.
    EXPECT(p11->C_Login(session, CKU_SO, (CK_UTF8CHAR_PTR)SO_PIN, 4), CKR_OK);
    EXPECT(p11->C_InitPIN(session, (CK_UTF8CHAR_PTR) "abcd", 4), CKR_OK);
    EXPECT(p11->C_Logout(session), CKR_OK);
    EXPECT_TRUE((token_flags(slot) & CKF_USER_PIN_LOCKED) == 0);
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR) "abcd", 4), CKR_OK);
    EXPECT(p11->C_SetPIN(session, (CK_UTF8CHAR_PTR) "abcd", 4, (CK_UTF8CHAR_PTR)PIN, 4), CKR_OK);
    EXPECT(p11->C_Logout(session), CKR_OK);
    EXPECT(p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)PIN, 4), CKR_OK);
}

static void test_always_authenticate(void) {
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_KEY_TYPE generic = CKK_GENERIC_SECRET;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &secret, sizeof secret}, {CKA_KEY_TYPE, &generic, sizeof generic},
        {CKA_ALWAYS_AUTHENTICATE, &yes, sizeof yes}, {CKA_VALUE, KEY_VALUE, 32},
    };
    CK_OBJECT_HANDLE k;
    CK_MECHANISM hmac = {CKM_SHA256_HMAC, NULL, 0};
    unsigned char mac[32];
    char mac_hex[65];
    CK_ULONG len = sizeof mac;
    EXPECT(p11->C_CreateObject(session, tmpl, 4, &k), CKR_OK);
    EXPECT(p11->C_SignInit(session, &hmac, k), CKR_OK);
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "hello", 5, mac, &len), CKR_USER_NOT_LOGGED_IN);
    EXPECT(p11->C_Login(session, CKU_CONTEXT_SPECIFIC, (CK_UTF8CHAR_PTR)PIN, 4), CKR_OK);
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "hello", 5, mac, &len), CKR_OK);
    hex(mac, 32, mac_hex);
    EXPECT_TRUE(strcmp(mac_hex, HELLO_HMAC) == 0);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 2 || getenv("NETHSM_DIR") == NULL) {
        fprintf(stderr, "usage: NETHSM_DIR=DIR NETHSM_LOG=FILE %s MODULE [EXPECTED_HMAC_HEX]\n", argv[0]);
        return 2;
    }
    module_path = argv[1];
    const char *openssl_hmac = argc > 2 ? argv[2] : NULL;
    p11 = load(0);
    if (p11 == NULL) return 1;

    test_basics();
    test_objects_and_crypto(openssl_hmac);
    test_aes();
    test_key_wrap();
    test_ec_and_derive();
    test_v32();
    test_threads();
    test_always_authenticate();
    test_fork();
    test_pin_lockout();

    EXPECT(p11->C_Finalize((void *)1), CKR_ARGUMENTS_BAD);
    EXPECT(p11->C_Finalize(NULL), CKR_OK);
    EXPECT(p11->C_Finalize(NULL), CKR_CRYPTOKI_NOT_INITIALIZED);
    EXPECT(p11->C_GetInfo(&(CK_INFO){0}), CKR_CRYPTOKI_NOT_INITIALIZED);

    if (failures == 0) {
        printf("selftest: ok (%d checks)\n", checks);
        return 0;
    }
    printf("selftest: FAILED (%d of %d checks)\n", failures, checks);
    return 1;
}
#endif
