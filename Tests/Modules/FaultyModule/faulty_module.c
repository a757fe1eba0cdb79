// A module that wraps a real one and injects the faults a control file names: what a failing
// token, reader or HSM answers, for the fault tests. Built only for the tests
// (libp11fork-test-faulty.so).
//
//   FAULTY_MODULE   the real module (read when this module is loaded)
//   FAULTY_CONTROL  the control file: read again whenever it changes (inode, size or mtime), so a
//                   test can change the faults between a parent's calls and its child's
//   FAULTY_LOG      one line appended per call, "pid function rv" (never an argument: no PIN)
//
// Control file, one fault a line, `#` comments; a trailing word `child` limits the fault to
// processes other than the one that loaded this copy of the module, a trailing `xN` to the first N
// calls of that function in each process (counted in FAULTY_LOG, so across module copies):
//   C_Sign CKR_DEVICE_ERROR      that function answers the code, without reaching the real module
//   C_Initialize hang            that function never returns
//   token absent                 the slots show no token: C_GetSlotList(CK_TRUE) lists none,
//                                C_GetSlotInfo clears CKF_TOKEN_PRESENT, slot calls answer
//                                CKR_TOKEN_NOT_PRESENT, session calls CKR_DEVICE_REMOVED
//   session closed               each session opened before the fault is closed in the real
//                                module on its next use, which answers CKR_SESSION_CLOSED (later
//                                calls on it get the real module's answer for a closed session)
//
// Every function is forwarded by one generic wrapper: each PKCS#11 2.40 function takes at most
// eight arguments, all of integer class (handles, lengths, flags, pointers), which the x86-64 and
// AArch64 calling conventions pass alike, so eight word-sized arguments carry any of them.
#define _GNU_SOURCE
#include "faulty_module.h"
#include <dlfcn.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef uintptr_t word;
typedef CK_RV (*any_function)(word, word, word, word, word, word, word, word);

enum action { ANSWER, HANG, TOKEN_ABSENT, SESSION_CLOSED };
struct fault {
    char function[40];
    enum action action;
    CK_RV rv;
    int child_only;
    // Only the first `times` calls of the function in a process (0: every call).
    int times;
};

static CK_FUNCTION_LIST_PTR real;
static CK_FUNCTION_LIST list;
static pid_t loader_pid;
static struct fault faults[16];
static int fault_count;
static struct stat control_seen;
// Sessions opened while `session closed` is in force (the fault spares them), and those it closed
// (whose later calls get the real module's answer for a closed session).
static CK_SESSION_HANDLE spared[64], closed[64];
static int spared_count, closed_count;

