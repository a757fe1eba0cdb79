// p11fuzz: a coverage-guided differential fuzzer for libp11fork.so (libFuzzer).
//
// Every fuzzer input is a sequence of PKCS#11 calls with hostile arguments. Each call is made
// twice with the same arguments: first through p11fork (side FORK, which loads SoftHSM with
// dlopen and a token directory A), then on a second, private copy of SoftHSM loaded with
// dlmopen(LM_ID_NEWLM) on an identical copy of the token in directory B (side DIRECT). The two
// answers must be the same return code and the same outputs; a difference, a crash, a hang or a
// leak is a finding. docs/RELIABILITY.md ("Hostile input (fuzzing)") explains the design.
#ifndef P11FUZZ_H
#define P11FUZZ_H

#include "CPKCS11.h"
#include "tool_support.h"
#include <stddef.h>
#include <stdint.h>

enum { FORK = 0, DIRECT = 1 };

// MARK: reading an input

// One call's argument bytes. Past the end every read is 0, and 0 always means the plain, valid
// choice, so a record with no argument bytes is a well-formed call (the seeds rely on it).
typedef struct {
    const uint8_t *d;
    size_t n, i;
} Rd;

uint8_t rd_u8(Rd *r);
uint16_t rd_u16(Rd *r);
uint32_t rd_u32(Rd *r);
void rd_bytes(Rd *r, void *out, size_t n);

// MARK: memory of one call

// Every buffer a call is given is allocated here, one malloc each (so ASan puts red zones around
// it), separately for each side, and freed right after the call: p11fork keeping a pointer into
// the application's memory and reading it later is then a use after free.
void *arena_alloc(int side, size_t n);
void *arena_dup(int side, const void *p, size_t n);
void arena_free_all(int side);

// MARK: handles

enum { H_SLOT, H_SESSION, H_OBJECT };

// The same slot, session or object on both sides: its handle through p11fork and directly.
typedef struct {
    CK_ULONG h[2];
    int kind;
    int live;
    int epoch;  // which life of the module (C_Initialize .. C_Finalize) it belongs to
    int det;    // objects: 1 when made from fixed bytes (outputs can be compared byte for byte)
    int ident;  // token objects: index in token_objects[], else -1
    int owner;  // session objects: the pair of the session that made them (-1: token object)
    int slot;   // sessions: the slot pair
    int opdet[12];  // sessions: how comparable each operation in progress is (see Call.level)
    CK_MECHANISM_TYPE opmech[12];  // sessions: the mechanism of each operation in progress
    int keykind;    // objects: what kind of key it is, when known (KK_...)
} Pair;

// What the harness knows of a key: SoftHSM 2.6.1 starts an RSA, EC or EdDSA operation with a key
// of any kind and then crashes on it, so such operations are only started with the right kind.
enum { KK_UNKNOWN, KK_SECRET, KK_OTHER, KK_RSA_PUB, KK_RSA_PRIV, KK_EC_PUB, KK_EC_PRIV, KK_ED_PUB, KK_ED_PRIV };

#define MAX_PAIRS 768
extern Pair pairs[MAX_PAIRS];
extern int npairs;
extern int cur_epoch;
extern int cur_session;  // pair index of the session most recently opened, or -1

// The objects the token is made with (harness.c). Their labels identify them when a search
// returns them for the first time.
enum { K_AES, K_AES_OPEN, K_HMAC, K_DES3, K_RSA, K_RSA_PUB, K_EC, K_EC_PUB, K_DATA, K_EC_AUTH, K_COUNT };
extern const char *const token_labels[K_COUNT];

// Handle arguments. Each returns the value for `side`; the choice is the same on both sides.
CK_SLOT_ID pick_slot(Rd *r, int side);
CK_SESSION_HANDLE pick_session(Rd *r, int side);
CK_OBJECT_HANDLE pick_object(Rd *r, int side, int preferred_ident);

// MARK: one call

