// PKCS#11 declarations for p11fork: the 2.40 API from p11-kit's header (Debian libp11-kit-dev),
// plus the PKCS#11 3.0 and 3.2 additions, which that header lacks, declared here from the OASIS
// 3.0 and 3.2 specifications (section 5, "Functions"; section 3, "Data types"). Also a few
// helpers that Swift cannot call directly (variadic syscall, GNU-only dlfcn). No logic lives here.
#ifndef CPKCS11_H
#define CPKCS11_H

#include <p11-kit-1/p11-kit/pkcs11.h>
#include <stddef.h>
#include <stdint.h>

// MARK: PKCS#11 3.0 data types

typedef struct CK_INTERFACE {
    CK_UTF8CHAR_PTR pInterfaceName;
    CK_VOID_PTR pFunctionList;
    CK_FLAGS flags;
} CK_INTERFACE;
typedef CK_INTERFACE *CK_INTERFACE_PTR;
typedef CK_INTERFACE **CK_INTERFACE_PTR_PTR;

#define CKF_INTERFACE_FORK_SAFE 0x00000001UL
#define CKF_END_OF_MESSAGE      0x00000001UL

// Flags for C_SessionCancel and CK_MECHANISM_INFO (3.0).
#define CKF_MESSAGE_ENCRYPT 0x00000002UL
#define CKF_MESSAGE_DECRYPT 0x00000004UL
#define CKF_MESSAGE_SIGN    0x00000008UL
#define CKF_MESSAGE_VERIFY  0x00000010UL
#define CKF_MULTI_MESSAGE   0x00000020UL
#define CKF_FIND_OBJECTS    0x00000040UL

// User types and return values added in 3.0.
#ifndef CKR_ACTION_PROHIBITED
#define CKR_ACTION_PROHIBITED 0x0000001BUL
#endif
#define CKR_OPERATION_CANCEL_FAILED 0x00000202UL
#define CKR_TOKEN_RESOURCE_EXCEEDED 0x00000201UL

// MARK: PKCS#11 3.0 functions

typedef CK_RV (*CK_C_GetInterfaceList)(CK_INTERFACE_PTR pInterfacesList, CK_ULONG_PTR pulCount);
typedef CK_RV (*CK_C_GetInterface)(CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION_PTR pVersion,
                                   CK_INTERFACE_PTR_PTR ppInterface, CK_FLAGS flags);
typedef CK_RV (*CK_C_LoginUser)(CK_SESSION_HANDLE hSession, CK_USER_TYPE userType,
                                CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen,
                                CK_UTF8CHAR_PTR pUsername, CK_ULONG ulUsernameLen);
typedef CK_RV (*CK_C_SessionCancel)(CK_SESSION_HANDLE hSession, CK_FLAGS flags);

typedef CK_RV (*CK_C_MessageEncryptInit)(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                         CK_OBJECT_HANDLE hKey);
typedef CK_RV (*CK_C_EncryptMessage)(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter,
                                     CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData,
                                     CK_ULONG ulAssociatedDataLen, CK_BYTE_PTR pPlaintext,
                                     CK_ULONG ulPlaintextLen, CK_BYTE_PTR pCiphertext,
                                     CK_ULONG_PTR pulCiphertextLen);
typedef CK_RV (*CK_C_EncryptMessageBegin)(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter,
                                          CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData,
                                          CK_ULONG ulAssociatedDataLen);
typedef CK_RV (*CK_C_EncryptMessageNext)(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter,
                                         CK_ULONG ulParameterLen, CK_BYTE_PTR pPlaintextPart,
                                         CK_ULONG ulPlaintextPartLen, CK_BYTE_PTR pCiphertextPart,
                                         CK_ULONG_PTR pulCiphertextPartLen, CK_FLAGS flags);
typedef CK_RV (*CK_C_MessageEncryptFinal)(CK_SESSION_HANDLE hSession);

typedef CK_RV (*CK_C_MessageDecryptInit)(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                         CK_OBJECT_HANDLE hKey);
typedef CK_RV (*CK_C_DecryptMessage)(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter,
                                     CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData,
                                     CK_ULONG ulAssociatedDataLen, CK_BYTE_PTR pCiphertext,
                                     CK_ULONG ulCiphertextLen, CK_BYTE_PTR pPlaintext,
                                     CK_ULONG_PTR pulPlaintextLen);
