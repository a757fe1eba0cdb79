// p11fork-forkcheck: runs one fork scenario against a PKCS#11 module and says what happened.
//
// The same scenario is run against the real module directly (to show its failure) and through
// libp11fork.so (to show it fixed). Written in C so that nothing in the driver's own runtime
// can blur what a forked child sees. Every child arms alarm() and _exit()s with a status; the
// parent checks every status, so a hang is a failure, never a stuck run.
//
//   p11fork-forkcheck --module PATH --token LABEL --pin PIN --key LABEL [--mechanism rsa|rsa-pkcs|ec|hmac]
//                     [--children N] [--signatures M] [--stagger MS] [--raw-fork] [--twins]
//                     [--run-before-fork CMD] [--in-flight N] [--verify-signature] [--named-slot ID]
//                     [--helper-mechanisms] [--ignore-mechanism-flags F] [--worker-user NAME] SCENARIO
//
// Scenarios: inherited, generations, child-initializes, child-teardown, threads, child-threads,
// pin-changed, storm, same-view, orphans, broker-dies, chain, handle-values, reuse (the last five described where they are written). same-view: each child first opens a session of its own on
// --named-slot ID (default: the token's slot; never listed in the child), logs in, signs with it,
// then compares C_GetInfo, both slot lists, every slot's CK_SLOT_INFO and CK_TOKEN_INFO (but for
// session counts, free memory and the clock) and the token's mechanism list and infos with the parent's
// (with --helper-mechanisms: the parent's less those p11-kit's RPC cannot carry, in its order;
// with --ignore-mechanism-flags F, infos are compared without the flag bits F). --raw-fork forks with the system call (no atfork handlers run); --twins picks the
// last of several keys with the same label and checks children's signatures equal the parent's.
// --verify-signature (storm, over a PKCS#11 3.2 module): the parent has a signature-first
// verification (C_VerifySignatureInit + Update, on a session of its own) in progress when it
// forks; every child finishes it (the signature must verify), every grandchild verifies its own
// signature with C_VerifySignatureInit + C_VerifySignature, and the parent finishes its own at the end.
// Last line: "result: ok ..." (exit 0) or "result: fail ..." (exit 1); usage errors exit 2.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <CPKCS11.h>
#include "tool_support.h"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHILD_TIMEOUT 20
#define MAX_SIGNATURE 1024

static CK_FUNCTION_LIST_PTR p11;
static const char *token_label, *pin, *key_label, *mechanism_name = "rsa", *run_before_fork;
static int children = 1, signatures = 1, stagger_ms = 0, raw_fork = 0, twins = 0;
// With --twins the parent's own signature, which a child's must equal (RSA PKCS#1 v1.5 is
// deterministic): the public key cannot tell two look-alike keys apart, equality can.
static unsigned char parent_signature[1024];
static CK_ULONG parent_signature_length;

static CK_SLOT_ID slot;
static CK_SESSION_HANDLE session;
// --verify-signature: the module's 3.2 list, and the session with the verification in progress.
static int verify_signature;
static CK_FUNCTION_LIST_3_2_PTR p32;
static CK_SESSION_HANDLE verifying_session;
static CK_OBJECT_HANDLE private_key, verify_key;

// MARK: PKCS#11 steps

static CK_MECHANISM mechanism(void) {
    CK_MECHANISM m = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    // Raw ECDSA over a 32-byte value: SoftHSM 2.6 has no CKM_ECDSA_SHA256.
    if (!strcmp(mechanism_name, "ec")) m.mechanism = CKM_ECDSA;
    if (!strcmp(mechanism_name, "hmac")) m.mechanism = CKM_SHA256_HMAC;
    // Plain PKCS#1 v1.5 over the 32 bytes, for modules without hash-and-sign (openCryptoki 3.8).
    if (!strcmp(mechanism_name, "rsa-pkcs")) m.mechanism = CKM_RSA_PKCS;
    return m;
}

// The first object of a class with a label; with --twins the last of several look-alikes.
static CK_RV find_object(CK_SESSION_HANDLE s, CK_OBJECT_CLASS class, const char *label, CK_OBJECT_HANDLE *out) {
    CK_OBJECT_HANDLE found[8];
    CK_ULONG count;
    CK_RV rv = tool_find_objects(p11, s, class, label, found, 8, &count);
    if (rv == CKR_OK) *out = found[twins ? count - 1 : 0];
    if (rv == CKR_OK && twins && count < 2) rv = CKR_OBJECT_HANDLE_INVALID;
    return rv;
}

// Opens a session, logs in, finds the signing key and the key that verifies its signatures.
static CK_RV set_up(CK_SLOT_ID *s_slot, CK_SESSION_HANDLE *s, CK_OBJECT_HANDLE *key, CK_OBJECT_HANDLE *verifier,
                    const char **step) {
    CK_RV rv;
    *step = "C_GetSlotList/C_GetTokenInfo";
    if ((rv = tool_find_slot(p11, token_label, s_slot)) != CKR_OK) return rv;
    *step = "C_OpenSession";
    if ((rv = p11->C_OpenSession(*s_slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, s)) != CKR_OK) return rv;
    *step = "C_Login";
    rv = p11->C_Login(*s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) return rv;
    int secret = !strcmp(mechanism_name, "hmac");
    *step = "C_FindObjects (signing key)";
    if ((rv = find_object(*s, secret ? CKO_SECRET_KEY : CKO_PRIVATE_KEY, key_label, key)) != CKR_OK) return rv;
    *step = "C_FindObjects (verifying key)";
    if (secret) { *verifier = *key; return CKR_OK; }
    return find_object(*s, CKO_PUBLIC_KEY, key_label, verifier);
}

// 32 bytes: also usable as the "digest" that raw ECDSA signs.
static const unsigned char message[] = "p11fork fork check: 32 bytes....";

static CK_RV sign_with(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, unsigned char *signature, CK_ULONG *length) {
    CK_MECHANISM m = mechanism();
    CK_RV rv = p11->C_SignInit(s, &m, key);
    if (rv != CKR_OK) return rv;
    *length = MAX_SIGNATURE;
    return p11->C_Sign(s, (CK_BYTE_PTR)message, sizeof message - 1, signature, length);
}

static CK_RV verify(const unsigned char *signature, CK_ULONG length) {
    if (twins) {
        int same = length == parent_signature_length && !memcmp(signature, parent_signature, length);
        return same ? CKR_OK : CKR_SIGNATURE_INVALID;
    }
    CK_MECHANISM m = mechanism();
    CK_RV rv = p11->C_VerifyInit(session, &m, verify_key);
    if (rv != CKR_OK) return rv;
    return p11->C_Verify(session, (CK_BYTE_PTR)message, sizeof message - 1, (CK_BYTE_PTR)signature, length);
}

