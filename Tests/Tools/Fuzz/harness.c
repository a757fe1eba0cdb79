// p11fuzz harness: the two sides, the throw-away tokens, the handle pairs, the comparison of
// each call and the libFuzzer entry points. The calls themselves are in ops.c.
//
// Environment (scripts/fuzz.sh sets all of it):
//   P11FUZZ_P11FORK    libp11fork.so to test (default .build/debug/libp11fork.so)
//   P11FUZZ_SOFTHSM    SoftHSM2 (default /usr/lib/softhsm/libsofthsm2.so)
//   P11FUZZ_DIR        work directory for the two tokens and the trace (default: a new one in
//                      /tmp, removed at exit)
//   P11FUZZ_VERBOSE=1  print every call as it is made (for reading a reproducer)
//   P11FUZZ_KEEP_GOING=1  report each distinct finding once and go on, instead of aborting
//   P11FUZZ_LIES=1     also pass lengths larger than their buffers (see docs/RELIABILITY.md)
//   P11FUZZ_STATS=FILE write the figures there at exit, with every function's answers
//   P11FUZZ_WRITE_SEEDS=DIR  write the seed corpus (seeds[] below) into DIR and exit
// p11fork itself is set up here unless the environment says otherwise: P11FORK_MODULE (SoftHSM),
// P11FORK_TRACE (a file in the work directory, read after each input) at level full, and
// P11FORK_REPLAY_LIMIT=16k.
#define _GNU_SOURCE
#include "p11fuzz.h"
#include "keys.h"
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

extern char **environ;
void __sanitizer_set_death_callback(void (*callback)(void));

Call C;
int cur_side;
Pair pairs[MAX_PAIRS];
int npairs;
int cur_epoch;
int cur_session = -1;
uint8_t *last_out[2];
size_t last_out_len[2];
int last_out_same = 1;

static CK_FUNCTION_LIST_PTR list240[2];
static CK_FUNCTION_LIST_3_0 *list30_fork;
static int use30;  // this input calls p11fork through its 3.0 list (else its 2.40 list)
static void *lib[2];
static int nslots;  // pairs[0 .. nslots-1] are the slots, kept from one input to the next
static int diverged;  // a tolerated difference happened: the rest of the input is not compared
static int verbose, keep_going;
int allow_lies;

static char workdir[PATH_MAX];
static int own_workdir;
static char conf_a[PATH_MAX + 16], conf_b[PATH_MAX + 16];
static char trace_path[PATH_MAX + 16];
static int trace_fd = -1;

// Figures for the report.
static unsigned long n_inputs, n_calls, n_compared, n_nocompare, n_diverged, n_findings, n_fork_only;
// Per operation: how often it was made, and the distinct answers (p11fork's, SoftHSM's) seen.
#define MAX_ANSWERS 24
static struct {
    unsigned long calls;
    CK_RV answer[MAX_ANSWERS][2];
    unsigned long times[MAX_ANSWERS];
    int n;
} per_op[128];
static unsigned long rv_pairs_distinct;
static unsigned long maps_base, vmlck_base_kb;

const char *const token_labels[K_COUNT] = {
    "aes", "aes-open", "hmac", "des3", "rsa", "rsa-pub", "ec", "ec-pub", "data", "ec-auth",
};

CK_FUNCTION_LIST_3_0 *fn(int side) {
    if (side == FORK && use30 && list30_fork) return list30_fork;
    return (CK_FUNCTION_LIST_3_0 *)list240[side];
}

int verbose_calls(void) { return verbose; }

static CK_C_GetInterfaceList get_interface_list;
static CK_C_GetInterface get_interface;
CK_C_GetInterfaceList fork_get_interface_list(void) { return get_interface_list; }
CK_C_GetInterface fork_get_interface(void) { return get_interface; }
CK_FUNCTION_LIST_3_0 *fork_list30(void) { return list30_fork; }

// MARK: small helpers

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "p11fuzz: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

// MARK: reader

uint8_t rd_u8(Rd *r) { return r->i < r->n ? r->d[r->i++] : 0; }
uint16_t rd_u16(Rd *r) { uint16_t v = rd_u8(r); return v | (uint16_t)(rd_u8(r) << 8); }
uint32_t rd_u32(Rd *r) { uint32_t v = rd_u16(r); return v | ((uint32_t)rd_u16(r) << 16); }
void rd_bytes(Rd *r, void *out, size_t n) {
    uint8_t *o = out;
    for (size_t k = 0; k < n; k++) o[k] = rd_u8(r);
}

// MARK: arena

typedef struct Block { struct Block *next; } Block;
static Block *arena[2];

void *arena_alloc(int side, size_t n) {
    Block *b = calloc(1, sizeof(Block) + n + 1);
    if (!b) die("out of memory (%zu bytes)", n);
    b->next = arena[side];
    arena[side] = b;
    return b + 1;
}

void *arena_dup(int side, const void *p, size_t n) {
    void *q = arena_alloc(side, n);
    if (n) memcpy(q, p, n);
    return q;
}

void arena_free_all(int side) {
    while (arena[side]) {
        Block *b = arena[side];
        arena[side] = b->next;
        free(b);
    }
}

// MARK: the call log of the current input

#define LOG_LINES 80
static char call_log[LOG_LINES][448];
static int log_count;

void note(const char *fmt, ...) {
    if (cur_side != FORK) return;
    size_t used = strlen(C.args);
    if (used + 2 >= sizeof C.args) return;
    if (used) C.args[used++] = ' ';
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(C.args + used, sizeof C.args - used, fmt, ap);
    va_end(ap);
}

void raise_level(int level) {
    if (level > C.level) C.level = level;
}

static void print_log(void) {
    fprintf(stderr, "p11fuzz: the calls of this input (p11fork's answer / SoftHSM's):\n");
    for (int k = 0; k < log_count && k < LOG_LINES; k++) fprintf(stderr, "  %s\n", call_log[k]);
}

#define MAX_SEEN 256
static char seen_findings[MAX_SEEN][160];
static int n_seen_findings;

void finding(const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    n_findings++;
    if (keep_going) {
        for (int k = 0; k < n_seen_findings; k++)
            if (!strncmp(seen_findings[k], msg, sizeof seen_findings[k] - 1)) { diverged = 1; return; }
        if (n_seen_findings < MAX_SEEN) snprintf(seen_findings[n_seen_findings++], sizeof seen_findings[0], "%s", msg);
    }
    fprintf(stderr, "\np11fuzz: FINDING: %s\n", msg);
    // The current call is not in the log yet.
    print_log();
    fprintf(stderr, "  -> %s(%s) = %s / %s\n", C.fn, C.args, tool_rv_name(C.rv[FORK]), C.fork_only ? "-" : tool_rv_name(C.rv[DIRECT]));
    if (keep_going) {
        diverged = 1;
        return;
    }
    fflush(stderr);
    abort();
}

// MARK: handle pairs

static int pair_add(int kind, CK_ULONG h0, CK_ULONG h1) {
    if (npairs >= MAX_PAIRS) return -1;
    Pair *p = &pairs[npairs];
    memset(p, 0, sizeof *p);
    p->h[FORK] = h0;
    p->h[DIRECT] = h1;
    p->kind = kind;
    p->live = 1;
    p->epoch = cur_epoch;
    p->det = 1;
    p->ident = -1;
    p->owner = -1;
    p->slot = -1;
    return npairs++;
}

static int count_pairs(int kind, int live) {
    int n = 0;
    for (int k = 0; k < npairs; k++) n += pairs[k].kind == kind && pairs[k].live == live;
    return n;
}

static int nth_pair(int kind, int live, unsigned n) {
    int total = count_pairs(kind, live);
    if (!total) return -1;
    n %= (unsigned)total;
    for (int k = 0; k < npairs; k++)
        if (pairs[k].kind == kind && pairs[k].live == live && n-- == 0) return k;
    return -1;
}

static int live_ident(int ident) {
    for (int k = npairs - 1; k >= 0; k--)
        if (pairs[k].kind == H_OBJECT && pairs[k].live && pairs[k].ident == ident) return k;
    return -1;
}

static int newest_live(int kind) {
    for (int k = npairs - 1; k >= 0; k--)
        if (pairs[k].kind == kind && pairs[k].live) return k;
    return -1;
}

// Each side gets the value its own module issued, a handle of an earlier life of the module
// included: p11fork passes handle values through where nothing has forked (README "How it
// behaves"), so both modules must answer alike, also where SoftHSM gave the number to something
// else since.
static CK_ULONG pair_value(int k, int side) { return pairs[k].h[side]; }

static int value_in_use(CK_ULONG v) {
    for (int k = 0; k < npairs; k++)
        if (pairs[k].h[FORK] == v || pairs[k].h[DIRECT] == v) return 1;
    return 0;
}

