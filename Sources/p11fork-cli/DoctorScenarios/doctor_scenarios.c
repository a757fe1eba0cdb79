// The fork scenarios of `p11fork doctor`. The parent (this helper) has logged in, found the key
// and signed; each scenario forks children that arm alarm() and _exit() with a status, sends
// their results back through a pipe, and the parent checks them and then that it still works
// itself. A hung child is killed by its alarm and reported as hung, never waited on forever.
#define _GNU_SOURCE
#include "doctor_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_CHILDREN 16
#define MAX_RESULTS 4
#define POOL_SIGNATURES 3

// MARK: children

/// What one child sent and how it ended.
typedef struct {
    unsigned char results[MAX_RESULTS][DOCTOR_MAX_SIGNATURE];
    CK_ULONG lengths[MAX_RESULTS];
    int result_count;
    char problem[300];  // the first failure the child reported
    char note[300];     // what the child wants said even when it succeeded
    int status;         // from waitpid
} child_report;

static child_report reports[MAX_CHILDREN];

// Records on the pipe: a tag ('R' result, 'P' problem, 'N' note), a length, the bytes.
static void send_record(int fd, char tag, const void *bytes, CK_ULONG length) {
    (void)!write(fd, &tag, 1);
    (void)!write(fd, &length, sizeof length);
    if (length) (void)!write(fd, bytes, length);
}

static void send_result(int fd, const unsigned char *bytes, CK_ULONG length) { send_record(fd, 'R', bytes, length); }

static void send_text(int fd, char tag, const char *format, ...) {
    char text[300];
    va_list args;
    va_start(args, format);
    vsnprintf(text, sizeof text, format, args);
    va_end(args);
    send_record(fd, tag, text, strlen(text));
}

