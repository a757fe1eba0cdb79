// NetHSM test module (libp11fork-test-nethsm.so): a PKCS#11 3.2 module that behaves like the
// client library of a network HSM that knows nothing about fork. Built only for p11fork's tests.
// It exports C_GetFunctionList, C_GetInterfaceList and C_GetInterface; see
// Tests/Modules/NetHSM/README.md. The 3.2 declarations are p11fork's own (CPKCS11.h).
#include <CPKCS11.h>

// The module's key encapsulation mechanism (README "PKCS#11 3.2"): ECDH on P-256 with an
// ephemeral key; the ciphertext is the ephemeral public point, the secret SHA-256 of the shared x.
#define CKM_NETHSM_ECDH_P256_KEM (CKM_VENDOR_DEFINED | 0x4E480001UL)