// A value neither side has issued: forwarded by p11fork as a value the module must reject.
static CK_ULONG unknown_value(uint8_t b, int kind) {
    static const CK_ULONG base[3] = { 0x51000000UL, 0x5e000000UL, 0x0b000000UL };
    CK_ULONG v;
    switch (b % 8) {
    case 0: v = base[kind] + 0x200 + (b >> 3); break;              // the range p11fork's own handles once had
    case 1: v = (1UL << 32) | (base[kind] + 1 + (b >> 6)); break;   // an issued index, another generation
    case 2: v = ~0UL; break;
    case 3: v = 0x7fffffffUL; break;
    case 4: v = 0xdeadbeefUL; break;
    case 5: v = 1UL << 63; break;
    case 6: v = base[(kind + 1) % 3] + 1 + (b >> 6); break;         // another kind's range
    default: v = (7UL << 32) | (base[kind] + 2); break;
    }
    if (value_in_use(v)) v = 0xdeadbeefUL;
    if (value_in_use(v)) v = 0x5a5a5a5a5aUL;
    return v;
}

CK_SLOT_ID pick_slot(Rd *r, int side) {
    uint8_t b = rd_u8(r);
    if (b < 160 && nslots) {
        int k = b == 0 ? 0 : (int)((b - 1) % nslots);
        C.slot_pair = k;
        if (side == FORK) note("slot=slot%d", k);
        return pairs[k].h[side];
    }
    CK_ULONG v = unknown_value(b, H_SLOT);
    if (side == FORK) note("slot=unknown(0x%lx)", v);
    return v;
}

CK_SESSION_HANDLE pick_session(Rd *r, int side) {
    uint8_t b = rd_u8(r);
    int k = -1;
    const char *what = "live";
    CK_ULONG v = CK_INVALID_HANDLE;
    if (b < 128 || b >= 208) {
        k = (b == 0 || b >= 208) ? cur_session : nth_pair(H_SESSION, 1, b - 1);
        if (k >= 0 && !pairs[k].live) k = newest_live(H_SESSION);
        if (k < 0) what = "none";
    } else if (b < 160) {
        k = nth_pair(H_SESSION, 0, b - 128);
        what = k >= 0 ? "stale" : "none";
    } else if (b < 176) {
        what = "CK_INVALID_HANDLE";
    } else if (b < 192) {
        v = unknown_value(b, H_SESSION);
        what = "unknown";
    } else {
        int o = nth_pair(H_OBJECT, 1, b - 192);
        if (o >= 0) v = pair_value(o, side);
        what = "an object's handle";
    }
    if (k >= 0) v = pair_value(k, side);
    if (!C.sess_picked[side]) {
        C.sess_picked[side] = 1;
        if (side == FORK) C.sess_pair = k;
        C.sess_value[side] = v;
    }
    if (side == FORK) {
        if (k >= 0) note("session=s%d%s", k, pairs[k].live ? "" : "(stale)");
        else note("session=%s", what);
    }
    return v;
}

CK_OBJECT_HANDLE pick_object(Rd *r, int side, int preferred) {
    uint8_t b = rd_u8(r);
    int k = -1;
    CK_ULONG v = CK_INVALID_HANDLE;
    const char *what = "none";
    if (b == 0) {
        if (preferred >= 0) k = live_ident(preferred);
        if (k < 0) k = newest_live(H_OBJECT);
    } else if (b < 128) {
        k = nth_pair(H_OBJECT, 1, b - 1);
    } else if (b < 160) {
        k = live_ident((b - 128) % K_COUNT);
    } else if (b < 176) {
        k = nth_pair(H_OBJECT, 0, b - 160);
        if (k < 0) what = "none (no stale object)";
    } else if (b < 192) {
        what = "CK_INVALID_HANDLE";
    } else if (b < 208) {
        v = unknown_value(b, H_OBJECT);
        what = "unknown";
    } else if (b < 224) {
        int s = nth_pair(H_SESSION, 1, b - 208);
        if (s >= 0) v = pair_value(s, side);
        what = "a session's handle";
    } else {
        k = newest_live(H_OBJECT);
    }
    if (k >= 0) {
        v = pair_value(k, side);
    }
    // The first object a call picks is obj_pair, the next obj2_pair (the same on both sides).
    if (side == FORK) {
        if (C.obj_picked == 0) C.obj_pair = k;
        else if (C.obj_picked == 1) C.obj2_pair = k;
        C.obj_picked++;
    }
    if (side == FORK) {
        if (k >= 0 && pairs[k].ident >= 0) note("obj=%s", token_labels[pairs[k].ident]);
        else if (k >= 0) note("obj=o%d%s%s", k, pairs[k].live ? "" : "(stale)", pairs[k].det ? "" : "(random)");
        else note("obj=%s", what);
    }
    return v;
}

// MARK: registering what a call gives back

void reg(int side, int kind, void *p, CK_ULONG *lenp, size_t cap, int flags) {
    if (C.nitems[side] >= MAX_ITEMS) return;
    Item *it = &C.items[side][C.nitems[side]++];
    memset(it, 0, sizeof *it);
    it->kind = kind;
    it->p = p;
    it->lenp = lenp;
    it->lenin = lenp ? *lenp : 0;
    it->cap = cap;
    it->flags = flags;
    if (kind == IT_INPUT && p && cap) it->orig = arena_dup(side, p, cap);
    if (kind == IT_TEMPLATE_IN && p && cap) {
        // A copy of the attributes and of each value, to see that nothing was written into them.
        CK_ATTRIBUTE *t = p;
        CK_ATTRIBUTE *copy = arena_dup(side, t, cap * sizeof *t);
        for (size_t k = 0; k < cap; k++)
            if (t[k].pValue && t[k].ulValueLen && t[k].ulValueLen <= 65536)
                copy[k].pValue = arena_dup(side, t[k].pValue, t[k].ulValueLen);
        it->orig = copy;
    }
}

// MARK: comparing the two answers

static int loose(CK_RV rv) {
    switch (rv) {
    case CKR_OK: case CKR_BUFFER_TOO_SMALL: case CKR_DATA_INVALID: case CKR_DATA_LEN_RANGE:
    case CKR_ENCRYPTED_DATA_INVALID: case CKR_ENCRYPTED_DATA_LEN_RANGE: case CKR_SIGNATURE_INVALID:
    case CKR_SIGNATURE_LEN_RANGE: case CKR_WRAPPED_KEY_INVALID: case CKR_WRAPPED_KEY_LEN_RANGE:
    case CKR_GENERAL_ERROR: case CKR_FUNCTION_FAILED: case CKR_KEY_SIZE_RANGE: case CKR_ATTRIBUTE_VALUE_INVALID:
    case CKR_TEMPLATE_INCONSISTENT: case CKR_TEMPLATE_INCOMPLETE: case CKR_DOMAIN_PARAMS_INVALID:
    case CKR_MECHANISM_PARAM_INVALID: case CKR_KEY_TYPE_INCONSISTENT: case CKR_ATTRIBUTE_SENSITIVE:
        return 1;
    }
    return 0;
}

static int is_template_type(CK_ATTRIBUTE_TYPE t) {
    return t == CKA_WRAP_TEMPLATE || t == CKA_UNWRAP_TEMPLATE || t == CKA_DERIVE_TEMPLATE;
}

static void set_last_out(int side, const void *p, size_t n) {
    free(last_out[side]);
    last_out[side] = malloc(n ? n : 1);
    if (n) memcpy(last_out[side], p, n);
    last_out_len[side] = n;
}

static const char *ident_name(int k) {
    static char buf[4][48];
    static int next;
    char *out = buf[next++ % 4];
    if (k < 0) snprintf(out, 48, "?");
    else if (pairs[k].ident >= 0) snprintf(out, 48, "%s", token_labels[pairs[k].ident]);
    else snprintf(out, 48, "o%d", k);
    return out;
}

// The label and class of an object a search returned for the first time (a token object).
static void read_identity(int side, CK_OBJECT_HANDLE h, char *out, size_t cap) {
    char label[96] = "";
    CK_OBJECT_CLASS cls = ~0UL;
    CK_ATTRIBUTE t[2] = { { CKA_LABEL, label, sizeof label - 1 }, { CKA_CLASS, &cls, sizeof cls } };
    CK_RV rv = fn(side)->C_GetAttributeValue(C.sess_value[side], h, t, 2);
    size_t n = (t[0].ulValueLen < sizeof label) ? t[0].ulValueLen : 0;
    label[n] = 0;
    snprintf(out, cap, "%s:%lu:%s", rv == CKR_OK ? "ok" : tool_rv_name(rv), cls, label);
}

static int ident_of_label(const char *identity) {
    const char *label = strrchr(identity, ':');
    if (!label) return -1;
    label++;
    for (int k = 0; k < K_COUNT; k++)
        if (!strcmp(label, token_labels[k])) return k;
    return -1;
}

