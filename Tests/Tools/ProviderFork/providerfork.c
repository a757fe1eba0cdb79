// p11fork-providerfork: the forking OpenSSL 3 program on pkcs11-provider
// (Sources/p11fork-cli/ProviderScenario) as a command, for the tests.
//
//   OPENSSL_CONF=<provider configuration> p11fork-providerfork URI WORKERS SIGNATURES WORKER_SECONDS [STAGGER_MS [scrub]]
//
// URI names the private key ("pkcs11:token=T;object=K;type=private"; the PIN comes from the
// configuration's pkcs11-module-token-pin, which the provider also needs in the workers). The
// exit status comes from returning from main, so OpenSSL's cleanup runs at exit: a crash there
// ends the program by a signal after its "result:" line. `scrub`: the workers get an environment
// of TZ alone, as nginx gives its workers.
#include "ProviderScenario.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// As nginx does for its workers: the program's `environ` set to a new array. Its address is
// taken PC-relative, as gcc's code for a PIE program does (haproxy's, nginx's), so the linker
// puts the variable in the program (a copy relocation), where libc then uses it; a module
// opened with RTLD_DEEPBIND sees libc's own, which the program never sets (docs/FORK.md,
// "Loaded by pkcs11-provider"). SwiftPM's -fPIC alone would go through the GOT. x86-64.
static char *scrubbed_environment[] = { "TZ=UTC", NULL };
static void scrub_environment(void) {
    char ***program_environ;
    __asm__("leaq environ(%%rip), %0" : "=r"(program_environ));
    *program_environ = scrubbed_environment;
}

int main(int argc, char **argv) {
    if (argc < 5 || argc > 7) {
        fprintf(stderr, "usage: p11fork-providerfork URI WORKERS SIGNATURES WORKER_SECONDS [STAGGER_MS [scrub]]\n");
        return 2;
    }
    provider_scenario_options options = {
        .uri = argv[1], .workers = atoi(argv[2]), .signatures = atoi(argv[3]), .seconds = atoi(argv[4]),
        .stagger_ms = argc >= 6 ? atoi(argv[5]) : 0,
        .before_fork = argc == 7 && strcmp(argv[6], "scrub") == 0 ? scrub_environment : NULL,
    };
    return provider_scenario_run(&options);
}
