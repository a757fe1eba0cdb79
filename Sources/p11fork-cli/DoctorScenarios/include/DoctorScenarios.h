// The helper side of `p11fork doctor`: one fork scenario against one module (the vendor's module
// directly, or libp11fork.so), run in a process of its own that the doctor starts, watches and
// kills if it hangs. In C, so that nothing of the tool's own runtime runs in a forked child.
#ifndef DOCTOR_SCENARIOS_H
#define DOCTOR_SCENARIOS_H

#include <stddef.h>

enum { DOCTOR_KEY_ANY = 0, DOCTOR_KEY_PRIVATE = 1, DOCTOR_KEY_SECRET = 2 };

/// Which module, token and key to use, and how long a child may take.
typedef struct {
    const char *module;           // path of the module to load
    const char *token_label;      // NULL: the only initialised token
    const char *token_serial;     // NULL: any serial number
    const char *key_label;        // NULL: any label
    const unsigned char *key_id;  // NULL: any CKA_ID
    size_t key_id_length;
    int key_class;                // DOCTOR_KEY_ANY, DOCTOR_KEY_PRIVATE or DOCTOR_KEY_SECRET
    int child_timeout;            // seconds before a child counts as hung
    int workers;                  // children of the worker-pool scenario (1...16)
    const char *worker_user;      // the user the children of worker-switches-user become (NULL: nobody)
} doctor_options;

/// Reads the PIN from `pin_fd` (to its end), runs `scenario` ("probe" or a fork scenario) and
/// writes "name: value" lines to standard output, the last one "result: ok|fail|n/a|error …".
/// Returns the process's exit status: 0 ok, 1 fail, 3 not applicable, 4 error before any fork.
int doctor_run(const doctor_options *options, const char *scenario, int pin_fd);

#endif
