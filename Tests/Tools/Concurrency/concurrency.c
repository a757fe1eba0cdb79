// p11fork-concurrency: many threads against a PKCS#11 module, forks among them, and C_Finalize
// racing them; run against the real module directly and through libp11fork.so.
//
//   p11fork-concurrency --module PATH --token LABEL --pin PIN --key LABEL
//                       [--locking callbacks|os|both|none] [--threads N] [--seconds S]
//                       [--children N] [--rounds N] [--busy keygen|random] [--child-timeout S] SCENARIO
//
// Scenarios:
//   threads         N threads sign, verify and search, each on a session of its own, and read a
//                   shared session, for S seconds; every signature is verified.
//   fork-churn      threads open, use and close sessions without pause while the main thread forks
//                   --children children one after another; each child signs on a session the
//                   parent kept open, finds a session the parent closed before the fork invalid,
//                   and tries the sessions the churning threads held at the fork.
//   fork-busy       a thread stays inside a slow call of the module (RSA-4096 key generation or a
//                   large C_GenerateRandom) while the main thread forks children that sign.
//   finalize-race   N threads sign, search and read session info while the main thread calls
//                   C_Finalize (in every other round a second thread too, at the same moment);
//                   then C_Initialize again; --rounds times.
//   initialize-race N threads list slots, read the session info of a handle from before and open
//                   and close sessions while the main thread calls C_Finalize and then C_Initialize
//                   (and logs in, finds the key, signs); --rounds times.
//   callbacks-fork  with the application's mutex callbacks, N threads sign while children are
//                   forked; each child signs, and its module must be using the callbacks too (the
//                   child counts them).
// --locking says what C_Initialize gets: mutex callbacks only, CKF_OS_LOCKING_OK only, both, or
// NULL. The callbacks are pthread mutexes that count their use; the count is printed.
// Every child arms alarm() and _exit()s with a status the parent checks; the main process arms
// alarm() too: a hang is a failure. Last line: "result: ok ..." (exit 0) or "result: fail ..."
// (exit 1); usage errors exit 2.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <p11-kit-1/p11-kit/pkcs11.h>
#include "tool_support.h"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64
#define MAX_SIGNATURE 1024

static CK_FUNCTION_LIST_PTR p11;
static const char *token_label, *pin, *key_label, *locking = "os", *busy = "keygen";
static int thread_count = 8, seconds = 3, children = 200, rounds = 20, child_timeout = 30;

static CK_SLOT_ID slot;
static CK_SESSION_HANDLE main_session;
static CK_OBJECT_HANDLE private_key, public_key;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

// MARK: the application's mutex callbacks (pthread mutexes that count their use)

static long mutexes_created, mutexes_destroyed, mutex_locks, mutex_unlocks;

static CK_RV create_mutex(CK_VOID_PTR_PTR out) {
    if (!out) return CKR_ARGUMENTS_BAD;
    pthread_mutex_t *m = malloc(sizeof *m);
    if (!m) return CKR_HOST_MEMORY;
    pthread_mutex_init(m, NULL);
    __atomic_add_fetch(&mutexes_created, 1, __ATOMIC_RELAXED);
    *out = m;
    return CKR_OK;
}

static CK_RV destroy_mutex(CK_VOID_PTR m) {
    if (!m) return CKR_MUTEX_BAD;
    pthread_mutex_destroy(m);
    free(m);
    __atomic_add_fetch(&mutexes_destroyed, 1, __ATOMIC_RELAXED);
    return CKR_OK;
}

static CK_RV lock_mutex(CK_VOID_PTR m) {
    if (!m) return CKR_MUTEX_BAD;
    pthread_mutex_lock(m);
    __atomic_add_fetch(&mutex_locks, 1, __ATOMIC_RELAXED);
    return CKR_OK;
}

static CK_RV unlock_mutex(CK_VOID_PTR m) {
    if (!m) return CKR_MUTEX_BAD;
    __atomic_add_fetch(&mutex_unlocks, 1, __ATOMIC_RELAXED);
    return pthread_mutex_unlock(m) ? CKR_MUTEX_NOT_LOCKED : CKR_OK;
}

static long counter(long *c) { return __atomic_load_n(c, __ATOMIC_RELAXED); }

