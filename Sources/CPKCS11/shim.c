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