static int read_exactly(int fd, void *buffer, size_t length) {
    size_t done = 0;
    while (done < length) {
        ssize_t n = read(fd, (char *)buffer + done, length - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 0;
        done += (size_t)n;
    }
    return 1;
}

static void collect(int fd, child_report *report) {
    for (;;) {
        char tag;
        CK_ULONG length;
        unsigned char bytes[DOCTOR_MAX_SIGNATURE];
        if (!read_exactly(fd, &tag, 1) || !read_exactly(fd, &length, sizeof length)) return;
        if (length > sizeof bytes || !read_exactly(fd, bytes, length)) return;
        if (tag == 'R' && report->result_count < MAX_RESULTS) {
            memcpy(report->results[report->result_count], bytes, length);
            report->lengths[report->result_count++] = length;
        } else if ((tag == 'P' && !report->problem[0]) || tag == 'N') {
            char *text = tag == 'P' ? report->problem : report->note;
            size_t n = length < sizeof report->problem - 1 ? length : sizeof report->problem - 1;
            memcpy(text, bytes, n);
            text[n] = 0;
        }
    }
}

typedef int (*child_body)(int fd, int index);

/// Children wait at this gate until all of them are forked (run_children with a stagger of -1).
static int gate[2] = { -1, -1 };

/// Forks `count` children running `body`, each after `stagger_ms` times its index (several
/// processes logging in at the same instant race in some modules' file stores, with or without
/// p11fork), and collects what each sent and how it ended. A stagger of -1 holds every child at
/// a gate until the last one is forked, then lets them all go at once.
static int run_children(int count, child_body body, int stagger_ms) {
    pid_t pids[MAX_CHILDREN];
    int fds[MAX_CHILDREN];
    memset(reports, 0, sizeof reports);
    if (stagger_ms < 0 && pipe2(gate, O_CLOEXEC) != 0) return 0;
    for (int i = 0; i < count; i++) {
        int p[2];
        // Close-on-exec: a helper process the module starts in a child must not hold the pipe open.
        if (pipe2(p, O_CLOEXEC) != 0) return 0;
        pid_t pid = fork();
        if (pid < 0) return 0;
        if (pid == 0) {
            close(p[0]);
            alarm((unsigned)doctor_opts->child_timeout);
            if (stagger_ms < 0) {
                // The gate opens when the parent closes its end: read() returns 0 in every child at once.
                char byte;
                close(gate[1]);
                while (read(gate[0], &byte, 1) < 0 && errno == EINTR) {}
                close(gate[0]);
            } else if (stagger_ms) {
                usleep((useconds_t)(i * stagger_ms * 1000));
            }
            _exit(body(p[1], i + 1));
        }
        close(p[1]);
        pids[i] = pid;
        fds[i] = p[0];
    }
    if (stagger_ms < 0) {
        close(gate[0]);
        close(gate[1]);
        gate[0] = gate[1] = -1;
    }
    for (int i = 0; i < count; i++) {
        collect(fds[i], &reports[i]);
        close(fds[i]);
        while (waitpid(pids[i], &reports[i].status, 0) < 0 && errno == EINTR) {}
    }
    return 1;
}

static int child_failed(const child_report *report) {
    return !WIFEXITED(report->status) || WEXITSTATUS(report->status) != 0;
}

// One phrase for how a child failed.
static void describe_failure(const child_report *report, int index, int count, char *out, size_t size) {
    char who[32] = "the child";
    if (count > 1) snprintf(who, sizeof who, "child %d", index);
    if (WIFSIGNALED(report->status)) {
        int signal = WTERMSIG(report->status);
        if (signal == SIGALRM) snprintf(out, size, "%s hung (no answer within %d s)", who, doctor_opts->child_timeout);
        else snprintf(out, size, "%s crashed (signal %d, %s)", who, signal, strsignal(signal));
    } else if (report->problem[0]) {
        snprintf(out, size, "%s: %s", who, report->problem);
    } else {
        snprintf(out, size, "%s exited with status %d", who, WEXITSTATUS(report->status));
    }
}

/// After the children: the parent signs again on its own session; it must be unharmed.
static int parent_still_signs(char *problem, size_t size) {
    unsigned char signature[DOCTOR_MAX_SIGNATURE];
    CK_ULONG length;
    const char *step;
    CK_RV rv = doctor_sign(doctor_session, doctor_signing_key.handle, doctor_signing_key.sign_mechanism, doctor_message, 32,
                           signature, &length, &step);
    if (rv == CKR_OK) {
        step = "its signature check";
        rv = doctor_check_signature(signature, length);
    }
    if (rv == CKR_OK) return 1;
    snprintf(problem, size, "the parent cannot sign after the child: %s answered %s", step, tool_rv_name(rv));
    return 0;
}

// Children that sent signatures: each checked in the parent.
static int check_signatures(int count, int expected_each, char *problem, size_t size, int *checked) {
    *checked = 0;
    for (int i = 0; i < count; i++) {
        if (child_failed(&reports[i])) {
            describe_failure(&reports[i], i + 1, count, problem, size);
            return 0;
        }
        if (reports[i].result_count != expected_each) {
            snprintf(problem, size, "child %d sent %d signature(s), not %d", i + 1, reports[i].result_count, expected_each);
            return 0;
        }
        for (int r = 0; r < reports[i].result_count; r++) {
            CK_RV rv = doctor_check_signature(reports[i].results[r], reports[i].lengths[r]);
            if (rv != CKR_OK) {
                snprintf(problem, size, "a signature of child %d is not the key's: %s", i + 1, tool_rv_name(rv));
                return 0;
            }
            (*checked)++;
        }
    }
    return 1;
}

static int child_signs(int fd, int count) {
    for (int i = 0; i < count; i++) {
        unsigned char signature[DOCTOR_MAX_SIGNATURE];
        CK_ULONG length;
        const char *step;
        CK_RV rv = doctor_sign(doctor_session, doctor_signing_key.handle, doctor_signing_key.sign_mechanism, doctor_message,
                               32, signature, &length, &step);
        if (rv != CKR_OK) {
            send_text(fd, 'P', "%s answered %s", step, tool_rv_name(rv));
            return 3;
        }
        send_result(fd, signature, length);
    }
    return 0;
}

// MARK: scenarios

// The parent logged in, found the key and signed; the child signs with the handles it inherited.
static int inherited_child(int fd, int index) { (void)index; return child_signs(fd, 1); }

static int scenario_inherited(void) {
    char problem[400];
    int checked;
    if (!run_children(1, inherited_child, 0)) return doctor_result(DOCTOR_ERROR, "fork pipe() or fork() failed: %s", strerror(errno));
    if (!check_signatures(1, 1, problem, sizeof problem, &checked)) return doctor_result(DOCTOR_FAIL, "%s", problem);
    if (!parent_still_signs(problem, sizeof problem)) return doctor_result(DOCTOR_FAIL, "%s", problem);
    return doctor_result(DOCTOR_OK, "the child signed with the parent's session and key (signature %s); the parent still signs",
                         doctor_check_description());
}

// The old rule (libp11, GnuTLS): the child calls C_Initialize, opens a session, logs in, finds the key.
static int reinitializing_child(int fd, int index) {
    (void)index;
    CK_C_INITIALIZE_ARGS init = { .flags = CKF_OS_LOCKING_OK };
    CK_RV rv = doctor_p11->C_Initialize(&init);
    if (rv != CKR_OK) { send_text(fd, 'P', "C_Initialize answered %s", tool_rv_name(rv)); return 3; }
    CK_SLOT_ID slot;
    char problem[400];
    if ((rv = doctor_find_token(&slot, problem, sizeof problem)) != CKR_OK) { send_text(fd, 'P', "finding the token: %s", problem); return 3; }
    CK_SESSION_HANDLE session;
    if ((rv = doctor_p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &session)) != CKR_OK) {
        send_text(fd, 'P', "C_OpenSession answered %s", tool_rv_name(rv));
        return 3;
    }
    if ((rv = doctor_login(session)) != CKR_OK) { send_text(fd, 'P', "C_Login answered %s", tool_rv_name(rv)); return 3; }
    CK_OBJECT_HANDLE key;
    if ((rv = doctor_refind_key(session, &key)) != CKR_OK) { send_text(fd, 'P', "finding the key answered %s", tool_rv_name(rv)); return 3; }
    unsigned char signature[DOCTOR_MAX_SIGNATURE];
    CK_ULONG length;
    const char *step;
    rv = doctor_sign(session, key, doctor_signing_key.sign_mechanism, doctor_message, 32, signature, &length, &step);
    if (rv != CKR_OK) { send_text(fd, 'P', "%s answered %s", step, tool_rv_name(rv)); return 3; }
    send_result(fd, signature, length);
    return 0;
}

