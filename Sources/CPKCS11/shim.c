#define _GNU_SOURCE
#include "CPKCS11.h"
#include <dlfcn.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

long CPKCS11_gettid(void) { return syscall(SYS_gettid); }

void *CPKCS11_dlmopen_new(const char *path, int flags) { return dlmopen(LM_ID_NEWLM, path, flags); }

#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif
#ifndef MADV_DONTDUMP
#define MADV_DONTDUMP 16
#endif
int CPKCS11_madv_wipeonfork(void) { return MADV_WIPEONFORK; }
int CPKCS11_madv_dontdump(void) { return MADV_DONTDUMP; }

const char *CPKCS11_image_path(const void *address) {
    Dl_info info;
    if (dladdr(address, &info) == 0) return NULL;
    return info.dli_fname;
}

#include <link.h>
#include <string.h>

struct CPKCS11_match { const char *needle; int count; };

static int CPKCS11_count_match(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    struct CPKCS11_match *match = data;
    if (info->dlpi_name && strstr(info->dlpi_name, match->needle)) match->count++;
    return 0;
}

int CPKCS11_loaded_count(const char *needle) {
    struct CPKCS11_match match = { needle, 0 };
    dl_iterate_phdr(CPKCS11_count_match, &match);
    return match.count;
}

extern char **environ;
char **CPKCS11_swap_environ(char **replacement) {
    char **previous = environ;
    environ = replacement;
    return previous;
}

// Per-thread set-up of a module copy's own libc (see CPKCS11.h).
__thread unsigned long CPKCS11_thread_copy_generation __attribute__((tls_model("initial-exec")));
unsigned long CPKCS11_copy_generation;
void (*CPKCS11_copy_ctype_init)(void);

void CPKCS11_use_copy(void *ctype_init) {
    CPKCS11_copy_ctype_init = (void (*)(void))ctype_init;
    __atomic_add_fetch(&CPKCS11_copy_generation, 1, __ATOMIC_RELEASE);
}

void CPKCS11_enter_copy_slow(void) {
    if (CPKCS11_copy_ctype_init) CPKCS11_copy_ctype_init();
    CPKCS11_thread_copy_generation = CPKCS11_copy_generation;
}
