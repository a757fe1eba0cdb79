// p11fork-faults: a real module that fails — in a parent, or in a forked child — and what the
// application's calls get. Run against libp11fork-test-faulty.so (which answers the faults its
// control file names) directly, or through libp11fork.so with the faulty module behind it.
//
//   p11fork-faults --module PATH --token LABEL --pin PIN --key LABEL --control FILE
//                  [--fault LINE] [--child-fault LINE] [--expect RV,RV,RV,RV] [--in-parent | --hang SECONDS]
//                  [--scan-child] [--pause MS]
//
// The parent initialises, logs in, finds the key (an RSA key pair), signs, then writes --fault to
// the control file and forks. The child makes four calls with what it inherited, each printed with
// its return code: 1 sign on the parent's session; (the child then writes --child-fault); 2 sign
// again; 3 open a new session and sign there; 4 sign on the parent's session. It exits 0 when the
// codes equal --expect (hex), 10 + N when call N answered otherwise (a signature that differs from
// the parent's counts as 0x80000001). The parent checks the status, clears the control file and
// signs twice more, checking each signature against its first one and with C_Verify.
// --in-parent: the four calls are made by the parent itself, with no fork.
// --hang S: the child's first call is expected not to return; a second thread of the child calls
// too, 0.3 s later. After S seconds the parent reads the child's CPU time (/proc/PID/stat), prints
// it, kills the child and carries on.
// --pause MS: the caller waits MS milliseconds before each call after the first (a failed
// recovery's next try is then due: p11fork waits 50 ms after the first failure, then twice as long
// after each further one, so 300 covers the first four tries).
// --scan-child: after its calls the child waits while the parent counts the copies of the PIN in
// the child's memory (/proc/PID/mem); the driver itself keeps the PIN only masked (its argument
// is wiped at start, the plain copy given to C_Login wiped right after), so a copy found is the
// module's or p11fork's.
// Last line: "result: ok" (exit 0) or "result: fail ..." (exit 1); usage errors exit 2.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <p11-kit-1/p11-kit/pkcs11.h>
#include "tool_support.h"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHILD_TIMEOUT 30
#define CALLS 4
#define DIFFERENT_SIGNATURE 0x80000001UL

static CK_FUNCTION_LIST_PTR p11;
static const char *token_label, *key_label, *control_path, *fault, *child_fault, *expect;
static int pause_ms;
static CK_SLOT_ID slot;
static CK_SESSION_HANDLE session;
static CK_OBJECT_HANDLE private_key, public_key;
static unsigned char expected[512];
static CK_ULONG expected_length;
static const unsigned char data[] = "p11fork fault scenario: the data to sign";
static unsigned char masked_pin[256];
static size_t pin_length;
#define PIN_MASK 0x5a

// The PIN in plain text for one use: the caller wipes it.
static void unmask_pin(unsigned char *out) {
    for (size_t i = 0; i < pin_length; i++) out[i] = masked_pin[i] ^ PIN_MASK;
}

static CK_RV login(void) {
    unsigned char plain[256];
    unmask_pin(plain);
    CK_RV rv = p11->C_Login(session, CKU_USER, plain, pin_length);
    explicit_bzero(plain, sizeof plain);
    return rv;
}

// How many times the PIN is in the memory of process `pid` (every readable mapping).
static int pin_copies(pid_t pid) {
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *maps = fopen(path, "r");
    snprintf(path, sizeof path, "/proc/%d/mem", pid);
    int mem = open(path, O_RDONLY);
    if (!maps || mem < 0) return -1;
    unsigned char plain[256], *chunk = malloc((1 << 20) + sizeof plain);
    unmask_pin(plain);
    int found = 0;
    while (fgets(line, sizeof line, maps)) {
        unsigned long start, end;
        char permissions[8];
        if (sscanf(line, "%lx-%lx %7s", &start, &end, permissions) != 3 || permissions[0] != 'r' || strstr(line, "[vvar]")
            || strstr(line, "[vsyscall]"))
            continue;
        // Chunks of 1 MiB that overlap by the PIN's length less one, so no copy is cut in two.
        for (unsigned long at = start; at < end; at += 1 << 20) {
            size_t want = end - at < (1 << 20) + pin_length - 1 ? end - at : (1 << 20) + pin_length - 1;
            ssize_t got = pread(mem, chunk, want, (off_t)at);
            for (ssize_t i = 0; got > 0 && i + (ssize_t)pin_length <= got; i++)
                if (memcmp(chunk + i, plain, pin_length) == 0 && i < (1 << 20)) found++;
        }
    }
    explicit_bzero(plain, sizeof plain);
    free(chunk);
    fclose(maps);
    close(mem);
    return found;
}

// One line of output (stdout is line-buffered: a child's lines are out before its _exit).
#define say(...) (printf(__VA_ARGS__), printf("\n"))

static int fail(const char *what, CK_RV rv) {
    say("result: fail %s -> 0x%lx", what, rv);
    return 1;
}

