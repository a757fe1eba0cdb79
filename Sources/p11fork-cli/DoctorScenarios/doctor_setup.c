// The doctor helper's setup: load the module, find the token, log in, choose the key and the
// mechanisms, sign once. Read-only: sessions are opened without CKF_RW_SESSION, so nothing can be
// written to the token; the PIN is only ever passed to C_Login.
#define _GNU_SOURCE
#include "doctor_internal.h"

#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

CK_FUNCTION_LIST_PTR doctor_p11;
const doctor_options *doctor_opts;
CK_SLOT_ID doctor_slot;
CK_SESSION_HANDLE doctor_session;
doctor_key doctor_signing_key;
// 64 bytes: the first 32 also serve as the "digest" that raw ECDSA signs.
const unsigned char doctor_message[64] = "p11fork doctor: data to sign...p11fork doctor: second half.....";

static char pin[256];
static CK_ULONG pin_length;

// MARK: output

static void write_line(char *line, size_t length) {
    line[length] = '\n';
    const char *p = line;
    size_t left = length + 1;
    while (left > 0) {
        ssize_t n = write(1, p, left);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        p += n;
        left -= (size_t)n;
    }
}

void doctor_say(const char *format, ...) {
    char line[1024];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(line, sizeof line - 1, format, args);
    va_end(args);
    if (n < 0) return;
    write_line(line, (size_t)n < sizeof line - 1 ? (size_t)n : sizeof line - 2);
}

int doctor_result(int status, const char *format, ...) {
    static const char *const words[] = { [DOCTOR_OK] = "ok", [DOCTOR_FAIL] = "fail", [DOCTOR_NOT_APPLICABLE] = "n/a",
                                         [DOCTOR_ERROR] = "error" };
    char detail[900];
    va_list args;
    va_start(args, format);
    vsnprintf(detail, sizeof detail, format, args);
    va_end(args);
    doctor_say("result: %s %s", words[status], detail);
    return status;
}

const char *doctor_mechanism_name(CK_MECHANISM_TYPE mechanism) {
    switch (mechanism) {
#define NAME(code) case code: return #code;
        NAME(CKM_RSA_PKCS) NAME(CKM_SHA256_RSA_PKCS) NAME(CKM_ECDSA) NAME(CKM_ECDSA_SHA256) NAME(CKM_EDDSA)
        NAME(CKM_SHA256_HMAC) NAME(CKM_SHA_1_HMAC) NAME(CKM_AES_CMAC) NAME(CKM_AES_CBC) NAME(CKM_AES_ECB)
        NAME(CKM_SHA256)
#undef NAME
    }
    static __thread char hex[24];
    snprintf(hex, sizeof hex, "0x%08lx", mechanism);
    return hex;
}

// A label as printable text: control characters become '?', trailing blanks go.
static void printable(char *out, size_t size, const unsigned char *bytes, size_t length) {
    while (length > 0 && (bytes[length - 1] == ' ' || bytes[length - 1] == 0)) length--;
    size_t n = 0;
    for (size_t i = 0; i < length && n + 1 < size; i++) out[n++] = bytes[i] < 0x20 || bytes[i] == 0x7f ? '?' : (char)bytes[i];
    out[n] = 0;
}

static void hex_string(char *out, size_t size, const unsigned char *bytes, size_t length) {
    size_t n = 0;
    out[0] = 0;
    for (size_t i = 0; i < length && n + 3 <= size; i++) n += (size_t)snprintf(out + n, size - n, "%02x", bytes[i]);
}

// MARK: token and login

int doctor_has_mechanism(CK_MECHANISM_TYPE mechanism, CK_FLAGS needed) {
    CK_MECHANISM_INFO info;
    return doctor_p11->C_GetMechanismInfo(doctor_slot, mechanism, &info) == CKR_OK && (info.flags & needed) == needed;
}