typedef CK_RV (*CK_C_DecryptMessageBegin)(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter,
                                          CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData,
                                          CK_ULONG ulAssociatedDataLen);
typedef CK_RV (*CK_C_DecryptMessageNext)(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter,
                                         CK_ULONG ulParameterLen, CK_BYTE_PTR pCiphertextPart,
                                         CK_ULONG ulCiphertextPartLen, CK_BYTE_PTR pPlaintextPart,
                                         CK_ULONG_PTR pulPlaintextPartLen, CK_FLAGS flags);
typedef CK_RV (*CK_C_MessageDecryptFinal)(CK_SESSION_HANDLE hSession);

typedef CK_RV (*CK_C_MessageSignInit)(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                      CK_OBJECT_HANDLE hKey);
typedef CK_RV (*CK_C_SignMessage)(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter,
                                  CK_ULONG ulParameterLen, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                                  CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen);
typedef CK_RV (*CK_C_SignMessageBegin)(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter,
                                       CK_ULONG ulParameterLen);
typedef CK_RV (*CK_C_SignMessageNext)(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter,
                                      CK_ULONG ulParameterLen, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                                      CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen);
typedef CK_RV (*CK_C_MessageSignFinal)(CK_SESSION_HANDLE hSession);

typedef CK_RV (*CK_C_MessageVerifyInit)(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                        CK_OBJECT_HANDLE hKey);
typedef CK_RV (*CK_C_VerifyMessage)(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter,
                                    CK_ULONG ulParameterLen, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                                    CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen);
typedef CK_RV (*CK_C_VerifyMessageBegin)(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter,
                                         CK_ULONG ulParameterLen);
typedef CK_RV (*CK_C_VerifyMessageNext)(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter,
                                        CK_ULONG ulParameterLen, CK_BYTE_PTR pData,
                                        CK_ULONG ulDataLen, CK_BYTE_PTR pSignature,
                                        CK_ULONG ulSignatureLen);
typedef CK_RV (*CK_C_MessageVerifyFinal)(CK_SESSION_HANDLE hSession);