// With --locking none the application has promised not to call from several threads at once
// (PKCS#11 2.40 section 5.4, C_Initialize with NULL): its threads take turns under this lock.
static pthread_mutex_t turns = PTHREAD_MUTEX_INITIALIZER;
static void take_turn(void) { if (!strcmp(locking, "none")) pthread_mutex_lock(&turns); }
static void end_turn(void) { if (!strcmp(locking, "none")) pthread_mutex_unlock(&turns); }

static int uses_callbacks(void) { return !strcmp(locking, "callbacks") || !strcmp(locking, "both"); }

static CK_RV initialize(void) {
    static CK_C_INITIALIZE_ARGS args;
    memset(&args, 0, sizeof args);
    if (uses_callbacks()) {
        args.CreateMutex = create_mutex;
        args.DestroyMutex = destroy_mutex;
        args.LockMutex = lock_mutex;
        args.UnlockMutex = unlock_mutex;
    }
    if (!strcmp(locking, "os") || !strcmp(locking, "both")) args.flags = CKF_OS_LOCKING_OK;
    return p11->C_Initialize(strcmp(locking, "none") ? &args : NULL);
}

static void say_callbacks(const char *who) {
    tool_say("%s: mutex callbacks: %ld created, %ld destroyed, %ld locks, %ld unlocks", who, counter(&mutexes_created),
        counter(&mutexes_destroyed), counter(&mutex_locks), counter(&mutex_unlocks));
}

// MARK: PKCS#11 steps

static const unsigned char message[] = "p11fork concurrency: 32 bytes..";

static CK_RV find_object(CK_SESSION_HANDLE s, CK_OBJECT_CLASS class, CK_OBJECT_HANDLE *out) {
    CK_ULONG count;
    return tool_find_objects(p11, s, class, key_label, out, 1, &count);
}

static CK_RV open_session(CK_SESSION_HANDLE *s) {
    return p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, s);
}

// Initialises, opens the main session, logs in, finds the key pair.
static CK_RV set_up(const char **step) {
    CK_RV rv;
    *step = "C_Initialize";
    if ((rv = initialize()) != CKR_OK) return rv;
    *step = "C_GetSlotList/C_GetTokenInfo";
    if ((rv = tool_find_slot(p11, token_label, &slot)) != CKR_OK) return rv;
    *step = "C_OpenSession";
    if ((rv = open_session(&main_session)) != CKR_OK) return rv;
    *step = "C_Login";
    if ((rv = p11->C_Login(main_session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin))) != CKR_OK) return rv;
    *step = "C_FindObjects (private key)";
    if ((rv = find_object(main_session, CKO_PRIVATE_KEY, &private_key)) != CKR_OK) return rv;
    *step = "C_FindObjects (public key)";
    return find_object(main_session, CKO_PUBLIC_KEY, &public_key);
}

// Signs on `s` and verifies the signature on the same session.
static CK_RV sign_and_verify(CK_SESSION_HANDLE s) {
    CK_MECHANISM m = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    unsigned char signature[MAX_SIGNATURE];
    CK_ULONG length = sizeof signature;
    CK_RV rv = p11->C_SignInit(s, &m, private_key);
    if (rv == CKR_OK) rv = p11->C_Sign(s, (CK_BYTE_PTR)message, sizeof message - 1, signature, &length);
    if (rv == CKR_OK) rv = p11->C_VerifyInit(s, &m, public_key);
    if (rv == CKR_OK) rv = p11->C_Verify(s, (CK_BYTE_PTR)message, sizeof message - 1, signature, length);
    return rv;
}

// MARK: children

// Runs `body(index)` in a child under alarm(child_timeout) and waits for it: tool_run_child's answer.
static int (*child_body)(int index);
static int child_with_index(void *index) { return child_body((int)(long)index); }
static int run_child(int (*body)(int index), int index) {
    child_body = body;
    return tool_run_child((unsigned)child_timeout, child_with_index, (void *)(long)index);
}

static void tally_child(int status, int index, int *failed, int *hung, int *crashed) {
    if (status == 0) return;
    if (status == TOOL_KILLED + SIGALRM) (*hung)++;
    else if (status > TOOL_KILLED) (*crashed)++;
    else (*failed)++;
    if (*failed + *hung + *crashed <= 5) tool_say("child %d: status %d", index, status);
}

// MARK: threads