CK_RV doctor_login(CK_SESSION_HANDLE session) {
    CK_RV rv = doctor_p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)pin, pin_length);
    return rv == CKR_USER_ALREADY_LOGGED_IN ? CKR_OK : rv;
}

static int padded_equal(const unsigned char *field, size_t size, const char *wanted) {
    size_t n = strlen(wanted);
    if (n > size || memcmp(field, wanted, n) != 0) return 0;
    for (size_t i = n; i < size; i++) if (field[i] != ' ' && field[i] != 0) return 0;
    return 1;
}

CK_RV doctor_find_token(CK_SLOT_ID *out, char *problem, size_t size) {
    CK_SLOT_ID slots[64];
    CK_ULONG count = 64;
    CK_RV rv = doctor_p11->C_GetSlotList(CK_TRUE, slots, &count);
    if (rv != CKR_OK) {
        snprintf(problem, size, "C_GetSlotList answered %s", tool_rv_name(rv));
        return rv;
    }
    char labels[400] = "";
    size_t listed = 0;
    int matches = 0, initialised = 0;
    for (CK_ULONG i = 0; i < count; i++) {
        CK_TOKEN_INFO info;
        if (doctor_p11->C_GetTokenInfo(slots[i], &info) != CKR_OK) continue;
        if (!(info.flags & CKF_TOKEN_INITIALIZED)) continue;
        initialised++;
        char label[40];
        printable(label, sizeof label, info.label, sizeof info.label);
        if (listed + strlen(label) + 5 < sizeof labels)
            listed += (size_t)snprintf(labels + listed, sizeof labels - listed, "%s\"%s\"", listed ? ", " : "", label);
        int wanted = 1;
        if (doctor_opts->token_label) wanted &= padded_equal(info.label, sizeof info.label, doctor_opts->token_label);
        if (doctor_opts->token_serial)
            wanted &= padded_equal(info.serialNumber, sizeof info.serialNumber, doctor_opts->token_serial);
        if (wanted && matches++ == 0) *out = slots[i];
    }
    int named = doctor_opts->token_label || doctor_opts->token_serial;
    if (initialised == 0) {
        snprintf(problem, size, "token-missing the module shows no initialised token");
        return CKR_TOKEN_NOT_PRESENT;
    }
    if (matches == 0) {
        snprintf(problem, size, "token-missing no token %s%s%s%s (tokens: %s)", doctor_opts->token_label ? "labelled " : "",
                 doctor_opts->token_label ? doctor_opts->token_label : "", doctor_opts->token_serial ? " with serial " : "",
                 doctor_opts->token_serial ? doctor_opts->token_serial : "", labels);
        return CKR_TOKEN_NOT_PRESENT;
    }
    if (!named && matches > 1) {
        snprintf(problem, size, "token-ambiguous %d tokens: %s", matches, labels);
        return CKR_TOKEN_NOT_PRESENT;
    }
    return CKR_OK;
}

// MARK: the key

static int can_sign_type(CK_OBJECT_CLASS key_class, CK_KEY_TYPE type) {
    if (key_class == CKO_PRIVATE_KEY) return type == CKK_RSA || type == CKK_EC || type == CKK_EC_EDWARDS;
    return type == CKK_GENERIC_SECRET || type == CKK_SHA_1_HMAC || type == CKK_SHA256_HMAC || type == CKK_SHA384_HMAC ||
           type == CKK_SHA512_HMAC || type == CKK_SHA224_HMAC || type == CKK_AES;
}

static const char *type_name(CK_OBJECT_CLASS key_class, CK_KEY_TYPE type) {
    switch (type) {
    case CKK_RSA: return "rsa";
    case CKK_EC: return "ec";
    case CKK_EC_EDWARDS: return "eddsa";
    case CKK_AES: return "aes";
    case CKK_GENERIC_SECRET: return "generic-secret";
    case CKK_SHA_1_HMAC: case CKK_SHA224_HMAC: case CKK_SHA256_HMAC: case CKK_SHA384_HMAC: case CKK_SHA512_HMAC: return "hmac";
    }
    return key_class == CKO_PRIVATE_KEY ? "other-private" : "other-secret";
}

