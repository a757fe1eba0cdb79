// p11fork-bench: measurements for scripts/bench.sh, run against a module directly and through
// libp11fork.so side by side (the machine is shared and noisy: compare ratios of runs made
// together, and instruction counts from callgrind, never absolute times alone).
//
//   p11fork-bench calls    --module M --token T N                 C_GetSessionInfo N times; ns/call
//   p11fork-bench signs    --module M --token T --pin P --key K [--mechanism rsa|ec] [--multipart] N
//                                                                  N signatures, for instruction counts
//   p11fork-bench memory   --module M --token T --pin P --sessions S --objects O
//                                                                  heap bytes per session and per object
//   p11fork-bench steady   --module M --token T --pin P --key K [--mechanism rsa|ec|hmac] N
//                                                                  N signatures; heap and RSS every N/10
//   p11fork-bench opstate  --module M --token T [--nss] [--save-state] N
//                                                                  N SHA-256 digests (init, update, final),
//                                                                  with C_GetOperationState after the update
//   p11fork-bench sign     --module M --token T --pin P --key K [--mechanism rsa|ec]
//                          --threads N --seconds S                 signatures per second
//   p11fork-bench recovery --module M --token T --pin P --key K --sessions S --objects O
//                          [--fresh] [--second]                    a child's first signature, ms
//                          (the parent holds S sessions and O session objects; the child uses one;
//                          with --second, a first child signs and ends before the measured one
//                          starts: a later worker, whose broker is initialised and logged in)
// With --in-child, "calls" and "sign" measure in a forked child, after its first call (which, through
// p11fork, recovers the module: a copy in the child, or the broker with P11FORK_STRATEGY=broker).
// With --fresh, "recovery" measures instead what the module needs in a new process for the same
// work (C_Initialize, C_OpenSession, C_Login, find, sign): the baseline for the child's figure.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <p11-kit-1/p11-kit/pkcs11.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <malloc.h>

static CK_FUNCTION_LIST_PTR p;
static const char *token, *pin, *key_label, *mechanism_name = "rsa";
static int threads = 1, seconds = 2, sessions = 1, objects = 0, fresh = 0, second = 0;
static long count = 1000000;
static CK_SLOT_ID slot;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int fail(const char *what, CK_RV rv) {
    fprintf(stderr, "p11fork-bench: %s: 0x%lx\n", what, rv);
    return 1;
}

static CK_RV find_slot(void) {
    CK_SLOT_ID slots[32];
    CK_ULONG n = 32;
    CK_RV rv = p->C_GetSlotList(CK_TRUE, slots, &n);
    if (rv != CKR_OK) return rv;
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        size_t len = strlen(token);
        if (p->C_GetTokenInfo(slots[i], &info) == CKR_OK && !memcmp(info.label, token, len) &&
            (len == 32 || info.label[len] == ' ')) {
            slot = slots[i];
            return CKR_OK;
        }
    }
    return CKR_TOKEN_NOT_PRESENT;
}

// Its own search rather than ToolSupport's: linked with that target, this driver's debug
// information is more than valgrind 3.19 (Debian 12) can read ("Possibly corrupted debuginfo
// file"), and callgrind counts nothing.
static CK_RV find_key(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *key) {
    CK_OBJECT_CLASS class = strcmp(mechanism_name, "hmac") ? CKO_PRIVATE_KEY : CKO_SECRET_KEY;
    CK_ATTRIBUTE t[] = { { CKA_CLASS, &class, sizeof class }, { CKA_LABEL, (void *)key_label, strlen(key_label) } };
    CK_ULONG n = 0;
    CK_RV rv = p->C_FindObjectsInit(s, t, 2);
    if (rv != CKR_OK) return rv;
    rv = p->C_FindObjects(s, key, 1, &n);
    p->C_FindObjectsFinal(s);
    return rv == CKR_OK && n == 0 ? CKR_OBJECT_HANDLE_INVALID : rv;
}

static CK_RV sign_once(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key) {
    static const unsigned char data[32] = "p11fork benchmark: 32 bytes....";
    CK_MECHANISM m = { !strcmp(mechanism_name, "ec") ? CKM_ECDSA : !strcmp(mechanism_name, "hmac") ? CKM_SHA256_HMAC : CKM_SHA256_RSA_PKCS,
                       NULL, 0 };
    unsigned char signature[1024];
    CK_ULONG length = sizeof signature;
    CK_RV rv = p->C_SignInit(s, &m, key);
    return rv != CKR_OK ? rv : p->C_Sign(s, (CK_BYTE_PTR)data, 32, signature, &length);
}

static int nss, save_state;