// Verification inside a child, on one of its own (inherited) sessions.
static CK_RV verify_in_child(CK_SESSION_HANDLE s, const unsigned char *signature, CK_ULONG length) {
    if (twins) return verify(signature, length);
    CK_MECHANISM m = mechanism();
    CK_RV rv = p11->C_VerifyInit(s, &m, verify_key);
    if (rv != CKR_OK) return rv;
    return p11->C_Verify(s, (CK_BYTE_PTR)message, sizeof message - 1, (CK_BYTE_PTR)signature, length);
}

// MARK: children

typedef int (*child_body)(int pipe_fd, int index);

// --worker-user NAME: a child switches to that user (its groups, then its gid, then its uid)
// before its first call, as server workers do right after the fork.
static const char *worker_user;
static void become_worker_user(void) {
    struct passwd *user = getpwnam(worker_user);
    if (!user || setgroups(0, NULL) != 0 || setgid(user->pw_gid) != 0 || setuid(user->pw_uid) != 0) {
        tool_say("child %d: cannot switch to user %s: %s", (int)getpid(), worker_user, strerror(errno));
        _exit(3);
    }
}

// --raw-fork: the fork system call itself, which runs no pthread_atfork handlers.
static pid_t make_child(void) {
    pid_t pid = raw_fork ? (pid_t)syscall(SYS_fork) : fork();
    if (pid == 0 && worker_user) become_worker_user();
    return pid;
}

// Sends a signature (or a failed return code) to the parent: [rv][length][bytes].
static void send_signature(int fd, CK_RV rv, const unsigned char *signature, CK_ULONG length) {
    (void)!write(fd, &rv, sizeof rv);
    (void)!write(fd, &length, sizeof length);
    if (rv == CKR_OK) (void)!write(fd, signature, length);
}

static int child_signs(int fd, int index, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key) {
    int status = 0;
    for (int i = 0; i < signatures; i++) {
        unsigned char signature[MAX_SIGNATURE];
        CK_ULONG length = 0;
        CK_RV rv = sign_with(s, key, signature, &length);
        send_signature(fd, rv, signature, length);
        if (rv != CKR_OK) {
            tool_say("child %d (pid %d): signature %d: %s", index, getpid(), i + 1, tool_rv_name(rv));
            status = 3;
            break;
        }
    }
    return status;
}

static int inherited_child(int fd, int index) { return child_signs(fd, index, session, private_key); }

// Forks `count` children running `body`; checks exit statuses and verifies what they signed.
static int run_children(int count, child_body body, int *verified_out) {
    pid_t pids[64];
    int fds[64];
    for (int i = 0; i < count; i++) {
        int p[2];
        if (pipe(p) != 0) return tool_fail("pipe: %s", strerror(errno));
        pid_t pid = make_child();
        if (pid < 0) return tool_fail("fork: %s", strerror(errno));
        if (pid == 0) {
            close(p[0]);
            alarm(CHILD_TIMEOUT);
            // SoftHSM's file store races when several processes initialise and log in at the
            // same moment (seen directly, without p11fork); --stagger spaces the children's
            // first calls so that a test measures p11fork, not that race.
            if (stagger_ms) usleep((useconds_t)(i * stagger_ms * 1000));
            _exit(body(p[1], i + 1));
        }
        close(p[1]);
        pids[i] = pid;
        fds[i] = p[0];
    }
    int problems = 0, verified = 0;
    for (int i = 0; i < count; i++) {
        // Read until the child closes its end (it exits or is killed by its alarm).
        for (;;) {
            CK_RV rv;
            CK_ULONG length;
            unsigned char signature[MAX_SIGNATURE];
            if (read(fds[i], &rv, sizeof rv) != sizeof rv) break;
            if (read(fds[i], &length, sizeof length) != sizeof length) break;
            if (rv != CKR_OK) continue;
            if (length > MAX_SIGNATURE || read(fds[i], signature, length) != (ssize_t)length) break;
            CK_RV checked = verify(signature, length);
            if (checked == CKR_OK) verified++;
            else { tool_say("child %d: its signature does not verify in the parent: %s", i + 1, tool_rv_name(checked)); problems++; }
        }
        close(fds[i]);
        int status = 0;
        waitpid(pids[i], &status, 0);
        if (WIFSIGNALED(status)) {
            tool_say("child %d: killed by signal %d%s", i + 1, WTERMSIG(status), WTERMSIG(status) == SIGALRM ? " (hung)" : "");
            problems++;
        } else if (WEXITSTATUS(status) != 0) {
            tool_say("child %d: exit status %d", i + 1, WEXITSTATUS(status));
            problems++;
        }
    }
    if (verified_out) *verified_out = verified;
    return problems;
}

// The parent must be unharmed by whatever its children did.
static int parent_still_signs(const char *scenario, int child_problems, int verified) {
    unsigned char signature[MAX_SIGNATURE];
    CK_ULONG length;
    CK_RV rv = sign_with(session, private_key, signature, &length);
    if (rv == CKR_OK) rv = verify(signature, length);
    if (child_problems) return tool_fail("%s: %d child problem(s); parent after the children: %s", scenario, child_problems, tool_rv_name(rv));
    if (rv != CKR_OK) return tool_fail("%s: children fine, but the parent cannot sign after them: %s", scenario, tool_rv_name(rv));
    tool_say("result: ok %s: %d signature(s) from children verified; the parent still signs", scenario, verified);
    return 0;
}

// MARK: scenarios

static int scenario_inherited(void) {
    int verified = 0;
    int problems = run_children(children, inherited_child, &verified);
    if (!problems && verified != children * signatures) return tool_fail("inherited: %d of %d signatures verified", verified, children * signatures);
    return parent_still_signs("inherited", problems, verified);
}

// Forks a grandchild that signs with the inherited handles; waits for it.
static int grandchild_signs(int fd, int index) {
    pid_t pid = make_child();
    if (pid == 0) {
        alarm(CHILD_TIMEOUT);
        _exit(child_signs(fd, 100 + index, session, private_key));
    }
    int grandchild = 0;
    waitpid(pid, &grandchild, 0);
    if (WIFSIGNALED(grandchild)) { tool_say("grandchild: killed by signal %d", WTERMSIG(grandchild)); return 4; }
    return WEXITSTATUS(grandchild);
}

// A child signs, then forks a grandchild that signs too (three generations).
static int generations_child(int fd, int index) {
    int status = child_signs(fd, index, session, private_key);
    return status ? status : grandchild_signs(fd, index);
}

// A child forks before any call of its own, like a daemon that detaches and then forks its
// workers (nginx); only the grandchild signs.
static int daemon_child(int fd, int index) { return grandchild_signs(fd, index); }

static int scenario_daemon(void) {
    int verified = 0;
    int problems = run_children(children, daemon_child, &verified);
    if (!problems && verified != children * signatures) return tool_fail("daemon: %d signatures verified", verified);
    return parent_still_signs("daemon", problems, verified);
}

static int scenario_generations(void) {
    int verified = 0;
    int problems = run_children(children, generations_child, &verified);
    if (!problems && verified != 2 * children * signatures) return tool_fail("generations: %d signatures verified", verified);
    return parent_still_signs("generations", problems, verified);
}