// Reads class, type, CKA_SIGN, label and ID, one attribute at a time (a module may refuse one).
static int read_key(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE handle, doctor_key *key) {
    CK_BBOOL sign = CK_FALSE;
    memset(key, 0, sizeof *key);
    key->handle = handle;
    CK_ATTRIBUTE attributes[] = {
        { CKA_CLASS, &key->key_class, sizeof key->key_class },
        { CKA_KEY_TYPE, &key->type, sizeof key->type },
        { CKA_SIGN, &sign, sizeof sign },
    };
    for (size_t i = 0; i < 3; i++)
        if (doctor_p11->C_GetAttributeValue(session, handle, &attributes[i], 1) != CKR_OK) attributes[i].ulValueLen = 0;
    unsigned char label[128];
    CK_ATTRIBUTE text = { CKA_LABEL, label, sizeof label };
    if (doctor_p11->C_GetAttributeValue(session, handle, &text, 1) == CKR_OK && text.ulValueLen <= sizeof label)
        printable(key->label, sizeof key->label, label, text.ulValueLen);
    CK_ATTRIBUTE id = { CKA_ID, key->id, sizeof key->id };
    if (doctor_p11->C_GetAttributeValue(session, handle, &id, 1) == CKR_OK && id.ulValueLen <= sizeof key->id)
        key->id_length = id.ulValueLen;
    return sign == CK_TRUE;
}

static CK_ULONG find(CK_SESSION_HANDLE session, CK_ATTRIBUTE *template, CK_ULONG count, CK_OBJECT_HANDLE *found,
                     CK_ULONG max) {
    CK_ULONG n = 0;
    if (doctor_p11->C_FindObjectsInit(session, template, count) != CKR_OK) return 0;
    if (doctor_p11->C_FindObjects(session, found, max, &n) != CKR_OK) n = 0;
    doctor_p11->C_FindObjectsFinal(session);
    return n;
}

// Builds a search template: class, then the label and ID the options name, then CKA_SIGN.
static CK_ULONG key_template(CK_ATTRIBUTE *t, CK_OBJECT_CLASS *key_class, const char *label, const unsigned char *id,
                             CK_ULONG id_length, CK_BBOOL *sign) {
    CK_ULONG n = 0;
    t[n++] = (CK_ATTRIBUTE){ CKA_CLASS, key_class, sizeof *key_class };
    if (label) t[n++] = (CK_ATTRIBUTE){ CKA_LABEL, (void *)label, strlen(label) };
    if (id) t[n++] = (CK_ATTRIBUTE){ CKA_ID, (void *)id, id_length };
    if (sign) t[n++] = (CK_ATTRIBUTE){ CKA_SIGN, sign, sizeof *sign };
    return n;
}

