#include "tool_support.h"
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

const char *tool_rv_name(CK_RV rv) {
    switch (rv) {
#define N(x) case x: return #x;
        N(CKR_OK) N(CKR_CANCEL) N(CKR_HOST_MEMORY) N(CKR_SLOT_ID_INVALID) N(CKR_GENERAL_ERROR)
        N(CKR_FUNCTION_FAILED) N(CKR_ARGUMENTS_BAD) N(CKR_NO_EVENT) N(CKR_NEED_TO_CREATE_THREADS)
        N(CKR_CANT_LOCK) N(CKR_ATTRIBUTE_READ_ONLY) N(CKR_ATTRIBUTE_SENSITIVE)
        N(CKR_ATTRIBUTE_TYPE_INVALID) N(CKR_ATTRIBUTE_VALUE_INVALID) N(CKR_ACTION_PROHIBITED)
        N(CKR_DATA_INVALID) N(CKR_DATA_LEN_RANGE) N(CKR_DEVICE_ERROR) N(CKR_DEVICE_MEMORY)
        N(CKR_DEVICE_REMOVED) N(CKR_ENCRYPTED_DATA_INVALID) N(CKR_ENCRYPTED_DATA_LEN_RANGE)
        N(CKR_FUNCTION_CANCELED) N(CKR_FUNCTION_NOT_PARALLEL) N(CKR_FUNCTION_NOT_SUPPORTED)
        N(CKR_KEY_HANDLE_INVALID) N(CKR_KEY_SIZE_RANGE) N(CKR_KEY_TYPE_INCONSISTENT) N(CKR_KEY_NOT_NEEDED)
        N(CKR_KEY_CHANGED) N(CKR_KEY_NEEDED) N(CKR_KEY_INDIGESTIBLE) N(CKR_KEY_FUNCTION_NOT_PERMITTED)
        N(CKR_KEY_NOT_WRAPPABLE) N(CKR_KEY_UNEXTRACTABLE) N(CKR_MECHANISM_INVALID)
        N(CKR_MECHANISM_PARAM_INVALID) N(CKR_OBJECT_HANDLE_INVALID) N(CKR_OPERATION_ACTIVE)
        N(CKR_OPERATION_NOT_INITIALIZED) N(CKR_PIN_INCORRECT) N(CKR_PIN_INVALID) N(CKR_PIN_LEN_RANGE)
        N(CKR_PIN_EXPIRED) N(CKR_PIN_LOCKED) N(CKR_SESSION_CLOSED) N(CKR_SESSION_COUNT)
        N(CKR_SESSION_HANDLE_INVALID) N(CKR_SESSION_PARALLEL_NOT_SUPPORTED) N(CKR_SESSION_READ_ONLY)
        N(CKR_SESSION_EXISTS) N(CKR_SESSION_READ_ONLY_EXISTS) N(CKR_SESSION_READ_WRITE_SO_EXISTS)
        N(CKR_SIGNATURE_INVALID) N(CKR_SIGNATURE_LEN_RANGE) N(CKR_TEMPLATE_INCOMPLETE)
        N(CKR_TEMPLATE_INCONSISTENT) N(CKR_TOKEN_NOT_PRESENT) N(CKR_TOKEN_NOT_RECOGNIZED)
        N(CKR_TOKEN_WRITE_PROTECTED) N(CKR_UNWRAPPING_KEY_HANDLE_INVALID) N(CKR_UNWRAPPING_KEY_SIZE_RANGE)
        N(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT) N(CKR_USER_ALREADY_LOGGED_IN) N(CKR_USER_NOT_LOGGED_IN)
        N(CKR_USER_PIN_NOT_INITIALIZED) N(CKR_USER_TYPE_INVALID) N(CKR_USER_ANOTHER_ALREADY_LOGGED_IN)
        N(CKR_USER_TOO_MANY_TYPES) N(CKR_WRAPPED_KEY_INVALID) N(CKR_WRAPPED_KEY_LEN_RANGE)
        N(CKR_WRAPPING_KEY_HANDLE_INVALID) N(CKR_WRAPPING_KEY_SIZE_RANGE)
        N(CKR_WRAPPING_KEY_TYPE_INCONSISTENT) N(CKR_RANDOM_SEED_NOT_SUPPORTED) N(CKR_RANDOM_NO_RNG)
        N(CKR_DOMAIN_PARAMS_INVALID) N(CKR_CURVE_NOT_SUPPORTED) N(CKR_BUFFER_TOO_SMALL)
        N(CKR_SAVED_STATE_INVALID) N(CKR_INFORMATION_SENSITIVE) N(CKR_STATE_UNSAVEABLE)
        N(CKR_CRYPTOKI_NOT_INITIALIZED) N(CKR_CRYPTOKI_ALREADY_INITIALIZED) N(CKR_MUTEX_BAD)
        N(CKR_MUTEX_NOT_LOCKED) N(CKR_FUNCTION_REJECTED)
#undef N
    }
    // A few buffers per thread, so that one line may name several unknown codes.
    static __thread char hex[4][24];
    static __thread unsigned next;
    char *out = hex[next++ % 4];
    snprintf(out, sizeof hex[0], "0x%lx", rv);
    return out;
}

