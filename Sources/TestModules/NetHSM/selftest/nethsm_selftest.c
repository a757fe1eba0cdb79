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
#include <p11-kit-1/p11-kit/pkcs11.h>
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
        N(CKR_SESSION_READ_ONLY_EXISTS) N(CKR_USER_ANOTHER_ALREADY_LOGGED_IN)
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
    EXPECT_TRUE(info.cryptokiVersion.major == 2 && info.cryptokiVersion.minor == 40);
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

    CK_MECHANISM_TYPE mechs[8];
    n = 8;
    EXPECT(p11->C_GetMechanismList(slot, mechs, &n), CKR_OK);
    EXPECT_TRUE(n == 3);

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
    EXPECT(p11->C_EncryptInit(session, NULL, 0), CKR_FUNCTION_NOT_SUPPORTED);
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

    // 1. Inherited state is broken; the parent is unaffected (its pending C_Sign still works).
    EXPECT(p11->C_SignInit(session, &hmac, key), CKR_OK);
    in_child("inherited copy: CKR_DEVICE_ERROR, C_Initialize ALREADY_INITIALIZED", child_inherited, NULL);
    len = sizeof mac;
    EXPECT(p11->C_Sign(session, (CK_BYTE_PTR) "hello", 5, mac, &len), CKR_OK);
    hex(mac, 32, mac_hex);
    EXPECT_TRUE(strcmp(mac_hex, expected_hmac) == 0);
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