static volatile int stop;
static long calls_made, signatures_verified;
static int thread_problems;
static CK_SESSION_HANDLE shared_session;

static void problem(const char *what, CK_RV rv) {
    if (__atomic_add_fetch(&thread_problems, 1, __ATOMIC_RELAXED) <= 5) tool_say("thread: %s: %s", what, tool_rv_name(rv));
}

// Signs and verifies, searches, and reads the shared session, each on a session of its own.
static void *worker(void *unused) {
    (void)unused;
    CK_SESSION_HANDLE s;
    take_turn();
    CK_RV rv = open_session(&s);
    end_turn();
    if (rv != CKR_OK) { problem("C_OpenSession", rv); return NULL; }
    long calls = 0, verified = 0;
    while (!stop) {
        take_turn();
        if ((rv = sign_and_verify(s)) != CKR_OK) problem("sign and verify", rv); else verified++;
        CK_OBJECT_HANDLE found;
        if ((rv = find_object(s, CKO_PUBLIC_KEY, &found)) != CKR_OK) problem("C_FindObjects", rv);
        else if (found != public_key) problem("C_FindObjects found another handle", CKR_GENERAL_ERROR);
        CK_SESSION_INFO info;
        if ((rv = p11->C_GetSessionInfo(shared_session, &info)) != CKR_OK) problem("C_GetSessionInfo (shared)", rv);
        else if (info.state != CKS_RW_USER_FUNCTIONS) problem("shared session not logged in", CKR_GENERAL_ERROR);
        CK_ULONG bits = 0;
        CK_ATTRIBUTE modulus_bits = { CKA_MODULUS_BITS, &bits, sizeof bits };
        if ((rv = p11->C_GetAttributeValue(shared_session, public_key, &modulus_bits, 1)) != CKR_OK)
            problem("C_GetAttributeValue (shared session)", rv);
        end_turn();
        calls += 13;
    }
    take_turn();
    if ((rv = p11->C_CloseSession(s)) != CKR_OK) problem("C_CloseSession", rv);
    end_turn();
    __atomic_add_fetch(&calls_made, calls, __ATOMIC_RELAXED);
    __atomic_add_fetch(&signatures_verified, verified, __ATOMIC_RELAXED);
    return NULL;
}

static int scenario_threads(void) {
    if ((shared_session = main_session) == 0) return tool_fail("threads: no shared session");
    long locks_before = counter(&mutex_locks);
    pthread_t threads[MAX_THREADS];
    double started = now();
    for (int i = 0; i < thread_count; i++) pthread_create(&threads[i], NULL, worker, NULL);
    sleep((unsigned)seconds);
    stop = 1;
    for (int i = 0; i < thread_count; i++) pthread_join(threads[i], NULL);
    double took = now() - started;
    say_callbacks("threads");
    tool_say("threads: %d threads, %.1f s, %ld calls, %ld signatures made and verified, %d problem(s)", thread_count, took,
        calls_made, signatures_verified, thread_problems);
    if (thread_problems) return tool_fail("threads: %d call(s) failed", thread_problems);
    if (signatures_verified < thread_count) return tool_fail("threads: only %ld signatures", signatures_verified);
    if (!strcmp(locking, "callbacks") && counter(&mutex_locks) == locks_before)
        return tool_fail("threads: the module never used the application's mutex callbacks");
    tool_say("result: ok threads: %d threads, %ld signatures verified, locking %s", thread_count, signatures_verified, locking);
    return 0;
}

// MARK: fork-churn

#define CHURN_THREADS 3
// The session each churning thread holds open right now (0: none): what a child tries.
static CK_SESSION_HANDLE churn_open[CHURN_THREADS];
static long churn_cycles;

static void *churn(void *index_pointer) {
    long index = (long)index_pointer;
    long cycles = 0;
    while (!stop) {
        CK_SESSION_HANDLE s;
        CK_RV rv = open_session(&s);
        if (rv != CKR_OK) { problem("C_OpenSession (churn)", rv); continue; }
        __atomic_store_n(&churn_open[index], s, __ATOMIC_RELEASE);
        CK_OBJECT_HANDLE found;
        if ((rv = find_object(s, CKO_PRIVATE_KEY, &found)) != CKR_OK) problem("C_FindObjects (churn)", rv);
        // Every third session also signs (login state is the token's: new sessions are logged in).
        if (cycles % 3 == 0 && (rv = sign_and_verify(s)) != CKR_OK) problem("sign and verify (churn)", rv);
        __atomic_store_n(&churn_open[index], 0, __ATOMIC_RELEASE);
        if ((rv = p11->C_CloseSession(s)) != CKR_OK) problem("C_CloseSession (churn)", rv);
        cycles++;
    }
    __atomic_add_fetch(&churn_cycles, cycles, __ATOMIC_RELAXED);
    return NULL;
}