static void write_line(const char *prefix, const char *format, va_list args) {
    char line[512];
    size_t start = strlen(prefix);
    memcpy(line, prefix, start);
    vsnprintf(line + start, sizeof line - start - 1, format, args);
    size_t n = strlen(line);
    line[n] = '\n';
    (void)!write(1, line, n + 1);
}

void tool_say(const char *format, ...) {
    va_list args;
    va_start(args, format);
    write_line("", format, args);
    va_end(args);
}

int tool_fail(const char *format, ...) {
    va_list args;
    va_start(args, format);
    write_line("result: fail ", format, args);
    va_end(args);
    return 1;
}

CK_RV tool_find_slot(CK_FUNCTION_LIST_PTR p11, const char *label, CK_SLOT_ID *out) {
    CK_SLOT_ID slots[32];
    CK_ULONG count = 32;
    CK_RV rv = p11->C_GetSlotList(CK_TRUE, slots, &count);
    if (rv != CKR_OK) return rv;
    size_t n = strlen(label);
    for (CK_ULONG i = 0; i < count && n <= 32; i++) {
        CK_TOKEN_INFO info;
        if (p11->C_GetTokenInfo(slots[i], &info) != CKR_OK || memcmp(info.label, label, n)) continue;
        int padded = 1;
        for (size_t j = n; j < 32; j++) padded &= info.label[j] == ' ';
        if (padded) { *out = slots[i]; return CKR_OK; }
    }
    return CKR_TOKEN_NOT_PRESENT;
}

CK_RV tool_find_objects(CK_FUNCTION_LIST_PTR p11, CK_SESSION_HANDLE session, CK_OBJECT_CLASS class,
                        const char *label, CK_OBJECT_HANDLE *found, CK_ULONG max, CK_ULONG *count) {
    CK_ATTRIBUTE template[] = { { CKA_CLASS, &class, sizeof class }, { CKA_LABEL, (void *)label, strlen(label) } };
    *count = 0;
    CK_RV rv = p11->C_FindObjectsInit(session, template, 2);
    if (rv != CKR_OK) return rv;
    rv = p11->C_FindObjects(session, found, max, count);
    CK_RV final = p11->C_FindObjectsFinal(session);
    if (rv == CKR_OK) rv = final;
    return rv == CKR_OK && *count == 0 ? CKR_OBJECT_HANDLE_INVALID : rv;
}

int tool_read_options(int argc, char **argv, const struct tool_option *options, const char **positional) {
    for (int i = 1; i < argc; i++) {
        const char *argument = argv[i];
        const struct tool_option *option = options;
        while (option->name && strcmp(option->name, argument)) option++;
        if (option->name && option->flag) {
            *option->flag = 1;
        } else if (option->name) {
            if (i + 1 >= argc) return -1;
            const char *value = argv[++i];
            if (option->text) *option->text = value;
            if (option->number) *option->number = atoi(value);
        } else if (argument[0] != '-' && positional && !*positional) {
            *positional = argument;
        } else {
            return -1;
        }
    }
    return 0;
}

CK_FUNCTION_LIST_PTR tool_load_module(const char *path, void **library, const char **problem) {
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        *problem = dlerror();
        return NULL;
    }
    if (library) *library = handle;
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    CK_FUNCTION_LIST_PTR list = NULL;
    if (!get || get(&list) != CKR_OK || !list) {
        *problem = "no usable C_GetFunctionList";
        return NULL;
    }
    return list;
}

int tool_run_child(unsigned seconds, int (*body)(void *), void *context) {
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        alarm(seconds);
        _exit(body(context));
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    return WIFSIGNALED(status) ? TOOL_KILLED + WTERMSIG(status) : WEXITSTATUS(status);
}
