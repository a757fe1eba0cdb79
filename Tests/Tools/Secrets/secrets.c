// p11fork-secrets: a process that logs in through a module and then lets a test inspect its
// memory. It reads the PIN from standard input into a buffer it wipes right after C_Login, so
// that any copy left in the process is the module's (or p11fork's) own. Then it obeys one
// command per line on standard input and answers "done" after each:
//   logout     C_Logout            finalize   C_Finalize
//   fork       forks a child that signs with the inherited session (replaying the login) and
//              waits for it; answers "done child <status>"
// Secret values of a session object and of operation data (the line holding them is wiped
// once used, and so is every copy the driver made):
//   key HEX    C_CreateObject on a second session: an AES session key (CKA_TOKEN false,
//              CKA_PRIVATE, CKA_SENSITIVE, not extractable) whose CKA_VALUE is HEX
//   derive HEX C_DeriveKey from that key with CKM_AES_ECB_ENCRYPT_DATA, the derivation data
//              HEX in the mechanism parameter: an AES session key that the next commands use
//   wrap HEX   makes an extractable AES session key of value HEX, C_WrapKey's it with the first
//              key (CKM_AES_KEY_WRAP), destroys it; answers "done 0x0 WRAPPED-HEX"
//   unwrap HEX C_UnwrapKey of those bytes with the first key: an AES session key that the next
//              commands use
//   encrypt    C_Encrypt of a fixed block with the key (CKM_AES_ECB); answers "done 0x0 HEX"
//   feed HEX   C_EncryptInit (CKM_AES_ECB) and C_EncryptUpdate of the bytes HEX
//   final      C_EncryptFinal      destroy    C_DestroyObject of the key
//   close      C_CloseSession of the second session
// A context-specific login (the PIN is given again; the line is wiped once used):
//   always     C_GenerateKeyPair of an EC P-256 session key pair whose private key has
//              CKA_ALWAYS_AUTHENTICATE, then C_SignInit (CKM_ECDSA) with it
//   context PIN  C_Login(CKU_CONTEXT_SPECIFIC)       sign   C_Sign (ends the operation)
//   child      forks: the child answers "child <pid>" and obeys the commands that follow
//              (the parent waits) until "exit", then _exit(0)s; the parent then answers
//              "done child <status>"
// It exits when standard input closes. First line of output: "ready <pid>".
//
//   p11fork-secrets --module PATH --token LABEL --key LABEL  < "PIN\n" + commands
#define _GNU_SOURCE
#include <dlfcn.h>
#include <p11-kit-1/p11-kit/pkcs11.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static CK_FUNCTION_LIST_PTR p11;
static CK_SESSION_HANDLE session;
static CK_SLOT_ID slot = (CK_SLOT_ID)-1;
static CK_OBJECT_HANDLE key;
static CK_SESSION_HANDLE objects;
static CK_OBJECT_HANDLE secret_key, first_key;

// Decodes HEX into `out` (at most `size` bytes); the number of bytes, or -1.
static int unhex(const char *hex, unsigned char *out, size_t size) {
    size_t n = strlen(hex);
    if (n % 2 || n / 2 > size) return -1;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned int byte;
        if (sscanf(hex + 2 * i, "%2x", &byte) != 1) return -1;
        out[i] = (unsigned char)byte;
    }
    return (int)(n / 2);
}

// The attributes every AES session key here starts with; then those of a key an application
// keeps private and sensitive and encrypts with.
static CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
static CK_KEY_TYPE aes = CKK_AES;
static CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
#define AES_SESSION_KEY { CKA_CLASS, &secret_class, sizeof secret_class }, { CKA_KEY_TYPE, &aes, sizeof aes }, { CKA_TOKEN, &no, sizeof no }
#define PRIVATE_SENSITIVE { CKA_PRIVATE, &yes, sizeof yes }, { CKA_SENSITIVE, &yes, sizeof yes }, { CKA_ENCRYPT, &yes, sizeof yes }