// What a call registers for comparison, in the same order on both sides.
enum {
    IT_OUTBUF,      // p: bytes, lenp: their length (in/out)
    IT_ULONG,       // p: CK_ULONG
    IT_BYTES,       // p: a structure compared byte for byte (CK_INFO, CK_TOKEN_INFO, ...)
    IT_SESSINFO,    // p: CK_SESSION_INFO (slotID mapped through the slot pairs)
    IT_NEWSESSION,  // p: CK_SESSION_HANDLE made by the call
    IT_NEWOBJECT,   // p: CK_OBJECT_HANDLE made by the call
    IT_FOUND,       // p: CK_OBJECT_HANDLE[], lenp: count (C_FindObjects)
    IT_SLOTLIST,    // p: CK_SLOT_ID[], lenp: count
    IT_MECHLIST,    // p: CK_MECHANISM_TYPE[], lenp: count
    IT_ATTRS,       // p: CK_ATTRIBUTE[] filled by C_GetAttributeValue, cap: count
    IT_INPUT,       // p: an input buffer, orig: a copy made before the call, cap: length
    IT_TEMPLATE_IN, // p: an input template, orig: a deep copy made before the call, cap: count
};

typedef struct {
    int kind;
    void *p;
    CK_ULONG *lenp;
    CK_ULONG lenin;
    size_t cap;
    const void *orig;
    int flags;
} Item;

#define ITEM_NO_BYTES 1  // compare lengths only (values differ between two correct modules)

#define MAX_ITEMS 48

typedef struct {
    const char *fn;
    CK_RV rv[2];
    // How far the two sides can be compared: 0 all outputs; 1 return code and lengths (random
    // outputs: ECDSA signatures, generated keys); 2 only a loose return code (inputs differ
    // between the sides, such as a random signature fed back into C_Verify).
    int level;
    const char *nocompare;  // set: the call is made but not compared (the reason)
    int fork_only;          // p11fork's own functions: checked by rules, not against SoftHSM
    Item items[2][MAX_ITEMS];
    int nitems[2];
    char args[320];
    int sess_pair, obj_pair, obj2_pair, slot_pair;  // the pairs chosen (-1: none)
    int det_new;            // determinism of objects the call makes
    int usage;              // operations: which one (U_ENC ...), for Pair.opdet
    int op_level;           // operations: the level an Init gives the later calls
    CK_MECHANISM_TYPE op_mech;
    CK_ULONG find_max;      // C_FindObjects: ulMaxObjectCount
    CK_SESSION_HANDLE sess_value[2];
    int sess_picked[2], obj_picked;
    int excluded;           // not made at all: SoftHSM itself would crash (ops.c, exclude())
    int null_field, param_crashes_softhsm;
} Call;

extern Call C;
extern int cur_side;

void reg(int side, int kind, void *p, CK_ULONG *lenp, size_t cap, int flags);
void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void raise_level(int level);
void search_ended(int sess, int compare);
void searches_forget(void);
CK_FUNCTION_LIST_3_0 *fn(int side);
int verbose_calls(void);
// p11fork's own 3.0 entry points and list (SoftHSM 2.6 has none).
CK_C_GetInterfaceList fork_get_interface_list(void);
CK_C_GetInterface fork_get_interface(void);
CK_FUNCTION_LIST_3_0 *fork_list30(void);

// The previous call's output on each side (C_Sign -> C_Verify, C_Encrypt -> C_Decrypt, ...).
extern uint8_t *last_out[2];
extern size_t last_out_len[2];
extern int last_out_same;

// Findings: a difference between the sides, or a rule p11fork broke. Aborts (libFuzzer keeps the
// input) unless P11FUZZ_KEEP_GOING is set.
void finding(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// MARK: the operations (ops.c)

enum {
    U_ENC, U_DEC, U_DIG, U_SIGN, U_VER, U_SREC, U_VREC, U_GEN, U_GENPAIR, U_WRAP, U_UNWRAP, U_DERIVE, U_COUNT
};

typedef struct {
    const char *name;
    void (*run)(Rd *r, int side);
    void (*post)(void);  // harness state after both sides answered (NULL: nothing)
    int fork_only;
} OpDef;

unsigned long excluded_calls(void);
extern const OpDef ops[];
extern const int nops;
int op_index(const char *name);
int seed_byte(const char *token);

// Secrets the trace must never show (docs: "Never in a trace").
#define USER_PIN "fuzz-PIN-2468"
#define WRONG_PIN "wrong-PIN-1357"
#define SECRET_MARK "S3CR3T"

#endif