static int scenario_child_reinitializes(void) {
    char problem[400];
    int checked;
    if (!run_children(1, reinitializing_child, 0)) return doctor_result(DOCTOR_ERROR, "fork pipe() or fork() failed: %s", strerror(errno));
    if (!check_signatures(1, 1, problem, sizeof problem, &checked)) return doctor_result(DOCTOR_FAIL, "%s", problem);
    if (!parent_still_signs(problem, sizeof problem)) return doctor_result(DOCTOR_FAIL, "%s", problem);
    return doctor_result(DOCTOR_OK, "the child initialised, logged in and signed on its own session; the parent still signs");
}

// What a library's clean-up does in a child at exit: log out, close the session, finalize.
static int finalizing_child(int fd, int index) {
    (void)index;
    CK_RV logout = doctor_p11->C_Logout(doctor_session);
    CK_RV close = doctor_p11->C_CloseSession(doctor_session);
    CK_RV finalize = doctor_p11->C_Finalize(NULL);
    send_text(fd, 'N', "the child's C_Logout, C_CloseSession and C_Finalize answered %s, %s, %s", tool_rv_name(logout),
              tool_rv_name(close), tool_rv_name(finalize));
    return 0;
}

static int scenario_child_finalizes(void) {
    char problem[400];
    if (!run_children(1, finalizing_child, 0)) return doctor_result(DOCTOR_ERROR, "fork pipe() or fork() failed: %s", strerror(errno));
    if (child_failed(&reports[0])) {
        describe_failure(&reports[0], 1, 1, problem, sizeof problem);
        return doctor_result(DOCTOR_FAIL, "%s", problem);
    }
    if (!parent_still_signs(problem, sizeof problem)) return doctor_result(DOCTOR_FAIL, "%s (%s)", problem, reports[0].note);
    return doctor_result(DOCTOR_OK, "%s; the parent still signs on its session", reports[0].note);
}