// Replaces the control file in one step (a new inode: the faulty module sees the change).
static int write_control(const char *line) {
    char temporary[4096];
    snprintf(temporary, sizeof temporary, "%s.%d", control_path, getpid());
    FILE *file = fopen(temporary, "w");
    if (!file) return -1;
    if (line) fprintf(file, "%s\n", line);
    fclose(file);
    return rename(temporary, control_path);
}

static CK_RV find_key(CK_SESSION_HANDLE s, CK_OBJECT_CLASS class, CK_OBJECT_HANDLE *out) {
    CK_ULONG n;
    return tool_find_objects(p11, s, class, key_label, out, 1, &n);
}

// RSA PKCS#1 v1.5 is deterministic: every signature of `data` equals the parent's first.
static CK_RV sign(CK_SESSION_HANDLE s, unsigned char *out, CK_ULONG *length) {
    CK_MECHANISM mechanism = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    CK_RV rv = p11->C_SignInit(s, &mechanism, private_key);
    if (rv == CKR_OK) rv = p11->C_Sign(s, (CK_BYTE_PTR)data, sizeof data, out, length);
    return rv;
}

static CK_RV sign_as_before(CK_SESSION_HANDLE s) {
    unsigned char signature[512];
    CK_ULONG length = sizeof signature;
    CK_RV rv = sign(s, signature, &length);
    if (rv != CKR_OK) return rv;
    return length == expected_length && memcmp(signature, expected, length) == 0 ? CKR_OK : DIFFERENT_SIGNATURE;
}

// The four calls; returns 0 when each answered what --expect says, else 10 + the first that did not.
static int calls(const char *who) {
    static const char *what[CALLS] = { "sign on the parent's session", "sign again", "sign on a new session",
                                       "sign on the parent's session" };
    CK_RV wanted[CALLS] = { 0 };
    const char *cursor = expect ? expect : "";
    for (int i = 0; i < CALLS && *cursor; i++) {
        char *end;
        wanted[i] = strtoul(cursor, &end, 16);
        cursor = *end == ',' ? end + 1 : end;
    }
    int status = 0;
    for (int i = 0; i < CALLS; i++) {
        CK_RV rv;
        if (i > 0 && pause_ms) usleep((useconds_t)pause_ms * 1000);
        if (i == 2) {
            CK_SESSION_HANDLE fresh;
            rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &fresh);
            if (rv == CKR_OK) rv = sign_as_before(fresh);
        } else {
            rv = sign_as_before(session);
        }
        say("%s: call %d (%s) -> 0x%lx", who, i + 1, what[i], rv);
        if (rv != wanted[i] && status == 0) status = 10 + i + 1;
        if (i == 0 && child_fault && write_control(child_fault) != 0) say("%s: cannot write %s", who, control_path);
    }
    return status;
}

static void *second_caller(void *unused) {
    (void)unused;
    usleep(300000);
    say("child: second thread calls");
    CK_RV rv = sign_as_before(session);
    say("child: second thread -> 0x%lx", rv);
    return NULL;
}

// Clock ticks of CPU (user + system) a process has used.
static long cpu_ticks(pid_t pid) {
    char path[64], text[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *file = fopen(path, "r");
    if (!file) return -1;
    size_t n = fread(text, 1, sizeof text - 1, file);
    fclose(file);
    text[n] = 0;
    char *after = strrchr(text, ')');
    unsigned long user = 0, system = 0;
    // Fields after the name: state is 3rd; utime and stime are the 14th and 15th.
    if (!after || sscanf(after + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &user, &system) != 2) return -1;
    return (long)(user + system);
}

static int hang(int seconds) {
    pid_t pid = fork();
    if (pid < 0) return fail("fork", (CK_RV)errno);
    if (pid == 0) {
        alarm(CHILD_TIMEOUT);
        pthread_t thread;
        pthread_create(&thread, NULL, second_caller, NULL);
        say("child: first call");
        CK_RV rv = sign_as_before(session);
        say("child: first call returned 0x%lx", rv);
        pthread_join(thread, NULL);
        _exit(3);
    }
    sleep((unsigned)seconds);
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) != 0) return fail("the child did not hang: status", (CK_RV)status);
    long ticks = cpu_ticks(pid);
    say("parent: child still inside the module after %d s; it used %ld clock ticks of CPU (%ld per second)", seconds, ticks,
        sysconf(_SC_CLK_TCK));
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return 0;
}

static int child(int scan) {
    int done[2], release[2];
    if (pipe(done) != 0 || pipe(release) != 0) return fail("pipe", (CK_RV)errno);
    pid_t pid = fork();
    if (pid < 0) return fail("fork", (CK_RV)errno);
    if (pid == 0) {
        alarm(CHILD_TIMEOUT);
        int status = calls("child");
        char byte = 0;
        if (scan && (write(done[1], &byte, 1) != 1 || read(release[0], &byte, 1) != 1)) status = 3;
        _exit(status);
    }
    int status = 0;
    char byte = 0;
    if (scan && read(done[0], &byte, 1) == 1) {
        say("parent: the PIN is in the child's memory %d time(s)", pin_copies(pid));
        if (write(release[1], &byte, 1) != 1) say("parent: cannot release the child");
    }
    waitpid(pid, &status, 0);
    if (WIFSIGNALED(status)) {
        say("result: fail child killed by signal %d%s", WTERMSIG(status), WTERMSIG(status) == SIGALRM ? " (hung)" : "");
        return 1;
    }
    say("parent: child exit status %d", WEXITSTATUS(status));
    return WEXITSTATUS(status) != 0;
}