static const struct { const char *name; CK_RV rv; } codes[] = {
    { "CKR_OK", CKR_OK }, { "CKR_GENERAL_ERROR", CKR_GENERAL_ERROR }, { "CKR_HOST_MEMORY", CKR_HOST_MEMORY },
    { "CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED }, { "CKR_ARGUMENTS_BAD", CKR_ARGUMENTS_BAD },
    { "CKR_DEVICE_ERROR", CKR_DEVICE_ERROR }, { "CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY },
    { "CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED }, { "CKR_SESSION_CLOSED", CKR_SESSION_CLOSED },
    { "CKR_PIN_INCORRECT", CKR_PIN_INCORRECT }, { "CKR_PIN_LOCKED", CKR_PIN_LOCKED }, { "CKR_PIN_EXPIRED", CKR_PIN_EXPIRED },
    { "CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT }, { "CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN },
    { "CKR_USER_PIN_NOT_INITIALIZED", CKR_USER_PIN_NOT_INITIALIZED },
    { "CKR_CRYPTOKI_ALREADY_INITIALIZED", CKR_CRYPTOKI_ALREADY_INITIALIZED },
};

static void log_call(const char *function, CK_RV rv) {
    const char *path = getenv("FAULTY_LOG");
    if (!path) return;
    char line[96];
    int n = snprintf(line, sizeof line, "%d %s 0x%lx\n", getpid(), function, rv);
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return;
    // One write per line: lines of parent and children never interleave.
    if (write(fd, line, (size_t)n) < 0) {}
    close(fd);
}

static int parse_code(const char *word, CK_RV *rv) {
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        if (strcmp(word, codes[i].name) == 0) { *rv = codes[i].rv; return 1; }
    char *end;
    unsigned long value = strtoul(word, &end, 16);
    if (strncmp(word, "0x", 2) != 0 || *end) return 0;
    *rv = value;
    return 1;
}

// Reads the control file again if it changed since the last call.
static void read_control(void) {
    const char *path = getenv("FAULTY_CONTROL");
    struct stat now;
    if (!path || stat(path, &now) != 0) memset(&now, 0, sizeof now);
    if (now.st_ino == control_seen.st_ino && now.st_size == control_seen.st_size
        && now.st_mtim.tv_sec == control_seen.st_mtim.tv_sec && now.st_mtim.tv_nsec == control_seen.st_mtim.tv_nsec)
        return;
    control_seen = now;
    fault_count = 0;
    spared_count = closed_count = 0;
    FILE *file = path ? fopen(path, "re") : NULL;
    if (!file) return;
    char line[160];
    while (fault_count < 16 && fgets(line, sizeof line, file)) {
        char first[40] = "", second[40] = "", third[16] = "", fourth[16] = "";
        if (line[0] == '#' || sscanf(line, "%39s %39s %15s %15s", first, second, third, fourth) < 2) continue;
        struct fault *f = &faults[fault_count];
        memset(f, 0, sizeof *f);
        snprintf(f->function, sizeof f->function, "%s", first);
        f->child_only = strcmp(third, "child") == 0 || strcmp(fourth, "child") == 0;
        if (third[0] == 'x') f->times = atoi(third + 1);
        if (fourth[0] == 'x') f->times = atoi(fourth + 1);
        if (strcmp(second, "hang") == 0) f->action = HANG;
        else if (strcmp(first, "token") == 0 && strcmp(second, "absent") == 0) f->action = TOKEN_ABSENT;
        else if (strcmp(first, "session") == 0 && strcmp(second, "closed") == 0) f->action = SESSION_CLOSED;
        else if (parse_code(second, &f->rv)) f->action = ANSWER;
        else { fprintf(stderr, "faulty module: control line not understood: %s", line); continue; }
        fault_count++;
    }
    fclose(file);
}

// How many calls of `function` this process made so far (FAULTY_LOG's lines for it).
static int calls_made(const char *function) {
    const char *path = getenv("FAULTY_LOG");
    FILE *file = path ? fopen(path, "re") : NULL;
    if (!file) return 0;
    char line[96], name[64];
    int pid, count = 0;
    while (fgets(line, sizeof line, file))
        if (sscanf(line, "%d %63s", &pid, name) == 2 && pid == getpid() && strcmp(name, function) == 0) count++;
    fclose(file);
    return count;
}

static const struct fault *fault_for(const char *function, enum action action) {
    for (int i = 0; i < fault_count; i++) {
        const struct fault *f = &faults[i];
        if (f->child_only && getpid() == loader_pid) continue;
        if (f->times && f->action == action && strcmp(f->function, function) == 0 && calls_made(function) >= f->times) continue;
        if (f->action == action && (action == TOKEN_ABSENT || action == SESSION_CLOSED || strcmp(f->function, function) == 0))
            return f;
    }
    return NULL;
}

// Which argument a function's first one is.
static int takes_slot(size_t offset) {
    return offset == offsetof(CK_FUNCTION_LIST, C_GetSlotInfo) || offset == offsetof(CK_FUNCTION_LIST, C_GetTokenInfo)
        || offset == offsetof(CK_FUNCTION_LIST, C_GetMechanismList) || offset == offsetof(CK_FUNCTION_LIST, C_GetMechanismInfo)
        || offset == offsetof(CK_FUNCTION_LIST, C_InitToken) || offset == offsetof(CK_FUNCTION_LIST, C_OpenSession)
        || offset == offsetof(CK_FUNCTION_LIST, C_CloseAllSessions);
}

static int takes_session(size_t offset) {
    return offset >= offsetof(CK_FUNCTION_LIST, C_InitPIN) && offset <= offsetof(CK_FUNCTION_LIST, C_CancelFunction)
        && !takes_slot(offset);
}

static int listed(const CK_SESSION_HANDLE *list, int count, CK_SESSION_HANDLE session) {
    for (int i = 0; i < count; i++)
        if (list[i] == session) return 1;
    return 0;
}

// What the fault makes of the call, or -1 to forward it (`rv` then holds nothing).
static int inject(size_t offset, const char *name, word *a, CK_RV *rv) {
    const struct fault *f = fault_for(name, HANG);
    if (f)
        for (;;) pause();
    if ((f = fault_for(name, ANSWER))) {
        *rv = f->rv;
        return 1;
    }
    if (fault_for(name, TOKEN_ABSENT)) {
        CK_SLOT_INFO info;
        if (offset == offsetof(CK_FUNCTION_LIST, C_GetSlotList) && (CK_BBOOL)a[0]) {  // only its low byte is passed
            if (!a[2]) { *rv = CKR_ARGUMENTS_BAD; return 1; }
            *(CK_ULONG *)a[2] = 0;
            *rv = CKR_OK;
            return 1;
        }
        if (offset == offsetof(CK_FUNCTION_LIST, C_GetSlotInfo)) {
            *rv = real->C_GetSlotInfo(a[0], (CK_SLOT_INFO *)a[1]);
            if (*rv == CKR_OK) ((CK_SLOT_INFO *)a[1])->flags &= ~(CK_FLAGS)CKF_TOKEN_PRESENT;
            return 1;
        }
        // A slot that exists has no token; an unknown slot gets the real module's answer.
        if (takes_slot(offset) && real->C_GetSlotInfo(a[0], &info) == CKR_OK) {
            *rv = CKR_TOKEN_NOT_PRESENT;
            return 1;
        }
        if (takes_session(offset) && offset != offsetof(CK_FUNCTION_LIST, C_CloseSession)) {
            *rv = CKR_DEVICE_REMOVED;
            return 1;
        }
    }
    if (fault_for(name, SESSION_CLOSED) && takes_session(offset) && !listed(spared, spared_count, a[0])
        && !listed(closed, closed_count, a[0]) && closed_count < 64) {
        real->C_CloseSession(a[0]);
        closed[closed_count++] = a[0];
        *rv = CKR_SESSION_CLOSED;
        return 1;
    }
    return 0;
}

static CK_RV forward(size_t offset, const char *name, word a0, word a1, word a2, word a3, word a4, word a5, word a6, word a7) {
    word a[8] = { a0, a1, a2, a3, a4, a5, a6, a7 };
    CK_RV rv;
    read_control();
    if (!inject(offset, name, a, &rv)) {
        any_function function = *(any_function *)((char *)real + offset);
        rv = function ? function(a0, a1, a2, a3, a4, a5, a6, a7) : CKR_FUNCTION_NOT_SUPPORTED;
        if (rv == CKR_OK && offset == offsetof(CK_FUNCTION_LIST, C_OpenSession) && fault_for(name, SESSION_CLOSED)
            && spared_count < 64)
            spared[spared_count++] = *(CK_SESSION_HANDLE *)a4;
    }
    log_call(name, rv);
    return rv;
}

#define WRAP(name)                                                                                            \
    static CK_RV wrap_##name(word a0, word a1, word a2, word a3, word a4, word a5, word a6, word a7) {      \
        return forward(offsetof(CK_FUNCTION_LIST, name), #name, a0, a1, a2, a3, a4, a5, a6, a7);               \
    }
#define FUNCTIONS(X)                                                                                          \
    X(C_Initialize) X(C_Finalize) X(C_GetInfo) X(C_GetSlotList) X(C_GetSlotInfo) X(C_GetTokenInfo)            \
    X(C_GetMechanismList) X(C_GetMechanismInfo) X(C_InitToken) X(C_InitPIN) X(C_SetPIN) X(C_OpenSession)       \
    X(C_CloseSession) X(C_CloseAllSessions) X(C_GetSessionInfo) X(C_GetOperationState) X(C_SetOperationState)  \
    X(C_Login) X(C_Logout) X(C_CreateObject) X(C_CopyObject) X(C_DestroyObject) X(C_GetObjectSize)             \
    X(C_GetAttributeValue) X(C_SetAttributeValue) X(C_FindObjectsInit) X(C_FindObjects) X(C_FindObjectsFinal)  \
    X(C_EncryptInit) X(C_Encrypt) X(C_EncryptUpdate) X(C_EncryptFinal) X(C_DecryptInit) X(C_Decrypt)           \
    X(C_DecryptUpdate) X(C_DecryptFinal) X(C_DigestInit) X(C_Digest) X(C_DigestUpdate) X(C_DigestKey)          \
    X(C_DigestFinal) X(C_SignInit) X(C_Sign) X(C_SignUpdate) X(C_SignFinal) X(C_SignRecoverInit)               \
    X(C_SignRecover) X(C_VerifyInit) X(C_Verify) X(C_VerifyUpdate) X(C_VerifyFinal) X(C_VerifyRecoverInit)     \
    X(C_VerifyRecover) X(C_DigestEncryptUpdate) X(C_DecryptDigestUpdate) X(C_SignEncryptUpdate)                \
    X(C_DecryptVerifyUpdate) X(C_GenerateKey) X(C_GenerateKeyPair) X(C_WrapKey) X(C_UnwrapKey) X(C_DeriveKey)  \
    X(C_SeedRandom) X(C_GenerateRandom) X(C_GetFunctionStatus) X(C_CancelFunction) X(C_WaitForSlotEvent)
FUNCTIONS(WRAP)

__attribute__((constructor)) static void load_real(void) {
    loader_pid = getpid();
    const char *path = getenv("FAULTY_MODULE");
    void *handle = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
    CK_C_GetFunctionList get = handle ? (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList") : NULL;
    if (!get || get(&real) != CKR_OK) {
        fprintf(stderr, "faulty module: set FAULTY_MODULE to a PKCS#11 module (%s)\n", path ? dlerror() : "unset");
        real = NULL;
        return;
    }
    list.version = real->version;
#define FILL(name) list.name = (CK_##name)(void *)wrap_##name;
    FUNCTIONS(FILL)
    list.C_GetFunctionList = C_GetFunctionList;
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList) {
    if (!real) return CKR_GENERAL_ERROR;
    if (!ppFunctionList) return CKR_ARGUMENTS_BAD;
    *ppFunctionList = &list;
    return CKR_OK;
}