// A pool of workers forked at once, each signing a few times with the parent's handles.
static int pool_child(int fd, int index) { (void)index; return child_signs(fd, POOL_SIGNATURES); }

/// Forks the pool (`workers` children running `body`, each signing POOL_SIGNATURES times), checks
/// every signature and that the parent still signs: DOCTOR_OK, or the status of the failing
/// result it wrote. `as` follows "children" in a failure (" (as nobody)", or "").
static int run_pool(child_body body, int stagger_ms, const char *as, int *checked) {
    char problem[400];
    int workers = doctor_opts->workers;
    if (!run_children(workers, body, stagger_ms)) return doctor_result(DOCTOR_ERROR, "fork pipe() or fork() failed: %s", strerror(errno));
    int failed = 0;
    for (int i = 0; i < workers; i++) failed += child_failed(&reports[i]);
    if (!check_signatures(workers, POOL_SIGNATURES, problem, sizeof problem, checked)) {
        if (failed > 1) return doctor_result(DOCTOR_FAIL, "%d of %d children%s failed; %s", failed, workers, as, problem);
        return doctor_result(DOCTOR_FAIL, "%s%s", problem, as);
    }
    if (!parent_still_signs(problem, sizeof problem)) return doctor_result(DOCTOR_FAIL, "%s", problem);
    return DOCTOR_OK;
}

static int scenario_worker_pool(void) {
    int checked, status = run_pool(pool_child, 100, "", &checked);
    if (status != DOCTOR_OK) return status;
    return doctor_result(DOCTOR_OK, "%d children signed %d times each (%d signatures %s); the parent still signs", doctor_opts->workers,
                         POOL_SIGNATURES, checked, doctor_check_description());
}

// The same pool, all children let go at the same instant: every one recovers the module at once.
static int scenario_simultaneous_workers(void) {
    int checked, status = run_pool(pool_child, -1, "", &checked);
    if (status != DOCTOR_OK) return status;
    return doctor_result(DOCTOR_OK, "%d children, let go at the same instant, signed %d times each (%d signatures %s); the parent still signs",
                         doctor_opts->workers, POOL_SIGNATURES, checked, doctor_check_description());
}

// Workers that drop root's rights right after fork (a web server's workers, a pool's initializer):
// the user is looked up in the parent, the child switches to it before its first call.
static uid_t worker_uid;
static gid_t worker_gid;

static int switching_child(int fd, int index) {
    (void)index;
    if (setgroups(0, NULL) != 0 || setgid(worker_gid) != 0 || setuid(worker_uid) != 0) {
        send_text(fd, 'P', "switching to uid %u failed: %s", (unsigned)worker_uid, strerror(errno));
        return 3;
    }
    return child_signs(fd, POOL_SIGNATURES);
}

static int scenario_worker_switches_user(void) {
    const char *user = doctor_opts->worker_user ? doctor_opts->worker_user : "nobody";
    if (geteuid() != 0)
        return doctor_result(DOCTOR_NOT_APPLICABLE, "the children switch from root to %s: run the doctor as root to try it", user);
    struct passwd *entry = getpwnam(user);
    if (!entry) return doctor_result(DOCTOR_NOT_APPLICABLE, "there is no user named %s", user);
    if (entry->pw_uid == 0) return doctor_result(DOCTOR_NOT_APPLICABLE, "%s is root: the children would not switch user", user);
    worker_uid = entry->pw_uid;
    worker_gid = entry->pw_gid;
    char as[80];
    snprintf(as, sizeof as, " (as %s)", user);
    int checked, status = run_pool(switching_child, 100, as, &checked);
    if (status != DOCTOR_OK) return status;
    return doctor_result(DOCTOR_OK, "%d children switched to %s (uid %u) and signed %d times each (%d signatures %s); the parent still signs",
                         doctor_opts->workers, user, (unsigned)worker_uid, POOL_SIGNATURES, checked, doctor_check_description());
}