// The entries of the 3.0 function list: the 2.40 list, in the same order, followed by the 3.0
// functions. The 3.2 list (below) begins with the same entries.
#define CPKCS11_FUNCTION_LIST_3_0_ENTRIES \
    CK_VERSION version; \
    CK_C_Initialize C_Initialize; \
    CK_C_Finalize C_Finalize; \
    CK_C_GetInfo C_GetInfo; \
    CK_C_GetFunctionList C_GetFunctionList; \
    CK_C_GetSlotList C_GetSlotList; \
    CK_C_GetSlotInfo C_GetSlotInfo; \
    CK_C_GetTokenInfo C_GetTokenInfo; \
    CK_C_GetMechanismList C_GetMechanismList; \
    CK_C_GetMechanismInfo C_GetMechanismInfo; \
    CK_C_InitToken C_InitToken; \
    CK_C_InitPIN C_InitPIN; \
    CK_C_SetPIN C_SetPIN; \
    CK_C_OpenSession C_OpenSession; \
    CK_C_CloseSession C_CloseSession; \
    CK_C_CloseAllSessions C_CloseAllSessions; \
    CK_C_GetSessionInfo C_GetSessionInfo; \
    CK_C_GetOperationState C_GetOperationState; \
    CK_C_SetOperationState C_SetOperationState; \
    CK_C_Login C_Login; \
    CK_C_Logout C_Logout; \
    CK_C_CreateObject C_CreateObject; \
    CK_C_CopyObject C_CopyObject; \
    CK_C_DestroyObject C_DestroyObject; \
    CK_C_GetObjectSize C_GetObjectSize; \
    CK_C_GetAttributeValue C_GetAttributeValue; \
    CK_C_SetAttributeValue C_SetAttributeValue; \
    CK_C_FindObjectsInit C_FindObjectsInit; \
    CK_C_FindObjects C_FindObjects; \
    CK_C_FindObjectsFinal C_FindObjectsFinal; \
    CK_C_EncryptInit C_EncryptInit; \
    CK_C_Encrypt C_Encrypt; \
    CK_C_EncryptUpdate C_EncryptUpdate; \
    CK_C_EncryptFinal C_EncryptFinal; \
    CK_C_DecryptInit C_DecryptInit; \
    CK_C_Decrypt C_Decrypt; \
    CK_C_DecryptUpdate C_DecryptUpdate; \
    CK_C_DecryptFinal C_DecryptFinal; \
    CK_C_DigestInit C_DigestInit; \
    CK_C_Digest C_Digest; \
    CK_C_DigestUpdate C_DigestUpdate; \
    CK_C_DigestKey C_DigestKey; \
    CK_C_DigestFinal C_DigestFinal; \
    CK_C_SignInit C_SignInit; \
    CK_C_Sign C_Sign; \
    CK_C_SignUpdate C_SignUpdate; \
    CK_C_SignFinal C_SignFinal; \
    CK_C_SignRecoverInit C_SignRecoverInit; \
    CK_C_SignRecover C_SignRecover; \
    CK_C_VerifyInit C_VerifyInit; \
    CK_C_Verify C_Verify; \
    CK_C_VerifyUpdate C_VerifyUpdate; \
    CK_C_VerifyFinal C_VerifyFinal; \
    CK_C_VerifyRecoverInit C_VerifyRecoverInit; \
    CK_C_VerifyRecover C_VerifyRecover; \
    CK_C_DigestEncryptUpdate C_DigestEncryptUpdate; \
    CK_C_DecryptDigestUpdate C_DecryptDigestUpdate; \
    CK_C_SignEncryptUpdate C_SignEncryptUpdate; \
    CK_C_DecryptVerifyUpdate C_DecryptVerifyUpdate; \
    CK_C_GenerateKey C_GenerateKey; \
    CK_C_GenerateKeyPair C_GenerateKeyPair; \
    CK_C_WrapKey C_WrapKey; \
    CK_C_UnwrapKey C_UnwrapKey; \
    CK_C_DeriveKey C_DeriveKey; \
    CK_C_SeedRandom C_SeedRandom; \
    CK_C_GenerateRandom C_GenerateRandom; \
    CK_C_GetFunctionStatus C_GetFunctionStatus; \
    CK_C_CancelFunction C_CancelFunction; \
    CK_C_WaitForSlotEvent C_WaitForSlotEvent; \
    CK_C_GetInterfaceList C_GetInterfaceList; \
    CK_C_GetInterface C_GetInterface; \
    CK_C_LoginUser C_LoginUser; \
    CK_C_SessionCancel C_SessionCancel; \
    CK_C_MessageEncryptInit C_MessageEncryptInit; \
    CK_C_EncryptMessage C_EncryptMessage; \
    CK_C_EncryptMessageBegin C_EncryptMessageBegin; \
    CK_C_EncryptMessageNext C_EncryptMessageNext; \
    CK_C_MessageEncryptFinal C_MessageEncryptFinal; \
    CK_C_MessageDecryptInit C_MessageDecryptInit; \
    CK_C_DecryptMessage C_DecryptMessage; \
    CK_C_DecryptMessageBegin C_DecryptMessageBegin; \
    CK_C_DecryptMessageNext C_DecryptMessageNext; \
    CK_C_MessageDecryptFinal C_MessageDecryptFinal; \
    CK_C_MessageSignInit C_MessageSignInit; \
    CK_C_SignMessage C_SignMessage; \
    CK_C_SignMessageBegin C_SignMessageBegin; \
    CK_C_SignMessageNext C_SignMessageNext; \
    CK_C_MessageSignFinal C_MessageSignFinal; \
    CK_C_MessageVerifyInit C_MessageVerifyInit; \
    CK_C_VerifyMessage C_VerifyMessage; \
    CK_C_VerifyMessageBegin C_VerifyMessageBegin; \
    CK_C_VerifyMessageNext C_VerifyMessageNext; \
    CK_C_MessageVerifyFinal C_MessageVerifyFinal;

typedef struct CK_FUNCTION_LIST_3_0 {
    CPKCS11_FUNCTION_LIST_3_0_ENTRIES
} CK_FUNCTION_LIST_3_0;
typedef CK_FUNCTION_LIST_3_0 *CK_FUNCTION_LIST_3_0_PTR;

// MARK: PKCS#11 3.2 data types and constants

// Return values added in 3.1/3.2.
#define CKR_KEY_EXHAUSTED               0x00000203UL
#define CKR_PENDING                     0x00000204UL
#define CKR_SESSION_ASYNC_NOT_SUPPORTED 0x00000205UL
#define CKR_SEED_RANDOM_REQUIRED        0x00000206UL
#define CKR_OPERATION_NOT_VALIDATED     0x00000207UL
#define CKR_TOKEN_NOT_INITIALIZED       0x00000208UL
#define CKR_PARAMETER_SET_NOT_SUPPORTED 0x00000209UL