static CK_SESSION_HANDLE closed_before_fork;
static CK_SESSION_HANDLE held_at_fork[CHURN_THREADS];
// What the children reported about the churning threads' sessions (pipe from each child).
static int churn_report[2];

// Exit status: 1 sign failed, 2 closed session not invalid, 3 a held session answered something
// else than CKR_OK / CKR_SESSION_HANDLE_INVALID, 4 a held session that answered CKR_OK cannot sign
// (CKR_OPERATION_ACTIVE is its right answer when the thread was between C_SignInit and C_Sign: the
// child gets the session's operation too).
static int churn_child(int index) {
    CK_RV rv = sign_and_verify(main_session);
    if (rv != CKR_OK) { tool_say("child %d: sign on the parent's session: %s", index, tool_rv_name(rv)); return 1; }
    CK_SESSION_INFO info;
    rv = p11->C_GetSessionInfo(closed_before_fork, &info);
    if (rv != CKR_SESSION_HANDLE_INVALID) { tool_say("child %d: closed session answered %s", index, tool_rv_name(rv)); return 2; }
    int working = 0, invalid = 0;
    for (int i = 0; i < CHURN_THREADS; i++) {
        if (!held_at_fork[i]) continue;
        rv = p11->C_GetSessionInfo(held_at_fork[i], &info);
        if (rv == CKR_SESSION_HANDLE_INVALID) { invalid++; continue; }
        if (rv != CKR_OK) { tool_say("child %d: a session held at the fork answered %s", index, tool_rv_name(rv)); return 3; }
        if ((rv = sign_and_verify(held_at_fork[i])) != CKR_OK && rv != CKR_OPERATION_ACTIVE) {
            tool_say("child %d: a session held at the fork cannot sign: %s", index, tool_rv_name(rv));
            return 4;
        }
        working++;
    }
    int counts[2] = { working, invalid };
    (void)!write(churn_report[1], counts, sizeof counts);
    return 0;
}

static int scenario_fork_churn(void) {
    if (pipe(churn_report)) return tool_fail("fork-churn: pipe");
    pthread_t threads[CHURN_THREADS];
    for (long i = 0; i < CHURN_THREADS; i++) pthread_create(&threads[i], NULL, churn, (void *)i);
    int failed = 0, hung = 0, crashed = 0, working = 0, invalid = 0;
    double started = now();
    for (int i = 0; i < children; i++) {
        CK_RV rv = open_session(&closed_before_fork);
        if (rv == CKR_OK) rv = p11->C_CloseSession(closed_before_fork);
        if (rv != CKR_OK) { problem("parent: open and close a session", rv); continue; }
        // Read just before the fork: the child sees what the threads held at about that moment.
        for (int t = 0; t < CHURN_THREADS; t++) held_at_fork[t] = __atomic_load_n(&churn_open[t], __ATOMIC_ACQUIRE);
        int status = run_child(churn_child, i);
        tally_child(status, i, &failed, &hung, &crashed);
        int counts[2];
        if (status == 0 && read(churn_report[0], counts, sizeof counts) == sizeof counts) {
            working += counts[0];
            invalid += counts[1];
        }
    }
    stop = 1;
    for (int i = 0; i < CHURN_THREADS; i++) pthread_join(threads[i], NULL);
    CK_RV parent = sign_and_verify(main_session);
    tool_say("fork-churn: %d children in %.1f s: %d failed, %d hung, %d crashed; sessions held by churning threads at the fork: "
        "%d worked in the child, %d answered CKR_SESSION_HANDLE_INVALID; %ld sessions opened and closed by %d threads, "
        "%d problem(s) in the parent's threads; parent signs after: %s",
        children, now() - started, failed, hung, crashed, working, invalid, churn_cycles, CHURN_THREADS, thread_problems,
        tool_rv_name(parent));
    if (failed || hung || crashed) return tool_fail("fork-churn: %d failed, %d hung, %d crashed", failed, hung, crashed);
    if (thread_problems || parent != CKR_OK) return tool_fail("fork-churn: the parent was harmed");
    tool_say("result: ok fork-churn: %d children signed", children);
    return 0;
}