// handle-values: a process opens a session of its own before it touches an inherited one (a
// child's fresh module copy issues the values its parent's module issued), then signs with the
// parent's session and key, finds the key on its own session and signs with that too. Its own
// handles must not take the value of any inherited one it still holds.
static CK_SESSION_HANDLE child_session = CK_INVALID_HANDLE;
static CK_OBJECT_HANDLE child_key = CK_INVALID_HANDLE;

static int own_session_signs(int fd, int index, const char *who, CK_SESSION_HANDLE *opened, CK_OBJECT_HANDLE *found) {
    CK_SESSION_HANDLE s;
    CK_RV rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s);
    if (rv != CKR_OK) { tool_say("%s %d: C_OpenSession: %s", who, index, tool_rv_name(rv)); send_signature(fd, rv, NULL, 0); return 3; }
    // The inherited session first: its recovery replays the login, which the new session shares.
    int status = child_signs(fd, index, session, private_key);
    if (status) return status;
    CK_OBJECT_HANDLE key;
    rv = find_object(s, !strcmp(mechanism_name, "hmac") ? CKO_SECRET_KEY : CKO_PRIVATE_KEY, key_label, &key);
    if (rv != CKR_OK) { tool_say("%s %d: finding the key on its own session: %s", who, index, tool_rv_name(rv)); send_signature(fd, rv, NULL, 0); return 3; }
    tool_say("%s %d: handles: parent's session 0x%lx, key 0x%lx; child's session 0x%lx; own session 0x%lx, key found on it 0x%lx",
             who, index, session, private_key, child_session, s, key);
    if (s == session || (child_session != CK_INVALID_HANDLE && s == child_session)) {
        tool_say("%s %d: its own session has the value of an inherited one", who, index);
        return 5;
    }
    *opened = s;
    *found = key;
    return child_signs(fd, index, s, key);
}

static int handle_values_child(int fd, int index) {
    int status = own_session_signs(fd, index, "child", &child_session, &child_key);
    if (status) return status;
    pid_t pid = make_child();
    if (pid == 0) {
        alarm(CHILD_TIMEOUT);
        CK_SESSION_HANDLE own;
        CK_OBJECT_HANDLE key;
        status = own_session_signs(fd, 100 + index, "grandchild", &own, &key);
        // The child's own session and key, inherited in turn.
        if (!status) status = child_signs(fd, 100 + index, child_session, child_key);
        _exit(status);
    }
    int grandchild = 0;
    waitpid(pid, &grandchild, 0);
    if (WIFSIGNALED(grandchild)) { tool_say("grandchild: killed by signal %d", WTERMSIG(grandchild)); return 4; }
    if (WEXITSTATUS(grandchild)) return WEXITSTATUS(grandchild);
    // The child's handles still work after its grandchild used them.
    return child_signs(fd, index, child_session, child_key);
}

static int scenario_handle_values(void) {
    int verified = 0;
    tool_say("parent: handles: session 0x%lx, key 0x%lx", session, private_key);
    int problems = run_children(children, handle_values_child, &verified);
    if (!problems && verified != 6 * children * signatures) return tool_fail("handle-values: %d signatures verified", verified);
    return parent_still_signs("handle-values", problems, verified);
}

// reuse: no fork. Opens two sessions, closes the first, opens another, and prints the values and
// what the module answers for the closed one; through p11fork they must be the module's own.
static int scenario_reuse(void) {
    CK_SESSION_HANDLE a, b, c;
    CK_RV rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &a);
    if (rv == CKR_OK) rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &b);
    if (rv == CKR_OK) rv = p11->C_CloseSession(a);
    if (rv == CKR_OK) rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &c);
    if (rv != CKR_OK) return tool_fail("reuse: opening and closing sessions: %s", tool_rv_name(rv));
    CK_OBJECT_HANDLE key;
    rv = find_object(c, !strcmp(mechanism_name, "hmac") ? CKO_SECRET_KEY : CKO_PRIVATE_KEY, key_label, &key);
    if (rv != CKR_OK) return tool_fail("reuse: finding the key: %s", tool_rv_name(rv));
    p11->C_CloseSession(b);
    CK_SESSION_INFO info;
    CK_RV closed = p11->C_GetSessionInfo(b, &info);
    tool_say("reuse: session 0x%lx, then 0x%lx and 0x%lx, after closing 0x%lx: 0x%lx; key found 0x%lx; the closed one answers %s",
             session, a, b, a, c, key, tool_rv_name(closed));
    tool_say("result: ok reuse");
    return 0;
}

// The old rule: the child calls C_Initialize, opens its own session, logs in, finds the key.
static int initializing_child(int fd, int index) {
    CK_C_INITIALIZE_ARGS init = { .flags = CKF_OS_LOCKING_OK };
    CK_RV rv = p11->C_Initialize(&init);
    if (rv != CKR_OK) { tool_say("child %d: C_Initialize: %s", index, tool_rv_name(rv)); send_signature(fd, rv, NULL, 0); return 3; }
    CK_SLOT_ID s_slot;
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE key, verifier;
    const char *step;
    if ((rv = set_up(&s_slot, &s, &key, &verifier, &step)) != CKR_OK) {
        tool_say("child %d: %s: %s", index, step, tool_rv_name(rv));
        send_signature(fd, rv, NULL, 0);
        return 3;
    }
    return child_signs(fd, index, s, key);
}

static int scenario_child_initializes(void) {
    int verified = 0;
    int problems = run_children(children, initializing_child, &verified);
    return parent_still_signs("child-initializes", problems, verified);
}

// The child tears down everything it inherited; the parent must not notice.
static int teardown_child(int fd, int index) {
    (void)fd;
    CK_RV logout = p11->C_Logout(session);
    CK_RV close = p11->C_CloseSession(session);
    CK_RV close_all = p11->C_CloseAllSessions(slot);
    CK_RV finalize = p11->C_Finalize(NULL);
    tool_say("child %d: C_Logout %s, C_CloseSession %s, C_CloseAllSessions %s, C_Finalize %s", index, tool_rv_name(logout),
        tool_rv_name(close), tool_rv_name(close_all), tool_rv_name(finalize));
    return 0;
}

static int scenario_child_teardown(void) {
    int problems = run_children(children, teardown_child, NULL);
    return parent_still_signs("child-teardown", problems, 0);
}

// Two threads sign continuously, each on its own session, and a third opens and closes sessions,
// while the parent forks children.
static volatile int stop_signing;
static int thread_failures;

// Opens and closes sessions and finds the key in a loop: the calls that take p11fork's own locks
// (issuing and releasing handles, recording objects), so that forks happen while they are held.
static void *session_churn_thread(void *unused) {
    (void)unused;
    while (!stop_signing) {
        CK_SESSION_HANDLE s;
        CK_OBJECT_HANDLE key;
        if (p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s) != CKR_OK) { __sync_fetch_and_add(&thread_failures, 1); continue; }
        if (find_object(s, !strcmp(mechanism_name, "hmac") ? CKO_SECRET_KEY : CKO_PRIVATE_KEY, key_label, &key) != CKR_OK)
            __sync_fetch_and_add(&thread_failures, 1);
        p11->C_CloseSession(s);
    }
    return NULL;
}