// Session flag (C_OpenSession, CK_SESSION_INFO) and token flags (CK_TOKEN_INFO).
#define CKF_ASYNC_SESSION           0x00000008UL
#define CKF_SEED_RANDOM_REQUIRED    0x02000000UL
#define CKF_ASYNC_SESSION_SUPPORTED 0x04000000UL
// Mechanism flags (CK_MECHANISM_INFO) for C_EncapsulateKey / C_DecapsulateKey.
#define CKF_ENCAPSULATE 0x10000000UL
#define CKF_DECAPSULATE 0x20000000UL

// C_GetSessionValidationFlags: the kind of flags asked for, and its one flag.
typedef CK_ULONG CK_SESSION_VALIDATION_FLAGS_TYPE;
#define CKS_LAST_VALIDATION_OK 0x00000001UL

// Key attributes for key encapsulation, and the parameter set of a post-quantum key.
#define CKA_PARAMETER_SET        0x0000061DUL
#define CKA_ENCAPSULATE_TEMPLATE 0x0000062AUL
#define CKA_DECAPSULATE_TEMPLATE 0x0000062BUL
#define CKA_ENCAPSULATE          0x00000633UL
#define CKA_DECAPSULATE          0x00000634UL

// Post-quantum key types, mechanisms and parameter sets (ML-KEM: FIPS 203, ML-DSA: FIPS 204,
// SLH-DSA: FIPS 205).
#define CKK_ML_KEM  0x00000049UL
#define CKK_ML_DSA  0x0000004AUL
#define CKK_SLH_DSA 0x0000004BUL
#define CKM_ML_KEM_KEY_PAIR_GEN  0x0000000FUL
#define CKM_ML_KEM               0x00000017UL
#define CKM_ML_DSA_KEY_PAIR_GEN  0x0000001CUL
#define CKM_ML_DSA               0x0000001DUL
#define CKM_HASH_ML_DSA          0x0000001FUL
#define CKM_SLH_DSA_KEY_PAIR_GEN 0x0000002DUL
#define CKM_SLH_DSA              0x0000002EUL
#define CKM_HASH_SLH_DSA         0x00000034UL
typedef CK_ULONG CK_ML_KEM_PARAMETER_SET_TYPE;
typedef CK_ULONG CK_ML_DSA_PARAMETER_SET_TYPE;
#define CKP_ML_KEM_512  0x00000001UL
#define CKP_ML_KEM_768  0x00000002UL
#define CKP_ML_KEM_1024 0x00000003UL
#define CKP_ML_DSA_44   0x00000001UL
#define CKP_ML_DSA_65   0x00000002UL
#define CKP_ML_DSA_87   0x00000003UL

// The result of an asynchronous function (C_AsyncComplete).
typedef struct CK_ASYNC_DATA {
    CK_ULONG ulVersion;
    CK_BYTE_PTR pValue;
    CK_ULONG ulValue;
    CK_OBJECT_HANDLE hObject;
    CK_OBJECT_HANDLE hAdditionalObject;
} CK_ASYNC_DATA;
typedef CK_ASYNC_DATA *CK_ASYNC_DATA_PTR;

// MARK: PKCS#11 3.2 functions

typedef CK_RV (*CK_C_EncapsulateKey)(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                     CK_OBJECT_HANDLE hPublicKey, CK_ATTRIBUTE_PTR pTemplate,
                                     CK_ULONG ulAttributeCount, CK_BYTE_PTR pCiphertext,
                                     CK_ULONG_PTR pulCiphertextLen, CK_OBJECT_HANDLE_PTR phKey);
typedef CK_RV (*CK_C_DecapsulateKey)(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                     CK_OBJECT_HANDLE hPrivateKey, CK_ATTRIBUTE_PTR pTemplate,
                                     CK_ULONG ulAttributeCount, CK_BYTE_PTR pCiphertext,
                                     CK_ULONG ulCiphertextLen, CK_OBJECT_HANDLE_PTR phKey);
typedef CK_RV (*CK_C_VerifySignatureInit)(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                          CK_OBJECT_HANDLE hKey, CK_BYTE_PTR pSignature,
                                          CK_ULONG ulSignatureLen);