// MARK: fork-busy

static volatile int busy_inside;
static long busy_calls;

static void *busy_thread(void *unused) {
    (void)unused;
    CK_SESSION_HANDLE s;
    CK_RV rv = open_session(&s);
    if (rv != CKR_OK) { problem("C_OpenSession (busy)", rv); return NULL; }
    static unsigned char random_bytes[16 << 20];
    while (!stop) {
        busy_inside = 1;
        if (!strcmp(busy, "random")) {
            rv = p11->C_GenerateRandom(s, random_bytes, sizeof random_bytes);
        } else {
            CK_MECHANISM m = { CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0 };
            CK_ULONG bits = 4096;
            CK_BBOOL no = CK_FALSE;
            CK_ATTRIBUTE public_template[] = { { CKA_MODULUS_BITS, &bits, sizeof bits }, { CKA_TOKEN, &no, sizeof no } };
            CK_ATTRIBUTE private_template[] = { { CKA_TOKEN, &no, sizeof no } };
            CK_OBJECT_HANDLE public_handle, private_handle;
            rv = p11->C_GenerateKeyPair(s, &m, public_template, 2, private_template, 1, &public_handle, &private_handle);
            if (rv == CKR_OK) {
                p11->C_DestroyObject(s, public_handle);
                p11->C_DestroyObject(s, private_handle);
            }
        }
        if (rv != CKR_OK) problem("the slow call", rv);
        __atomic_add_fetch(&busy_calls, 1, __ATOMIC_RELAXED);
    }
    p11->C_CloseSession(s);
    return NULL;
}

static int busy_child(int index) {
    CK_RV rv = sign_and_verify(main_session);
    if (rv != CKR_OK) { tool_say("child %d: sign: %s", index, tool_rv_name(rv)); return 1; }
    return 0;
}

static int scenario_fork_busy(void) {
    pthread_t thread;
    pthread_create(&thread, NULL, busy_thread, NULL);
    while (!busy_inside) usleep(1000);
    int failed = 0, hung = 0, crashed = 0;
    double started = now();
    for (int i = 0; i < children; i++) {
        // Forks land at random points of the slow call (each takes ~0.1 to a few seconds).
        usleep(5000 + rand() % 20000);
        tally_child(run_child(busy_child, i), i, &failed, &hung, &crashed);
    }
    stop = 1;
    pthread_join(thread, NULL);
    CK_RV parent = sign_and_verify(main_session);
    tool_say("fork-busy: %d children forked during %ld slow call(s) (%s) in %.1f s: %d failed, %d hung, %d crashed; "
        "%d problem(s) in the parent's threads; parent signs after: %s",
        children, busy_calls, busy, now() - started, failed, hung, crashed, thread_problems, tool_rv_name(parent));
    if (failed || hung || crashed) return tool_fail("fork-busy: %d failed, %d hung, %d crashed", failed, hung, crashed);
    if (thread_problems || parent != CKR_OK) return tool_fail("fork-busy: the parent was harmed");
    tool_say("result: ok fork-busy: %d children signed", children);
    return 0;
}

// MARK: finalize-race

// Codes a call racing C_Finalize may get (PKCS#11 2.40 section 5.4 leaves the race unspecified):
// the call was done before the finalization, or the library or handle is gone.
static int acceptable_in_race(CK_RV rv) {
    return rv == CKR_OK || rv == CKR_CRYPTOKI_NOT_INITIALIZED || rv == CKR_SESSION_HANDLE_INVALID
        || rv == CKR_SESSION_CLOSED || rv == CKR_OBJECT_HANDLE_INVALID || rv == CKR_KEY_HANDLE_INVALID
        || rv == CKR_OPERATION_NOT_INITIALIZED;
}

static long race_answers[4];  // CKR_OK, CKR_CRYPTOKI_NOT_INITIALIZED, handle invalid or closed, other accepted