// A search in progress on one session: what each side returned so far. Two copies of SoftHSM
// return the objects of a search in different orders (it walks a set ordered by memory
// addresses), so a search is compared as a whole: the counts call by call, the objects when it
// ends. Objects the harness has not seen before (token objects) are known by class and label.
#define MAX_FOUND 128
typedef struct {
    int sess, used;
    int n[2];
    CK_OBJECT_HANDLE h[2][MAX_FOUND];
    char id[2][MAX_FOUND][104];
    int matched[2][MAX_FOUND];
} Search;
static Search searches[8];

void searches_forget(void) { memset(searches, 0, sizeof searches); }

static Search *search_for(int sess) {
    for (int k = 0; k < 8; k++)
        if (searches[k].used && searches[k].sess == sess) return &searches[k];
    for (int k = 0; k < 8; k++)
        if (!searches[k].used) {
            memset(&searches[k], 0, sizeof searches[k]);
            searches[k].used = 1;
            searches[k].sess = sess;
            return &searches[k];
        }
    memset(&searches[0], 0, sizeof searches[0]);
    searches[0].used = 1;
    searches[0].sess = sess;
    return &searches[0];
}

// The search on `sess` ended (all found, C_FindObjectsFinal, or a new C_FindObjectsInit): every
// object one side returned must have been returned by the other.
void search_ended(int sess, int compare) {
    for (int k = 0; k < 8; k++) {
        Search *s = &searches[k];
        if (!s->used || s->sess != sess) continue;
        for (int side = 0; side < 2 && compare; side++)
            for (int i = 0; i < s->n[side]; i++)
                if (!s->matched[side][i]) {
                    finding("%s: the search gave %s an object (%s) that %s did not give", C.fn,
                            side == FORK ? "p11fork" : "SoftHSM", s->id[side][i], side == FORK ? "SoftHSM" : "p11fork");
                    side = 2;
                    break;
                }
        s->used = 0;
    }
}

static void found_objects(Item *a, Item *b, int compare) {
    if (!a->p || !b->p || !a->lenp || !b->lenp) return;
    CK_ULONG n[2] = { *a->lenp, *b->lenp };
    if (compare && n[FORK] != n[DIRECT]) {
        finding("%s: p11fork found %lu objects, SoftHSM %lu", C.fn, n[FORK], n[DIRECT]);
        return;
    }
    Search *s = search_for(C.sess_pair);
    CK_OBJECT_HANDLE *found[2] = { a->p, b->p };
    size_t cap[2] = { a->cap, b->cap };
    for (int side = 0; side < 2; side++) {
        for (CK_ULONG i = 0; i < n[side] && i < cap[side] && s->n[side] < MAX_FOUND; i++) {
            int at = s->n[side]++;
            CK_OBJECT_HANDLE h = found[side][i];
            s->h[side][at] = h;
            s->matched[side][at] = 0;
            int known = -1;
            for (int k = 0; k < npairs; k++)
                if (pairs[k].kind == H_OBJECT && pairs[k].live && pairs[k].h[side] == h) { known = k; break; }
            if (known >= 0) snprintf(s->id[side][at], sizeof s->id[side][at], "%s", ident_name(known));
            else read_identity(side, h, s->id[side][at], sizeof s->id[side][at]);
        }
    }
    // Match what is new with what the other side gave, in this call or before.
    for (int i = 0; i < s->n[FORK]; i++) {
        if (s->matched[FORK][i]) continue;
        for (int j = 0; j < s->n[DIRECT]; j++) {
            if (s->matched[DIRECT][j] || strcmp(s->id[FORK][i], s->id[DIRECT][j])) continue;
            s->matched[FORK][i] = s->matched[DIRECT][j] = 1;
            if (strchr(s->id[FORK][i], ':')) {
                // First seen: a token object, known from now on by its handles on both sides.
                int k = pair_add(H_OBJECT, s->h[FORK][i], s->h[DIRECT][j]);
                if (k >= 0) {
                    static const int kinds[K_COUNT] = { KK_SECRET, KK_SECRET, KK_SECRET, KK_SECRET, KK_RSA_PRIV, KK_RSA_PUB,
                                                        KK_EC_PRIV, KK_EC_PUB, KK_OTHER, KK_EC_PRIV };
                    pairs[k].ident = ident_of_label(s->id[FORK][i]);
                    if (pairs[k].ident >= 0) pairs[k].keykind = kinds[pairs[k].ident];
                }
            }
            break;
        }
    }
    if (n[FORK] < C.find_max && n[DIRECT] < C.find_max) search_ended(C.sess_pair, compare);
}