// Signatures the parent's signing threads made (the storm reports them).
static long parent_signatures;

static void *signing_thread(void *unused) {
    (void)unused;
    CK_SESSION_HANDLE s;
    if (p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s) != CKR_OK) { __sync_fetch_and_add(&thread_failures, 1); return NULL; }
    while (!stop_signing) {
        unsigned char signature[MAX_SIGNATURE];
        CK_ULONG length;
        if (sign_with(s, private_key, signature, &length) != CKR_OK) __sync_fetch_and_add(&thread_failures, 1);
        else __sync_fetch_and_add(&parent_signatures, 1);
    }
    p11->C_CloseSession(s);
    return NULL;
}

static int scenario_threads(void) {
    pthread_t threads[3];
    pthread_create(&threads[0], NULL, signing_thread, NULL);
    pthread_create(&threads[1], NULL, signing_thread, NULL);
    pthread_create(&threads[2], NULL, session_churn_thread, NULL);
    usleep(20000);
    int problems = 0, verified = 0;
    for (int round = 0; round < children; round++) {
        int v = 0;
        problems += run_children(1, inherited_child, &v);
        verified += v;
    }
    stop_signing = 1;
    for (int i = 0; i < 3; i++) pthread_join(threads[i], NULL);
    if (thread_failures) return tool_fail("threads: %d signature(s) failed in the parent's signing threads", thread_failures);
    return parent_still_signs("threads", problems, verified);
}

// The PIN changes after the parent's login: the child's replay fails once, clearly, and the
// child's next call does not try the PIN again.
static int pin_changed_child(int fd, int index) {
    unsigned char signature[MAX_SIGNATURE];
    CK_ULONG length;
    CK_RV first = sign_with(session, private_key, signature, &length);
    CK_RV second = sign_with(session, private_key, signature, &length);
    tool_say("child %d: first signature %s, second %s", index, tool_rv_name(first), tool_rv_name(second));
    (void)fd;
    if (first == CKR_OK || second == CKR_OK) return 5;
    return first == CKR_PIN_INCORRECT ? 0 : 6;
}

static int scenario_pin_changed(void) {
    int problems = run_children(1, pin_changed_child, NULL);
    if (problems) return tool_fail("pin-changed: the child did not get CKR_PIN_INCORRECT then a refusal");
    tool_say("result: ok pin-changed: the child got CKR_PIN_INCORRECT and no second attempt");
    return 0;
}

// Several threads of one child call at once, each on its own inherited session: the child's
// recovery must happen exactly once and serve them all.
#define CHILD_THREADS 4
static CK_SESSION_HANDLE thread_sessions[CHILD_THREADS];
static CK_RV thread_results[CHILD_THREADS];

static void *child_thread(void *arg) {
    int i = (int)(long)arg;
    unsigned char signature[MAX_SIGNATURE];
    CK_ULONG length;
    thread_results[i] = sign_with(thread_sessions[i], private_key, signature, &length);
    if (thread_results[i] == CKR_OK) thread_results[i] = verify_in_child(thread_sessions[i], signature, length);
    return NULL;
}

static int threaded_child(int fd, int index) {
    (void)fd;
    pthread_t threads[CHILD_THREADS];
    for (long i = 0; i < CHILD_THREADS; i++) pthread_create(&threads[i], NULL, child_thread, (void *)i);
    int status = 0;
    for (int i = 0; i < CHILD_THREADS; i++) {
        pthread_join(threads[i], NULL);
        if (thread_results[i] != CKR_OK) { tool_say("child %d thread %d: %s", index, i, tool_rv_name(thread_results[i])); status = 3; }
    }
    return status;
}

static int scenario_child_threads(void) {
    for (int i = 0; i < CHILD_THREADS; i++) {
        CK_RV rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &thread_sessions[i]);
        if (rv != CKR_OK) return tool_fail("child-threads: parent C_OpenSession: %s", tool_rv_name(rv));
    }
    int problems = run_children(children, threaded_child, NULL);
    return parent_still_signs("child-threads", problems, 0);
}

// A fork storm: two threads sign without pause while the parent forks `children` children, a
// few at a time; every tenth child forks a grandchild of its own. Every child and grandchild
// signs once with the inherited session and key under alarm(). Counted: children (and
// grandchildren) that signed, that failed, that hung (their alarm fired), that crashed; the
// parent's signatures made and failed meanwhile.
// MARK: same-view

// What an application sees of the module, taken in the parent before the fork and in a child.
#define VIEW_SLOTS 16
#define VIEW_MECHANISMS 512
struct view {
    CK_RV info_rv, list_rv, present_rv, mechanisms_rv;
    CK_INFO info;
    CK_ULONG count, present_count, mechanism_count;
    CK_SLOT_ID slots[VIEW_SLOTS], present[VIEW_SLOTS];
    CK_RV slot_rv[VIEW_SLOTS], token_rv[VIEW_SLOTS];
    CK_SLOT_INFO slot_info[VIEW_SLOTS];
    CK_TOKEN_INFO token_info[VIEW_SLOTS];
    CK_MECHANISM_TYPE mechanisms[VIEW_MECHANISMS];
    CK_RV mechanism_rv[VIEW_MECHANISMS];
    CK_MECHANISM_INFO mechanism_info[VIEW_MECHANISMS];
};
static struct view parent_view;
static CK_SLOT_ID named_slot;
static int named_slot_given, helper_mechanisms;
// --ignore-mechanism-flags F: mechanism flag bits a layer between (p11-kit's RPC) adds.
static CK_FLAGS ignored_mechanism_flags;

// True if `part` is `whole` in the same order with some left out (and, unless `whole` is empty, not empty).
static int is_ordered_part(const CK_MECHANISM_TYPE *part, CK_ULONG part_count, const CK_MECHANISM_TYPE *whole, CK_ULONG whole_count) {
    CK_ULONG j = 0;
    for (CK_ULONG i = 0; i < part_count; i++) {
        while (j < whole_count && whole[j] != part[i]) j++;
        if (j++ == whole_count) return 0;
    }
    return part_count > 0 || whole_count == 0;
}