static int choose_key(char *problem, size_t size) {
    CK_OBJECT_CLASS classes[2];
    int class_count = 0;
    if (doctor_opts->key_class != DOCTOR_KEY_SECRET) classes[class_count++] = CKO_PRIVATE_KEY;
    if (doctor_opts->key_class != DOCTOR_KEY_PRIVATE) classes[class_count++] = CKO_SECRET_KEY;
    int named = doctor_opts->key_label || doctor_opts->key_id;
    CK_BBOOL yes = CK_TRUE;
    for (int c = 0; c < class_count; c++) {
        CK_ATTRIBUTE t[4];
        CK_ULONG n = key_template(t, &classes[c], doctor_opts->key_label, doctor_opts->key_id, doctor_opts->key_id_length,
                                  named ? NULL : &yes);
        CK_OBJECT_HANDLE found[32];
        CK_ULONG count = find(doctor_session, t, n, found, 32);
        for (CK_ULONG i = 0; i < count; i++) {
            int sign = read_key(doctor_session, found[i], &doctor_signing_key);
            int usable = sign && can_sign_type(doctor_signing_key.key_class, doctor_signing_key.type);
            if (usable) return 1;
            if (named) {
                snprintf(problem, size, "key-unusable the key named (class %s, type %s) %s", classes[c] == CKO_PRIVATE_KEY ? "private" : "secret",
                         type_name(doctor_signing_key.key_class, doctor_signing_key.type),
                         sign ? "is of a type the doctor cannot sign with (RSA, EC, EdDSA, HMAC or AES-CMAC keys)" : "cannot sign (CKA_SIGN is false)");
                return 0;
            }
        }
    }
    if (named) {
        char id[80], label[200] = "";
        hex_string(id, sizeof id, doctor_opts->key_id ? doctor_opts->key_id : (const unsigned char *)"", doctor_opts->key_id_length);
        if (doctor_opts->key_label) snprintf(label, sizeof label, " labelled \"%s\"", doctor_opts->key_label);
        snprintf(problem, size, "key-missing no private or secret key%s%s%s on the token", label, doctor_opts->key_id ? " with ID " : "",
                 doctor_opts->key_id ? id : "");
    } else {
        snprintf(problem, size, "key-missing no private or secret key on the token can sign");
    }
    return 0;
}

CK_RV doctor_refind_key(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE *key) {
    const doctor_key *k = &doctor_signing_key;
    CK_OBJECT_CLASS key_class = k->key_class;
    CK_ATTRIBUTE t[4];
    CK_ULONG n = key_template(t, &key_class, k->label[0] ? k->label : NULL, k->id_length ? k->id : NULL, k->id_length, NULL);
    CK_OBJECT_HANDLE found[2];
    CK_RV rv = doctor_p11->C_FindObjectsInit(session, t, n);
    if (rv != CKR_OK) return rv;
    CK_ULONG count = 0;
    rv = doctor_p11->C_FindObjects(session, found, 2, &count);
    doctor_p11->C_FindObjectsFinal(session);
    if (rv == CKR_OK && count == 0) rv = CKR_KEY_HANDLE_INVALID;
    if (rv == CKR_OK) *key = found[0];
    return rv;
}

// The signing mechanisms this key and module allow, and how signatures are checked.
static void choose_mechanisms(doctor_key *k) {
    k->sign_mechanism = k->multipart_mechanism = 0;
    switch (k->type) {
    case CKK_RSA:
        k->deterministic = 1;
        if (doctor_has_mechanism(CKM_SHA256_RSA_PKCS, CKF_SIGN)) k->sign_mechanism = k->multipart_mechanism = CKM_SHA256_RSA_PKCS;
        else if (doctor_has_mechanism(CKM_RSA_PKCS, CKF_SIGN)) k->sign_mechanism = CKM_RSA_PKCS;
        break;
    case CKK_EC:
        k->deterministic = 0;
        if (doctor_has_mechanism(CKM_ECDSA_SHA256, CKF_SIGN)) k->multipart_mechanism = CKM_ECDSA_SHA256;
        k->sign_mechanism = doctor_has_mechanism(CKM_ECDSA, CKF_SIGN) ? CKM_ECDSA : k->multipart_mechanism;
        break;
    case CKK_EC_EDWARDS:
        k->deterministic = 1;
        if (doctor_has_mechanism(CKM_EDDSA, CKF_SIGN)) k->sign_mechanism = CKM_EDDSA;
        break;
    case CKK_AES:
        k->deterministic = 1;
        if (doctor_has_mechanism(CKM_AES_CMAC, CKF_SIGN)) k->sign_mechanism = k->multipart_mechanism = CKM_AES_CMAC;
        break;
    default:
        k->deterministic = 1;
        if (doctor_has_mechanism(CKM_SHA256_HMAC, CKF_SIGN)) k->sign_mechanism = k->multipart_mechanism = CKM_SHA256_HMAC;
        else if (doctor_has_mechanism(CKM_SHA_1_HMAC, CKF_SIGN)) k->sign_mechanism = k->multipart_mechanism = CKM_SHA_1_HMAC;
        break;
    }
}