static CK_RV create_key(const char *hex) {
    unsigned char value[64];
    int length = unhex(hex, value, sizeof value);
    if (length <= 0) return CKR_ARGUMENTS_BAD;
    CK_ATTRIBUTE t[] = {
        AES_SESSION_KEY, PRIVATE_SENSITIVE, { CKA_EXTRACTABLE, &no, sizeof no }, { CKA_DERIVE, &yes, sizeof yes },
        { CKA_WRAP, &yes, sizeof yes }, { CKA_UNWRAP, &yes, sizeof yes }, { CKA_LABEL, "secrets-aes", 11 },
        { CKA_VALUE, value, (CK_ULONG)length },
    };
    CK_RV rv = objects ? CKR_OK : p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &objects);
    if (rv == CKR_OK) rv = p11->C_CreateObject(objects, t, sizeof t / sizeof t[0], &secret_key);
    first_key = secret_key;
    explicit_bzero(value, sizeof value);
    return rv;
}

static void tohex(const unsigned char *bytes, CK_ULONG length, char *hex_out) {
    for (CK_ULONG i = 0; i < length; i++) sprintf(hex_out + 2 * i, "%02x", bytes[i]);
}

static CK_RV wrap_value(const char *hex, char *hex_out) {
    unsigned char value[64], wrapped[80];
    int length = unhex(hex, value, sizeof value);
    if (length <= 0) return CKR_ARGUMENTS_BAD;
    CK_ATTRIBUTE t[] = { AES_SESSION_KEY, { CKA_EXTRACTABLE, &yes, sizeof yes }, { CKA_VALUE, value, (CK_ULONG)length } };
    CK_OBJECT_HANDLE plain;
    CK_ULONG wrapped_length = sizeof wrapped;
    CK_MECHANISM m = { CKM_AES_KEY_WRAP, NULL, 0 };
    CK_RV rv = p11->C_CreateObject(objects, t, sizeof t / sizeof t[0], &plain);
    explicit_bzero(value, sizeof value);
    if (rv != CKR_OK) return rv;
    rv = p11->C_WrapKey(objects, &m, first_key, plain, wrapped, &wrapped_length);
    CK_RV destroyed = p11->C_DestroyObject(objects, plain);
    if (rv == CKR_OK) tohex(wrapped, wrapped_length, hex_out);
    explicit_bzero(wrapped, sizeof wrapped);
    return rv == CKR_OK ? destroyed : rv;
}

static CK_RV unwrap_key(const char *hex) {
    unsigned char wrapped[80];
    int length = unhex(hex, wrapped, sizeof wrapped);
    if (length <= 0) return CKR_ARGUMENTS_BAD;
    CK_ATTRIBUTE t[] = { AES_SESSION_KEY, PRIVATE_SENSITIVE };
    CK_MECHANISM m = { CKM_AES_KEY_WRAP, NULL, 0 };
    CK_OBJECT_HANDLE unwrapped;
    CK_RV rv = p11->C_UnwrapKey(objects, &m, first_key, wrapped, (CK_ULONG)length, t, sizeof t / sizeof t[0], &unwrapped);
    if (rv == CKR_OK) secret_key = unwrapped;
    explicit_bzero(wrapped, sizeof wrapped);
    return rv;
}

static CK_RV derive_key(const char *hex) {
    unsigned char data[64];
    int length = unhex(hex, data, sizeof data);
    if (length <= 0 || length % 16) return CKR_ARGUMENTS_BAD;
    CK_KEY_DERIVATION_STRING_DATA parameter = { data, (CK_ULONG)length };
    CK_MECHANISM m = { CKM_AES_ECB_ENCRYPT_DATA, &parameter, sizeof parameter };
    CK_ULONG size = 32;
    CK_ATTRIBUTE t[] = { AES_SESSION_KEY, PRIVATE_SENSITIVE, { CKA_VALUE_LEN, &size, sizeof size } };
    CK_OBJECT_HANDLE derived;
    CK_RV rv = p11->C_DeriveKey(objects, &m, secret_key, t, sizeof t / sizeof t[0], &derived);
    if (rv == CKR_OK) secret_key = derived;
    explicit_bzero(data, sizeof data);
    return rv;
}

static CK_OBJECT_HANDLE always_key;