static void take_view(struct view *v) {
    memset(v, 0, sizeof *v);
    v->info_rv = p11->C_GetInfo(&v->info);
    v->count = VIEW_SLOTS;
    v->list_rv = p11->C_GetSlotList(CK_FALSE, v->slots, &v->count);
    v->present_count = VIEW_SLOTS;
    v->present_rv = p11->C_GetSlotList(CK_TRUE, v->present, &v->present_count);
    for (CK_ULONG i = 0; v->list_rv == CKR_OK && i < v->count; i++) {
        v->slot_rv[i] = p11->C_GetSlotInfo(v->slots[i], &v->slot_info[i]);
        v->token_rv[i] = p11->C_GetTokenInfo(v->slots[i], &v->token_info[i]);
        // What changes with use, not with who asks: sessions open, free memory, the clock.
        CK_TOKEN_INFO *t = &v->token_info[i];
        t->ulSessionCount = t->ulRwSessionCount = t->ulFreePublicMemory = t->ulFreePrivateMemory = 0;
        memset(t->utcTime, 0, sizeof t->utcTime);
    }
    v->mechanism_count = VIEW_MECHANISMS;
    v->mechanisms_rv = p11->C_GetMechanismList(slot, v->mechanisms, &v->mechanism_count);
    for (CK_ULONG i = 0; v->mechanisms_rv == CKR_OK && i < v->mechanism_count && i < VIEW_MECHANISMS; i++)
        v->mechanism_rv[i] = p11->C_GetMechanismInfo(slot, v->mechanisms[i], &v->mechanism_info[i]);
}

static int same_view_child(int fd, int index) {
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE key;
    CK_RV rv = p11->C_OpenSession(named_slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s);
    if (rv == CKR_OK) {
        rv = p11->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
        if (rv == CKR_USER_ALREADY_LOGGED_IN) rv = CKR_OK;
    }
    if (rv == CKR_OK) rv = find_object(s, !strcmp(mechanism_name, "hmac") ? CKO_SECRET_KEY : CKO_PRIVATE_KEY, key_label, &key);
    if (rv != CKR_OK) {
        tool_say("child %d: session on slot 0x%lx: %s", index, named_slot, tool_rv_name(rv));
        send_signature(fd, rv, NULL, 0);
        return 3;
    }
    int status = child_signs(fd, index, s, key);
    struct view v;
    take_view(&v);
    const struct view *w = &parent_view;
    if (v.info_rv != w->info_rv || memcmp(&v.info, &w->info, sizeof v.info)) {
        tool_say("child %d: C_GetInfo %s '%.32s' '%.32s' %d.%d; the parent's %s '%.32s' '%.32s' %d.%d", index, tool_rv_name(v.info_rv),
                 v.info.manufacturerID, v.info.libraryDescription, v.info.libraryVersion.major, v.info.libraryVersion.minor,
                 tool_rv_name(w->info_rv), w->info.manufacturerID, w->info.libraryDescription, w->info.libraryVersion.major,
                 w->info.libraryVersion.minor);
        status = 5;
    }
    if (v.list_rv != w->list_rv || v.count != w->count || memcmp(v.slots, w->slots, v.count * sizeof v.slots[0]) ||
        v.present_rv != w->present_rv || v.present_count != w->present_count ||
        memcmp(v.present, w->present, v.present_count * sizeof v.present[0])) {
        tool_say("child %d: slot list (%lu, first 0x%lx; present %lu) differs from the parent's (%lu, first 0x%lx; present %lu)", index,
                 v.count, v.slots[0], v.present_count, w->count, w->slots[0], w->present_count);
        status = 5;
    }
    for (CK_ULONG i = 0; i < v.count && i < w->count; i++) {
        if (v.slot_rv[i] != w->slot_rv[i] || memcmp(&v.slot_info[i], &w->slot_info[i], sizeof v.slot_info[i])) {
            tool_say("child %d: CK_SLOT_INFO of slot 0x%lx differs: '%.64s' / the parent's '%.64s'", index, v.slots[i],
                     v.slot_info[i].slotDescription, w->slot_info[i].slotDescription);
            status = 5;
        }
        if (v.token_rv[i] != w->token_rv[i] || memcmp(&v.token_info[i], &w->token_info[i], sizeof v.token_info[i])) {
            tool_say("child %d: CK_TOKEN_INFO of slot 0x%lx differs (%s, '%.32s' flags 0x%lx / the parent's %s, '%.32s' flags 0x%lx)", index,
                     v.slots[i], tool_rv_name(v.token_rv[i]), v.token_info[i].label, v.token_info[i].flags, tool_rv_name(w->token_rv[i]),
                     w->token_info[i].label, w->token_info[i].flags);
            status = 5;
        }
    }
    int same_mechanisms = helper_mechanisms ? is_ordered_part(v.mechanisms, v.mechanism_count, w->mechanisms, w->mechanism_count)
        : v.mechanism_count == w->mechanism_count && !memcmp(v.mechanisms, w->mechanisms, v.mechanism_count * sizeof v.mechanisms[0]);
    if (v.mechanisms_rv != w->mechanisms_rv || !same_mechanisms) {
        tool_say("child %d: mechanism list of slot 0x%lx: %s, %lu mechanisms; the parent's %s, %lu", index, slot,
                 tool_rv_name(v.mechanisms_rv), v.mechanism_count, tool_rv_name(w->mechanisms_rv), w->mechanism_count);
        status = 5;
    }
    for (CK_ULONG i = 0; same_mechanisms && i < v.mechanism_count; i++) {
        CK_ULONG j = 0;
        while (j < w->mechanism_count && w->mechanisms[j] != v.mechanisms[i]) j++;
        CK_MECHANISM_INFO mine = v.mechanism_info[i], theirs = j < w->mechanism_count ? w->mechanism_info[j] : mine;
        mine.flags &= ~ignored_mechanism_flags;
        theirs.flags &= ~ignored_mechanism_flags;
        if (j == w->mechanism_count || v.mechanism_rv[i] != w->mechanism_rv[j] || memcmp(&mine, &theirs, sizeof mine)) {
            const CK_MECHANISM_INFO *m = &v.mechanism_info[i], *n = j < w->mechanism_count ? &w->mechanism_info[j] : m;
            tool_say("child %d: CK_MECHANISM_INFO of mechanism 0x%lx: %s, keys %lu..%lu, flags 0x%lx; the parent's %lu..%lu, 0x%lx", index,
                     v.mechanisms[i], tool_rv_name(v.mechanism_rv[i]), m->ulMinKeySize, m->ulMaxKeySize, m->flags, n->ulMinKeySize,
                     n->ulMaxKeySize, n->flags);
            status = 5;
        }
    }
    if (status == 0) tool_say("child %d: C_GetInfo, %lu slots, their infos and %lu mechanisms (of %lu) with theirs are the parent's", index, v.count,
                              v.mechanism_count, w->mechanism_count);
    return status;
}

// chain: a chain of --children generations (child, grandchild, ...): each signs with the
// inherited session and key, verifies its signature, then forks the next and passes on its status.
static int chain_level(int level) {
    unsigned char signature[MAX_SIGNATURE];
    CK_ULONG length = 0;
    CK_RV rv = sign_with(session, private_key, signature, &length);
    if (rv == CKR_OK) rv = verify_in_child(session, signature, length);
    if (rv != CKR_OK) { tool_say("generation %d (pid %d): %s", level, (int)getpid(), tool_rv_name(rv)); return 3; }
    if (level == children) { tool_say("generation %d (pid %d): signed and verified, the last of the chain", level, (int)getpid()); return 0; }
    pid_t pid = make_child();
    if (pid < 0) return 4;
    if (pid == 0) {
        alarm(CHILD_TIMEOUT * 3);
        _exit(chain_level(level + 1));
    }
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFSIGNALED(status)) { tool_say("generation %d: killed by signal %d", level + 1, WTERMSIG(status)); return 5; }
    return WEXITSTATUS(status);
}