// For non-deterministic signatures: the public key with the private key's ID, else its label.
static void find_verifier(doctor_key *k) {
    k->verifier = CK_INVALID_HANDLE;
    if (k->deterministic || k->key_class != CKO_PRIVATE_KEY) return;
    CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY;
    CK_ATTRIBUTE t[4];
    CK_ULONG n = k->id_length ? key_template(t, &public_class, NULL, k->id, k->id_length, NULL)
                              : key_template(t, &public_class, k->label[0] ? k->label : NULL, NULL, 0, NULL);
    if (n < 2) return;
    CK_OBJECT_HANDLE found[1];
    if (find(doctor_session, t, n, found, 1) == 1) k->verifier = found[0];
}

// MARK: signing

CK_RV doctor_sign(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key, CK_MECHANISM_TYPE mechanism, const unsigned char *data,
                  CK_ULONG length, unsigned char *signature, CK_ULONG *signature_length, const char **step) {
    CK_MECHANISM m = { mechanism, NULL, 0 };
    *step = "C_SignInit";
    CK_RV rv = doctor_p11->C_SignInit(session, &m, key);
    if (rv != CKR_OK) return rv;
    *step = "C_Sign";
    *signature_length = DOCTOR_MAX_SIGNATURE;
    return doctor_p11->C_Sign(session, (CK_BYTE_PTR)data, length, signature, signature_length);
}

CK_RV doctor_check_signature(const unsigned char *signature, CK_ULONG length) {
    const doctor_key *k = &doctor_signing_key;
    if (k->deterministic) {
        int same = length == k->reference_length && memcmp(signature, k->reference, length) == 0;
        return same ? CKR_OK : CKR_SIGNATURE_INVALID;
    }
    if (k->verifier == CK_INVALID_HANDLE) return CKR_OK;
    CK_MECHANISM m = { k->sign_mechanism, NULL, 0 };
    CK_RV rv = doctor_p11->C_VerifyInit(doctor_session, &m, k->verifier);
    if (rv != CKR_OK) return rv;
    return doctor_p11->C_Verify(doctor_session, (CK_BYTE_PTR)doctor_message, 32, (CK_BYTE_PTR)signature, length);
}

const char *doctor_check_description(void) {
    if (doctor_signing_key.deterministic) return "equal to the parent's";
    if (doctor_signing_key.verifier != CK_INVALID_HANDLE) return "verified with the public key";
    return "not verified: no public key with the key's ID or label";
}

// MARK: the helper's main

static int read_pin(int fd) {
    pin_length = 0;
    for (;;) {
        ssize_t n = read(fd, pin + pin_length, sizeof pin - pin_length);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        pin_length += (CK_ULONG)n;
        if (pin_length == sizeof pin) return 0;
    }
    return 1;
}

static int probe(void) {
    const doctor_key *k = &doctor_signing_key;
    CK_TOKEN_INFO info;
    char text[160];
    if (doctor_p11->C_GetTokenInfo(doctor_slot, &info) == CKR_OK) {
        printable(text, sizeof text, info.label, sizeof info.label);
        doctor_say("token: %s", text);
        printable(text, sizeof text, info.serialNumber, sizeof info.serialNumber);
        doctor_say("token-serial: %s", text);
        printable(text, sizeof text, info.manufacturerID, sizeof info.manufacturerID);
        doctor_say("token-manufacturer: %s", text);
    }
    doctor_say("key-class: %s", k->key_class == CKO_PRIVATE_KEY ? "private" : "secret");
    doctor_say("key-type: %s", type_name(k->key_class, k->type));
    doctor_say("key-label: %s", k->label);
    hex_string(text, sizeof text, k->id, k->id_length);
    doctor_say("key-id: %s", text);
    doctor_say("mechanism: %s", doctor_mechanism_name(k->sign_mechanism));
    doctor_say("multipart-mechanism: %s", k->multipart_mechanism ? doctor_mechanism_name(k->multipart_mechanism) : "");
    doctor_say("check: %s", doctor_check_description());
    return doctor_result(DOCTOR_OK, "the module loads, the token is there, the PIN is accepted and the key signs");
}

