// p11fork-enginefork: a forking program that signs through OpenSSL's pkcs11 engine (libp11),
// the way nginx and Apache workers do. The parent loads the engine and the key and signs; then
// children sign with the same EVP_PKEY (libp11 notices the fork and, following the old rule,
// calls C_Initialize again, opens sessions and logs in again itself); the parent verifies every
// signature and signs again after the children.
//
//   OPENSSL_CONF=examples/openssl-engine.cnf LIBP11FORK=<module> \
//     p11fork-enginefork "pkcs11:token=T;object=K" PIN CHILDREN
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/conf.h>
#include <openssl/engine.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const unsigned char digest[32] = "p11fork engine fork check: 32 b";

static int sign(EVP_PKEY *key, unsigned char *signature, size_t *length) {
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(key, NULL);
    int ok = ctx && EVP_PKEY_sign_init(ctx) > 0 && EVP_PKEY_sign(ctx, signature, length, digest, sizeof digest) > 0;
    EVP_PKEY_CTX_free(ctx);
    return ok;
}

static int verify(EVP_PKEY *key, const unsigned char *signature, size_t length) {
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(key, NULL);
    int ok = ctx && EVP_PKEY_verify_init(ctx) > 0 && EVP_PKEY_verify(ctx, signature, length, digest, sizeof digest) > 0;
    EVP_PKEY_CTX_free(ctx);
    return ok;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: p11fork-enginefork PKCS11-URI PIN CHILDREN\n");
        return 2;
    }
    alarm(60);
    const char *uri = argv[1], *pin = argv[2];
    int children = atoi(argv[3]);
    OPENSSL_init_crypto(OPENSSL_INIT_LOAD_CONFIG, NULL);
    ENGINE *engine = ENGINE_by_id("pkcs11");
    if (!engine || !ENGINE_ctrl_cmd_string(engine, "PIN", pin, 0) || !ENGINE_init(engine)) {
        ERR_print_errors_fp(stderr);
        printf("result: fail the pkcs11 engine did not load\n");
        return 1;
    }
    char private_uri[512], public_uri[512];
    snprintf(private_uri, sizeof private_uri, "%s;type=private", uri);
    snprintf(public_uri, sizeof public_uri, "%s;type=public", uri);
    EVP_PKEY *key = ENGINE_load_private_key(engine, private_uri, NULL, NULL);
    EVP_PKEY *public_key = ENGINE_load_public_key(engine, public_uri, NULL, NULL);
    unsigned char signature[1024];
    size_t length = sizeof signature;
    if (!key || !public_key || !sign(key, signature, &length) || !verify(public_key, signature, length)) {
        ERR_print_errors_fp(stderr);
        printf("result: fail the parent could not sign and verify\n");
        return 1;
    }

    int verified = 0, problems = 0;
    for (int i = 0; i < children; i++) {
        int fds[2];
        if (pipe(fds) != 0) return 1;
        pid_t pid = fork();
        if (pid == 0) {
            alarm(20);
            close(fds[0]);
            size_t n = sizeof signature;
            int ok = sign(key, signature, &n);
            if (!ok) ERR_print_errors_fp(stderr);
            if (ok) (void)!write(fds[1], signature, n);
            _exit(ok ? 0 : 3);
        }
        close(fds[1]);
        unsigned char got[1024];
        ssize_t n = read(fds[0], got, sizeof got);
        close(fds[0]);
        int status = 0;
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            printf("child %d: %s %d\n", i + 1, WIFSIGNALED(status) ? "killed by signal" : "exit status",
                   WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
            problems++;
        } else if (n > 0 && verify(public_key, got, (size_t)n)) {
            verified++;
        } else {
            printf("child %d: its signature does not verify\n", i + 1);
            problems++;
        }
    }
    length = sizeof signature;
    int parent_after = sign(key, signature, &length) && verify(public_key, signature, length);
    if (problems || !parent_after) {
        printf("result: fail %d child problem(s); parent signs after them: %s\n", problems, parent_after ? "yes" : "no");
        return 1;
    }
    printf("result: ok %d signature(s) from children verified; the parent still signs\n", verified);
    EVP_PKEY_free(key);
    EVP_PKEY_free(public_key);
    ENGINE_finish(engine);
    ENGINE_free(engine);
    return 0;
}