static int scenario_chain(void) {
    pid_t pid = make_child();
    if (pid < 0) return tool_fail("fork: %s", strerror(errno));
    if (pid == 0) {
        alarm(CHILD_TIMEOUT * 3);
        _exit(chain_level(1));
    }
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFSIGNALED(status) || WEXITSTATUS(status) != 0) return tool_fail("chain: a generation failed (status 0x%x)", status);
    return parent_still_signs("chain", 0, children);
}

// orphans: the parent forks the children and is then killed with SIGKILL. Each child waits
// until its parent is gone, signs, verifies its own signature and says so: the caller reads the
// children's lines (they keep its standard output open until they end).
static int scenario_orphans(void) {
    pid_t parent = getpid();
    for (int i = 0; i < children; i++) {
        pid_t pid = make_child();
        if (pid < 0) return tool_fail("fork: %s", strerror(errno));
        if (pid > 0) continue;
        alarm(CHILD_TIMEOUT);
        for (int waited = 0; getppid() == parent && waited < 100; waited++) usleep(100000);
        if (getppid() == parent) { tool_say("orphan %d: its parent is still alive", i + 1); _exit(1); }
        unsigned char signature[MAX_SIGNATURE];
        CK_ULONG length = 0;
        CK_RV rv = sign_with(session, private_key, signature, &length);
        if (rv == CKR_OK) rv = verify_in_child(session, signature, length);
        tool_say("orphan %d (pid %d): signed and verified after its parent was killed: %s", i + 1, (int)getpid(), tool_rv_name(rv));
        _exit(rv == CKR_OK ? 0 : 3);
    }
    kill(getpid(), SIGKILL);
    return 1;
}

// The broker serving this run: a live process named p11fork-broker whose environment (the one
// p11fork was loaded with) holds this run's FORKCHECK_RUN mark; 0 when there is none.
static pid_t broker_of_this_run(void) {
    const char *mark = getenv("FORKCHECK_RUN");
    DIR *proc = opendir("/proc");
    if (!proc || !mark) return 0;
    char wanted[64];
    snprintf(wanted, sizeof wanted, "FORKCHECK_RUN=%s", mark);
    pid_t found = 0;
    for (struct dirent *entry; !found && (entry = readdir(proc));) {
        pid_t pid = (pid_t)atoi(entry->d_name);
        if (pid <= 0) continue;
        char path[64], stat[256] = "", environment[65536];
        snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
        FILE *file = fopen(path, "r");
        if (!file) continue;
        if (!fgets(stat, sizeof stat, file)) stat[0] = 0;
        fclose(file);
        // "PID (p11fork-broker) STATE ...": a zombie has ended.
        if (!strstr(stat, "(p11fork-broker) ") || strstr(stat, ") Z ")) continue;
        snprintf(path, sizeof path, "/proc/%d/environ", (int)pid);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        ssize_t size = read(fd, environment, sizeof environment - 1);
        close(fd);
        for (ssize_t at = 0; size > 0 && at < size; at += (ssize_t)strlen(environment + at) + 1) {
            environment[size] = 0;
            if (!strcmp(environment + at, wanted)) { found = pid; break; }
        }
    }
    closedir(proc);
    return found;
}

// Says how many Unix sockets the broker holds and how many of them listen, that is, accept a
// connection from a process that did not inherit it: /proc/PID/fd against /proc/net/unix, whose
// Flags column has __SO_ACCEPTCON (0x10000) for a listening socket. (A connected socket may show
// an address, the path its listener had or an abstract name the kernel gave it; neither accepts.)
static void report_broker_sockets(pid_t broker) {
    char path[64], link[64];
    unsigned long inodes[256];
    int count = 0, listening = 0;
    snprintf(path, sizeof path, "/proc/%d/fd", (int)broker);
    DIR *fds = opendir(path);
    for (struct dirent *entry; fds && count < 256 && (entry = readdir(fds));) {
        char fd_path[128];
        snprintf(fd_path, sizeof fd_path, "%s/%s", path, entry->d_name);
        ssize_t size = readlink(fd_path, link, sizeof link - 1);
        if (size <= 0) continue;
        link[size] = 0;
        if (sscanf(link, "socket:[%lu]", &inodes[count]) == 1) count++;
    }
    if (fds) closedir(fds);
    FILE *table = fopen("/proc/net/unix", "r");
    char line[512];
    while (table && fgets(line, sizeof line, table)) {
        // Num RefCount Protocol Flags Type St Inode Path
        unsigned long flags = 0, inode = 0;
        if (sscanf(line, "%*s %*s %*s %lx %*s %*s %lu", &flags, &inode) < 2) continue;
        for (int i = 0; i < count; i++) if (inodes[i] == inode && (flags & 0x10000)) listening++;
    }
    if (table) fclose(table);
    tool_say("broker sockets: %d, listening: %d", count, listening);
}

// broker-dies (children served by the broker): a child signs, kills the broker its module talks
// to, and signs again: that call must answer an error (the child's alarm catches a hang).
static int broker_dies_child(int fd, int index) {
    int status = child_signs(fd, index, session, private_key);
    if (status) return status;
    pid_t broker = broker_of_this_run();
    if (!broker) { tool_say("child %d: no broker serves this child", index); return 4; }
    report_broker_sockets(broker);
    kill(broker, SIGKILL);
    usleep(200000);
    for (int attempt = 1; attempt <= 2; attempt++) {
        unsigned char signature[MAX_SIGNATURE];
        CK_ULONG length = 0;
        CK_RV rv = sign_with(session, private_key, signature, &length);
        tool_say("child %d: signature %d after the broker (pid %d) was killed: %s", index, attempt, (int)broker, tool_rv_name(rv));
        if (rv == CKR_OK) return 5;
    }
    return 0;
}

static int scenario_broker_dies(void) {
    int verified = 0;
    int problems = run_children(1, broker_dies_child, &verified);
    return parent_still_signs("broker-dies", problems, verified);
}

// lane-abuse (children served by the broker): a child signs (its lane is made), then writes
// requests of its own making into its lane, as a compromised worker could: child 1 a signing
// mechanism whose parameter would be a pointer in the broker, child 2 a byte string longer than
// the request. The broker must refuse each without calling the module (it closes that lane), stay
// up, and the child must go on signing over p11-kit's RPC.
#include "../../../Sources/CPKCS11/lane.h"

static P11ForkLane *own_lane(void) {
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[512];
    P11ForkLane *found = NULL;
    while (maps && !found && fgets(line, sizeof line, maps)) {
        unsigned long start;
        if (strstr(line, "/memfd:p11fork-lane") && sscanf(line, "%lx-", &start) == 1) found = (P11ForkLane *)start;
    }
    if (maps) fclose(maps);
    return found;
}

