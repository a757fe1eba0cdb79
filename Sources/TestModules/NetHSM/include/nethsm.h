// NetHSM test module (libp11fork-test-nethsm.so): a PKCS#11 2.40 module that behaves like the
// client library of a network HSM that knows nothing about fork. Built only for p11fork's tests.
// Its only export is C_GetFunctionList; see Sources/TestModules/NetHSM/README.md.
#include <p11-kit-1/p11-kit/pkcs11.h>