static int usage(void) {
    fprintf(stderr, "usage: p11fork-faults --module PATH --token LABEL --pin PIN --key LABEL --control FILE "
                    "[--fault LINE] [--child-fault LINE] [--expect RV,RV,RV,RV] [--in-parent | --hang SECONDS] [--scan-child] [--pause MS]\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *module = NULL;
    int in_parent = 0, hang_seconds = 0, scan = 0;
    const char *pin_argument = NULL;
    const struct tool_option options[] = {
        { "--in-parent", .flag = &in_parent }, { "--scan-child", .flag = &scan }, { "--module", &module },
        { "--token", &token_label }, { "--pin", &pin_argument }, { "--key", &key_label }, { "--control", &control_path },
        { "--fault", &fault }, { "--child-fault", &child_fault }, { "--expect", &expect },
        { "--hang", .number = &hang_seconds }, { "--pause", .number = &pause_ms }, { NULL },
    };
    if (tool_read_options(argc, argv, options, NULL)) return usage();
    // The PIN is wiped from the arguments once it is masked.
    char *pin = (char *)pin_argument;
    if (!module || !token_label || !pin || !key_label || !control_path || strlen(pin) >= sizeof masked_pin) return usage();
    pin_length = strlen(pin);
    for (size_t i = 0; i < pin_length; i++) masked_pin[i] = (unsigned char)pin[i] ^ PIN_MASK;
    explicit_bzero(pin, pin_length);
    setvbuf(stdout, NULL, _IOLBF, 0);
    alarm(CHILD_TIMEOUT * 2);
    write_control(NULL);

    const char *problem;
    if (!(p11 = tool_load_module(module, NULL, &problem))) return fail(problem, 0);
    CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
    CK_RV rv;
    if ((rv = p11->C_Initialize(&args)) != CKR_OK) return fail("C_Initialize", rv);
    if ((rv = tool_find_slot(p11, token_label, &slot)) != CKR_OK) return fail("finding the token", rv);
    if ((rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session)) != CKR_OK)
        return fail("C_OpenSession", rv);
    if ((rv = login()) != CKR_OK) return fail("C_Login", rv);
    if ((rv = find_key(session, CKO_PRIVATE_KEY, &private_key)) != CKR_OK) return fail("finding the private key", rv);
    if ((rv = find_key(session, CKO_PUBLIC_KEY, &public_key)) != CKR_OK) return fail("finding the public key", rv);
    expected_length = sizeof expected;
    if ((rv = sign(session, expected, &expected_length)) != CKR_OK) return fail("the parent's first signature", rv);
    say("parent: signed (%lu bytes)", expected_length);

    if (fault && write_control(fault) != 0) return fail("writing the control file", (CK_RV)errno);
    int failed = in_parent ? calls("parent") != 0 : hang_seconds ? hang(hang_seconds) : child(scan);

    // The parent, faults cleared, is unharmed: its signatures equal its first and verify. (A
    // fault that closed its session in this process: it opens another and logs in again.)
    write_control(NULL);
    rv = sign_as_before(session);
    if (rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED) {
        say("parent: its session was closed; it opens another");
        if ((rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session)) != CKR_OK)
            return fail("C_OpenSession afterwards", rv);
        rv = login();
        if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) return fail("C_Login afterwards", rv);
        // Closing the last session (a logout) may have taken the keys' handles with it.
        if ((rv = find_key(session, CKO_PRIVATE_KEY, &private_key)) != CKR_OK) return fail("finding the private key again", rv);
        if ((rv = find_key(session, CKO_PUBLIC_KEY, &public_key)) != CKR_OK) return fail("finding the public key again", rv);
    }
    for (int i = 0; i < 2; i++) {
        if ((rv = sign_as_before(session)) != CKR_OK) return fail("the parent's signature afterwards", rv);
        CK_MECHANISM mechanism = { CKM_SHA256_RSA_PKCS, NULL, 0 };
        if ((rv = p11->C_VerifyInit(session, &mechanism, public_key)) == CKR_OK)
            rv = p11->C_Verify(session, (CK_BYTE_PTR)data, sizeof data, expected, expected_length);
        if (rv != CKR_OK) return fail("verifying the parent's signature afterwards", rv);
    }
    say("parent: signs and verifies afterwards");
    if (failed) {
        say("result: fail the calls did not answer as expected");
        return 1;
    }
    say("result: ok");
    return 0;
}