static void tally_race(CK_RV rv, long local[4]) {
    if (!acceptable_in_race(rv)) { problem("a call racing C_Finalize", rv); return; }
    local[rv == CKR_OK ? 0 : rv == CKR_CRYPTOKI_NOT_INITIALIZED ? 1
          : rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED ? 2 : 3]++;
}

static void *racer(void *unused) {
    (void)unused;
    CK_SESSION_HANDLE s;
    CK_RV rv = open_session(&s);
    long local[4] = { 0 };
    tally_race(rv, local);
    if (rv != CKR_OK) return NULL;
    // Until the library is gone: every call must answer one of the accepted codes.
    for (int gone = 0; !gone;) {
        CK_MECHANISM m = { CKM_SHA256_RSA_PKCS, NULL, 0 };
        unsigned char signature[MAX_SIGNATURE];
        CK_ULONG length = sizeof signature;
        rv = p11->C_SignInit(s, &m, private_key);
        tally_race(rv, local);
        if (rv == CKR_OK) {
            rv = p11->C_Sign(s, (CK_BYTE_PTR)message, sizeof message - 1, signature, &length);
            tally_race(rv, local);
        }
        CK_OBJECT_HANDLE found;
        tally_race(rv = find_object(s, CKO_PUBLIC_KEY, &found), local);
        CK_SESSION_INFO info;
        tally_race(rv = p11->C_GetSessionInfo(s, &info), local);
        gone = rv == CKR_CRYPTOKI_NOT_INITIALIZED || rv == CKR_SESSION_HANDLE_INVALID;
    }
    __atomic_add_fetch(&race_answers[0], local[0], __ATOMIC_RELAXED);
    __atomic_add_fetch(&race_answers[1], local[1], __ATOMIC_RELAXED);
    __atomic_add_fetch(&race_answers[2], local[2], __ATOMIC_RELAXED);
    __atomic_add_fetch(&race_answers[3], local[3], __ATOMIC_RELAXED);
    return NULL;
}

// In every other round a second thread calls C_Finalize at the same moment as the main thread.
static pthread_barrier_t finalizers;
static CK_RV second_finalize;

static void *second_finalizer(void *unused) {
    (void)unused;
    pthread_barrier_wait(&finalizers);
    second_finalize = p11->C_Finalize(NULL);
    return NULL;
}

static int scenario_finalize_race(void) {
    const char *step;
    double started = now();
    int doubled = 0;
    pthread_barrier_init(&finalizers, NULL, 2);
    for (int round = 0; round < rounds; round++) {
        if (round > 0) {
            CK_RV rv = set_up(&step);
            if (rv != CKR_OK) return tool_fail("finalize-race: round %d: %s: %s", round, step, tool_rv_name(rv));
        }
        pthread_t threads[MAX_THREADS], second;
        for (int i = 0; i < thread_count; i++) pthread_create(&threads[i], NULL, racer, NULL);
        int twice = round % 2 == 1;
        if (twice) pthread_create(&second, NULL, second_finalizer, NULL);
        usleep(2000 + rand() % 20000);
        if (twice) pthread_barrier_wait(&finalizers);
        CK_RV rv = p11->C_Finalize(NULL);
        for (int i = 0; i < thread_count; i++) pthread_join(threads[i], NULL);
        if (twice) {
            pthread_join(second, NULL);
            // One of the two finalizes; the other finds the library finalized.
            int one_each = (rv == CKR_OK && second_finalize == CKR_CRYPTOKI_NOT_INITIALIZED)
                || (rv == CKR_CRYPTOKI_NOT_INITIALIZED && second_finalize == CKR_OK);
            if (!one_each) return tool_fail("finalize-race: round %d: two C_Finalize calls answered %s and %s", round,
                                            tool_rv_name(rv), tool_rv_name(second_finalize));
            rv = CKR_OK;
            doubled++;
        }
        if (rv != CKR_OK) return tool_fail("finalize-race: round %d: C_Finalize: %s", round, tool_rv_name(rv));
        if (thread_problems) return tool_fail("finalize-race: round %d: %d unexpected answer(s)", round, thread_problems);
    }
    // After the last round: initialise again, and everything works.
    CK_RV rv = set_up(&step);
    if (rv != CKR_OK) return tool_fail("finalize-race: after the rounds: %s: %s", step, tool_rv_name(rv));
    if ((rv = sign_and_verify(main_session)) != CKR_OK) return tool_fail("finalize-race: sign after the rounds: %s", tool_rv_name(rv));
    tool_say("finalize-race: %d rounds of %d threads in %.1f s (%d with two C_Finalize at once: one CKR_OK, one "
        "CKR_CRYPTOKI_NOT_INITIALIZED each); answers: %ld CKR_OK, %ld CKR_CRYPTOKI_NOT_INITIALIZED, "
        "%ld CKR_SESSION_HANDLE_INVALID/CLOSED, %ld other handle or operation codes",
        rounds, thread_count, now() - started, doubled, race_answers[0], race_answers[1], race_answers[2], race_answers[3]);
    tool_say("result: ok finalize-race: %d rounds, then signs", rounds);
    return 0;
}

