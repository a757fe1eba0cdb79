// p11fork-setuid-probe: a program that loads a PKCS#11 module the way a setuid program (a PAM
// module in su, a helper run by a daemon) does: the module's path and the C_Initialize pReserved
// string are the program's own choices, read from `probe.conf` beside the executable (root's file,
// in root's folder), never from its arguments or environment, which whoever runs it chooses.
// The tests copy it, make it setuid root and run it as nobody with hostile P11FORK_* variables.
//
//   p11fork-setuid-probe [--fork-worker UID]
//
// probe.conf:  library=/path/libp11fork.so
//              reserved=p11fork: config=/path/root.conf      (optional)
//              token=LABEL
// It initialises the module, finds the token and prints "token: LABEL". With --fork-worker, a
// forked child then switches to UID (as a server's worker does), calls the module with what it
// inherited, and exits with a status its parent checks (alarm() bounds it).
// Last line: "result: ok" (exit 0) or "result: fail ..." (exit 1); usage errors exit 2.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <grp.h>
#include <limits.h>
#include <p11-kit-1/p11-kit/pkcs11.h>
#include "tool_support.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static char library[PATH_MAX], reserved[1024], token[64];

// Reads probe.conf from the executable's own folder.
static int read_settings(void) {
    char path[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", path, sizeof path - 16);
    if (n <= 0) return 0;
    path[n] = 0;
    char *slash = strrchr(path, '/');
    if (!slash) return 0;
    strcpy(slash + 1, "probe.conf");
    FILE *file = fopen(path, "r");
    if (!file) return 0;
    char line[1200];
    while (fgets(line, sizeof line, file)) {
        line[strcspn(line, "\n")] = 0;
        if (!strncmp(line, "library=", 8)) snprintf(library, sizeof library, "%s", line + 8);
        if (!strncmp(line, "reserved=", 9)) snprintf(reserved, sizeof reserved, "%s", line + 9);
        if (!strncmp(line, "token=", 6)) snprintf(token, sizeof token, "%s", line + 6);
    }
    fclose(file);
    return library[0] && token[0];
}

// The worker: switches user, then lists the token with the handles it inherited.
static int worker(CK_FUNCTION_LIST_PTR p11, uid_t uid) {
    alarm(20);
    if (setgroups(0, NULL) != 0 || setgid(uid) != 0 || setuid(uid) != 0) return 3;
    CK_SLOT_ID slot;
    CK_RV rv = tool_find_slot(p11, token, &slot);
    tool_say("worker (uid %d): token lookup %s", (int)getuid(), tool_rv_name(rv));
    return rv == CKR_OK ? 0 : 1;
}

struct worker_context {
    CK_FUNCTION_LIST_PTR p11;
    uid_t uid;
};
static int run_worker(void *context) {
    struct worker_context *worker_context = context;
    return worker(worker_context->p11, worker_context->uid);
}

int main(int argc, char **argv) {
    long worker_uid = -1;
    if (argc == 3 && !strcmp(argv[1], "--fork-worker")) worker_uid = strtol(argv[2], NULL, 10);
    else if (argc != 1) { fprintf(stderr, "usage: p11fork-setuid-probe [--fork-worker UID]\n"); return 2; }
    if (!read_settings()) { fprintf(stderr, "p11fork-setuid-probe: no usable probe.conf beside the program\n"); return 2; }
    tool_say("uid=%d euid=%d", (int)getuid(), (int)geteuid());

    const char *problem;
    CK_FUNCTION_LIST_PTR p11 = tool_load_module(library, NULL, &problem);
    if (!p11) return tool_fail("%s: %s", library, problem);
    CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK, .pReserved = reserved[0] ? reserved : NULL };
    CK_RV rv = p11->C_Initialize(&args);
    tool_say("C_Initialize: %s", tool_rv_name(rv));
    if (rv != CKR_OK) return tool_fail("C_Initialize %s", tool_rv_name(rv));
    CK_SLOT_ID slot;
    rv = tool_find_slot(p11, token, &slot);
    if (rv != CKR_OK) return tool_fail("token %s: %s", token, tool_rv_name(rv));
    tool_say("token: %s", token);

    if (worker_uid >= 0) {
        struct worker_context context = { p11, (uid_t)worker_uid };
        int status = tool_run_child(0, run_worker, &context);
        if (status < 0) return tool_fail("fork failed");
        if (status != 0)
            return tool_fail("worker %s %d", status > TOOL_KILLED ? "killed by signal" : "exit status",
                             status > TOOL_KILLED ? status - TOOL_KILLED : status);
        tool_say("worker: ok");
    }
    rv = p11->C_Finalize(NULL);
    if (rv != CKR_OK) return tool_fail("C_Finalize %s", tool_rv_name(rv));
    tool_say("result: ok");
    return 0;
}
