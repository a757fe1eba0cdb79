// What the C test drivers and the doctor's scenarios share: return-code names, one-write output
// lines, reading options, loading a module, finding a token, running a child and waiting for it.
#ifndef P11FORK_TOOL_SUPPORT_H
#define P11FORK_TOOL_SUPPORT_H
#include <p11-kit-1/p11-kit/pkcs11.h>

// The CKR_ name of a return code, or its hex value (in a per-thread buffer).
const char *tool_rv_name(CK_RV rv);
// Writes one line to stdout with a single write(2): lines of parents and children never interleave.
void tool_say(const char *format, ...) __attribute__((format(printf, 1, 2)));
// Says "result: fail REASON" and returns 1 (the drivers' exit status for a failed scenario).
int tool_fail(const char *format, ...) __attribute__((format(printf, 1, 2)));
// The slot whose token's label is `label` (blank-padded, as in CK_TOKEN_INFO).
CK_RV tool_find_slot(CK_FUNCTION_LIST_PTR p11, const char *label, CK_SLOT_ID *out);
// Up to `max` objects of `class` labelled `label`, their number in `*count`: the first failing
// code of C_FindObjectsInit/C_FindObjects/C_FindObjectsFinal, CKR_OBJECT_HANDLE_INVALID for none.
CK_RV tool_find_objects(CK_FUNCTION_LIST_PTR p11, CK_SESSION_HANDLE session, CK_OBJECT_CLASS class,
                        const char *label, CK_OBJECT_HANDLE *found, CK_ULONG max, CK_ULONG *count);

// One option of a driver, `--name VALUE` or, for a flag, `--name` alone: `text` takes the value
// as it is, `number` takes it as an int; `flag` is set to 1 by the option, which takes no value.
struct tool_option {
    const char *name;
    const char **text;
    int *number;
    int *flag;
};
// Reads argv[1...] into `options` (ended by an entry with no name); the one word that is not an
// option goes to *positional (none is allowed when positional is NULL). 0, or -1 at the first
// argument that is unknown, lacks its value or is a second positional word.
int tool_read_options(int argc, char **argv, const struct tool_option *options, const char **positional);

// dlopens the module at `path` (RTLD_NOW | RTLD_LOCAL) and asks it for its function list; the
// library's handle goes to *library when it is given (to look up C_GetInterface). NULL, with
// the reason in *problem, when the module cannot be loaded or has no usable C_GetFunctionList.
CK_FUNCTION_LIST_PTR tool_load_module(const char *path, void **library, const char **problem);

// What tool_run_child answers for a child a signal killed: TOOL_KILLED + the signal's number.
#define TOOL_KILLED 128
// Forks a child that arms alarm(seconds) (0: none), runs body(context) and _exit()s with what
// it returns; waits for it. The child's exit status, TOOL_KILLED + the signal that killed it
// (SIGALRM: it hung), or -1 when fork failed (errno says why).
int tool_run_child(unsigned seconds, int (*body)(void *), void *context);

#endif
