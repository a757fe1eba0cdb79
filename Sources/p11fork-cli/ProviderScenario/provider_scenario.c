// The forking OpenSSL 3 program of ProviderScenario.h: a prefork server on OpenSSL 3 in small.
// The parent loads the token key through OSSL_STORE (the provider's key URI) and signs; then it
// forks workers that sign with the EVP_PKEY they inherited (the provider notices the fork and, in
// each worker, finalizes and initialises the module again and logs in again itself), and keeps
// signing while they run and after they ended. Every signature is checked in the parent against
// the token's public key, taken out of the provider into OpenSSL's default provider (software).
// A worker that hangs ends as "killed by signal 14" (its alarm). Forks may be spaced: SoftHSM's
// file store rewrites the token file on every login, and a worker reading it at that moment
// misses the key (seen here with three workers forked at once, directly and through p11fork).
#include "ProviderScenario.h"
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/store.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

enum { max_workers = 16, max_signature = 1024 };

static const unsigned char message[] = "p11fork provider fork check: signed by a forked worker";

static int sign(EVP_PKEY *key, unsigned char *signature, size_t *length) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx && EVP_DigestSignInit_ex(ctx, NULL, "SHA256", NULL, NULL, key, NULL) > 0
        && EVP_DigestSign(ctx, signature, length, message, sizeof message) > 0;
    EVP_MD_CTX_free(ctx);
    return ok;
}

static int verify(EVP_PKEY *public_key, const unsigned char *signature, size_t length) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx && EVP_DigestVerifyInit_ex(ctx, NULL, "SHA256", NULL, "provider=default", public_key, NULL) > 0
        && EVP_DigestVerify(ctx, signature, length, message, sizeof message) == 1;
    EVP_MD_CTX_free(ctx);
    return ok;
}

// The first private key OSSL_STORE finds at the URI.
static EVP_PKEY *load_key(const char *uri) {
    OSSL_STORE_CTX *store = OSSL_STORE_open(uri, NULL, NULL, NULL, NULL);
    EVP_PKEY *key = NULL;
    while (store && !key && !OSSL_STORE_eof(store)) {
        OSSL_STORE_INFO *info = OSSL_STORE_load(store);
        if (info && OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY) key = OSSL_STORE_INFO_get1_PKEY(info);
        OSSL_STORE_INFO_free(info);
    }
    OSSL_STORE_close(store);
    return key;
}

// The key's public half in OpenSSL's default provider: written out as PEM through the provider,
// read back in software.
static EVP_PKEY *software_public_key(EVP_PKEY *key) {
    BIO *bio = BIO_new(BIO_s_mem());
    EVP_PKEY *public_key = NULL;
    if (bio && PEM_write_bio_PUBKEY(bio, key) > 0)
        public_key = PEM_read_bio_PUBKEY_ex(bio, NULL, NULL, NULL, NULL, "provider=default");
    BIO_free(bio);
    return public_key;
}

static void parent_hung(int signal) {
    (void)signal;
    static const char line[] = "result: fail the parent did not finish in time (it hung)\n";
    (void)!write(1, line, sizeof line - 1);
    _exit(4);
}

// A worker: signs `count` times with the inherited key and writes each signature (length, then
// bytes) to `fd`. Exit status 0 when all were made, 3 when one failed.
static void worker(int number, EVP_PKEY *key, int count, int fd, int seconds) {
    signal(SIGALRM, SIG_DFL);
    alarm(seconds);
    for (int i = 0; i < count; i++) {
        unsigned char signature[max_signature];
        size_t length = sizeof signature;
        if (!sign(key, signature, &length)) {
            fprintf(stderr, "worker %d: signature %d failed:\n", number, i + 1);
            ERR_print_errors_fp(stderr);
            _exit(3);
        }
        unsigned short n = (unsigned short)length;
        if (write(fd, &n, sizeof n) != sizeof n || write(fd, signature, length) != (ssize_t)length) _exit(5);
    }
    _exit(0);
}