int doctor_run(const doctor_options *options, const char *scenario, int pin_fd) {
    doctor_opts = options;
    // The tool's runtime catches crashes to print a backtrace; here a crash must look like one.
    static const int crashes[] = { SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP };
    for (size_t i = 0; i < sizeof crashes / sizeof crashes[0]; i++) signal(crashes[i], SIG_DFL);
    // The whole helper is bounded too: every child has its own alarm, this covers the parent.
    alarm((unsigned)(options->child_timeout * 3 + 10));
    if (!read_pin(pin_fd)) return doctor_result(DOCTOR_ERROR, "usage the PIN is longer than %zu bytes", sizeof pin - 1);

    void *library = dlopen(options->module, RTLD_NOW | RTLD_LOCAL);
    if (!library) return doctor_result(DOCTOR_ERROR, "module cannot load it: %s", dlerror());
    CK_C_GetFunctionList get_list = (CK_C_GetFunctionList)dlsym(library, "C_GetFunctionList");
    if (!get_list) return doctor_result(DOCTOR_ERROR, "module it has no C_GetFunctionList: not a PKCS#11 module");
    CK_RV rv = get_list(&doctor_p11);
    if (rv != CKR_OK || !doctor_p11) return doctor_result(DOCTOR_ERROR, "module C_GetFunctionList answered %s", tool_rv_name(rv));
    CK_C_INITIALIZE_ARGS init = { .flags = CKF_OS_LOCKING_OK };
    if ((rv = doctor_p11->C_Initialize(&init)) != CKR_OK)
        return doctor_result(DOCTOR_ERROR, "initialize C_Initialize answered %s", tool_rv_name(rv));

    char problem[600];
    if (doctor_find_token(&doctor_slot, problem, sizeof problem) != CKR_OK) return doctor_result(DOCTOR_ERROR, "%s", problem);
    // A read-only session: nothing the doctor does can write to the token.
    if ((rv = doctor_p11->C_OpenSession(doctor_slot, CKF_SERIAL_SESSION, NULL, NULL, &doctor_session)) != CKR_OK)
        return doctor_result(DOCTOR_ERROR, "session C_OpenSession answered %s", tool_rv_name(rv));
    if ((rv = doctor_login(doctor_session)) != CKR_OK)
        return doctor_result(DOCTOR_ERROR, "login C_Login answered %s", tool_rv_name(rv));
    if (!choose_key(problem, sizeof problem)) return doctor_result(DOCTOR_ERROR, "%s", problem);
    doctor_key *k = &doctor_signing_key;
    choose_mechanisms(k);
    if (!k->sign_mechanism)
        return doctor_result(DOCTOR_ERROR, "key-unusable the module offers no signing mechanism the doctor knows for this %s key",
                             type_name(k->key_class, k->type));
    find_verifier(k);
    const char *step;
    if ((rv = doctor_sign(doctor_session, k->handle, k->sign_mechanism, doctor_message, 32, k->reference, &k->reference_length,
                          &step)) != CKR_OK)
        return doctor_result(DOCTOR_ERROR, "sign %s with %s answered %s", step, doctor_mechanism_name(k->sign_mechanism), tool_rv_name(rv));
    if (!k->deterministic && (rv = doctor_check_signature(k->reference, k->reference_length)) != CKR_OK)
        return doctor_result(DOCTOR_ERROR, "sign the key's own signature does not verify with its public key: %s", tool_rv_name(rv));

    int status = !strcmp(scenario, "probe") ? probe() : doctor_run_fork_scenario(scenario);
    doctor_p11->C_Finalize(NULL);
    return status;
}