typedef CK_RV (*CK_C_VerifySignature)(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen);
typedef CK_RV (*CK_C_VerifySignatureUpdate)(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen);
typedef CK_RV (*CK_C_VerifySignatureFinal)(CK_SESSION_HANDLE hSession);
typedef CK_RV (*CK_C_GetSessionValidationFlags)(CK_SESSION_HANDLE hSession,
                                                CK_SESSION_VALIDATION_FLAGS_TYPE type, CK_FLAGS *pFlags);
typedef CK_RV (*CK_C_AsyncComplete)(CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pFunctionName,
                                    CK_ASYNC_DATA_PTR pResult);
typedef CK_RV (*CK_C_AsyncGetID)(CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pFunctionName, CK_ULONG_PTR pulID);
typedef CK_RV (*CK_C_AsyncJoin)(CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pFunctionName, CK_ULONG ulID,
                                CK_BYTE_PTR pData, CK_ULONG ulData);
typedef CK_RV (*CK_C_WrapKeyAuthenticated)(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                           CK_OBJECT_HANDLE hWrappingKey, CK_OBJECT_HANDLE hKey,
                                           CK_BYTE_PTR pAssociatedData, CK_ULONG ulAssociatedDataLen,
                                           CK_BYTE_PTR pWrappedKey, CK_ULONG_PTR pulWrappedKeyLen);
typedef CK_RV (*CK_C_UnwrapKeyAuthenticated)(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                             CK_OBJECT_HANDLE hUnwrappingKey, CK_BYTE_PTR pWrappedKey,
                                             CK_ULONG ulWrappedKeyLen, CK_ATTRIBUTE_PTR pTemplate,
                                             CK_ULONG ulAttributeCount, CK_BYTE_PTR pAssociatedData,
                                             CK_ULONG ulAssociatedDataLen, CK_OBJECT_HANDLE_PTR phKey);

// The 3.2 function list: the 3.0 list, in the same order, followed by the 3.2 functions.
typedef struct CK_FUNCTION_LIST_3_2 {
    CPKCS11_FUNCTION_LIST_3_0_ENTRIES
    CK_C_EncapsulateKey C_EncapsulateKey;
    CK_C_DecapsulateKey C_DecapsulateKey;
    CK_C_VerifySignatureInit C_VerifySignatureInit;
    CK_C_VerifySignature C_VerifySignature;
    CK_C_VerifySignatureUpdate C_VerifySignatureUpdate;
    CK_C_VerifySignatureFinal C_VerifySignatureFinal;
    CK_C_GetSessionValidationFlags C_GetSessionValidationFlags;
    CK_C_AsyncComplete C_AsyncComplete;
    CK_C_AsyncGetID C_AsyncGetID;
    CK_C_AsyncJoin C_AsyncJoin;
    CK_C_WrapKeyAuthenticated C_WrapKeyAuthenticated;
    CK_C_UnwrapKeyAuthenticated C_UnwrapKeyAuthenticated;
} CK_FUNCTION_LIST_3_2;
typedef CK_FUNCTION_LIST_3_2 *CK_FUNCTION_LIST_3_2_PTR;

// MARK: helpers Swift cannot express

/// The calling thread's kernel id (gettid), for trace lines.
long CPKCS11_gettid(void);
/// The same, asked of the kernel once per thread and process: `pid` is the process's current pid
/// (a forked child's thread keeps its parent's thread-local copy, so the pair is checked).
long CPKCS11_cached_tid(long pid);
/// This thread's trace line buffer (4096 bytes, then 256 for TraceLine's header cache), or NULL
/// while it is already in use.
void *CPKCS11_trace_buffer_take(void);
void CPKCS11_trace_buffer_give_back(void);
/// clock_gettime(CLOCK_MONOTONIC) in nanoseconds: in C because Swift guards a frame holding an
/// address-taken timespec with a stack protector (about 15 instructions a reading, two readings
/// a traced call).
uint64_t CPKCS11_monotonic_nanoseconds(void);
/// dlmopen(LM_ID_NEWLM, ...): a private copy of a library in a new link-map namespace.
void *CPKCS11_dlmopen_new(const char *path, int flags);
/// madvise advice values that Swift's Glibc module may not import.
int CPKCS11_madv_wipeonfork(void);
int CPKCS11_madv_dontdump(void);
/// mlock2(MLOCK_ONFAULT): locks the pages present now and those faulted in later, without
/// faulting in (or copying) the rest; -1 where the kernel lacks it.
int CPKCS11_mlock_on_fault(void *address, size_t length);
/// The file name of the loaded image that holds `address` (dladdr), or NULL.
const char *CPKCS11_image_path(const void *address);
/// How many loaded objects (all link-map namespaces) have `needle` in their file name.
int CPKCS11_loaded_count(const char *needle);
/// Replaces the process environment (`environ`), returning the previous one.
char **CPKCS11_swap_environ(char **replacement);
/// getauxval(AT_SECURE): non-zero in a process with rights its user did not give it (setuid,
/// setgid, file capabilities), where glibc's secure_getenv returns NULL.
int CPKCS11_secure_execution(void);
/// In a child served by the broker: p11-kit's client writes to its socket without MSG_NOSIGNAL,
/// so the broker's death would raise SIGPIPE and kill a child that left SIGPIPE at its default.
/// Where it is at the default, a handler ignores the SIGPIPEs raised while `channel` shows the
/// broker gone (setting CPKCS11_broker_gone) and ends the process as the default would otherwise.
void CPKCS11_guard_sigpipe(int channel);
/// Non-zero once the guard has seen the broker gone.
int CPKCS11_broker_gone(void);
/// sendmsg of `bytes` with `fd_count` (1 to 4) descriptors attached (SCM_RIGHTS), MSG_NOSIGNAL.
long CPKCS11_send_with_fds(int socket, const void *bytes, size_t count, const int *fds, int fd_count);

