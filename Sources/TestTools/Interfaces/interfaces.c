// p11fork-interfaces: the PKCS#11 3.0 interface calls, and a few 3.0 functions reached through
// a 3.0 function list (message-based AES-GCM encryption, C_SessionCancel), printed as a
// transcript like p11fork-conformance's. Run against NSS's softoken (a 3.0 module) directly and
// through p11fork, the transcripts must match; against a 2.40 module p11fork offers 2.40 only.
//
//   p11fork-interfaces --module PATH [--nss-nodb]
#include <CPKCS11.h>
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int step;
static void line(const char *name, CK_RV rv, const char *format, ...) {
    char details[1024] = "";
    va_list args;
    va_start(args, format);
    vsnprintf(details, sizeof details, format, args);
    va_end(args);
    printf("%02d %s rv=0x%lx%s%s\n", ++step, name, rv, details[0] ? " " : "", details);
}

static const char *hex(const unsigned char *b, CK_ULONG n) {
    static char out[512];
    if (n > 200) n = 200;
    for (CK_ULONG i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", b[i]);
    out[2 * n] = 0;
    return out;
}

// PKCS#11 3.0 section 2.9.5 (AES-GCM message parameters).
typedef struct {
    CK_BYTE_PTR pIv;
    CK_ULONG ulIvLen;
    CK_ULONG ulIvFixedBits;
    CK_ULONG ivGenerator;
    CK_BYTE_PTR pTag;
    CK_ULONG ulTagBits;
} GCM_MESSAGE_PARAMS;

int main(int argc, char **argv) {
    const char *module = NULL;
    int nss = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--module") && i + 1 < argc) module = argv[++i];
        else if (!strcmp(argv[i], "--nss-nodb")) nss = 1;
    }
    if (!module) { fprintf(stderr, "usage: p11fork-interfaces --module PATH [--nss-nodb]\n"); return 2; }
    alarm(60);
    setvbuf(stdout, NULL, _IONBF, 0);
    void *library = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (!library) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    CK_C_GetInterfaceList list = (CK_C_GetInterfaceList)dlsym(library, "C_GetInterfaceList");
    CK_C_GetInterface get = (CK_C_GetInterface)dlsym(library, "C_GetInterface");
    if (!list || !get) { printf("no 3.0 entry points\n"); return 1; }

    // Only the standard "PKCS 11" interfaces are compared: p11fork does not offer a module's
    // vendor interfaces, so the raw counts differ where a module has some.
    CK_ULONG count = 0;
    CK_RV rv = list(NULL, &count);
    line("C_GetInterfaceList(NULL)", rv, "%s", count > 0 ? "some" : "none");
    CK_INTERFACE interfaces[8];
    CK_ULONG none = 0;
    line("C_GetInterfaceList(0 room)", list(interfaces, &none), "%s", "");
    // NSS's softoken crashes on these NULL pointers, so they are asked only of other modules.
    if (!nss) line("C_GetInterfaceList(NULL count)", list(interfaces, NULL), "%s", "");
    count = 8;
    rv = list(interfaces, &count);
    int has30 = 0;
    for (CK_ULONG i = 0; i < count && rv == CKR_OK; i++) {
        CK_VERSION *version = (CK_VERSION *)interfaces[i].pFunctionList;
        if (strcmp((char *)interfaces[i].pInterfaceName, "PKCS 11")) continue;  // vendor interfaces are not compared
        line("interface", rv, "'%s' %d.%d", (char *)interfaces[i].pInterfaceName, version->major, version->minor);
        if (version->major == 3) has30 = 1;
    }
    CK_INTERFACE_PTR chosen = NULL;
    CK_VERSION v30 = { 3, 0 }, v240 = { 2, 40 };
    line("C_GetInterface('PKCS 11', 3.0)", get((CK_UTF8CHAR_PTR)"PKCS 11", &v30, &chosen, 0), "%s", "");
    line("C_GetInterface('PKCS 11', 2.40)", get((CK_UTF8CHAR_PTR)"PKCS 11", &v240, &chosen, 0), "%s", "");
    if (!nss) line("C_GetInterface(NULL, NULL, NULL)", get(NULL, NULL, NULL, 0), "%s", "");
    line("C_GetInterface('Vendor X')", get((CK_UTF8CHAR_PTR)"Vendor X", NULL, &chosen, 0), "%s", "");
    if (!nss) line("C_GetInterface(fork safe)", get(NULL, NULL, &chosen, CKF_INTERFACE_FORK_SAFE), "%s", "");
    rv = get((CK_UTF8CHAR_PTR)"PKCS 11", NULL, &chosen, 0);
    CK_VERSION *version = chosen ? (CK_VERSION *)chosen->pFunctionList : NULL;
    line("C_GetInterface('PKCS 11', any)", rv, "%d.%d", version ? version->major : 0, version ? version->minor : 0);
    if (!has30) return 0;

    // Through the 3.0 list.
    rv = get((CK_UTF8CHAR_PTR)"PKCS 11", &v30, &chosen, 0);
    if (rv != CKR_OK) return 1;
    CK_FUNCTION_LIST_3_0_PTR p = (CK_FUNCTION_LIST_3_0_PTR)chosen->pFunctionList;
    CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
    if (nss) args.pReserved = "configdir='' certPrefix='' keyPrefix='' secmod='' flags=readOnly,noCertDB,noModDB,forceOpen,optimizeSpace";
    line("C_Initialize (3.0 list)", p->C_Initialize(&args), "%s", "");
    CK_SLOT_ID slots[8];
    CK_ULONG n = 8;
    rv = p->C_GetSlotList(CK_FALSE, slots, &n);
    line("C_GetSlotList", rv, "count=%lu", n);
    CK_SESSION_HANDLE s = 0;
    line("C_OpenSession", p->C_OpenSession(slots[0], CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s), "%s", "");

    static const unsigned char value[16] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 };
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_KEY_TYPE aes = CKK_AES;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE t[] = { { CKA_CLASS, &secret, sizeof secret }, { CKA_KEY_TYPE, &aes, sizeof aes }, { CKA_TOKEN, &no, 1 },
                         { CKA_VALUE, (void *)value, 16 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_DECRYPT, &yes, 1 } };
    CK_OBJECT_HANDLE key = 0;
    line("C_CreateObject(AES)", p->C_CreateObject(s, t, 6, &key), "%s", "");

    CK_MECHANISM gcm = { CKM_AES_GCM, NULL, 0 };
    rv = p->C_MessageEncryptInit(s, &gcm, key);
    line("C_MessageEncryptInit", rv, "%s", "");
    if (rv == CKR_OK) {
        unsigned char iv[12] = { 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9 }, tag[16];
        GCM_MESSAGE_PARAMS params = { iv, 12, 0, 0 /* CKG_NO_GENERATE */, tag, 128 };
        unsigned char out[64];
        CK_ULONG out_len = sizeof out;
        static const unsigned char aad[] = "header", text[] = "message-based encryption";
        rv = p->C_EncryptMessage(s, &params, sizeof params, (CK_BYTE_PTR)aad, 6, (CK_BYTE_PTR)text, sizeof text - 1, out, &out_len);
        char ciphertext[512];
        snprintf(ciphertext, sizeof ciphertext, "%s", hex(out, out_len));
        line("C_EncryptMessage", rv, "%s tag=%s", ciphertext, rv == CKR_OK ? hex(tag, 16) : "");
        line("C_MessageEncryptFinal", p->C_MessageEncryptFinal(s), "%s", "");
    }
    unsigned char scratch[64];
    CK_ULONG scratch_len = sizeof scratch;
    line("C_EncryptMessage(not initialised)",
         p->C_EncryptMessage(s, scratch, 8, scratch, 1, scratch, 1, scratch, &scratch_len), "%s", "");
    line("C_SessionCancel", p->C_SessionCancel(s, CKF_MESSAGE_ENCRYPT), "%s", "");
    line("C_SessionCancel(unknown session)", p->C_SessionCancel(0x7777, CKF_MESSAGE_ENCRYPT), "%s", "");
    line("C_LoginUser(unknown session)", p->C_LoginUser(0x7777, CKU_USER, (CK_UTF8CHAR_PTR)"x", 1, (CK_UTF8CHAR_PTR)"u", 1), "%s", "");
    line("C_CloseSession", p->C_CloseSession(s), "%s", "");
    line("C_Finalize", p->C_Finalize(NULL), "%s", "");
    return 0;
}