static void compare_items(int rv_equal) {
    int nc = C.nitems[FORK] < C.nitems[DIRECT] ? C.nitems[FORK] : C.nitems[DIRECT];
    int compare = rv_equal && !C.nocompare && !diverged;
    CK_RV rv = C.rv[FORK];
    for (int k = 0; k < nc; k++) {
        Item *a = &C.items[FORK][k], *b = &C.items[DIRECT][k];
        if (a->kind != b->kind) die("internal: item %d differs in kind for %s", k, C.fn);
        switch (a->kind) {
        case IT_OUTBUF: {
            if (!rv_equal || (rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL)) break;
            if (compare && a->lenp && b->lenp && C.level <= 1 && *a->lenp != *b->lenp)
                finding("%s: output length: p11fork %lu, SoftHSM %lu (room %lu)", C.fn, *a->lenp, *b->lenp, a->lenin);
            if (rv != CKR_OK || !a->p || !b->p || !a->lenp || !b->lenp) break;
            size_t n0 = *a->lenp < a->cap ? *a->lenp : a->cap, n1 = *b->lenp < b->cap ? *b->lenp : b->cap;
            int same = n0 == n1 && !memcmp(a->p, b->p, n0);
            if (compare && C.level == 0 && !(a->flags & ITEM_NO_BYTES) && !same)
                finding("%s: output bytes differ (%zu bytes)", C.fn, n0);
            set_last_out(FORK, a->p, n0);
            set_last_out(DIRECT, b->p, n1);
            last_out_same = same && C.level == 0 && !(a->flags & ITEM_NO_BYTES);
            break;
        }
        case IT_ULONG:
            if (compare && (rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL) && a->p && b->p && C.level <= 1 && *(CK_ULONG *)a->p != *(CK_ULONG *)b->p)
                finding("%s: output number: p11fork %lu, SoftHSM %lu", C.fn, *(CK_ULONG *)a->p, *(CK_ULONG *)b->p);
            break;
        case IT_BYTES:
            if (compare && rv == CKR_OK && a->p && b->p && C.level == 0 && memcmp(a->p, b->p, a->cap)) {
                size_t at = 0;
                while (at < a->cap && ((uint8_t *)a->p)[at] == ((uint8_t *)b->p)[at]) at++;
                finding("%s: output structure differs at byte %zu of %zu", C.fn, at, a->cap);
            }
            break;
        case IT_SESSINFO: {
            if (!compare || rv != CKR_OK || !a->p || !b->p) break;
            CK_SESSION_INFO *s0 = a->p, *s1 = b->p;
            if (s0->state != s1->state || s0->flags != s1->flags || s0->ulDeviceError != s1->ulDeviceError)
                finding("%s: session info: p11fork state %lu flags 0x%lx, SoftHSM state %lu flags 0x%lx", C.fn, s0->state,
                        s0->flags, s1->state, s1->flags);
            int slot = -1;
            for (int j = 0; j < nslots; j++)
                if (pairs[j].h[DIRECT] == s1->slotID) slot = j;
            if (slot < 0 || pairs[slot].h[FORK] != s0->slotID)
                finding("%s: session info names slot 0x%lx through p11fork, expected the ID p11fork lists for SoftHSM's slot 0x%lx",
                        C.fn, s0->slotID, s1->slotID);
            break;
        }
        case IT_NEWSESSION:
        case IT_NEWOBJECT: {
            CK_RV r0 = C.rv[FORK], r1 = C.rv[DIRECT];
            if ((r0 != CKR_OK && r1 != CKR_OK) || !a->p) break;
            CK_ULONG h0 = r0 == CKR_OK ? *(CK_ULONG *)a->p : CK_INVALID_HANDLE;
            CK_ULONG h1 = r1 == CKR_OK && b->p ? *(CK_ULONG *)b->p : CK_INVALID_HANDLE;
            int kind = a->kind == IT_NEWSESSION ? H_SESSION : H_OBJECT;
            if (r0 == CKR_OK) {
                for (int j = 0; j < npairs; j++)
                    if (pairs[j].kind == kind && pairs[j].live && pairs[j].h[FORK] == h0)
                        finding("%s: p11fork handed out 0x%lx, which is already the live handle of %s", C.fn, h0,
                                kind == H_SESSION ? "another session" : ident_name(j));
                if (h0 == CK_INVALID_HANDLE) finding("%s: p11fork answered CKR_OK with CK_INVALID_HANDLE", C.fn);
            }
            int p = pair_add(kind, h0, h1);
            if (p < 0) break;
            if (kind == H_SESSION) {
                pairs[p].slot = C.slot_pair;
                cur_session = p;
            } else {
                pairs[p].det = C.det_new;
                pairs[p].owner = C.sess_pair;
                pairs[p].keykind = a->flags;  // the kind of key the call makes, when known
            }
            break;
        }
        case IT_FOUND:
            if (rv_equal && rv == CKR_OK) found_objects(a, b, compare);
            break;
        case IT_SLOTLIST: {
            if (!rv_equal || rv != CKR_OK || !a->p || !b->p || !a->lenp || !b->lenp) break;
            CK_ULONG n = *a->lenp;
            if (n != *b->lenp) break;  // counts were compared by the IT_ULONG before
            CK_SLOT_ID *s0 = a->p, *s1 = b->p;
            for (CK_ULONG i = 0; i < n && i < a->cap; i++) {
                int j;
                for (j = 0; j < nslots; j++)
                    if (pairs[j].h[DIRECT] == s1[i]) break;
                if (j == nslots) {
                    if (compare) finding("%s: SoftHSM lists slot 0x%lx that was not there at the start", C.fn, s1[i]);
                } else if (pairs[j].h[FORK] != s0[i] && compare) {
                    finding("%s: slot %d has ID 0x%lx through p11fork now, 0x%lx before", C.fn, j, s0[i], pairs[j].h[FORK]);
                }
            }
            break;
        }
        case IT_MECHLIST:
            if (compare && rv == CKR_OK && a->p && b->p && a->lenp && b->lenp && *a->lenp == *b->lenp &&
                memcmp(a->p, b->p, sizeof(CK_MECHANISM_TYPE) * (*a->lenp < a->cap ? *a->lenp : a->cap)))
                finding("%s: mechanism lists differ", C.fn);
            break;
        case IT_ATTRS: {
            if (!compare) break;
            if (rv != CKR_OK && rv != CKR_ATTRIBUTE_SENSITIVE && rv != CKR_ATTRIBUTE_TYPE_INVALID && rv != CKR_BUFFER_TOO_SMALL) break;
            CK_ATTRIBUTE *t0 = a->p, *t1 = b->p;
            for (size_t i = 0; i < a->cap; i++) {
                if (C.level <= 1 && t0[i].ulValueLen != t1[i].ulValueLen) {
                    finding("%s: attribute 0x%lx: length %lu through p11fork, %lu from SoftHSM", C.fn, t0[i].type,
                            t0[i].ulValueLen, t1[i].ulValueLen);
                    break;
                }
                if (C.level == 0 && t0[i].pValue && t1[i].pValue && t0[i].ulValueLen == t1[i].ulValueLen &&
                    t0[i].ulValueLen != CK_UNAVAILABLE_INFORMATION && t0[i].ulValueLen <= 65536 && !is_template_type(t0[i].type) &&
                    memcmp(t0[i].pValue, t1[i].pValue, t0[i].ulValueLen)) {
                    finding("%s: attribute 0x%lx: value differs", C.fn, t0[i].type);
                    break;
                }
            }
            break;
        }
        case IT_INPUT: {
            int changed0 = a->p && a->orig && memcmp(a->p, a->orig, a->cap);
            int changed1 = b->p && b->orig && memcmp(b->p, b->orig, b->cap);
            if (changed0 && !changed1) finding("%s: p11fork wrote into an input buffer of the application (%zu bytes)", C.fn, a->cap);
            break;
        }
        case IT_TEMPLATE_IN: {
            int changed[2] = { 0, 0 };
            Item *it[2] = { a, b };
            for (int s = 0; s < 2; s++) {
                CK_ATTRIBUTE *t = it[s]->p, *o = (CK_ATTRIBUTE *)it[s]->orig;
                if (!t || !o) continue;
                for (size_t i = 0; i < it[s]->cap; i++) {
                    if (t[i].type != o[i].type || t[i].ulValueLen != o[i].ulValueLen) changed[s] = 1;
                    else if (t[i].pValue && o[i].pValue && t[i].ulValueLen && t[i].ulValueLen <= 65536 &&
                             o[i].pValue != t[i].pValue && memcmp(t[i].pValue, o[i].pValue, t[i].ulValueLen))
                        changed[s] = 1;
                }
            }
            if (changed[FORK] && !changed[DIRECT]) finding("%s: p11fork changed the application's template", C.fn);
            break;
        }
        }
    }
}

// Features for libFuzzer beyond edge coverage: which answers each function gave on each side.
__attribute__((used, section("__libfuzzer_extra_counters"))) static uint8_t extra_counters[1 << 13];

static void count_answer(int op) {
    uint32_t h = (uint32_t)op * 2654435761u;
    h ^= (uint32_t)C.rv[FORK] * 40503u;
    h ^= (uint32_t)C.rv[DIRECT] * 2246822519u;
    h ^= (uint32_t)C.level << 29;
    extra_counters[h % sizeof extra_counters]++;
    if (C.excluded) return;
    typeof(per_op[0]) *o = &per_op[op % 128];
    o->calls++;
    CK_RV direct = C.fork_only ? ~0UL : C.rv[DIRECT];
    for (int k = 0; k < o->n; k++)
        if (o->answer[k][0] == C.rv[FORK] && o->answer[k][1] == direct) { o->times[k]++; return; }
    if (o->n < MAX_ANSWERS) {
        o->answer[o->n][0] = C.rv[FORK];
        o->answer[o->n][1] = direct;
        o->times[o->n++] = 1;
        rv_pairs_distinct++;
    }
}

// The table of functions and answers (P11FUZZ_STATS), for docs/RELIABILITY.md.
static void write_answers(FILE *f) {
    fprintf(f, "\nfunction: calls; answers (p11fork = SoftHSM unless shown apart) x times\n");
    for (int op = 0; op < nops && op < 128; op++) {
        fprintf(f, "%s: %lu;", ops[op].name, per_op[op].calls);
        for (int k = 0; k < per_op[op].n; k++) {
            CK_RV a = per_op[op].answer[k][0], b = per_op[op].answer[k][1];
            if (ops[op].fork_only || a == b) fprintf(f, " %s x%lu", tool_rv_name(a), per_op[op].times[k]);
            else fprintf(f, " %s/%s x%lu", tool_rv_name(a), tool_rv_name(b), per_op[op].times[k]);
        }
        fprintf(f, "\n");
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void run_op(int op, Rd *r) {
    memset(&C, 0, sizeof C);
    C.fn = ops[op].name;
    C.sess_pair = C.obj_pair = C.obj2_pair = C.slot_pair = -1;
    C.det_new = 1;
    C.fork_only = ops[op].fork_only;
    double took[2] = { 0, 0 };
    for (int side = 0; side < 2; side++) {
        if (side == DIRECT && C.fork_only) break;
        if (C.fork_only && !list30_fork) break;
        r->i = 0;
        cur_side = side;
        double t0 = now();
        ops[op].run(r, side);
        took[side] = now() - t0;
    }
    cur_side = FORK;
    n_calls++;
    int rv_equal = C.fork_only || C.rv[FORK] == C.rv[DIRECT];
    if (C.fork_only && !list30_fork) {
        C.excluded = 1;
    } else if (C.excluded) {
        // Not made on either side (ops.c, exclude()).
    } else if (C.fork_only) {
        n_fork_only++;
    } else if (C.nocompare || diverged) {
        n_nocompare++;
    } else {
        n_compared++;
        if (!rv_equal) {
            if (C.level >= 2 && loose(C.rv[FORK]) && loose(C.rv[DIRECT])) {
                diverged = 1;
                n_diverged++;
            } else {
                finding("%s: p11fork answered %s, SoftHSM %s", C.fn, tool_rv_name(C.rv[FORK]), tool_rv_name(C.rv[DIRECT]));
            }
        }
    }
    // p11fork does a little more than SoftHSM (a lock, a table look-up, a trace line); a call that
    // takes far longer through it than directly is a hang in the making. (The bound leaves room
    // for a busy machine stalling one call; libFuzzer's -timeout catches a real hang.)
    if (took[FORK] > 10.0 && took[FORK] > 20 * took[DIRECT] + 1.0)
        finding("%s: took %.1f s through p11fork, %.3f s directly", C.fn, took[FORK], took[DIRECT]);
    if (!C.fork_only && !C.excluded) compare_items(rv_equal);
    if (ops[op].post) ops[op].post();
    count_answer(op);
    if (log_count < LOG_LINES) {
        snprintf(call_log[log_count], sizeof call_log[0], "#%d %s(%s) = %s / %s%s%s", log_count, C.fn, C.args,
                 tool_rv_name(C.rv[FORK]), C.fork_only ? "-" : tool_rv_name(C.rv[DIRECT]),
                 C.nocompare ? " [not compared: " : "", C.nocompare ? C.nocompare : "");
        if (C.nocompare) strncat(call_log[log_count], "]", sizeof call_log[0] - strlen(call_log[log_count]) - 1);
        if (verbose) fprintf(stderr, "p11fuzz: %s\n", call_log[log_count]);
    }
    log_count++;
    arena_free_all(FORK);
    arena_free_all(DIRECT);
}

// MARK: the tokens

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f)) die("cannot write %s: %s", path, strerror(errno));
}