// A session key made by C_CreateObject (never a token object), used in the child.
static CK_OBJECT_HANDLE session_key;
static CK_MECHANISM_TYPE session_key_mechanism;
static unsigned char session_iv[16] = "p11fork doctor..";

static CK_RV use_session_key(CK_SESSION_HANDLE session, unsigned char *out, CK_ULONG *length, const char **step) {
    CK_MECHANISM m = { session_key_mechanism, NULL, 0 };
    if (session_key_mechanism == CKM_AES_CBC) { m.pParameter = session_iv; m.ulParameterLen = sizeof session_iv; }
    if (session_key_mechanism == CKM_SHA256_HMAC) return doctor_sign(session, session_key, CKM_SHA256_HMAC, doctor_message, 32, out, length, step);
    *step = "C_EncryptInit";
    CK_RV rv = doctor_p11->C_EncryptInit(session, &m, session_key);
    if (rv != CKR_OK) return rv;
    *step = "C_Encrypt";
    *length = DOCTOR_MAX_SIGNATURE;
    return doctor_p11->C_Encrypt(session, (CK_BYTE_PTR)doctor_message, 32, out, length);
}

static int session_key_child(int fd, int index) {
    (void)index;
    unsigned char out[DOCTOR_MAX_SIGNATURE];
    CK_ULONG length;
    const char *step;
    CK_RV rv = use_session_key(doctor_session, out, &length, &step);
    if (rv != CKR_OK) { send_text(fd, 'P', "%s with the session key answered %s", step, tool_rv_name(rv)); return 3; }
    send_result(fd, out, length);
    return 0;
}

static int scenario_session_object(void) {
    static const unsigned char value[32] = "p11fork doctor session key bytes";
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_AES;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ULONG value_length = 16;
    CK_ATTRIBUTE_TYPE use = CKA_ENCRYPT;
    if (doctor_has_mechanism(CKM_AES_CBC, CKF_ENCRYPT)) session_key_mechanism = CKM_AES_CBC;
    else if (doctor_has_mechanism(CKM_AES_ECB, CKF_ENCRYPT)) session_key_mechanism = CKM_AES_ECB;
    else if (doctor_has_mechanism(CKM_SHA256_HMAC, CKF_SIGN)) {
        session_key_mechanism = CKM_SHA256_HMAC;
        type = CKK_GENERIC_SECRET;
        value_length = 32;
        use = CKA_SIGN;
    } else {
        return doctor_result(DOCTOR_NOT_APPLICABLE, "the module offers neither AES nor HMAC-SHA256 for a session key");
    }
    static const char label[] = "p11fork doctor session key";
    CK_ATTRIBUTE template[] = {
        { CKA_CLASS, &secret, sizeof secret }, { CKA_KEY_TYPE, &type, sizeof type }, { CKA_TOKEN, &no, sizeof no },
        { CKA_VALUE, (void *)value, value_length }, { use, &yes, sizeof yes }, { CKA_LABEL, (void *)label, sizeof label - 1 },
    };
    CK_RV rv = doctor_p11->C_CreateObject(doctor_session, template, 6, &session_key);
    if (rv != CKR_OK)
        return doctor_result(DOCTOR_NOT_APPLICABLE, "the module refuses to make a session key with C_CreateObject (%s)", tool_rv_name(rv));
    unsigned char expected[DOCTOR_MAX_SIGNATURE];
    CK_ULONG expected_length;
    const char *step;
    int status;
    char problem[400];
    if ((rv = use_session_key(doctor_session, expected, &expected_length, &step)) != CKR_OK) {
        status = doctor_result(DOCTOR_NOT_APPLICABLE, "the parent cannot use the session key: %s answered %s", step, tool_rv_name(rv));
    } else if (!run_children(1, session_key_child, 0)) {
        status = doctor_result(DOCTOR_ERROR, "fork pipe() or fork() failed: %s", strerror(errno));
    } else if (child_failed(&reports[0])) {
        describe_failure(&reports[0], 1, 1, problem, sizeof problem);
        status = doctor_result(DOCTOR_FAIL, "%s", problem);
    } else if (reports[0].result_count != 1 || reports[0].lengths[0] != expected_length ||
               memcmp(reports[0].results[0], expected, expected_length) != 0) {
        status = doctor_result(DOCTOR_FAIL, "the child's %s with the session key differs from the parent's",
                               doctor_mechanism_name(session_key_mechanism));
    } else if (!parent_still_signs(problem, sizeof problem)) {
        status = doctor_result(DOCTOR_FAIL, "%s", problem);
    } else {
        status = doctor_result(DOCTOR_OK, "the child used the parent's session key (%s, made by C_CreateObject): same result as the parent's",
                               doctor_mechanism_name(session_key_mechanism));
    }
    doctor_p11->C_DestroyObject(doctor_session, session_key);
    return status;
}