static CK_RV initialize(void) {
    CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
    // NSS's softoken needs its configuration string; no database, read-only.
    if (nss) args.pReserved = "configdir='' certPrefix='' keyPrefix='' secmod='' flags=readOnly,noCertDB,noModDB,forceOpen,optimizeSpace";
    CK_RV rv = p->C_Initialize(&args);
    return rv != CKR_OK ? rv : find_slot();
}

static int in_child;

// --in-child: from here on the measurement runs in a forked child, after one call that lets
// p11fork recover the module there; the parent exits with the child's status.
static void into_child(CK_SESSION_HANDLE s) {
    if (!in_child) return;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) _exit(1);
    if (pid == 0) {
        alarm(600);
        CK_SESSION_INFO info;
        CK_RV rv = p->C_GetSessionInfo(s, &info);
        if (rv != CKR_OK) _exit(fail("the child's first call", rv));
        return;
    }
    int status = 0;
    waitpid(pid, &status, 0);
    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
}

// MARK: calls

static int bench_calls(void) {
    CK_RV rv = initialize();
    if (rv != CKR_OK) return fail("initialise", rv);
    CK_SESSION_HANDLE s;
    if ((rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK) return fail("C_OpenSession", rv);
    into_child(s);
    CK_SESSION_INFO info;
    double start = now();
    for (long i = 0; i < count; i++) p->C_GetSessionInfo(s, &info);
    double took = now() - start;
    printf("calls %ld ns_per_call %.1f\n", count, took * 1e9 / count);
    p->C_Finalize(NULL);
    return 0;
}

// MARK: signs (for instruction counts: N times C_SignInit + C_Sign, or with --multipart a SHA-256
// digest fed in two C_DigestUpdate calls, on one session)

static int multipart;

static int bench_signs(void) {
    CK_RV rv = initialize();
    if (rv != CKR_OK) return fail("initialise", rv);
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE key;
    if ((rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK) return fail("C_OpenSession", rv);
    if ((rv = p->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin))) != CKR_OK) return fail("C_Login", rv);
    if ((rv = find_key(s, &key)) != CKR_OK) return fail("find the key", rv);
    static const unsigned char data[32] = "p11fork benchmark: 32 bytes....";
    for (long i = 0; i < count; i++) {
        unsigned char signature[1024];
        CK_ULONG length = sizeof signature;
        if (!multipart) {
            rv = sign_once(s, key);
        } else {
            // Multi-part: a SHA-256 digest in two updates (cheap in the module, so what p11fork
            // adds to C_*Init/C_*Update/C_*Final shows).
            CK_MECHANISM sha = { CKM_SHA256, NULL, 0 };
            if ((rv = p->C_DigestInit(s, &sha)) == CKR_OK && (rv = p->C_DigestUpdate(s, (CK_BYTE_PTR)data, 16)) == CKR_OK &&
                (rv = p->C_DigestUpdate(s, (CK_BYTE_PTR)data + 16, 16)) == CKR_OK)
                rv = p->C_DigestFinal(s, signature, &length);
        }
        if (rv != CKR_OK) return fail("sign", rv);
    }
    printf("signs %ld\n", count);
    p->C_Finalize(NULL);
    return 0;
}

// MARK: opstate (is C_GetOperationState after each update an alternative to replay? what it costs)

static int bench_opstate(void) {
    CK_RV rv = initialize();
    if (rv != CKR_OK) return fail("initialise", rv);
    CK_SESSION_HANDLE s;
    if ((rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK) return fail("C_OpenSession", rv);
    static const unsigned char data[32] = "p11fork benchmark: 32 bytes....";
    CK_MECHANISM sha = { CKM_SHA256, NULL, 0 };
    unsigned char state[4096], digest[64];
    double start = now();
    for (long i = 0; i < count; i++) {
        CK_ULONG length = sizeof digest, state_length = sizeof state;
        if ((rv = p->C_DigestInit(s, &sha)) != CKR_OK || (rv = p->C_DigestUpdate(s, (CK_BYTE_PTR)data, 32)) != CKR_OK)
            return fail("digest", rv);
        if (save_state && (rv = p->C_GetOperationState(s, state, &state_length)) != CKR_OK) return fail("C_GetOperationState", rv);
        if ((rv = p->C_DigestFinal(s, digest, &length)) != CKR_OK) return fail("C_DigestFinal", rv);
    }
    printf("opstate %ld save %d ns_per_digest %.1f\n", count, save_state, (now() - start) * 1e9 / count);
    p->C_Finalize(NULL);
    return 0;
}

// MARK: sign

static volatile int stop;
static long totals[64];

static void *signer(void *arg) {
    long index = (long)arg;
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE key;
    if (p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s) != CKR_OK || find_key(s, &key) != CKR_OK) return NULL;
    while (!stop) if (sign_once(s, key) == CKR_OK) totals[index]++;
    p->C_CloseSession(s);
    return NULL;
}