static void copy_tree(const char *from, const char *to) {
    DIR *d = opendir(from);
    if (!d) die("cannot read %s: %s", from, strerror(errno));
    mkdir(to, 0700);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char a[PATH_MAX], b[PATH_MAX];
        snprintf(a, sizeof a, "%s/%s", from, e->d_name);
        snprintf(b, sizeof b, "%s/%s", to, e->d_name);
        struct stat st;
        if (lstat(a, &st)) die("stat %s: %s", a, strerror(errno));
        if (S_ISDIR(st.st_mode)) {
            copy_tree(a, b);
            continue;
        }
        int in = open(a, O_RDONLY), out = open(b, O_WRONLY | O_CREAT | O_TRUNC, st.st_mode & 0777);
        if (in < 0 || out < 0) die("copy %s: %s", a, strerror(errno));
        char buf[8192];
        ssize_t n;
        while ((n = read(in, buf, sizeof buf)) > 0)
            if (write(out, buf, n) != n) die("copy %s: %s", b, strerror(errno));
        close(in);
        close(out);
    }
    closedir(d);
}

static void remove_tree(const char *path) {
    DIR *d = opendir(path);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char p[PATH_MAX];
            snprintf(p, sizeof p, "%s/%s", path, e->d_name);
            struct stat st;
            if (!lstat(p, &st) && S_ISDIR(st.st_mode)) remove_tree(p);
            else unlink(p);
        }
        closedir(d);
    }
    rmdir(path);
}

// The private copy of SoftHSM reads its environment through its own libc's `environ`, which
// was set when the copy was loaded: point it at a fixed array that names the token directory.
static char **env_a, **env_b;

static char **environment_with(const char *conf) {
    int n = 0;
    while (environ[n]) n++;
    char **env = calloc(n + 2, sizeof *env);
    int k = 0;
    for (int i = 0; i < n; i++)
        if (strncmp(environ[i], "SOFTHSM2_CONF=", 14)) env[k++] = strdup(environ[i]);
    char *setting = malloc(strlen(conf) + 16);
    sprintf(setting, "SOFTHSM2_CONF=%s", conf);
    env[k++] = setting;
    env[k] = NULL;
    return env;
}

static void direct_environment(char **env) {
    char ***copy_environ = dlsym(lib[DIRECT], "__environ");
    if (!copy_environ) copy_environ = dlsym(lib[DIRECT], "environ");
    if (!copy_environ) die("the private copy of SoftHSM has no environ to set");
    *copy_environ = env;
}

// The copy's libc numbers its pthread keys from 0 again, while the values of keys live in each
// thread's own block, shared with the first libc: it would use the keys the process already
// has (ASan, libFuzzer, the Swift runtime inside p11fork, the first OpenSSL). Its first key
// numbers are taken up and never used.
static void separate_thread_keys(void) {
    int (*create)(pthread_key_t *, void (*)(void *)) = dlsym(lib[DIRECT], "pthread_key_create");
    if (!create) return;
    pthread_key_t probe;
    if (pthread_key_create(&probe, NULL)) return;
    pthread_key_delete(probe);
    pthread_key_t key;
    while (create(&key, NULL) == 0 && key < probe + 192) { }
}

static CK_BBOOL yes = CK_TRUE, no = CK_FALSE;

static void check(CK_RV rv, const char *what) {
    if (rv != CKR_OK) die("making the token: %s answered %s", what, tool_rv_name(rv));
}

