// Finding 1 of scripts/fuzz.sh (docs/RELIABILITY.md), fixed in commit 99c8776: p11fork lost the
// copy it keeps of the C_Initialize arguments when the application later initialised with NULL.
//
// Sources/P11ForkCore/Loader/Strategies.swift, ModuleRecovery.keepInitArguments: the first
// C_Initialize with arguments allocates a CK_C_INITIALIZE_ARGS (48 bytes); before the fix, a
// later successful C_Initialize(NULL) set the pointer to nil without deallocating it, so each
// "C_Initialize(&args) ... C_Finalize ... C_Initialize(NULL)" cycle lost 48 bytes.
//
//   clang -g -fsanitize=address -fuse-ld=lld -I Sources/CPKCS11/include \
//     Tests/Tools/Fuzz/repro/init_args_leak.c -o /tmp/init_args_leak -ldl
//   SOFTHSM2_CONF=<any SoftHSM configuration> P11FORK_MODULE=/usr/lib/softhsm/libsofthsm2.so \
//     /tmp/init_args_leak .build/debug/libp11fork.so
// Expected: every call CKR_OK and no leak. Before the fix: LeakSanitizer reported "Direct leak of
// 144 byte(s) in 3 object(s)" allocated by swift_slowAlloc in keepInitArguments (three cycles).
// The same as a fuzzer input: scripts/fuzz.sh --repro Tests/Tools/Fuzz/repro/init_args_leak.input
#include "CPKCS11.h"
#include <dlfcn.h>
#include <stdio.h>

int main(int argc, char **argv) {
    void *lib = dlopen(argc > 1 ? argv[1] : ".build/debug/libp11fork.so", RTLD_NOW);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 2; }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    CK_FUNCTION_LIST_PTR f;
    if (get(&f) != CKR_OK) return 2;
    CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
    for (int cycle = 0; cycle < 3; cycle++) {
        CK_RV a = f->C_Initialize(&args), b = f->C_Finalize(NULL);
        CK_RV c = f->C_Initialize(NULL), d = f->C_Finalize(NULL);
        printf("cycle %d: C_Initialize(&args)=0x%lx C_Finalize=0x%lx C_Initialize(NULL)=0x%lx C_Finalize=0x%lx\n", cycle, a, b, c, d);
    }
    // Leaving the library loaded: what LeakSanitizer reports at exit is what p11fork lost.
    return 0;
}