// The parent signs once and checks the signature; prints what happened under `when`.
static int parent_signs(EVP_PKEY *key, EVP_PKEY *public_key, const char *when) {
    unsigned char signature[max_signature];
    size_t length = sizeof signature;
    int ok = sign(key, signature, &length) && verify(public_key, signature, length);
    printf("parent signs %s: %s\n", when, ok ? "yes, verified" : "no");
    if (!ok) ERR_print_errors_fp(stdout);
    fflush(stdout);
    return ok;
}

static int run(const provider_scenario_options *options) {
    const char *uri = options->uri;
    int workers = options->workers, signatures = options->signatures, seconds = options->seconds;
    int stagger = options->stagger_ms;
    if (!uri || workers < 1 || workers > max_workers || signatures < 1 || signatures > 50 || seconds < 1 || stagger < 0) {
        fprintf(stderr, "provider scenario: WORKERS 1..%d, SIGNATURES 1..50, WORKER_SECONDS at least 1\n", max_workers);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGALRM, parent_hung);
    alarm(seconds + 30);
    OPENSSL_init_crypto(OPENSSL_INIT_LOAD_CONFIG, NULL);
    EVP_PKEY *key = load_key(uri);
    EVP_PKEY *public_key = key ? software_public_key(key) : NULL;
    if (!key || !public_key) {
        ERR_print_errors_fp(stdout);
        printf("result: fail the parent could not load the key through OSSL_STORE\n");
        return 1;
    }
    if (!parent_signs(key, public_key, "before the fork")) {
        printf("result: fail the parent could not sign before forking\n");
        return 1;
    }
    if (options->before_fork) options->before_fork();

    pid_t pids[max_workers];
    int fds[max_workers];
    for (int i = 0; i < workers; i++) {
        int pipe_fds[2];
        if (pipe(pipe_fds) != 0) return 1;
        if (i > 0 && stagger > 0) usleep((useconds_t)stagger * 1000);
        fflush(NULL);
        pid_t pid = fork();
        if (pid < 0) return 1;
        if (pid == 0) {
            close(pipe_fds[0]);
            worker(i + 1, key, signatures, pipe_fds[1], seconds);
        }
        close(pipe_fds[1]);
        pids[i] = pid;
        fds[i] = pipe_fds[0];
    }
    int parent_during = parent_signs(key, public_key, "while the workers run");

    int signed_ok = 0, problems = 0;
    for (int i = 0; i < workers; i++) {
        int status = 0;
        waitpid(pids[i], &status, 0);
        int verified = 0, bad = 0;
        unsigned short n;
        while (read(fds[i], &n, sizeof n) == sizeof n) {
            unsigned char signature[max_signature];
            if (n > sizeof signature || read(fds[i], signature, n) != n) { bad++; break; }
            if (verify(public_key, signature, n)) verified++; else bad++;
        }
        close(fds[i]);
        if (WIFSIGNALED(status)) {
            printf("worker %d: killed by signal %d%s after %d signature(s)\n", i + 1, WTERMSIG(status),
                   WTERMSIG(status) == SIGALRM ? " (no answer in time)" : "", verified);
            problems++;
        } else if (WEXITSTATUS(status) != 0 || bad || verified != signatures) {
            printf("worker %d: exit status %d, %d signature(s) verified, %d that do not verify\n", i + 1,
                   WEXITSTATUS(status), verified, bad);
            problems++;
        } else {
            printf("worker %d: %d signature(s) verified\n", i + 1, verified);
            signed_ok += verified;
        }
    }
    int parent_after = parent_signs(key, public_key, "after the workers");
    if (problems || !parent_during || !parent_after) {
        printf("result: fail %d of %d worker(s) failed; the parent kept signing: %s\n", problems, workers,
               parent_during && parent_after ? "yes" : "no");
        return 1;
    }
    printf("result: ok %d worker(s) made %d signature(s), all verified; the parent kept signing\n", workers, signed_ok);
    EVP_PKEY_free(public_key);
    EVP_PKEY_free(key);
    return 0;
}

int provider_scenario_run(const provider_scenario_options *options) {
    int status = run(options);
    // The parent's alarm is for the scenario only. (OpenSSL's cleanup, where the provider closes
    // its sessions and finalizes the module, comes at the caller's exit.)
    alarm(0);
    signal(SIGALRM, SIG_DFL);
    return status;
}