static void make_token(CK_FUNCTION_LIST_PTR f) {
    check(f->C_Initialize(NULL), "C_Initialize");
    CK_SLOT_ID slots[8];
    CK_ULONG n = 8;
    check(f->C_GetSlotList(CK_FALSE, slots, &n), "C_GetSlotList");
    if (n < 1) die("SoftHSM shows no slot");
    CK_UTF8CHAR label[32];
    memset(label, ' ', sizeof label);
    memcpy(label, "p11fuzz", 7);
    check(f->C_InitToken(slots[0], (CK_UTF8CHAR_PTR)USER_PIN, strlen(USER_PIN), label), "C_InitToken");
    n = 8;
    check(f->C_GetSlotList(CK_TRUE, slots, &n), "C_GetSlotList");
    CK_SESSION_HANDLE s;
    check(f->C_OpenSession(slots[0], CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s), "C_OpenSession");
    check(f->C_Login(s, CKU_SO, (CK_UTF8CHAR_PTR)USER_PIN, strlen(USER_PIN)), "C_Login(SO)");
    check(f->C_InitPIN(s, (CK_UTF8CHAR_PTR)USER_PIN, strlen(USER_PIN)), "C_InitPIN");
    check(f->C_Logout(s), "C_Logout");
    check(f->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)USER_PIN, strlen(USER_PIN)), "C_Login");

    static const unsigned char aes_value[33] = "p11fuzz fixed AES-256 test key!!";
    static const unsigned char aes_open_value[17] = "p11fuzz AES-128!";
    static const unsigned char hmac_value[33] = "p11fuzz fixed HMAC secret value.";
    static const unsigned char des3_value[24] = "p11fuzz 3DES test key..";
    static const unsigned char ec_params[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
    static const unsigned char e65537[] = { 0x01, 0x00, 0x01 };
    static const unsigned char data_value[] = "p11fuzz data object";
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY, priv = CKO_PRIVATE_KEY, pub = CKO_PUBLIC_KEY, data = CKO_DATA;
    CK_KEY_TYPE aes = CKK_AES, generic = CKK_GENERIC_SECRET, des3 = CKK_DES3, rsa = CKK_RSA, ec = CKK_EC;
    // Token objects can be neither changed nor destroyed (and the fuzzer's own objects are
    // always session objects), so every input starts from the same token.
#define TOKEN_OBJECT(lbl, id)                                                                                   \
    { CKA_TOKEN, &yes, 1 }, { CKA_MODIFIABLE, &no, 1 }, { CKA_DESTROYABLE, &no, 1 }, { CKA_COPYABLE, &yes, 1 }, \
        { CKA_LABEL, (void *)lbl, strlen(lbl) }, { CKA_ID, (void *)id, 1 }
    CK_ATTRIBUTE t_aes[] = { TOKEN_OBJECT("aes", "\x81"), { CKA_CLASS, &secret, sizeof secret }, { CKA_KEY_TYPE, &aes, sizeof aes },
                             { CKA_VALUE, (void *)aes_value, 32 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_DECRYPT, &yes, 1 },
                             { CKA_WRAP, &yes, 1 }, { CKA_UNWRAP, &yes, 1 }, { CKA_SIGN, &yes, 1 }, { CKA_VERIFY, &yes, 1 },
                             { CKA_DERIVE, &yes, 1 }, { CKA_SENSITIVE, &no, 1 }, { CKA_EXTRACTABLE, &yes, 1 },
                             { CKA_PRIVATE, &yes, 1 } };
    CK_ATTRIBUTE t_aes_open[] = { TOKEN_OBJECT("aes-open", "\x82"), { CKA_CLASS, &secret, sizeof secret },
                                  { CKA_KEY_TYPE, &aes, sizeof aes }, { CKA_VALUE, (void *)aes_open_value, 16 },
                                  { CKA_ENCRYPT, &yes, 1 }, { CKA_DECRYPT, &yes, 1 }, { CKA_WRAP, &yes, 1 },
                                  { CKA_UNWRAP, &yes, 1 }, { CKA_DERIVE, &yes, 1 }, { CKA_SENSITIVE, &no, 1 },
                                  { CKA_EXTRACTABLE, &yes, 1 }, { CKA_PRIVATE, &no, 1 } };
    CK_ATTRIBUTE t_hmac[] = { TOKEN_OBJECT("hmac", "\x83"), { CKA_CLASS, &secret, sizeof secret }, { CKA_KEY_TYPE, &generic, sizeof generic },
                              { CKA_VALUE, (void *)hmac_value, 32 }, { CKA_SIGN, &yes, 1 }, { CKA_VERIFY, &yes, 1 },
                              { CKA_DERIVE, &yes, 1 }, { CKA_SENSITIVE, &no, 1 }, { CKA_EXTRACTABLE, &yes, 1 },
                              { CKA_PRIVATE, &no, 1 } };
    CK_ATTRIBUTE t_des3[] = { TOKEN_OBJECT("des3", "\x84"), { CKA_CLASS, &secret, sizeof secret }, { CKA_KEY_TYPE, &des3, sizeof des3 },
                              { CKA_VALUE, (void *)des3_value, 24 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_DECRYPT, &yes, 1 },
                              { CKA_WRAP, &yes, 1 }, { CKA_UNWRAP, &yes, 1 }, { CKA_DERIVE, &yes, 1 }, { CKA_SIGN, &yes, 1 },
                              { CKA_VERIFY, &yes, 1 }, { CKA_SENSITIVE, &yes, 1 }, { CKA_EXTRACTABLE, &no, 1 } };
    CK_ATTRIBUTE t_rsa[] = { TOKEN_OBJECT("rsa", "\x85"), { CKA_CLASS, &priv, sizeof priv }, { CKA_KEY_TYPE, &rsa, sizeof rsa },
                             { CKA_MODULUS, (void *)rsa_n, sizeof rsa_n }, { CKA_PUBLIC_EXPONENT, (void *)e65537, 3 },
                             { CKA_PRIVATE_EXPONENT, (void *)rsa_d, sizeof rsa_d }, { CKA_PRIME_1, (void *)rsa_p, sizeof rsa_p },
                             { CKA_PRIME_2, (void *)rsa_q, sizeof rsa_q }, { CKA_EXPONENT_1, (void *)rsa_dp, sizeof rsa_dp },
                             { CKA_EXPONENT_2, (void *)rsa_dq, sizeof rsa_dq }, { CKA_COEFFICIENT, (void *)rsa_qinv, sizeof rsa_qinv },
                             { CKA_SIGN, &yes, 1 }, { CKA_DECRYPT, &yes, 1 }, { CKA_UNWRAP, &yes, 1 }, { CKA_SIGN_RECOVER, &yes, 1 },
                             { CKA_SENSITIVE, &yes, 1 }, { CKA_EXTRACTABLE, &no, 1 }, { CKA_PRIVATE, &yes, 1 } };
    CK_ATTRIBUTE t_rsa_pub[] = { TOKEN_OBJECT("rsa-pub", "\x85"), { CKA_CLASS, &pub, sizeof pub }, { CKA_KEY_TYPE, &rsa, sizeof rsa },
                                 { CKA_MODULUS, (void *)rsa_n, sizeof rsa_n }, { CKA_PUBLIC_EXPONENT, (void *)e65537, 3 },
                                 { CKA_VERIFY, &yes, 1 }, { CKA_ENCRYPT, &yes, 1 }, { CKA_WRAP, &yes, 1 },
                                 { CKA_VERIFY_RECOVER, &yes, 1 }, { CKA_PRIVATE, &no, 1 } };
    CK_ATTRIBUTE t_ec[] = { TOKEN_OBJECT("ec", "\x86"), { CKA_CLASS, &priv, sizeof priv }, { CKA_KEY_TYPE, &ec, sizeof ec },
                            { CKA_EC_PARAMS, (void *)ec_params, sizeof ec_params }, { CKA_VALUE, (void *)ec_d, sizeof ec_d },
                            { CKA_SIGN, &yes, 1 }, { CKA_DERIVE, &yes, 1 }, { CKA_SENSITIVE, &no, 1 },
                            { CKA_EXTRACTABLE, &yes, 1 }, { CKA_PRIVATE, &yes, 1 } };
    CK_ATTRIBUTE t_ec_pub[] = { TOKEN_OBJECT("ec-pub", "\x86"), { CKA_CLASS, &pub, sizeof pub }, { CKA_KEY_TYPE, &ec, sizeof ec },
                                { CKA_EC_PARAMS, (void *)ec_params, sizeof ec_params },
                                { CKA_EC_POINT, (void *)ec_point_der, sizeof ec_point_der }, { CKA_VERIFY, &yes, 1 },
                                { CKA_PRIVATE, &no, 1 } };
    CK_ATTRIBUTE t_data[] = { { CKA_TOKEN, &yes, 1 }, { CKA_MODIFIABLE, &no, 1 }, { CKA_DESTROYABLE, &no, 1 },
                              { CKA_COPYABLE, &yes, 1 }, { CKA_LABEL, (void *)"data", 4 }, { CKA_CLASS, &data, sizeof data },
                              { CKA_VALUE, (void *)data_value, sizeof data_value - 1 },
                              { CKA_APPLICATION, (void *)"p11fuzz", 7 }, { CKA_PRIVATE, &no, 1 } };
    CK_ATTRIBUTE t_ec_auth[] = { TOKEN_OBJECT("ec-auth", "\x88"), { CKA_CLASS, &priv, sizeof priv }, { CKA_KEY_TYPE, &ec, sizeof ec },
                                 { CKA_EC_PARAMS, (void *)ec_params, sizeof ec_params }, { CKA_VALUE, (void *)ec_d, sizeof ec_d },
                                 { CKA_SIGN, &yes, 1 }, { CKA_ALWAYS_AUTHENTICATE, &yes, 1 }, { CKA_SENSITIVE, &yes, 1 },
                                 { CKA_EXTRACTABLE, &no, 1 }, { CKA_PRIVATE, &yes, 1 } };
#undef TOKEN_OBJECT
    struct { CK_ATTRIBUTE *t; CK_ULONG n; } objects[K_COUNT] = {
        { t_aes, sizeof t_aes / sizeof *t_aes }, { t_aes_open, sizeof t_aes_open / sizeof *t_aes_open },
        { t_hmac, sizeof t_hmac / sizeof *t_hmac }, { t_des3, sizeof t_des3 / sizeof *t_des3 },
        { t_rsa, sizeof t_rsa / sizeof *t_rsa }, { t_rsa_pub, sizeof t_rsa_pub / sizeof *t_rsa_pub },
        { t_ec, sizeof t_ec / sizeof *t_ec }, { t_ec_pub, sizeof t_ec_pub / sizeof *t_ec_pub },
        { t_data, sizeof t_data / sizeof *t_data }, { t_ec_auth, sizeof t_ec_auth / sizeof *t_ec_auth },
    };
    for (int k = 0; k < K_COUNT; k++) {
        CK_OBJECT_HANDLE h;
        char what[64];
        snprintf(what, sizeof what, "C_CreateObject(%s)", token_labels[k]);
        check(f->C_CreateObject(s, objects[k].t, objects[k].n, &h), what);
        if (k == K_AES) {
            // The token must stay as it is made: check that SoftHSM refuses to destroy or change it.
            CK_RV rv = f->C_DestroyObject(s, h);
            if (rv == CKR_OK) die("SoftHSM destroyed an object with CKA_DESTROYABLE false: the token would not stay the same");
            CK_ATTRIBUTE relabel = { CKA_LABEL, (void *)"x", 1 };
            rv = f->C_SetAttributeValue(s, h, &relabel, 1);
            if (rv == CKR_OK) die("SoftHSM changed an object with CKA_MODIFIABLE false: the token would not stay the same");
        }
    }
    check(f->C_Finalize(NULL), "C_Finalize");
}

// MARK: the per-input life

static void load_sides(void) {
    const char *p11fork = getenv("P11FUZZ_P11FORK");
    if (!p11fork) p11fork = ".build/debug/libp11fork.so";
    const char *softhsm = getenv("P11FUZZ_SOFTHSM");
    if (!softhsm) softhsm = "/usr/lib/softhsm/libsofthsm2.so";

    // p11fork first (it loads its SoftHSM with dlopen, in the main namespace), so that the
    // private copy below is loaded after every thread key of the first namespace exists.
    setenv("SOFTHSM2_CONF", conf_a, 1);
    setenv("P11FORK_MODULE", softhsm, 0);
    lib[FORK] = dlopen(p11fork, RTLD_NOW | RTLD_LOCAL);
    if (!lib[FORK]) die("cannot load p11fork (%s): %s", p11fork, dlerror());
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(lib[FORK], "C_GetFunctionList");
    get_interface = (CK_C_GetInterface)dlsym(lib[FORK], "C_GetInterface");
    get_interface_list = (CK_C_GetInterfaceList)dlsym(lib[FORK], "C_GetInterfaceList");
    if (!get || get(&list240[FORK]) != CKR_OK) die("%s is not a PKCS#11 module", p11fork);
    CK_INTERFACE *interface = NULL;
    CK_VERSION v30 = { 3, 0 };
    if (get_interface && get_interface_list && get_interface((CK_UTF8CHAR_PTR) "PKCS 11", &v30, &interface, 0) == CKR_OK && interface)
        list30_fork = interface->pFunctionList;
    else
        // Only when the harness is pointed at something else than p11fork (a check of the
        // harness itself): p11fork always offers its 3.0 interface.
        fprintf(stderr, "p11fuzz: %s offers no PKCS#11 3.0 interface: its 3.0 calls are left out\n", p11fork);
    // Let the first namespace's SoftHSM and OpenSSL make their thread keys now.
    if (list240[FORK]->C_Initialize(NULL) != CKR_OK) die("p11fork's C_Initialize failed (is P11FORK_MODULE right?)");
    list240[FORK]->C_Finalize(NULL);

    lib[DIRECT] = dlmopen(LM_ID_NEWLM, softhsm, RTLD_NOW | RTLD_LOCAL);
    if (!lib[DIRECT]) die("cannot load a private copy of %s: %s", softhsm, dlerror());
    separate_thread_keys();
    get = (CK_C_GetFunctionList)dlsym(lib[DIRECT], "C_GetFunctionList");
    if (!get || get(&list240[DIRECT]) != CKR_OK) die("%s is not a PKCS#11 module", softhsm);
}