static int lane_abuse_child(int fd, int index) {
    int status = child_signs(fd, index, session, private_key);
    if (status) return status;
    P11ForkLane *lane = own_lane();
    if (!lane) { tool_say("child %d: no lane in this child", index); return 4; }
    CK_ULONG request[16] = { 0 };
    size_t words;
    if (index == 1) {
        // C_SignInit with CKM_RSA_PKCS_OAEP and a 40-byte parameter: pointers, in the broker.
        CK_ULONG fake[5] = { 0x4141414141414141UL, 0x4242424242424242UL, 1, 0x4343434343434343UL, 64 };
        request[0] = 2; request[1] = session; request[2] = CKM_RSA_PKCS_OAEP; request[3] = private_key; request[4] = sizeof fake;
        memcpy(&request[5], fake, sizeof fake);
        words = 10;
    } else {
        // C_SignUpdate whose data claims 1 MiB in a request of a few words.
        request[0] = 5; request[1] = session; request[2] = 1UL << 20;
        words = 3;
    }
    memcpy(p11fork_lane_data(lane), request, words * sizeof(CK_ULONG));
    uint32_t call = atomic_load(&lane->request) + 1;
    atomic_store(&lane->length, (uint32_t)(words * sizeof(CK_ULONG)));
    p11fork_lane_post(&lane->request, call, &lane->broker_sleeps);
    for (int i = 0; i < 400 && !atomic_load(&lane->closed); i++) usleep(5000);
    tool_say("child %d: the lane after a request of its own making: %s", index, atomic_load(&lane->closed) ? "closed" : "open");
    if (!atomic_load(&lane->closed)) return 5;
    pid_t broker = broker_of_this_run();
    tool_say("child %d: broker %s", index, broker && kill(broker, 0) == 0 ? "still running" : "gone");
    if (!broker) return 6;
    return child_signs(fd, index, session, private_key);
}

static int scenario_lane_abuse(void) {
    int verified = 0;
    int problems = run_children(2, lane_abuse_child, &verified);
    return parent_still_signs("lane-abuse", problems, verified);
}

static int scenario_same_view(void) {
    take_view(&parent_view);
    if (parent_view.info_rv != CKR_OK || parent_view.list_rv != CKR_OK || parent_view.count == 0 || parent_view.mechanisms_rv != CKR_OK)
        return tool_fail("same-view: the parent's view: C_GetInfo %s, C_GetSlotList %s, C_GetMechanismList %s",
                         tool_rv_name(parent_view.info_rv), tool_rv_name(parent_view.list_rv), tool_rv_name(parent_view.mechanisms_rv));
    if (!named_slot_given) named_slot = slot;
    int verified = 0;
    int problems = run_children(children, same_view_child, &verified);
    if (!problems && verified != children * signatures) return tool_fail("same-view: %d signatures verified", verified);
    return parent_still_signs("same-view", problems, verified);
}

// --in-flight N: children alive at once (default 1). SoftHSM's file store writes the token file
// on every login, and a process reading it at that moment may lose the token or the PIN: with 3
// at once, about 2 children in 1,000 hit that (SoftHSM's race, not p11fork's).
static int storm_in_flight = 1;

// The half of `message` fed to the parent's signature-first verification before the fork.
#define VERIFY_SIGNATURE_FED 16

// A signature-first verification (3.2) of `signature` over `message`, in one call.
static CK_RV verify_signature_once(CK_SESSION_HANDLE s, const unsigned char *signature, CK_ULONG length) {
    CK_MECHANISM m = mechanism();
    CK_RV rv = p32->C_VerifySignatureInit(s, &m, verify_key, (CK_BYTE_PTR)signature, length);
    return rv == CKR_OK ? p32->C_VerifySignature(s, (CK_BYTE_PTR)message, sizeof message - 1) : rv;
}

// The rest of `message` fed to the verification in progress on verifying_session, then its end.
static CK_RV verify_signature_finish(void) {
    CK_RV rv = p32->C_VerifySignatureUpdate(verifying_session, (CK_BYTE_PTR)message + VERIFY_SIGNATURE_FED,
                                            sizeof message - 1 - VERIFY_SIGNATURE_FED);
    return rv == CKR_OK ? p32->C_VerifySignatureFinal(verifying_session) : rv;
}

static int storm_child(int index) {
    alarm(CHILD_TIMEOUT);
    unsigned char signature[MAX_SIGNATURE];
    CK_ULONG length;
    CK_RV rv = sign_with(session, private_key, signature, &length);
    if (rv == CKR_OK) rv = verify_in_child(session, signature, length);
    if (rv == CKR_OK && verify_signature) rv = verify_signature_finish();
    if (rv != CKR_OK) { tool_say("storm child %d (pid %d): %s", index, getpid(), tool_rv_name(rv)); return 3; }
    if (index % 10 == 0) {
        pid_t grandchild = make_child();
        if (grandchild == 0) {
            alarm(CHILD_TIMEOUT);
            CK_RV g = sign_with(session, private_key, signature, &length);
            if (g == CKR_OK) g = verify_signature ? verify_signature_once(session, signature, length)
                                                  : verify_in_child(session, signature, length);
            if (g != CKR_OK) tool_say("storm grandchild of %d: %s", index, tool_rv_name(g));
            _exit(g == CKR_OK ? 0 : 3);
        }
        int status = 0;
        if (grandchild < 0 || waitpid(grandchild, &status, 0) < 0) return 7;
        if (WIFSIGNALED(status)) return WTERMSIG(status) == SIGALRM ? 8 : 9;  // the grandchild hung / crashed
        if (WEXITSTATUS(status) != 0) return 10;
    }
    return 0;
}

static int scenario_storm(void) {
    pthread_t threads[2];
    for (int i = 0; i < 2; i++) pthread_create(&threads[i], NULL, signing_thread, NULL);
    usleep(20000);
    int ok = 0, failed = 0, hung = 0, crashed = 0, grandchildren_bad = 0, in_flight = 0;
    for (int i = 0; i < children || in_flight > 0; ) {
        if (i < children && in_flight < storm_in_flight) {
            pid_t pid = make_child();
            if (pid == 0) _exit(storm_child(i));
            if (pid < 0) { failed++; i++; continue; }
            in_flight++;
            i++;
            continue;
        }
        int status = 0;
        if (wait(&status) < 0) break;
        in_flight--;
        if (WIFSIGNALED(status)) { if (WTERMSIG(status) == SIGALRM) hung++; else crashed++; }
        else if (WEXITSTATUS(status) == 0) ok++;
        else if (WEXITSTATUS(status) >= 8) { ok++; grandchildren_bad++; }
        else failed++;
    }
    stop_signing = 1;
    for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
    tool_say("storm: %d children (%d at a time): %d signed and verified, %d failed, %d hung, %d crashed; %d grandchild problem(s); "
        "the parent's threads made %ld signatures, %d failed",
        children, storm_in_flight, ok, failed, hung, crashed, grandchildren_bad, parent_signatures, thread_failures);
    if (failed || hung || crashed || grandchildren_bad || thread_failures || ok != children)
        return tool_fail("storm: not every child signed, or the parent was harmed");
    if (verify_signature) {
        CK_RV rv = verify_signature_finish();
        if (rv != CKR_OK) return tool_fail("storm: the parent's own C_VerifySignature operation: %s", tool_rv_name(rv));
        tool_say("storm: every child finished the parent's C_VerifySignatureInit + Update (signature verified); so did the parent");
    }
    return parent_still_signs("storm", 0, ok);
}

