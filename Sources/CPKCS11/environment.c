#include <stddef.h>

extern char **environ;
static char *no_variables[1];

// Runs before every other constructor of the library, the Swift runtime's included (which reads
// `environ` at start-up, as p11fork does at load). pkcs11-provider opens its module with
// RTLD_DEEPBIND, which makes the module's `environ` libc's own variable rather than the
// program's; in a program that uses `environ` itself (haproxy: a copy relocation), libc's own is
// never set and stays NULL, and loading p11fork crashed (so it did after clearenv()). NULL
// becomes the environment the loader hands to constructors, or an empty one.
__attribute__((constructor(101))) static void CPKCS11_environment_present(int argc, char **argv, char **envp) {
    (void)argc;
    (void)argv;
    if (environ == NULL) environ = envp ? envp : no_variables;
}