static void pair_slots(void) {
    CK_SLOT_ID s[2][16];
    CK_ULONG n[2];
    for (int side = 0; side < 2; side++) {
        if (list240[side]->C_Initialize(NULL) != CKR_OK) die("C_Initialize failed on side %d", side);
        n[side] = 16;
        if (list240[side]->C_GetSlotList(CK_FALSE, s[side], &n[side]) != CKR_OK) die("C_GetSlotList failed on side %d", side);
        CK_TOKEN_INFO info;
        if (list240[side]->C_GetTokenInfo(s[side][0], &info) != CKR_OK || memcmp(info.label, "p11fuzz ", 8))
            die("the first slot on side %d does not hold the fuzzer's token", side);
    }
    if (n[0] != n[1] || n[0] < 1) die("the two sides show %lu and %lu slots", n[0], n[1]);
    npairs = 0;
    for (CK_ULONG k = 0; k < n[0]; k++) pair_add(H_SLOT, s[0][k], s[1][k]);
    nslots = npairs;
    for (int side = 0; side < 2; side++) list240[side]->C_Finalize(NULL);
}

static unsigned long proc_number(const char *file, const char *key) {
    FILE *f = fopen(file, "r");
    if (!f) return 0;
    char line[256];
    unsigned long v = 0, lines = 0;
    while (fgets(line, sizeof line, f)) {
        lines++;
        if (key && !strncmp(line, key, strlen(key))) v = strtoul(line + strlen(key), NULL, 10);
    }
    fclose(f);
    return key ? v : lines;
}

static void print_figures(void) {
    char text[2048];
    unsigned long maps = proc_number("/proc/self/maps", NULL);
    snprintf(text, sizeof text,
             "p11fuzz figures: inputs %lu, calls %lu (compared %lu, not compared %lu, p11fork-only %lu), "
             "calls not made because SoftHSM would crash %lu, "
             "inputs stopped comparing after a tolerated difference %lu, distinct (function, answers) %lu, "
             "findings %lu, memory maps %lu (after warm-up %lu), locked memory %lu kB (after warm-up %lu kB)\n",
             n_inputs, n_calls, n_compared, n_nocompare, n_fork_only, excluded_calls(), n_diverged, rv_pairs_distinct, n_findings, maps,
             maps_base, proc_number("/proc/self/status", "VmLck:"), vmlck_base_kb);
    fputs(text, stderr);
    const char *stats = getenv("P11FUZZ_STATS");
    if (stats) {
        FILE *f = fopen(stats, "w");
        if (f) {
            fputs(text, f);
            write_answers(f);
            fclose(f);
        }
    }
}

// A crash (ASan report, or a deadly signal) says which call of the input was being made.
static void on_death(void) {
    fprintf(stderr, "\np11fuzz: died in %s(%s) made %s\n", C.fn ? C.fn : "?", C.args,
            cur_side == FORK ? "through p11fork" : "on SoftHSM directly");
    print_log();
}

static void at_exit(void) {
    print_figures();
    if (own_workdir) remove_tree(workdir);
}

// MARK: seeds

// The seed corpus, as text: the prologue (0 nothing, 1 C_Initialize, 2 and a session, 4 and a
// login and a search of every object; +8 calls p11fork through its 3.0 list), then calls, each
// with its argument bytes after a colon (0 is the plain choice; "0*16" sixteen zeros; "@CKM_X"
// picks a mechanism, "#label" a token object; see ops.c for what each byte of a call means).
static const char *const seeds[] = {
    "4 C_SignInit C_Sign C_VerifyInit C_Verify",
    "12 C_SignInit C_Sign C_VerifyInit C_Verify",
    "4 C_EncryptInit C_Encrypt C_DecryptInit C_Decrypt",
    "4 C_EncryptInit C_EncryptUpdate C_EncryptUpdate C_EncryptFinal C_DecryptInit C_DecryptUpdate C_DecryptFinal",
    "4 C_DigestInit C_DigestUpdate C_DigestKey C_DigestFinal C_DigestInit C_Digest",
    "4 C_GenerateKey C_EncryptInit:0,0,0*16,0,0xE0 C_Encrypt C_DecryptInit:0,0,0*16,0,0xE0 C_Decrypt",
    "4 C_GenerateKeyPair C_SignInit:0,@CKM_ECDSA,0,0xE0 C_Sign C_GetAttributeValue:0,0xE0",
    "4 C_WrapKey:0,@CKM_AES_KEY_WRAP C_UnwrapKey:0,@CKM_AES_KEY_WRAP C_GetAttributeValue:0,0xE0 C_EncryptInit:0,0,0*16,0,0xE0 "
    "C_Encrypt C_WrapKey:0,@CKM_RSA_PKCS C_UnwrapKey:0,@CKM_RSA_PKCS",
    "4 C_DeriveKey C_GetAttributeValue:0,0xE0 C_SignInit:0,@CKM_SHA256_HMAC,0,0xE0 C_Sign",
    "4 C_CreateObject C_CopyObject:0,0xE0 C_SetAttributeValue:0,0xE0 C_GetAttributeValue:0,0xE0 C_GetObjectSize:0,0xE0 "
    "C_DestroyObject:0,0xE0 C_GetAttributeValue:0,0xA0",
    "2 C_OpenSession C_GetSessionInfo C_CloseSession C_GetSessionInfo:0x80 C_OpenSession C_CloseAllSessions C_Finalize "
    "C_Initialize C_GetSessionInfo:0x80 C_OpenSession C_GetSessionInfo",
    "1 C_GetInfo C_GetSlotList C_GetSlotInfo C_GetTokenInfo C_GetMechanismList C_GetMechanismInfo C_WaitForSlotEvent "
    "C_GetSlotList:1 C_GetMechanismList:0,1",
    "2 C_Login:0,1 C_InitPIN C_SetPIN C_Logout C_Login C_GetSessionInfo C_Logout",
    "4 C_SignInit:0,@CKM_ECDSA,0,#ec-auth C_Login:0,2 C_Sign",
    "4 C_EncryptInit:0,@CKM_AES_GCM,0,0,0,0,0 C_Encrypt C_DecryptInit:0,@CKM_AES_GCM,0,0,0,0,0 C_Decrypt",
    "4 C_EncryptInit:0,@CKM_RSA_PKCS_OAEP,0,0,0,0 C_Encrypt C_DecryptInit:0,@CKM_RSA_PKCS_OAEP,0,0,0,0 C_Decrypt",
    "0 C_GetInfo C_Initialize:3 C_Initialize C_Finalize:1 C_Finalize C_Finalize C_GetSlotList C_Initialize:5 C_Initialize:4",
    "4 3.0-functions C_GetInterfaceList C_GetInterface 3.0-functions:2 3.0-functions:14",
    "4 C_FindObjectsInit:0,0,2 C_FindObjects:0,1 C_FindObjects:0,1 C_FindObjectsFinal C_FindObjects",
    "4 C_SignInit:0,@CKM_SHA256_HMAC C_SignUpdate C_SignUpdate C_SignFinal C_VerifyInit:0,@CKM_SHA256_HMAC C_VerifyUpdate "
    "C_VerifyUpdate C_VerifyFinal",
    "4 C_SignRecoverInit C_SignRecover C_VerifyRecoverInit C_VerifyRecover",
    "4 C_GenerateRandom C_SeedRandom C_GetOperationState C_SetOperationState C_GetFunctionStatus C_CancelFunction",
    "4 C_SignInit:0,@CKM_SHA256_RSA_PKCS_PSS,0,0 C_Sign C_VerifyInit:0,@CKM_SHA256_RSA_PKCS_PSS,0,0 C_Verify",
    "4 C_EncryptInit:0,@CKM_DES3_CBC_PAD,0*8,0 C_Encrypt C_DecryptInit:0,@CKM_DES3_CBC_PAD,0*8,0 C_Decrypt",
    "4 C_DeriveKey:0,@CKM_AES_ECB_ENCRYPT_DATA C_DeriveKey:0,@CKM_CONCATENATE_BASE_AND_KEY C_DeriveKey:0,@CKM_HKDF_DERIVE",
    "4 C_EncryptInit:0,@CKM_AES_CTR,0,0*16,0 C_Encrypt C_EncryptInit:0,@CKM_AES_KEY_WRAP C_Encrypt:0,8,3",
    "4 C_SignInit C_SignUpdate C_CloseSession C_Sign C_Finalize C_Sign C_Initialize C_Sign",
};