// MARK: main

static int usage(const char *problem) {
    fprintf(stderr, "p11fork-forkcheck: %s\nusage: p11fork-forkcheck --module PATH --token LABEL --pin PIN --key LABEL "
                    "[--mechanism rsa|rsa-pkcs|ec|hmac] [--children N] [--signatures M] [--stagger MS] [--raw-fork] [--twins] [--run-before-fork CMD] [--in-flight N] [--verify-signature] SCENARIO\n"
                    "scenarios: inherited generations daemon child-initializes child-teardown threads child-threads pin-changed storm same-view orphans broker-dies lane-abuse chain\n", problem);
    return 2;
}

int main(int argc, char **argv) {
    const char *module = NULL, *scenario = NULL;
    const char *ignored_flags = NULL, *named_slot_text = NULL;
    const struct tool_option options[] = {
        { "--module", &module }, { "--token", &token_label }, { "--pin", &pin }, { "--key", &key_label },
        { "--mechanism", &mechanism_name }, { "--children", .number = &children }, { "--signatures", .number = &signatures },
        { "--run-before-fork", &run_before_fork }, { "--stagger", .number = &stagger_ms }, { "--raw-fork", .flag = &raw_fork },
        { "--twins", .flag = &twins }, { "--in-flight", .number = &storm_in_flight }, { "--worker-user", &worker_user },
        { "--verify-signature", .flag = &verify_signature }, { "--helper-mechanisms", .flag = &helper_mechanisms },
        { "--ignore-mechanism-flags", &ignored_flags }, { "--named-slot", &named_slot_text }, { NULL },
    };
    if (tool_read_options(argc, argv, options, &scenario)) return usage("unknown or incomplete argument");
    if (ignored_flags) ignored_mechanism_flags = strtoul(ignored_flags, NULL, 0);
    if (named_slot_text) {
        named_slot = strtoul(named_slot_text, NULL, 0);
        named_slot_given = 1;
    }
    if (!module || !token_label || !pin || !key_label || !scenario) return usage("missing argument");
    if (children < 1 || (children > 64 && strcmp(scenario, "storm") && strcmp(scenario, "threads") && strcmp(scenario, "chain")) || children > 100000 || signatures < 1)
        return usage("--children is 1..64 (storm and threads: up to 100000), --signatures at least 1");
    if (storm_in_flight < 1 || storm_in_flight > 64) return usage("--in-flight is 1..64");
    if (strcmp(mechanism_name, "rsa") && strcmp(mechanism_name, "rsa-pkcs") && strcmp(mechanism_name, "ec") &&
        strcmp(mechanism_name, "hmac")) return usage("bad --mechanism");

    // A mark the broker inherits with the environment p11fork is loaded with (broker-dies finds it so).
    char run_mark[32];
    snprintf(run_mark, sizeof run_mark, "%d", (int)getpid());
    setenv("FORKCHECK_RUN", run_mark, 1);
    void *library;
    const char *problem;
    if (!(p11 = tool_load_module(module, &library, &problem))) return tool_fail("%s: %s", module, problem);

    // Many threads may call at once (the threads scenario): the module must lock.
    CK_C_INITIALIZE_ARGS init = { .flags = CKF_OS_LOCKING_OK };
    CK_RV rv = p11->C_Initialize(&init);
    if (rv != CKR_OK) return tool_fail("parent C_Initialize: %s", tool_rv_name(rv));
    const char *step;
    if ((rv = set_up(&slot, &session, &private_key, &verify_key, &step)) != CKR_OK) return tool_fail("parent %s: %s", step, tool_rv_name(rv));
    unsigned char signature[MAX_SIGNATURE];
    CK_ULONG length;
    if ((rv = sign_with(session, private_key, signature, &length)) != CKR_OK) return tool_fail("parent C_Sign: %s", tool_rv_name(rv));
    memcpy(parent_signature, signature, length);
    parent_signature_length = length;
    if ((rv = verify(signature, length)) != CKR_OK) return tool_fail("parent's own signature does not verify: %s", tool_rv_name(rv));
    if (run_before_fork && system(run_before_fork) != 0) return tool_fail("--run-before-fork command failed");
    if (verify_signature) {
        CK_C_GetInterface get = (CK_C_GetInterface)dlsym(library, "C_GetInterface");
        CK_INTERFACE_PTR chosen = NULL;
        if (!get || get((CK_UTF8CHAR_PTR)"PKCS 11", &(CK_VERSION){ 3, 2 }, &chosen, 0) != CKR_OK || !chosen)
            return tool_fail("--verify-signature: %s offers no 'PKCS 11' 3.2 interface", module);
        p32 = chosen->pFunctionList;
        CK_MECHANISM m = mechanism();
        if ((rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &verifying_session)) != CKR_OK ||
            (rv = p32->C_VerifySignatureInit(verifying_session, &m, verify_key, signature, length)) != CKR_OK ||
            (rv = p32->C_VerifySignatureUpdate(verifying_session, (CK_BYTE_PTR)message, VERIFY_SIGNATURE_FED)) != CKR_OK)
            return tool_fail("parent's C_VerifySignatureInit + Update: %s", tool_rv_name(rv));
    }

    int result;
    if (!strcmp(scenario, "inherited")) result = scenario_inherited();
    else if (!strcmp(scenario, "generations")) result = scenario_generations();
    else if (!strcmp(scenario, "daemon")) result = scenario_daemon();
    else if (!strcmp(scenario, "child-initializes")) result = scenario_child_initializes();
    else if (!strcmp(scenario, "child-teardown")) result = scenario_child_teardown();
    else if (!strcmp(scenario, "threads")) result = scenario_threads();
    else if (!strcmp(scenario, "storm")) result = scenario_storm();
    else if (!strcmp(scenario, "pin-changed")) result = scenario_pin_changed();
    else if (!strcmp(scenario, "child-threads")) result = scenario_child_threads();
    else if (!strcmp(scenario, "same-view")) result = scenario_same_view();
    else if (!strcmp(scenario, "orphans")) result = scenario_orphans();
    else if (!strcmp(scenario, "chain")) result = scenario_chain();
    else if (!strcmp(scenario, "handle-values")) result = scenario_handle_values();
    else if (!strcmp(scenario, "reuse")) result = scenario_reuse();
    else if (!strcmp(scenario, "broker-dies")) result = scenario_broker_dies();
    else if (!strcmp(scenario, "lane-abuse")) result = scenario_lane_abuse();
    else return usage("unknown scenario");
    p11->C_Finalize(NULL);
    return result;
}