static int bench_sign(void) {
    CK_RV rv = initialize();
    if (rv != CKR_OK) return fail("initialise", rv);
    CK_SESSION_HANDLE s;
    if ((rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK) return fail("C_OpenSession", rv);
    if ((rv = p->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin))) != CKR_OK) return fail("C_Login", rv);
    into_child(s);
    pthread_t t[64];
    for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, signer, (void *)i);
    sleep((unsigned)seconds);
    stop = 1;
    long total = 0;
    for (int i = 0; i < threads; i++) { pthread_join(t[i], NULL); total += totals[i]; }
    printf("sign threads %d signatures_per_second %.1f\n", threads, (double)total / seconds);
    p->C_Finalize(NULL);
    return 0;
}

// MARK: memory (bytes of heap per open session and per object handle, and in a steady state)

static long heap_bytes(void) { return (long)mallinfo2().uordblks; }

static long rss_kib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    while (f && fgets(line, sizeof line, f)) if (sscanf(line, "VmRSS: %ld", &kib) == 1) break;
    if (f) fclose(f);
    return kib;
}

static int bench_memory(void) {
    CK_RV rv = initialize();
    if (rv != CKR_OK) return fail("initialise", rv);
    CK_SESSION_HANDLE first, s;
    if ((rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &first)) != CKR_OK) return fail("C_OpenSession", rv);
    if ((rv = p->C_Login(first, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin))) != CKR_OK) return fail("C_Login", rv);
    // Warm up what a first session or object allocates once.
    if ((rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK) return fail("C_OpenSession", rv);
    long before = heap_bytes();
    for (int i = 0; i < sessions; i++)
        if ((rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK) return fail("C_OpenSession", rv);
    long after_sessions = heap_bytes();
    for (int i = 0; i < objects; i++) {
        CK_OBJECT_CLASS data = CKO_DATA;
        CK_BBOOL no = CK_FALSE;
        char label[32];
        snprintf(label, sizeof label, "memory-%d", i);
        CK_ATTRIBUTE t[] = { { CKA_CLASS, &data, sizeof data }, { CKA_TOKEN, &no, 1 },
                             { CKA_LABEL, label, strlen(label) }, { CKA_VALUE, label, strlen(label) } };
        CK_OBJECT_HANDLE h;
        if ((rv = p->C_CreateObject(first, t, 4, &h)) != CKR_OK) return fail("C_CreateObject", rv);
    }
    long after_objects = heap_bytes();
    printf("memory sessions %d bytes_per_session %.1f objects %d bytes_per_object %.1f\n", sessions,
           sessions ? (double)(after_sessions - before) / sessions : 0.0, objects,
           objects ? (double)(after_objects - after_sessions) / objects : 0.0);
    p->C_Finalize(NULL);
    return 0;
}

// N signatures (C_SignInit + C_Sign) on one session; heap and resident size at every tenth.
static int bench_steady(void) {
    CK_RV rv = initialize();
    if (rv != CKR_OK) return fail("initialise", rv);
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE key;
    if ((rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK) return fail("C_OpenSession", rv);
    if ((rv = p->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin))) != CKR_OK) return fail("C_Login", rv);
    if ((rv = find_key(s, &key)) != CKR_OK) return fail("find the key", rv);
    double start = now();
    for (long i = 1; i <= count; i++) {
        if ((rv = sign_once(s, key)) != CKR_OK) return fail("sign", rv);
        if (i % (count / 10 ? count / 10 : 1) == 0)
            printf("steady signatures %ld heap_bytes %ld rss_kib %ld seconds %.1f\n", i, heap_bytes(), rss_kib(), now() - start);
    }
    p->C_Finalize(NULL);
    return 0;
}

// MARK: recovery