static void write_seeds(const char *dir) {
    mkdir(dir, 0755);
    for (size_t k = 0; k < sizeof seeds / sizeof *seeds; k++) {
        uint8_t out[4096];
        size_t n = 0;
        char *text = strdup(seeds[k]), *save = NULL;
        char *word = strtok_r(text, " ", &save);
        out[n++] = (uint8_t)strtoul(word, NULL, 0);
        while ((word = strtok_r(NULL, " ", &save))) {
            char *colon = strchr(word, ':');
            if (colon) *colon = 0;
            out[n++] = (uint8_t)op_index(word);
            size_t len_at = n++;
            out[len_at] = 0;
            if (colon) {
                char *save2 = NULL;
                for (char *b = strtok_r(colon + 1, ",", &save2); b; b = strtok_r(NULL, ",", &save2)) {
                    int repeat = 1;
                    char *star = strchr(b, '*');
                    if (star) { *star = 0; repeat = atoi(star + 1); }
                    int v = (b[0] == '@' || b[0] == '#') ? seed_byte(b) : (int)strtoul(b, NULL, 0);
                    while (repeat--) { out[n++] = (uint8_t)v; out[len_at]++; }
                }
            }
        }
        free(text);
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/seed-%02zu", dir, k + 1);
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(out, 1, n, f) != n || fclose(f)) die("cannot write %s", path);
    }
    fprintf(stderr, "p11fuzz: %zu seeds written to %s\n", sizeof seeds / sizeof *seeds, dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    if (getenv("P11FUZZ_WRITE_SEEDS")) {
        write_seeds(getenv("P11FUZZ_WRITE_SEEDS"));
        exit(0);
    }
    (void)argc;
    (void)argv;
    verbose = getenv("P11FUZZ_VERBOSE") != NULL;
    keep_going = getenv("P11FUZZ_KEEP_GOING") != NULL;
    allow_lies = getenv("P11FUZZ_LIES") != NULL;
    const char *dir = getenv("P11FUZZ_DIR");
    if (dir) {
        snprintf(workdir, sizeof workdir, "%s", dir);
        mkdir(workdir, 0700);
    } else {
        snprintf(workdir, sizeof workdir, "/tmp/p11fuzz.XXXXXX");
        if (!mkdtemp(workdir)) die("mkdtemp: %s", strerror(errno));
        own_workdir = 1;
    }
    char a[PATH_MAX + 16], b[PATH_MAX + 16], text[2 * PATH_MAX];
    snprintf(a, sizeof a, "%s/a", workdir);
    snprintf(b, sizeof b, "%s/b", workdir);
    remove_tree(a);
    remove_tree(b);
    mkdir(a, 0700);
    mkdir(b, 0700);
    snprintf(conf_a, sizeof conf_a, "%s/a.conf", workdir);
    snprintf(conf_b, sizeof conf_b, "%s/b.conf", workdir);
    snprintf(text, sizeof text, "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", a);
    write_file(conf_a, text);
    snprintf(text, sizeof text, "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", b);
    write_file(conf_b, text);

    // The trace, at its fullest, to a file the harness reads after each input: it must never
    // show a PIN or a secret value. P11FORK_TRACE set to something else turns that check off.
    if (!getenv("P11FORK_TRACE")) {
        snprintf(trace_path, sizeof trace_path, "%s/trace.log", workdir);
        setenv("P11FORK_TRACE", trace_path, 1);
        setenv("P11FORK_TRACE_LEVEL", "full", 0);
    }
    // A small bound on what p11fork keeps for a child, so that inputs reach the paths where it
    // is full (operations stop being recorded, ended ones give their memory back).
    setenv("P11FORK_REPLAY_LIMIT", "16k", 0);

    load_sides();
    env_a = environment_with(conf_a);
    env_b = environment_with(conf_b);
    direct_environment(env_a);
    make_token(list240[DIRECT]);
    copy_tree(a, b);
    direct_environment(env_b);
    pair_slots();
    if (trace_path[0]) trace_fd = open(trace_path, O_RDWR | O_CREAT, 0600);
    atexit(at_exit);
    __sanitizer_set_death_callback(on_death);
    fprintf(stderr, "p11fuzz: p11fork and SoftHSM ready (%d slots, tokens in %s)\n", nslots, workdir);
    return 0;
}

// Reads the trace of the input and empties it; a PIN or a marked secret in it is a finding.
static void check_trace(void) {
    if (trace_fd < 0) return;
    struct stat st;
    if (fstat(trace_fd, &st) || st.st_size == 0) return;
    size_t n = st.st_size;
    char *text = malloc(n + 1);
    ssize_t got = pread(trace_fd, text, n, 0);
    if (got < 0) got = 0;
    text[got] = 0;
    static const char *const secrets[] = {
        USER_PIN, WRONG_PIN, "PIN-2468", "PIN-1357", SECRET_MARK,
        "50494e2d", "50494E2D",          // "PIN-" in hex
        "533343523354", "533343523354",  // the secret marker in hex
        "7031316675", "7031316675",      // "p11fu", the start of every fixed key value, in hex
    };
    for (size_t k = 0; k < sizeof secrets / sizeof *secrets; k++) {
        const char *at = memmem(text, got, secrets[k], strlen(secrets[k]));
        if (!at) continue;
        const char *start = at, *end = at;
        while (start > text && start[-1] != '\n') start--;
        while (*end && *end != '\n') end++;
        C.fn = "trace";
        C.args[0] = 0;
        finding("the trace shows a secret (%s): %.*s", secrets[k], (int)(end - start > 600 ? 600 : end - start), start);
        break;
    }
    free(text);
    if (ftruncate(trace_fd, 0)) { }
}

static void begin_input(void) {
    npairs = nslots;
    searches_forget();
    cur_session = -1;
    diverged = 0;
    log_count = 0;
    last_out_same = 1;
    for (int s = 0; s < 2; s++) set_last_out(s, "", 0);
}

// Leaves both sides finalized, as the next input expects.
static void end_input(void) {
    int op = op_index("C_Finalize");
    Rd empty = { NULL, 0, 0 };
    run_op(op, &empty);
    if (C.rv[FORK] != CKR_OK && C.rv[FORK] != CKR_CRYPTOKI_NOT_INITIALIZED) {
        // An input that left the library in a state C_Finalize(NULL) refuses: make sure.
        list240[FORK]->C_Finalize(NULL);
        list240[DIRECT]->C_Finalize(NULL);
    }
    cur_epoch++;
    check_trace();
    n_inputs++;
    // Memory that is never given back shows as more mappings or more locked memory over time.
    if (n_inputs % 500 == 0) {
        unsigned long maps = proc_number("/proc/self/maps", NULL), vmlck = proc_number("/proc/self/status", "VmLck:");
        if (n_inputs == 1000) {
            maps_base = maps;
            vmlck_base_kb = vmlck;
        } else if (n_inputs > 1000 && (maps > maps_base + 4000 || vmlck > vmlck_base_kb + 65536)) {
            C.fn = "memory";
            C.args[0] = 0;
            finding("memory keeps growing: %lu mappings (%lu after warm-up), %lu kB locked (%lu kB after warm-up)", maps,
                    maps_base, vmlck, vmlck_base_kb);
        }
    }
}

// Input: one byte for the prologue (what is done before the fuzzed calls), then records of
// [function byte][length byte][that many argument bytes].
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    begin_input();
    size_t i = 0;
    uint8_t prologue = size ? data[i++] : 0;
    use30 = (prologue >> 3) & 1;
    static const char *const steps[] = { "C_Initialize", "C_OpenSession", "C_Login", "C_FindObjectsInit", "C_FindObjects",
                                         "C_FindObjectsFinal" };
    int nsteps = 0;
    switch (prologue & 7) {
    case 0: nsteps = 0; break;
    case 1: nsteps = 1; break;
    case 2: case 3: nsteps = 2; break;
    default: nsteps = 6; break;
    }
    for (int k = 0; k < nsteps; k++) {
        Rd empty = { NULL, 0, 0 };
        run_op(op_index(steps[k]), &empty);
    }
    int count = 0;
    while (i < size && count < 64) {
        uint8_t op = data[i++];
        size_t len = i < size ? data[i++] : 0;
        if (len > size - i) len = size - i;
        Rd r = { data + i, len, 0 };
        i += len;
        run_op(op % nops, &r);
        count++;
    }
    end_input();
    return 0;
}