static CK_RV always_authenticate(void) {
    static CK_BYTE p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
    CK_MECHANISM generate = { CKM_EC_KEY_PAIR_GEN, NULL, 0 };
    CK_ATTRIBUTE pub[] = { { CKA_EC_PARAMS, p256, sizeof p256 }, { CKA_TOKEN, &no, sizeof no } };
    CK_ATTRIBUTE priv[] = { { CKA_TOKEN, &no, sizeof no }, { CKA_PRIVATE, &yes, sizeof yes }, { CKA_SIGN, &yes, sizeof yes },
                            { CKA_ALWAYS_AUTHENTICATE, &yes, sizeof yes } };
    CK_OBJECT_HANDLE public_key;
    CK_MECHANISM m = { CKM_ECDSA, NULL, 0 };
    CK_RV rv = p11->C_GenerateKeyPair(session, &generate, pub, 2, priv, 4, &public_key, &always_key);
    return rv == CKR_OK ? p11->C_SignInit(session, &m, always_key) : rv;
}

static CK_RV sign_always(void) {
    static const unsigned char hash[32] = "p11fork secrets: 32-byte hash..";
    unsigned char signature[128];
    CK_ULONG length = sizeof signature;
    return p11->C_Sign(session, (CK_BYTE_PTR)hash, 32, signature, &length);
}

static CK_RV encrypt_block(char *hex_out) {
    static const unsigned char block[16] = "p11fork block 16";
    unsigned char out[16];
    CK_ULONG length = sizeof out;
    CK_MECHANISM m = { CKM_AES_ECB, NULL, 0 };
    CK_RV rv = p11->C_EncryptInit(objects, &m, secret_key);
    if (rv == CKR_OK) rv = p11->C_Encrypt(objects, (CK_BYTE_PTR)block, 16, out, &length);
    if (rv == CKR_OK) tohex(out, length, hex_out);
    return rv;
}

static CK_RV feed(const char *hex) {
    unsigned char data[256], out[512];
    int length = unhex(hex, data, sizeof data);
    if (length <= 0 || length % 16) return CKR_ARGUMENTS_BAD;
    CK_ULONG produced = sizeof out;
    CK_MECHANISM m = { CKM_AES_ECB, NULL, 0 };
    CK_RV rv = p11->C_EncryptInit(objects, &m, secret_key);
    if (rv == CKR_OK) rv = p11->C_EncryptUpdate(objects, data, (CK_ULONG)length, out, &produced);
    explicit_bzero(data, sizeof data);
    return rv;
}

static CK_RV sign_once(void) {
    static const unsigned char data[32] = "p11fork secrets: 32 bytes.......";
    unsigned char signature[1024];
    CK_ULONG length = sizeof signature;
    CK_MECHANISM m = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    CK_RV rv = p11->C_SignInit(session, &m, key);
    return rv == CKR_OK ? p11->C_Sign(session, (CK_BYTE_PTR)data, 32, signature, &length) : rv;
}