// MARK: initialize-race

static volatile int initialize_returned;

// Until well after the main thread's C_Initialize has returned: slot list, the session handle of
// before the C_Finalize, and a session of its own; every answer must be an accepted one.
static void *initialize_racer(void *unused) {
    (void)unused;
    long local[4] = { 0 };
    CK_SESSION_HANDLE stale = main_session;
    for (int after = 0; after < 50;) {
        CK_ULONG count = 0;
        tally_race(p11->C_GetSlotList(CK_TRUE, NULL, &count), local);
        CK_SESSION_INFO info;
        tally_race(p11->C_GetSessionInfo(stale, &info), local);
        CK_SESSION_HANDLE s;
        CK_RV rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s);
        tally_race(rv, local);
        if (rv == CKR_OK) tally_race(p11->C_CloseSession(s), local);
        if (__atomic_load_n(&initialize_returned, __ATOMIC_ACQUIRE)) after++;
    }
    for (int i = 0; i < 4; i++) __atomic_add_fetch(&race_answers[i], local[i], __ATOMIC_RELAXED);
    return NULL;
}

// N threads call while the main thread initialises the library again after a C_Finalize: calls
// before it answer CKR_CRYPTOKI_NOT_INITIALIZED, calls after it work, the stale session handle
// gets the module's own answer (it reaches the module as it would directly).
static int scenario_initialize_race(void) {
    const char *step;
    double started = now();
    for (int round = 0; round < rounds; round++) {
        CK_RV rv = p11->C_Finalize(NULL);
        if (rv != CKR_OK) return tool_fail("initialize-race: round %d: C_Finalize: %s", round, tool_rv_name(rv));
        __atomic_store_n(&initialize_returned, 0, __ATOMIC_RELEASE);
        pthread_t threads[MAX_THREADS];
        for (int i = 0; i < thread_count; i++) pthread_create(&threads[i], NULL, initialize_racer, NULL);
        usleep(rand() % 3000);
        rv = set_up(&step);
        __atomic_store_n(&initialize_returned, 1, __ATOMIC_RELEASE);
        for (int i = 0; i < thread_count; i++) pthread_join(threads[i], NULL);
        if (rv != CKR_OK) return tool_fail("initialize-race: round %d: %s: %s", round, step, tool_rv_name(rv));
        if (thread_problems) return tool_fail("initialize-race: round %d: %d unexpected answer(s)", round, thread_problems);
        if ((rv = sign_and_verify(main_session)) != CKR_OK) return tool_fail("initialize-race: round %d: sign: %s", round, tool_rv_name(rv));
    }
    tool_say("initialize-race: %d rounds of %d threads in %.1f s; answers: %ld CKR_OK, %ld CKR_CRYPTOKI_NOT_INITIALIZED, "
        "%ld CKR_SESSION_HANDLE_INVALID/CLOSED, %ld other handle codes",
        rounds, thread_count, now() - started, race_answers[0], race_answers[1], race_answers[2], race_answers[3]);
    tool_say("result: ok initialize-race: %d rounds, each signing after", rounds);
    return 0;
}

// MARK: callbacks-fork

// The child's module must be using the application's callbacks: its signature takes locks
// through them (a module re-initialised in the child with other arguments would not).
static int callbacks_child(int index) {
    long created = counter(&mutexes_created), locks = counter(&mutex_locks);
    CK_RV rv = sign_and_verify(main_session);
    long created_after = counter(&mutexes_created), locks_after = counter(&mutex_locks);
    tool_say("child %d: sign %s; in the child: %ld mutex(es) created, %ld lock(s) through the callbacks", index, tool_rv_name(rv),
        created_after - created, locks_after - locks);
    if (rv != CKR_OK) return 1;
    return locks_after > locks ? 0 : 2;
}