/// The broker's lane (lane.h): makes the shared region, sealed at its size, mapped here and not
/// into forked children; returns its descriptor (close-on-exec) for the broker, or -1 (errno).
int CPKCS11_lane_make(void **region);
/// The region's data part (lane.h: P11FORK_LANE_DATA), and how many bytes it holds.
void *CPKCS11_lane_data(void *region);
unsigned long CPKCS11_lane_capacity(void);
/// One call over the lane: the request of `length` bytes is in place; returns the reply's length,
/// -1 when the broker closed the lane (the call was not made: it may go over the RPC), or -2 when
/// the broker has ended (`channel` shows it gone).
long CPKCS11_lane_call(void *region, unsigned length, int channel);

/// The tree lock: a robust, process-shared mutex in a shared anonymous page, made by a process
/// before its first fork and inherited by all its descendants, which take it around what a real
/// module cannot do in two processes at once (docs/DESIGN.md "Threads and locks").
/// Makes it, once per process tree (0, or an errno value).
int CPKCS11_tree_lock_make(void);
/// Takes it, waiting at most `timeout_ms` (not at all while `given_up_on`, a pid, holds it): 0
/// taken at once, 1 taken after waiting for `*holder`, 2 taken over from `*holder`, which ended
/// holding it; -1 when there is none (this process never made or inherited one), ETIMEDOUT
/// (`*holder` still holds it), EDEADLK (this thread holds it), another errno value. Only 0, 1 and
/// 2 must be followed by CPKCS11_tree_lock_give().
int CPKCS11_tree_lock_take(long timeout_ms, int given_up_on, int *holder);
void CPKCS11_tree_lock_give(void);

/// A module copy loaded with dlmopen runs on its own libc, whose per-thread state (the ctype
/// tables behind isspace() and friends) is set up only in the thread that loaded it: a thread
/// started by the main libc has none, and the copy crashed in isspace(). Before a thread calls
/// into a copy, it runs the copy libc's __ctype_init once. When no copy is in use the check is
/// two loads that compare equal.
extern __thread unsigned long CPKCS11_thread_copy_generation __attribute__((tls_model("initial-exec"), visibility("hidden")));
// Hidden: read with one instruction relative to the code, not through the global offset table.
extern unsigned long CPKCS11_copy_generation __attribute__((visibility("hidden")));
extern void (*CPKCS11_copy_ctype_init)(void);
void CPKCS11_enter_copy_slow(void);
/// Makes a copy current: `ctype_init` is its libc's __ctype_init (or NULL).
void CPKCS11_use_copy(void *ctype_init);
/// True once this process uses a module copy (every thread must then be set up for it).
static inline int CPKCS11_copy_in_use(void) { return CPKCS11_copy_generation != 0; }
static inline void CPKCS11_enter_copy(void) {
    // In a process that never used a copy (every parent) the generation is 0: one load, no TLS.
    if (__builtin_expect(CPKCS11_copy_generation != 0, 0) &&
        __builtin_expect(CPKCS11_thread_copy_generation != CPKCS11_copy_generation, 0)) CPKCS11_enter_copy_slow();
}

#endif