// An operation begun in the parent (init and a first update) and finished in the child; the
// parent finishes its own too. A digest when the key has no multi-part signing mechanism.
static int operation_is_digest;

static CK_RV finish_operation(CK_SESSION_HANDLE session, unsigned char *out, CK_ULONG *length, const char **step) {
    *length = DOCTOR_MAX_SIGNATURE;
    CK_RV rv;
    if (operation_is_digest) {
        *step = "C_DigestUpdate";
        if ((rv = doctor_p11->C_DigestUpdate(session, (CK_BYTE_PTR)doctor_message + 32, 32)) != CKR_OK) return rv;
        *step = "C_DigestFinal";
        return doctor_p11->C_DigestFinal(session, out, length);
    }
    *step = "C_SignUpdate";
    if ((rv = doctor_p11->C_SignUpdate(session, (CK_BYTE_PTR)doctor_message + 32, 32)) != CKR_OK) return rv;
    *step = "C_SignFinal";
    return doctor_p11->C_SignFinal(session, out, length);
}

static int operation_child(int fd, int index) {
    (void)index;
    unsigned char out[DOCTOR_MAX_SIGNATURE];
    CK_ULONG length;
    const char *step;
    CK_RV rv = finish_operation(doctor_session, out, &length, &step);
    if (rv != CKR_OK) { send_text(fd, 'P', "%s answered %s", step, tool_rv_name(rv)); return 3; }
    send_result(fd, out, length);
    return 0;
}

// A result over the whole 64 bytes: equal to the one-shot reference, or verified by the public key.
static CK_RV check_whole(const unsigned char *reference, CK_ULONG reference_length, const unsigned char *result, CK_ULONG length) {
    const doctor_key *k = &doctor_signing_key;
    if (operation_is_digest || k->deterministic)
        return length == reference_length && !memcmp(result, reference, length) ? CKR_OK : CKR_SIGNATURE_INVALID;
    if (k->verifier == CK_INVALID_HANDLE) return CKR_OK;
    CK_MECHANISM m = { k->multipart_mechanism, NULL, 0 };
    CK_RV rv = doctor_p11->C_VerifyInit(doctor_session, &m, k->verifier);
    if (rv != CKR_OK) return rv;
    return doctor_p11->C_Verify(doctor_session, (CK_BYTE_PTR)doctor_message, 64, (CK_BYTE_PTR)result, length);
}

