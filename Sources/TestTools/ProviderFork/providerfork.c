// p11fork-providerfork: the forking OpenSSL 3 program on pkcs11-provider
// (Sources/p11fork-cli/ProviderScenario) as a command, for the tests.
//
//   OPENSSL_CONF=<provider configuration> p11fork-providerfork URI WORKERS SIGNATURES WORKER_SECONDS [STAGGER_MS]
//
// URI names the private key ("pkcs11:token=T;object=K;type=private"; the PIN comes from the
// configuration's pkcs11-module-token-pin, which the provider also needs in the workers). The
// exit status comes from returning from main, so OpenSSL's cleanup runs at exit: a crash there
// ends the program by a signal after its "result:" line.
#include "ProviderScenario.h"
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: p11fork-providerfork URI WORKERS SIGNATURES WORKER_SECONDS [STAGGER_MS]\n");
        return 2;
    }
    provider_scenario_options options = {
        .uri = argv[1], .workers = atoi(argv[2]), .signatures = atoi(argv[3]), .seconds = atoi(argv[4]),
        .stagger_ms = argc == 6 ? atoi(argv[5]) : 0,
    };
    return provider_scenario_run(&options);
}