static int bench_recovery(void) {
    if (fresh) {
        // What a new process needs for the same work, from its first call.
        double start = now();
        CK_RV rv = initialize();
        CK_SESSION_HANDLE s;
        CK_OBJECT_HANDLE key;
        if (rv == CKR_OK) rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s);
        if (rv == CKR_OK) rv = p->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
        if (rv == CKR_OK) rv = find_key(s, &key);
        if (rv == CKR_OK) rv = sign_once(s, key);
        if (rv != CKR_OK) return fail("fresh process", rv);
        printf("fresh ms %.3f\n", (now() - start) * 1e3);
        return 0;
    }
    CK_RV rv = initialize();
    if (rv != CKR_OK) return fail("initialise", rv);
    CK_SESSION_HANDLE first = 0, s;
    for (int i = 0; i < sessions; i++) {
        if ((rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK) return fail("C_OpenSession", rv);
        if (i == 0) first = s;
    }
    if ((rv = p->C_Login(first, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin))) != CKR_OK) return fail("C_Login", rv);
    // The parent creates `objects` data objects (session objects): handles it holds that its
    // child never uses. Recovery work must not grow with them.
    for (int i = 0; i < objects; i++) {
        CK_OBJECT_CLASS data = CKO_DATA;
        CK_BBOOL no = CK_FALSE;
        char label[32];
        snprintf(label, sizeof label, "bench-%d", i);
        CK_ATTRIBUTE t[] = { { CKA_CLASS, &data, sizeof data }, { CKA_TOKEN, &no, 1 },
                             { CKA_LABEL, label, strlen(label) }, { CKA_VALUE, label, strlen(label) } };
        CK_OBJECT_HANDLE h;
        if ((rv = p->C_CreateObject(first, t, 4, &h)) != CKR_OK) return fail("C_CreateObject", rv);
    }
    CK_OBJECT_HANDLE key;
    if ((rv = find_key(first, &key)) != CKR_OK) return fail("find key", rv);
    if ((rv = sign_once(first, key)) != CKR_OK) return fail("parent sign", rv);
    if (second) {
        pid_t first_worker = fork();
        if (first_worker == 0) {
            alarm(60);
            _exit(sign_once(first, key) == CKR_OK ? 0 : 3);
        }
        int status = 0;
        waitpid(first_worker, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return fail("first child", (CK_RV)status);
    }
    int fds[2];
    if (pipe(fds) != 0) return 1;
    pid_t pid = fork();
    if (pid == 0) {
        alarm(60);
        double start = now();
        CK_RV crv = sign_once(first, key);
        double ms = (now() - start) * 1e3;
        if (crv != CKR_OK) _exit(3);
        (void)!write(fds[1], &ms, sizeof ms);
        _exit(0);
    }
    double ms = -1;
    (void)!read(fds[0], &ms, sizeof ms);
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return fail("child", (CK_RV)status);
    printf("recovery sessions %d objects %d ms %.3f\n", sessions, objects, ms);
    p->C_Finalize(NULL);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: see the comment at the top of bench.c\n"); return 2; }
    const char *what = argv[1], *module = NULL;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--module") && v) { module = v; i++; }
        else if (!strcmp(a, "--token") && v) { token = v; i++; }
        else if (!strcmp(a, "--pin") && v) { pin = v; i++; }
        else if (!strcmp(a, "--key") && v) { key_label = v; i++; }
        else if (!strcmp(a, "--mechanism") && v) { mechanism_name = v; i++; }
        else if (!strcmp(a, "--threads") && v) { threads = atoi(v); i++; }
        else if (!strcmp(a, "--seconds") && v) { seconds = atoi(v); i++; }
        else if (!strcmp(a, "--sessions") && v) { sessions = atoi(v); i++; }
        else if (!strcmp(a, "--objects") && v) { objects = atoi(v); i++; }
        else if (!strcmp(a, "--fresh")) fresh = 1;
        else if (!strcmp(a, "--second")) second = 1;
        else if (!strcmp(a, "--in-child")) in_child = 1;
        else if (!strcmp(a, "--multipart")) multipart = 1;
        else if (!strcmp(a, "--nss")) nss = 1;
        else if (!strcmp(a, "--save-state")) save_state = 1;
        else if (a[0] != '-') count = atol(a);
        else { fprintf(stderr, "p11fork-bench: unknown argument %s\n", a); return 2; }
    }
    if (!module || !token || threads < 1 || threads > 64) { fprintf(stderr, "p11fork-bench: missing or bad arguments\n"); return 2; }
    void *library = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    CK_C_GetFunctionList get = library ? (CK_C_GetFunctionList)dlsym(library, "C_GetFunctionList") : NULL;
    if (!get || get(&p) != CKR_OK) { fprintf(stderr, "p11fork-bench: cannot load %s\n", module); return 1; }
    if (!strcmp(what, "calls")) return bench_calls();
    if (!strcmp(what, "sign") && pin && key_label) return bench_sign();
    if (!strcmp(what, "signs") && pin && key_label) return bench_signs();
    if (!strcmp(what, "opstate")) return bench_opstate();
    if (!strcmp(what, "memory") && pin) return bench_memory();
    if (!strcmp(what, "steady") && pin && key_label) return bench_steady();
    if (!strcmp(what, "recovery") && pin && key_label) return bench_recovery();
    fprintf(stderr, "p11fork-bench: unknown measurement or missing --pin/--key\n");
    return 2;
}