int main(int argc, char **argv) {
    const char *module = NULL, *token = NULL, *label = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--module")) module = argv[i + 1];
        else if (!strcmp(argv[i], "--token")) token = argv[i + 1];
        else if (!strcmp(argv[i], "--key")) label = argv[i + 1];
    }
    if (!module || !token || !label) { fprintf(stderr, "usage: p11fork-secrets --module PATH --token LABEL --key LABEL\n"); return 2; }
    alarm(120);
    setvbuf(stdout, NULL, _IONBF, 0);
    void *library = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    CK_C_GetFunctionList get = library ? (CK_C_GetFunctionList)dlsym(library, "C_GetFunctionList") : NULL;
    if (!get || get(&p11) != CKR_OK) { printf("fail load\n"); return 1; }
    CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
    if (p11->C_Initialize(&args) != CKR_OK) { printf("fail initialize\n"); return 1; }
    CK_SLOT_ID slots[16];
    CK_ULONG n = 16;
    if (p11->C_GetSlotList(CK_TRUE, slots, &n) != CKR_OK) { printf("fail slots\n"); return 1; }
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        size_t len = strlen(token);
        if (p11->C_GetTokenInfo(slots[i], &info) == CKR_OK && len <= 32 && !memcmp(info.label, token, len)) { slot = slots[i]; break; }
    }
    if (slot == (CK_SLOT_ID)-1 || p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &session) != CKR_OK) { printf("fail session\n"); return 1; }

    // The PIN: read with read(2) into our own buffer (no stdio buffer keeps a copy), used once, wiped.
    char pin[128];
    ssize_t got = 0;
    while (got < (ssize_t)sizeof pin - 1) {
        ssize_t r = read(0, pin + got, 1);
        if (r != 1 || pin[got] == '\n') break;
        got++;
    }
    CK_RV rv = p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)pin, (CK_ULONG)got);
    explicit_bzero(pin, sizeof pin);
    if (rv != CKR_OK) { printf("fail login 0x%lx\n", rv); return 1; }
    CK_OBJECT_CLASS class = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE t[] = { { CKA_CLASS, &class, sizeof class }, { CKA_LABEL, (void *)label, strlen(label) } };
    if (p11->C_FindObjectsInit(session, t, 2) != CKR_OK || p11->C_FindObjects(session, &key, 1, &n) != CKR_OK || n != 1) { printf("fail key\n"); return 1; }
    p11->C_FindObjectsFinal(session);
    if (sign_once() != CKR_OK) { printf("fail sign\n"); return 1; }
    printf("ready %d\n", getpid());

    char command[600];
    size_t used = 0;
    int in_child = 0;
    for (;;) {
        char c;
        if (read(0, &c, 1) != 1) break;
        if (c != '\n') { if (used < sizeof command - 1) command[used++] = c; continue; }
        command[used] = 0;
        used = 0;
        char hex[200] = "";
        if (!strncmp(command, "key ", 4)) printf("done 0x%lx\n", create_key(command + 4));
        else if (!strncmp(command, "derive ", 7)) printf("done 0x%lx\n", derive_key(command + 7));
        else if (!strncmp(command, "wrap ", 5)) { CK_RV rv = wrap_value(command + 5, hex); printf("done 0x%lx %s\n", rv, hex); }
        else if (!strncmp(command, "unwrap ", 7)) printf("done 0x%lx\n", unwrap_key(command + 7));
        else if (!strcmp(command, "always")) printf("done 0x%lx\n", always_authenticate());
        else if (!strncmp(command, "context ", 8))
            printf("done 0x%lx\n", p11->C_Login(session, CKU_CONTEXT_SPECIFIC, (CK_UTF8CHAR_PTR)command + 8, strlen(command + 8)));
        else if (!strcmp(command, "sign")) printf("done 0x%lx\n", sign_always());
        else if (!strcmp(command, "sign-once")) printf("done 0x%lx\n", sign_once());
        else if (!strncmp(command, "feed ", 5)) printf("done 0x%lx\n", feed(command + 5));
        else if (!strcmp(command, "encrypt")) { CK_RV rv = encrypt_block(hex); printf("done 0x%lx %s\n", rv, hex); }
        else if (!strcmp(command, "final")) {
            unsigned char out[64];
            CK_ULONG length = sizeof out;
            printf("done 0x%lx\n", p11->C_EncryptFinal(objects, out, &length));
        }
        else if (!strcmp(command, "destroy")) printf("done 0x%lx\n", p11->C_DestroyObject(objects, secret_key));
        else if (!strcmp(command, "close")) printf("done 0x%lx\n", p11->C_CloseSession(objects));
        else if (!strcmp(command, "child")) {
            pid_t pid = fork();
            if (pid == 0) { alarm(60); in_child = 1; printf("child %d\n", getpid()); }
            else {
                int status = 0;
                waitpid(pid, &status, 0);
                printf("done child %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
            }
        }
        else if (!strcmp(command, "exit") && in_child) _exit(0);
        else if (!strcmp(command, "logout")) printf("done 0x%lx\n", p11->C_Logout(session));
        else if (!strcmp(command, "finalize")) printf("done 0x%lx\n", p11->C_Finalize(NULL));
        else if (!strcmp(command, "fork")) {
            pid_t pid = fork();
            if (pid == 0) { alarm(20); _exit(sign_once() == CKR_OK ? 0 : 3); }
            int status = 0;
            waitpid(pid, &status, 0);
            printf("done child %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
        } else printf("done unknown\n");
        explicit_bzero(command, sizeof command);
    }
    if (in_child) _exit(4);
    return 0;
}
