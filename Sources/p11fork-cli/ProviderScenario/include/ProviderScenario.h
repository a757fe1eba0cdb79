// A forking OpenSSL 3 program on pkcs11-provider, as a function: the test driver
// p11fork-providerfork and `p11fork doctor --consumer provider` run it. In C, so that nothing
// of the caller's runtime runs in the workers it forks.
#ifndef PROVIDER_SCENARIO_H
#define PROVIDER_SCENARIO_H

typedef struct {
    const char *uri;   // the private key: "pkcs11:token=…;object=…;type=private"
    int workers;       // 1...16
    int signatures;    // each worker's, 1...50
    int seconds;       // what a worker may take (its alarm); the parent's alarm is 30 s more
    int stagger_ms;    // between forks
    void (*before_fork)(void);  // NULL, or called once the parent has loaded the key and signed
} provider_scenario_options;

/// With OPENSSL_CONF naming a configuration that activates pkcs11-provider (its
/// pkcs11-module-token-pin set: the provider logs in again in each worker): the parent loads the
/// key through OSSL_STORE and signs, forks the workers, which sign with the inherited EVP_PKEY,
/// and signs while they run and after; every signature is verified in software. Prints
/// "parent signs …:", "worker N: …" and last "result: ok|fail …" lines on standard output.
/// Returns 0 when everything signed, 1 when not, 2 for bad options.
int provider_scenario_run(const provider_scenario_options *options);

#endif