// The parent's threads sign meanwhile: a mutex the module made through the callbacks may be held
// by one of them at the fork, and the child must not need it.
static int scenario_callbacks_fork(void) {
    if (strcmp(locking, "callbacks")) return tool_fail("callbacks-fork needs --locking callbacks");
    shared_session = main_session;
    pthread_t threads[MAX_THREADS];
    for (int i = 0; i < thread_count; i++) pthread_create(&threads[i], NULL, worker, NULL);
    int failed = 0, hung = 0, crashed = 0;
    for (int i = 0; i < children; i++) tally_child(run_child(callbacks_child, i), i, &failed, &hung, &crashed);
    stop = 1;
    for (int i = 0; i < thread_count; i++) pthread_join(threads[i], NULL);
    say_callbacks("parent");
    if (failed || hung || crashed) return tool_fail("callbacks-fork: %d failed, %d hung, %d crashed", failed, hung, crashed);
    if (thread_problems) return tool_fail("callbacks-fork: %d call(s) of the parent's threads failed", thread_problems);
    tool_say("result: ok callbacks-fork: %d children signed with the application's mutex callbacks in use", children);
    return 0;
}

// MARK: main

static int usage(const char *problem) {
    fprintf(stderr, "p11fork-concurrency: %s\nusage: p11fork-concurrency --module PATH --token LABEL --pin PIN --key LABEL "
                    "[--locking callbacks|os|both|none] [--threads N] [--seconds S] [--children N] [--rounds N] "
                    "[--busy keygen|random] [--child-timeout S] threads|fork-churn|fork-busy|finalize-race|initialize-race|callbacks-fork\n", problem);
    return 2;
}

int main(int argc, char **argv) {
    const char *module = NULL, *scenario = NULL;
    const struct tool_option options[] = {
        { "--module", &module }, { "--token", &token_label }, { "--pin", &pin }, { "--key", &key_label },
        { "--locking", &locking }, { "--busy", &busy }, { "--threads", .number = &thread_count },
        { "--seconds", .number = &seconds }, { "--children", .number = &children }, { "--rounds", .number = &rounds },
        { "--child-timeout", .number = &child_timeout }, { NULL },
    };
    if (tool_read_options(argc, argv, options, &scenario)) return usage("unknown or incomplete argument");
    if (!module || !token_label || !pin || !key_label || !scenario) return usage("--module, --token, --pin, --key and a scenario are required");
    if (thread_count < 1 || thread_count > MAX_THREADS || seconds < 1 || children < 1 || rounds < 1 || child_timeout < 1)
        return usage("--threads is 1..64; --seconds, --children, --rounds, --child-timeout at least 1");
    if (strcmp(locking, "callbacks") && strcmp(locking, "os") && strcmp(locking, "both") && strcmp(locking, "none"))
        return usage("--locking is callbacks, os, both or none");
    srand((unsigned)getpid());
    // The whole run is bounded too: a hang in the parent is a failure (SIGALRM kills it).
    alarm((unsigned)(120 + seconds + children * 2 + rounds * 5 + 10 * child_timeout));

    const char *problem;
    if (!(p11 = tool_load_module(module, NULL, &problem))) return tool_fail("%s: %s", module, problem);
    const char *step;
    CK_RV rv = set_up(&step);
    if (rv != CKR_OK) return tool_fail("%s: %s", step, tool_rv_name(rv));

    int result;
    if (!strcmp(scenario, "threads")) result = scenario_threads();
    else if (!strcmp(scenario, "fork-churn")) result = scenario_fork_churn();
    else if (!strcmp(scenario, "fork-busy")) result = scenario_fork_busy();
    else if (!strcmp(scenario, "finalize-race")) result = scenario_finalize_race();
    else if (!strcmp(scenario, "initialize-race")) result = scenario_initialize_race();
    else if (!strcmp(scenario, "callbacks-fork")) result = scenario_callbacks_fork();
    else return usage("unknown scenario");
    if (result == 0) {
        p11->C_Finalize(NULL);
        say_callbacks("end");
    }
    return result;
}