static int scenario_operation(void) {
    const doctor_key *k = &doctor_signing_key;
    operation_is_digest = k->multipart_mechanism == 0;
    CK_MECHANISM m = { operation_is_digest ? CKM_SHA256 : k->multipart_mechanism, NULL, 0 };
    const char *what = operation_is_digest ? "SHA-256 digest" : doctor_mechanism_name(k->multipart_mechanism);
    unsigned char reference[DOCTOR_MAX_SIGNATURE];
    CK_ULONG reference_length = sizeof reference;
    CK_RV rv;
    // The whole data in one call, for reference.
    if (operation_is_digest) {
        if ((rv = doctor_p11->C_DigestInit(doctor_session, &m)) == CKR_OK)
            rv = doctor_p11->C_Digest(doctor_session, (CK_BYTE_PTR)doctor_message, 64, reference, &reference_length);
        if (rv != CKR_OK)
            return doctor_result(DOCTOR_NOT_APPLICABLE, "the key has no multi-part signing mechanism and the module no SHA-256 digest (%s)",
                                 tool_rv_name(rv));
        rv = doctor_p11->C_DigestInit(doctor_session, &m);
        if (rv == CKR_OK) rv = doctor_p11->C_DigestUpdate(doctor_session, (CK_BYTE_PTR)doctor_message, 32);
    } else {
        const char *step;
        rv = doctor_sign(doctor_session, k->handle, k->multipart_mechanism, doctor_message, 64, reference, &reference_length, &step);
        if (rv != CKR_OK) return doctor_result(DOCTOR_NOT_APPLICABLE, "%s with %s answered %s in the parent", step, what, tool_rv_name(rv));
        rv = doctor_p11->C_SignInit(doctor_session, &m, k->handle);
        if (rv == CKR_OK) rv = doctor_p11->C_SignUpdate(doctor_session, (CK_BYTE_PTR)doctor_message, 32);
    }
    if (rv != CKR_OK) return doctor_result(DOCTOR_NOT_APPLICABLE, "beginning a multi-part %s in the parent answered %s", what, tool_rv_name(rv));
    if (!run_children(1, operation_child, 0)) return doctor_result(DOCTOR_ERROR, "fork pipe() or fork() failed: %s", strerror(errno));

    unsigned char mine[DOCTOR_MAX_SIGNATURE];
    CK_ULONG mine_length;
    const char *step;
    char problem[400];
    CK_RV parent = finish_operation(doctor_session, mine, &mine_length, &step);
    if (child_failed(&reports[0])) {
        describe_failure(&reports[0], 1, 1, problem, sizeof problem);
        return doctor_result(DOCTOR_FAIL, "%s (the parent had begun a %s and fed it half the data)", problem, what);
    }
    if (reports[0].result_count != 1 || check_whole(reference, reference_length, reports[0].results[0], reports[0].lengths[0]) != CKR_OK)
        return doctor_result(DOCTOR_FAIL, "the child finished the parent's %s, but its result is not that of the whole data", what);
    if (parent != CKR_OK)
        return doctor_result(DOCTOR_FAIL, "the parent cannot finish its own %s after the child: %s answered %s", what, step, tool_rv_name(parent));
    if (check_whole(reference, reference_length, mine, mine_length) != CKR_OK)
        return doctor_result(DOCTOR_FAIL, "the parent's own %s is wrong after the child finished its copy", what);
    return doctor_result(DOCTOR_OK, "the child finished the %s the parent had begun (init and a first update in the parent); so did the parent", what);
}

int doctor_run_fork_scenario(const char *scenario) {
    static const struct { const char *name; int (*run)(void); } scenarios[] = {
        { "inherited-session", scenario_inherited },
        { "child-reinitializes", scenario_child_reinitializes },
        { "child-finalizes", scenario_child_finalizes },
        { "worker-pool", scenario_worker_pool },
        { "simultaneous-workers", scenario_simultaneous_workers },
        { "worker-switches-user", scenario_worker_switches_user },
        { "session-object", scenario_session_object },
        { "operation-in-progress", scenario_operation },
    };
    for (size_t i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++)
        if (!strcmp(scenarios[i].name, scenario)) return scenarios[i].run();
    return doctor_result(DOCTOR_ERROR, "usage unknown scenario '%s'", scenario);
}
