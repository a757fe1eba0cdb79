// NetHSM test module: the PKCS#11 entry points (2.40, the 3.0 interface calls, the 3.2 functions).
//
// The module plays the client library of a network HSM that knows nothing about fork. One
// C_Initialize of one loaded copy in one process is one "connection" to the server (the state
// file, see server.c); sessions, operations and the login state live on the server and belong
// to the connection. After fork the child's inherited copy is a shared, broken connection:
//   - C_Initialize answers CKR_CRYPTOKI_ALREADY_INITIALIZED and the copy stays broken;
//   - C_Finalize, C_Logout, C_CloseSession and C_CloseAllSessions reach the server and tear
//     down the *parent's* state (its sessions, its login), then answer as the server does;
//   - every other call fails with CKR_DEVICE_ERROR.
// A fresh copy (dlmopen) or a C_Initialize after C_Finalize in the child is a new connection.
// Handles are server ids behind a per-connection prefix and the slot ID is per connection, so
// nothing a parent got works in a child's connection and vice versa.
#define _GNU_SOURCE
#include "nethsm_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MANUFACTURER "p11fork test"
#define DESCRIPTION "NetHSM test module"
#define MODEL "NetHSM"

// MARK: the client side of the connection (process local, one per loaded copy)

// Guards everything below. Never re-initialised: a fork while another thread holds it leaves
// it held in the child, which then hangs on its next call, as a naive client library would.
static pthread_mutex_t client_lock = PTHREAD_MUTEX_INITIALIZER;

static struct {
    int initialized;
    pid_t pid;              // the process that called C_Initialize
    struct nh_state *srv;
    uint32_t conn_id;
    uint32_t tag;           // handle prefix of this connection
    int reuse;              // NETHSM_HANDLES=reuse: handles are the lowest free values, no prefix
    CK_SLOT_ID slot;
    char log_path[1024];    // NETHSM_LOG, read at C_Initialize
} client;

static struct nh_connection *conn;  // this connection's server record, valid between begin() and end()

static const char *rv_name(CK_RV rv) {
    switch (rv) {
    case CKR_OK: return "CKR_OK";
    case CKR_DEVICE_ERROR: return "CKR_DEVICE_ERROR";
    case CKR_SESSION_HANDLE_INVALID: return "CKR_SESSION_HANDLE_INVALID";
    case CKR_SLOT_ID_INVALID: return "CKR_SLOT_ID_INVALID";
    case CKR_USER_NOT_LOGGED_IN: return "CKR_USER_NOT_LOGGED_IN";
    case CKR_CRYPTOKI_ALREADY_INITIALIZED: return "CKR_CRYPTOKI_ALREADY_INITIALIZED";
    case CKR_ARGUMENTS_BAD: return "CKR_ARGUMENTS_BAD";
    default: {
        static char other[24];  // only used under the client lock
        snprintf(other, sizeof other, "0x%lx", rv);
        return other;
    }
    }
}

// Starts a call: client lock, "initialised?", "still the process that connected?", server lock.
// On CKR_OK both locks are held and conn is set; end() releases them.
static CK_RV begin(const char *function) {
    pthread_mutex_lock(&client_lock);
    if (!client.initialized) {
        pthread_mutex_unlock(&client_lock);
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    }
    if (client.pid != getpid()) {
        nh_log(client.log_path, "pid=%d inherited %s: connection %u belongs to pid %d -> CKR_DEVICE_ERROR",
               (int)getpid(), function, client.conn_id, (int)client.pid);
        pthread_mutex_unlock(&client_lock);
        return CKR_DEVICE_ERROR;
    }
    if (nh_server_lock(client.srv) != 0) {
        pthread_mutex_unlock(&client_lock);
        return CKR_DEVICE_ERROR;
    }
    conn = nh_connection_find(client.srv, client.conn_id);
    if (conn == NULL) {  // the server dropped us
        nh_server_unlock(client.srv);
        pthread_mutex_unlock(&client_lock);
        return CKR_DEVICE_ERROR;
    }
    return CKR_OK;
}

static CK_RV end(CK_RV rv) {
    conn = NULL;
    nh_server_unlock(client.srv);
    pthread_mutex_unlock(&client_lock);
    return rv;
}

// For the four teardown calls, which reach the server even on inherited state: like begin(),
// and *inherited tells whether this process is not the one that connected.
static CK_RV begin_teardown(const char *function, int *inherited) {
    pthread_mutex_lock(&client_lock);
    if (!client.initialized) {
        pthread_mutex_unlock(&client_lock);
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    }
    *inherited = client.pid != getpid();
    if (nh_server_lock(client.srv) != 0) {
        pthread_mutex_unlock(&client_lock);
        return CKR_DEVICE_ERROR;
    }
    conn = nh_connection_find(client.srv, client.conn_id);
    if (conn == NULL) {
        if (*inherited)
            nh_log(client.log_path, "pid=%d inherited %s: connection %u of pid %d is gone -> CKR_DEVICE_ERROR",
                   (int)getpid(), function, client.conn_id, (int)client.pid);
        return end(CKR_DEVICE_ERROR);
    }
    return CKR_OK;
}

static void pad(unsigned char *dst, size_t size, const char *text) {
    memset(dst, ' ', size);
    size_t n = strlen(text);
    memcpy(dst, text, n < size ? n : size);
}

// MARK: handles

static CK_ULONG handle_of(uint32_t server_id) { return (client.reuse ? 0 : (CK_ULONG)client.tag << NH_ID_BITS) | server_id; }

static int foreign(CK_ULONG handle) { return (handle >> NH_ID_BITS) != (client.reuse ? 0 : client.tag); }

static struct nh_session *session_of(CK_SESSION_HANDLE handle) {
    if (foreign(handle)) return NULL;
    return nh_session_find(client.srv, client.conn_id, (uint32_t)(handle & NH_ID_MASK));
}

// Token objects, and this connection's session objects.
static struct nh_object *object_of(CK_OBJECT_HANDLE handle) {
    if (foreign(handle)) return NULL;
    struct nh_object *o = nh_object_find(client.srv, (uint32_t)(handle & NH_ID_MASK));
    if (o != NULL && !o->token && o->conn != client.conn_id) return NULL;
    return o;
}

static int user_logged_in(void) { return conn->login == NH_LOGIN_USER; }

static CK_RV may_use(const struct nh_object *o) {
    return o->private_ && !user_logged_in() ? CKR_USER_NOT_LOGGED_IN : CKR_OK;
}

static int is_key_object(const struct nh_object *o) {
    return o->klass == CKO_SECRET_KEY || o->klass == CKO_PRIVATE_KEY || o->klass == CKO_PUBLIC_KEY;
}

static CK_RV may_write(const struct nh_session *se, const struct nh_object *o) {
    CK_RV rv = may_use(o);
    if (rv == CKR_OK && o->token && !se->rw) rv = CKR_SESSION_READ_ONLY;
    return rv;
}

// Puts a finished object (built in *o) on the server; *handle gets its handle.
static CK_RV store_object(const struct nh_session *se, struct nh_object *o, CK_OBJECT_HANDLE_PTR handle) {
    struct nh_object *slot = nh_object_new(client.srv);
    if (slot == NULL) return CKR_DEVICE_MEMORY;
    if (client.reuse) slot->id = nh_object_lowest_id(client.srv, slot);
    uint32_t id = slot->id;
    uint64_t seq = slot->seq;
    *slot = *o;
    slot->id = id;
    slot->seq = seq;
    slot->session = o->token ? 0 : se->id;
    slot->conn = o->token ? 0 : se->conn;
    slot->in_use = 1;
    *handle = handle_of(id);
    return CKR_OK;
}

static void end_operation(struct nh_session *se) {
    se->op = NH_OP_NONE;
    se->op_parts = 0;
    se->op_key = 0;
    se->op_key_private = 0;
    se->op_needs_context_login = 0;
    explicit_bzero(&se->hmac, sizeof se->hmac);
    memset(&se->digest, 0, sizeof se->digest);
    explicit_bzero(&se->cipher, sizeof se->cipher);
    se->find_count = se->find_next = 0;
}

static int pin_matches(const uint8_t *want, uint32_t want_len, const CK_UTF8CHAR *pin, CK_ULONG len) {
    if (len != want_len) return 0;
    uint8_t diff = 0;
    for (CK_ULONG i = 0; i < len; i++) diff |= (uint8_t)(want[i] ^ pin[i]);
    return diff == 0;
}

// Checks a PIN against the server, counting consecutive failures (3 lock it).
static CK_RV check_pin(int so, const CK_UTF8CHAR *pin, CK_ULONG len) {
    struct nh_state *s = client.srv;
    uint32_t *failures = so ? &s->so_failures : &s->user_failures;
    if (*failures >= NH_PIN_TRIES) return CKR_PIN_LOCKED;
    int ok = so ? pin_matches(s->so_pin, s->so_pin_len, pin, len) : pin_matches(s->user_pin, s->user_pin_len, pin, len);
    if (!ok) {
        (*failures)++;
        return CKR_PIN_INCORRECT;
    }
    *failures = 0;
    return CKR_OK;
}

// MARK: general purpose

static CK_RV nh_Initialize(CK_VOID_PTR init_args) {
    pthread_mutex_lock(&client_lock);
    CK_RV rv = CKR_OK;
    if (client.initialized) {
        if (client.pid != getpid())
            nh_log(client.log_path,
                   "pid=%d inherited C_Initialize: connection %u of pid %d stays broken -> CKR_CRYPTOKI_ALREADY_INITIALIZED",
                   (int)getpid(), client.conn_id, (int)client.pid);
        rv = CKR_CRYPTOKI_ALREADY_INITIALIZED;
        goto out;
    }
    if (init_args != NULL) {
        CK_C_INITIALIZE_ARGS *args = init_args;
        int callbacks = (args->CreateMutex != NULL) + (args->DestroyMutex != NULL) + (args->LockMutex != NULL) +
                        (args->UnlockMutex != NULL);
        if (args->pReserved != NULL || (callbacks != 0 && callbacks != 4)) {
            rv = CKR_ARGUMENTS_BAD;
            goto out;
        }
        if (callbacks == 4 && !(args->flags & CKF_OS_LOCKING_OK)) {
            rv = CKR_CANT_LOCK;  // this client only knows the OS's locks
            goto out;
        }
    }
    const char *dir = getenv("NETHSM_DIR");
    if (dir == NULL || dir[0] == '\0') {
        fprintf(stderr, "nethsm: NETHSM_DIR is not set: set it to the directory that holds the NetHSM server state "
                        "(created on first use)\n");
        rv = CKR_GENERAL_ERROR;
        goto out;
    }
    const char *log_path = getenv("NETHSM_LOG");
    if (log_path != NULL && strlen(log_path) >= sizeof client.log_path) {
        fprintf(stderr, "nethsm: NETHSM_LOG is too long (at most %zu characters)\n", sizeof client.log_path - 1);
        rv = CKR_GENERAL_ERROR;
        goto out;
    }
    char why[512];
    struct nh_state *srv = nh_server_open(dir, why, sizeof why);
    if (srv == NULL) {
        fprintf(stderr, "nethsm: %s\n", why);
        rv = CKR_GENERAL_ERROR;
        goto out;
    }
    if (nh_server_lock(srv) != 0) {
        nh_server_close(srv);
        rv = CKR_DEVICE_ERROR;
        goto out;
    }
    struct nh_connection *c = nh_connection_open(srv, getpid());
    if (c == NULL) {
        nh_server_unlock(srv);
        nh_server_close(srv);
        fprintf(stderr, "nethsm: the server has no free connection (%d in use)\n", NH_MAX_CONNECTIONS);
        rv = CKR_GENERAL_ERROR;
        goto out;
    }
    client.srv = srv;
    client.pid = getpid();
    client.conn_id = c->id;
    client.tag = c->tag;
    const char *handles = getenv("NETHSM_HANDLES");
    client.reuse = handles != NULL && strcmp(handles, "reuse") == 0;
    client.slot = (CK_SLOT_ID)c->slot;
    snprintf(client.log_path, sizeof client.log_path, "%s", log_path != NULL ? log_path : "");
    client.initialized = 1;
    nh_server_unlock(srv);
out:
    pthread_mutex_unlock(&client_lock);
    return rv;
}

static CK_RV nh_Finalize(CK_VOID_PTR reserved) {
    int inherited = 0;
    CK_RV rv = begin_teardown("C_Finalize", &inherited);
    if (rv != CKR_OK) return rv;
    if (reserved != NULL) return end(CKR_ARGUMENTS_BAD);
    if (inherited) {
        // The shared connection goes down on the server: the parent loses its sessions and login.
        int was_logged_in = conn->login != NH_LOGIN_NONE;
        unsigned closed = nh_connection_reset(client.srv, conn);
        nh_log(client.log_path, "pid=%d inherited C_Finalize: killed connection %u of pid %d (%u sessions, %s) -> CKR_OK",
               (int)getpid(), client.conn_id, (int)client.pid, closed, was_logged_in ? "logout" : "not logged in");
    } else {
        nh_connection_close(client.srv, conn);
    }
    struct nh_state *srv = client.srv;
    conn = NULL;
    nh_server_unlock(srv);
    nh_server_close(srv);
    memset(&client, 0, sizeof client);
    pthread_mutex_unlock(&client_lock);
    return CKR_OK;
}

static CK_RV nh_GetInfo(CK_INFO_PTR info) {
    CK_RV rv = begin("C_GetInfo");
    if (rv != CKR_OK) return rv;
    if (info == NULL) return end(CKR_ARGUMENTS_BAD);
    memset(info, 0, sizeof *info);
    info->cryptokiVersion.major = 3;  // the newest interface it offers (README "PKCS#11 3.2")
    info->cryptokiVersion.minor = 2;
    pad(info->manufacturerID, sizeof info->manufacturerID, MANUFACTURER);
    info->flags = 0;
    pad(info->libraryDescription, sizeof info->libraryDescription, DESCRIPTION);
    info->libraryVersion.major = 1;
    info->libraryVersion.minor = 0;
    return end(CKR_OK);
}

// MARK: slots and tokens

static CK_RV nh_GetSlotList(CK_BBOOL token_present, CK_SLOT_ID_PTR list, CK_ULONG_PTR count) {
    (void)token_present;  // the token is always present
    CK_RV rv = begin("C_GetSlotList");
    if (rv != CKR_OK) return rv;
    if (count == NULL) return end(CKR_ARGUMENTS_BAD);
    if (list != NULL) {
        if (*count < 1)
            rv = CKR_BUFFER_TOO_SMALL;
        else
            list[0] = client.slot;
    }
    *count = 1;
    return end(rv);
}

static CK_RV nh_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info) {
    CK_RV rv = begin("C_GetSlotInfo");
    if (rv != CKR_OK) return rv;
    if (info == NULL) return end(CKR_ARGUMENTS_BAD);
    if (slot != client.slot) return end(CKR_SLOT_ID_INVALID);
    memset(info, 0, sizeof *info);
    pad(info->slotDescription, sizeof info->slotDescription, "NetHSM test slot (network)");
    pad(info->manufacturerID, sizeof info->manufacturerID, MANUFACTURER);
    info->flags = CKF_TOKEN_PRESENT;
    info->hardwareVersion.major = 1;
    info->firmwareVersion.major = 1;
    return end(CKR_OK);
}

static CK_FLAGS pin_flags(uint32_t failures, CK_FLAGS count_low, CK_FLAGS final_try, CK_FLAGS locked) {
    if (failures >= NH_PIN_TRIES) return locked;
    CK_FLAGS flags = 0;
    if (failures > 0) flags |= count_low;
    if (failures == NH_PIN_TRIES - 1) flags |= final_try;
    return flags;
}

static CK_RV nh_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info) {
    CK_RV rv = begin("C_GetTokenInfo");
    if (rv != CKR_OK) return rv;
    if (info == NULL) return end(CKR_ARGUMENTS_BAD);
    if (slot != client.slot) return end(CKR_SLOT_ID_INVALID);
    struct nh_state *s = client.srv;
    memset(info, 0, sizeof *info);
    memcpy(info->label, s->label, sizeof info->label);
    pad(info->manufacturerID, sizeof info->manufacturerID, MANUFACTURER);
    pad(info->model, sizeof info->model, MODEL);
    memcpy(info->serialNumber, s->serial, sizeof info->serialNumber);
    info->flags = CKF_RNG | CKF_LOGIN_REQUIRED | CKF_USER_PIN_INITIALIZED | CKF_TOKEN_INITIALIZED | CKF_ASYNC_SESSION_SUPPORTED |
                  pin_flags(s->user_failures, CKF_USER_PIN_COUNT_LOW, CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED) |
                  pin_flags(s->so_failures, CKF_SO_PIN_COUNT_LOW, CKF_SO_PIN_FINAL_TRY, CKF_SO_PIN_LOCKED);
    info->ulMaxSessionCount = NH_MAX_SESSIONS;
    info->ulSessionCount = nh_session_count(s, conn->id, 0);
    info->ulMaxRwSessionCount = NH_MAX_SESSIONS;
    info->ulRwSessionCount = nh_session_count(s, conn->id, 1);
    info->ulMaxPinLen = NH_MAX_PIN;
    info->ulMinPinLen = NH_MIN_PIN;
    info->ulTotalPublicMemory = CK_UNAVAILABLE_INFORMATION;
    info->ulFreePublicMemory = CK_UNAVAILABLE_INFORMATION;
    info->ulTotalPrivateMemory = CK_UNAVAILABLE_INFORMATION;
    info->ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION;
    info->hardwareVersion.major = 1;
    info->firmwareVersion.major = 1;
    memset(info->utcTime, ' ', sizeof info->utcTime);  // no clock on the token
    return end(CKR_OK);
}

static const struct {
    CK_MECHANISM_TYPE type;
    CK_ULONG min, max;
    CK_FLAGS flags;
} mechanisms[] = {
    // Key sizes in bytes, except for EC (bits), as PKCS#11 says.
    {CKM_SHA256, 0, 0, CKF_DIGEST},
    {CKM_SHA256_HMAC, 1, NH_MAX_VALUE, CKF_SIGN | CKF_VERIFY},
    {CKM_GENERIC_SECRET_KEY_GEN, 1, NH_MAX_VALUE, CKF_GENERATE},
    {CKM_AES_KEY_GEN, 16, 32, CKF_GENERATE},
    {CKM_AES_ECB, 16, 32, CKF_ENCRYPT | CKF_DECRYPT},
    {CKM_AES_CBC, 16, 32, CKF_ENCRYPT | CKF_DECRYPT},
    {CKM_AES_CBC_PAD, 16, 32, CKF_ENCRYPT | CKF_DECRYPT},
    {CKM_AES_KEY_WRAP, 16, 32, CKF_WRAP | CKF_UNWRAP},
    {CKM_EC_KEY_PAIR_GEN, 256, 256, CKF_GENERATE_KEY_PAIR | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS},
    {CKM_ECDH1_DERIVE, 256, 256, CKF_DERIVE | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS},
    {CKM_CONCATENATE_BASE_AND_DATA, 1, NH_MAX_VALUE, CKF_DERIVE},
    {CKM_SHA256_KEY_DERIVATION, 1, NH_MAX_VALUE, CKF_DERIVE},
    {CKM_NETHSM_ECDH_P256_KEM, 256, 256, CKF_ENCAPSULATE | CKF_DECAPSULATE | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS},
};
#define MECHANISM_COUNT (sizeof mechanisms / sizeof mechanisms[0])

static CK_RV nh_GetMechanismList(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count) {
    CK_RV rv = begin("C_GetMechanismList");
    if (rv != CKR_OK) return rv;
    if (count == NULL) return end(CKR_ARGUMENTS_BAD);
    if (slot != client.slot) return end(CKR_SLOT_ID_INVALID);
    if (list != NULL) {
        if (*count < MECHANISM_COUNT)
            rv = CKR_BUFFER_TOO_SMALL;
        else
            for (size_t i = 0; i < MECHANISM_COUNT; i++) list[i] = mechanisms[i].type;
    }
    *count = MECHANISM_COUNT;
    return end(rv);
}

static CK_RV nh_GetMechanismInfo(CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info) {
    CK_RV rv = begin("C_GetMechanismInfo");
    if (rv != CKR_OK) return rv;
    if (info == NULL) return end(CKR_ARGUMENTS_BAD);
    if (slot != client.slot) return end(CKR_SLOT_ID_INVALID);
    for (size_t i = 0; i < MECHANISM_COUNT; i++) {
        if (mechanisms[i].type == type) {
            info->ulMinKeySize = mechanisms[i].min;
            info->ulMaxKeySize = mechanisms[i].max;
            info->flags = mechanisms[i].flags;
            return end(CKR_OK);
        }
    }
    return end(CKR_MECHANISM_INVALID);
}

// MARK: PINs

static CK_RV nh_InitPIN(CK_SESSION_HANDLE session, CK_UTF8CHAR_PTR pin, CK_ULONG len) {
    CK_RV rv = begin("C_InitPIN");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (pin == NULL) return end(CKR_ARGUMENTS_BAD);  // no protected authentication path
    if (conn->login != NH_LOGIN_SO) return end(CKR_USER_NOT_LOGGED_IN);
    if (!se->rw) return end(CKR_SESSION_READ_ONLY);
    if (len < NH_MIN_PIN || len > NH_MAX_PIN) return end(CKR_PIN_LEN_RANGE);
    memset(client.srv->user_pin, 0, sizeof client.srv->user_pin);
    memcpy(client.srv->user_pin, pin, len);
    client.srv->user_pin_len = (uint32_t)len;
    client.srv->user_failures = 0;
    return end(CKR_OK);
}

static CK_RV nh_SetPIN(CK_SESSION_HANDLE session, CK_UTF8CHAR_PTR old_pin, CK_ULONG old_len, CK_UTF8CHAR_PTR new_pin,
                       CK_ULONG new_len) {
    CK_RV rv = begin("C_SetPIN");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (old_pin == NULL || new_pin == NULL) return end(CKR_ARGUMENTS_BAD);
    if (!se->rw) return end(CKR_SESSION_READ_ONLY);
    if (new_len < NH_MIN_PIN || new_len > NH_MAX_PIN) return end(CKR_PIN_LEN_RANGE);
    int so = conn->login == NH_LOGIN_SO;  // the SO changes the SO PIN; user or public session: the user PIN
    rv = check_pin(so, old_pin, old_len);
    if (rv != CKR_OK) return end(rv);
    struct nh_state *s = client.srv;
    uint8_t *target = so ? s->so_pin : s->user_pin;
    memset(target, 0, NH_MAX_PIN);
    memcpy(target, new_pin, new_len);
    if (so)
        s->so_pin_len = (uint32_t)new_len;
    else
        s->user_pin_len = (uint32_t)new_len;
    return end(CKR_OK);
}

// MARK: sessions

static CK_RV nh_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application, CK_NOTIFY notify,
                            CK_SESSION_HANDLE_PTR session) {
    (void)application;  // no notifications are ever sent
    (void)notify;
    CK_RV rv = begin("C_OpenSession");
    if (rv != CKR_OK) return rv;
    if (session == NULL) return end(CKR_ARGUMENTS_BAD);
    if (slot != client.slot) return end(CKR_SLOT_ID_INVALID);
    if (!(flags & CKF_SERIAL_SESSION)) return end(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
    int rw = (flags & CKF_RW_SESSION) != 0;
    if (!rw && conn->login == NH_LOGIN_SO) return end(CKR_SESSION_READ_WRITE_SO_EXISTS);
    struct nh_session *se = nh_session_new(client.srv, conn, rw);
    if (se == NULL) return end(CKR_SESSION_COUNT);
    se->async = (flags & CKF_ASYNC_SESSION) != 0;
    if (client.reuse) se->id = nh_session_lowest_id(client.srv, se);
    *session = handle_of(se->id);
    return end(CKR_OK);
}

static CK_RV nh_CloseSession(CK_SESSION_HANDLE session) {
    int inherited = 0;
    CK_RV rv = begin_teardown("C_CloseSession", &inherited);
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    uint32_t id = se != NULL ? se->id : 0;
    if (se == NULL)
        rv = CKR_SESSION_HANDLE_INVALID;
    else
        nh_session_close(client.srv, se);
    if (inherited && rv == CKR_OK)
        nh_log(client.log_path, "pid=%d inherited C_CloseSession: closed session %u of connection %u of pid %d -> CKR_OK",
               (int)getpid(), id, client.conn_id, (int)client.pid);
    else if (inherited)
        nh_log(client.log_path, "pid=%d inherited C_CloseSession: 0x%lx is no session of connection %u of pid %d -> %s",
               (int)getpid(), session, client.conn_id, (int)client.pid, rv_name(rv));
    return end(rv);
}

static CK_RV nh_CloseAllSessions(CK_SLOT_ID slot) {
    int inherited = 0;
    CK_RV rv = begin_teardown("C_CloseAllSessions", &inherited);
    if (rv != CKR_OK) return rv;
    unsigned closed = 0;
    if (slot != client.slot)
        rv = CKR_SLOT_ID_INVALID;
    else
        closed = nh_connection_reset(client.srv, conn);  // the last session closed ends the login too
    if (inherited && rv == CKR_OK)
        nh_log(client.log_path,
               "pid=%d inherited C_CloseAllSessions: closed %u sessions of connection %u of pid %d (logout) -> CKR_OK",
               (int)getpid(), closed, client.conn_id, (int)client.pid);
    else if (inherited)
        nh_log(client.log_path, "pid=%d inherited C_CloseAllSessions: slot %lu is not the slot of connection %u of pid %d -> %s",
               (int)getpid(), slot, client.conn_id, (int)client.pid, rv_name(rv));
    return end(rv);
}

static CK_RV nh_GetSessionInfo(CK_SESSION_HANDLE session, CK_SESSION_INFO_PTR info) {
    CK_RV rv = begin("C_GetSessionInfo");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (info == NULL) return end(CKR_ARGUMENTS_BAD);
    memset(info, 0, sizeof *info);
    info->slotID = client.slot;
    if (se->rw)
        info->state = conn->login == NH_LOGIN_SO     ? CKS_RW_SO_FUNCTIONS
                      : conn->login == NH_LOGIN_USER ? CKS_RW_USER_FUNCTIONS
                                                     : CKS_RW_PUBLIC_SESSION;
    else
        info->state = conn->login == NH_LOGIN_USER ? CKS_RO_USER_FUNCTIONS : CKS_RO_PUBLIC_SESSION;
    info->flags = CKF_SERIAL_SESSION | (se->rw ? CKF_RW_SESSION : 0) | (se->async ? CKF_ASYNC_SESSION : 0);
    info->ulDeviceError = 0;
    return end(CKR_OK);
}

static CK_RV nh_Login(CK_SESSION_HANDLE session, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG len) {
    CK_RV rv = begin("C_Login");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (pin == NULL) return end(CKR_ARGUMENTS_BAD);  // no protected authentication path
    switch (user) {
    case CKU_CONTEXT_SPECIFIC:
        if ((se->op != NH_OP_SIGN && se->op != NH_OP_DECRYPT) || !se->op_needs_context_login)
            return end(CKR_OPERATION_NOT_INITIALIZED);
        rv = check_pin(0, pin, len);
        if (rv == CKR_OK) se->op_needs_context_login = 0;
        return end(rv);
    case CKU_USER:
        if (conn->login == NH_LOGIN_USER) return end(CKR_USER_ALREADY_LOGGED_IN);
        if (conn->login == NH_LOGIN_SO) return end(CKR_USER_ANOTHER_ALREADY_LOGGED_IN);
        rv = check_pin(0, pin, len);
        if (rv == CKR_OK) conn->login = NH_LOGIN_USER;
        return end(rv);
    case CKU_SO:
        if (conn->login == NH_LOGIN_SO) return end(CKR_USER_ALREADY_LOGGED_IN);
        if (conn->login == NH_LOGIN_USER) return end(CKR_USER_ANOTHER_ALREADY_LOGGED_IN);
        if (nh_session_count(client.srv, conn->id, 0) != nh_session_count(client.srv, conn->id, 1))
            return end(CKR_SESSION_READ_ONLY_EXISTS);
        rv = check_pin(1, pin, len);
        if (rv == CKR_OK) conn->login = NH_LOGIN_SO;
        return end(rv);
    default:
        return end(CKR_USER_TYPE_INVALID);
    }
}

static CK_RV nh_Logout(CK_SESSION_HANDLE session) {
    int inherited = 0;
    CK_RV rv = begin_teardown("C_Logout", &inherited);
    if (rv != CKR_OK) return rv;
    if (session_of(session) == NULL)
        rv = CKR_SESSION_HANDLE_INVALID;
    else if (conn->login == NH_LOGIN_NONE)
        rv = CKR_USER_NOT_LOGGED_IN;
    else
        conn->login = NH_LOGIN_NONE;
    if (inherited && rv == CKR_OK)
        nh_log(client.log_path, "pid=%d inherited C_Logout: logged out connection %u of pid %d -> CKR_OK", (int)getpid(),
               client.conn_id, (int)client.pid);
    else if (inherited)
        nh_log(client.log_path, "pid=%d inherited C_Logout: connection %u of pid %d unchanged -> %s", (int)getpid(),
               client.conn_id, (int)client.pid, rv_name(rv));
    return end(rv);
}

// MARK: objects

static CK_RV nh_CreateObject(CK_SESSION_HANDLE session, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count,
                             CK_OBJECT_HANDLE_PTR object) {
    CK_RV rv = begin("C_CreateObject");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (object == NULL || (tmpl == NULL && count > 0)) return end(CKR_ARGUMENTS_BAD);
    struct nh_object o;
    rv = nh_template_apply(&o, tmpl, count, NH_CREATE, NH_FROM_TEMPLATE, NH_FROM_TEMPLATE);
    if (rv == CKR_OK) rv = may_write(se, &o);
    if (rv == CKR_OK) rv = store_object(se, &o, object);
    explicit_bzero(&o, sizeof o);
    return end(rv);
}

static CK_RV nh_CopyObject(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE source, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count,
                           CK_OBJECT_HANDLE_PTR object) {
    CK_RV rv = begin("C_CopyObject");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (object == NULL || (tmpl == NULL && count > 0)) return end(CKR_ARGUMENTS_BAD);
    struct nh_object *from = object_of(source);
    if (from == NULL) return end(CKR_OBJECT_HANDLE_INVALID);
    if ((rv = may_use(from)) != CKR_OK) return end(rv);
    struct nh_object o = *from;
    rv = nh_template_apply(&o, tmpl, count, NH_COPY, NH_FROM_TEMPLATE, NH_FROM_TEMPLATE);
    if (rv == CKR_OK) rv = may_write(se, &o);
    if (rv == CKR_OK) rv = store_object(se, &o, object);
    explicit_bzero(&o, sizeof o);
    return end(rv);
}

static CK_RV nh_DestroyObject(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object) {
    CK_RV rv = begin("C_DestroyObject");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    struct nh_object *o = object_of(object);
    if (o == NULL) return end(CKR_OBJECT_HANDLE_INVALID);
    if ((rv = may_write(se, o)) != CKR_OK) return end(rv);
    nh_object_free(o);
    return end(CKR_OK);
}

// PKCS#11 2.40 C_GetAttributeValue: every attribute is processed; the return code is the first
// problem met (CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID or CKR_BUFFER_TOO_SMALL), and
// each attribute that cannot be returned gets ulValueLen = CK_UNAVAILABLE_INFORMATION.
static CK_RV nh_GetAttributeValue(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_PTR tmpl,
                                  CK_ULONG count) {
    CK_RV rv = begin("C_GetAttributeValue");
    if (rv != CKR_OK) return rv;
    if (session_of(session) == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (tmpl == NULL && count > 0) return end(CKR_ARGUMENTS_BAD);
    struct nh_object *o = object_of(object);
    if (o == NULL) return end(CKR_OBJECT_HANDLE_INVALID);
    if ((rv = may_use(o)) != CKR_OK) return end(rv);
    for (CK_ULONG i = 0; i < count; i++) {
        const void *value;
        CK_ULONG len;
        uint8_t scratch[sizeof(CK_ULONG)];
        CK_RV one = nh_attribute_read(o, tmpl[i].type, &value, &len, scratch);
        if (one == CKR_OK) {
            if (tmpl[i].pValue == NULL) {
                tmpl[i].ulValueLen = len;
            } else if (tmpl[i].ulValueLen >= len) {
                if (len > 0) memcpy(tmpl[i].pValue, value, len);
                tmpl[i].ulValueLen = len;
            } else {
                tmpl[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
                one = CKR_BUFFER_TOO_SMALL;
            }
        } else {
            tmpl[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
        }
        if (rv == CKR_OK) rv = one;
    }
    return end(rv);
}

static CK_RV nh_SetAttributeValue(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_PTR tmpl,
                                  CK_ULONG count) {
    CK_RV rv = begin("C_SetAttributeValue");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (tmpl == NULL && count > 0) return end(CKR_ARGUMENTS_BAD);
    struct nh_object *o = object_of(object);
    if (o == NULL) return end(CKR_OBJECT_HANDLE_INVALID);
    if ((rv = may_write(se, o)) != CKR_OK) return end(rv);
    return end(nh_attributes_set(o, tmpl, count));
}

static int visible(const struct nh_object *o) {
    if (!o->in_use) return 0;
    if (!o->token && o->conn != client.conn_id) return 0;
    return !o->private_ || user_logged_in();
}

static CK_RV nh_FindObjectsInit(CK_SESSION_HANDLE session, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count) {
    CK_RV rv = begin("C_FindObjectsInit");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if ((rv = nh_template_check_pointers(tmpl, count)) != CKR_OK) return end(rv);
    if (se->op != NH_OP_NONE) return end(CKR_OPERATION_ACTIVE);
    // The matches, in creation order (insertion sort by sequence number: at most 256).
    struct nh_state *s = client.srv;
    const struct nh_object *found[NH_MAX_OBJECTS];
    uint32_t n = 0;
    for (int i = 0; i < NH_MAX_OBJECTS; i++) {
        const struct nh_object *o = &s->objects[i];
        if (!visible(o) || !nh_object_matches(o, tmpl, count)) continue;
        uint32_t at = n++;
        while (at > 0 && found[at - 1]->seq > o->seq) {
            found[at] = found[at - 1];
            at--;
        }
        found[at] = o;
    }
    end_operation(se);
    for (uint32_t i = 0; i < n; i++) se->find_ids[i] = found[i]->id;
    se->find_count = n;
    se->op = NH_OP_FIND;
    return end(CKR_OK);
}

static CK_RV nh_FindObjects(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE_PTR objects, CK_ULONG max, CK_ULONG_PTR count) {
    CK_RV rv = begin("C_FindObjects");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (objects == NULL || count == NULL) return end(CKR_ARGUMENTS_BAD);
    if (se->op != NH_OP_FIND) return end(CKR_OPERATION_NOT_INITIALIZED);
    CK_ULONG n = 0;
    while (n < max && se->find_next < se->find_count) {
        uint32_t id = se->find_ids[se->find_next++];
        struct nh_object *o = nh_object_find(client.srv, id);
        if (o != NULL && visible(o)) objects[n++] = handle_of(id);  // skips what vanished meanwhile
    }
    *count = n;
    return end(CKR_OK);
}

static CK_RV nh_FindObjectsFinal(CK_SESSION_HANDLE session) {
    CK_RV rv = begin("C_FindObjectsFinal");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (se->op != NH_OP_FIND) return end(CKR_OPERATION_NOT_INITIALIZED);
    end_operation(se);
    return end(CKR_OK);
}

// MARK: digest

static CK_RV mechanism_check(CK_MECHANISM_PTR mechanism, CK_MECHANISM_TYPE wanted) {
    if (mechanism->mechanism != wanted) return CKR_MECHANISM_INVALID;
    if (mechanism->pParameter != NULL || mechanism->ulParameterLen != 0) return CKR_MECHANISM_PARAM_INVALID;
    return CKR_OK;
}

// The output-length protocol of C_Sign, C_SignFinal, C_Digest, C_DigestFinal: a NULL buffer asks
// for the length (operation stays), a short buffer is CKR_BUFFER_TOO_SMALL (operation stays).
// Returns 1 when the caller should produce the output now.
static int output_ready(CK_BYTE_PTR out, CK_ULONG_PTR out_len, CK_RV *rv) {
    if (out == NULL) {
        *out_len = NH_HMAC_LEN;
        *rv = CKR_OK;
        return 0;
    }
    if (*out_len < NH_HMAC_LEN) {
        *out_len = NH_HMAC_LEN;
        *rv = CKR_BUFFER_TOO_SMALL;
        return 0;
    }
    return 1;
}

static CK_RV nh_DigestInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism) {
    CK_RV rv = begin("C_DigestInit");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (mechanism == NULL) return end(CKR_ARGUMENTS_BAD);
    if (se->op != NH_OP_NONE) return end(CKR_OPERATION_ACTIVE);
    if ((rv = mechanism_check(mechanism, CKM_SHA256)) != CKR_OK) return end(rv);
    end_operation(se);
    nh_sha256_init(&se->digest);
    se->op = NH_OP_DIGEST;
    return end(CKR_OK);
}

static CK_RV nh_Digest(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR digest,
                       CK_ULONG_PTR digest_len) {
    CK_RV rv = begin("C_Digest");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (se->op != NH_OP_DIGEST) return end(CKR_OPERATION_NOT_INITIALIZED);
    if (se->op_parts) return end(CKR_OPERATION_ACTIVE);  // a multi-part digest is under way
    if (digest_len == NULL || (data == NULL && data_len > 0)) {
        end_operation(se);
        return end(CKR_ARGUMENTS_BAD);
    }
    if (!output_ready(digest, digest_len, &rv)) return end(rv);
    nh_sha256_update(&se->digest, data, data_len);
    nh_sha256_final(&se->digest, digest);
    *digest_len = NH_HMAC_LEN;
    end_operation(se);
    return end(CKR_OK);
}

static CK_RV nh_DigestUpdate(CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len) {
    CK_RV rv = begin("C_DigestUpdate");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (se->op != NH_OP_DIGEST) return end(CKR_OPERATION_NOT_INITIALIZED);
    if (part == NULL && part_len > 0) {
        end_operation(se);
        return end(CKR_ARGUMENTS_BAD);
    }
    nh_sha256_update(&se->digest, part, part_len);
    se->op_parts = 1;
    return end(CKR_OK);
}

static CK_RV nh_DigestFinal(CK_SESSION_HANDLE session, CK_BYTE_PTR digest, CK_ULONG_PTR digest_len) {
    CK_RV rv = begin("C_DigestFinal");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (se->op != NH_OP_DIGEST) return end(CKR_OPERATION_NOT_INITIALIZED);
    if (digest_len == NULL) {
        end_operation(se);
        return end(CKR_ARGUMENTS_BAD);
    }
    if (!output_ready(digest, digest_len, &rv)) return end(rv);
    nh_sha256_final(&se->digest, digest);
    *digest_len = NH_HMAC_LEN;
    end_operation(se);
    return end(CKR_OK);
}

// MARK: sign and verify (CKM_SHA256_HMAC)

static CK_RV mac_init(struct nh_session *se, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key, int sign) {
    if (mechanism == NULL) return CKR_ARGUMENTS_BAD;
    if (se->op != NH_OP_NONE) return CKR_OPERATION_ACTIVE;
    CK_RV rv = mechanism_check(mechanism, CKM_SHA256_HMAC);
    if (rv != CKR_OK) return rv;
    struct nh_object *o = object_of(key);
    if (o == NULL || !is_key_object(o)) return CKR_KEY_HANDLE_INVALID;
    if ((rv = may_use(o)) != CKR_OK) return rv;
    if (o->klass != CKO_SECRET_KEY || o->key_type != CKK_GENERIC_SECRET) return CKR_KEY_TYPE_INCONSISTENT;
    if (!(sign ? o->sign : o->verify)) return CKR_KEY_FUNCTION_NOT_PERMITTED;
    end_operation(se);
    nh_hmac_init(&se->hmac, o->value, o->value_len);
    se->op = sign ? NH_OP_SIGN : NH_OP_VERIFY;
    se->op_key = o->id;
    se->op_key_private = o->private_;
    se->op_needs_context_login = sign && o->always_authenticate;
    return CKR_OK;
}

// Checks that the session has the operation and may still use its key. A key that became
// unusable (logout, e.g. by a child on a shared connection) ends the operation.
static CK_RV op_continue(struct nh_session *se, enum nh_op op) {
    if (se->op != op) return CKR_OPERATION_NOT_INITIALIZED;
    if (se->op_key_private && !user_logged_in()) {
        end_operation(se);
        return CKR_USER_NOT_LOGGED_IN;
    }
    if (se->op_needs_context_login) return CKR_USER_NOT_LOGGED_IN;  // C_Login(CKU_CONTEXT_SPECIFIC) first
    return CKR_OK;
}

// C_SignUpdate, C_VerifyUpdate, C_VerifySignatureUpdate: more data for the HMAC of operation op.
static CK_RV mac_update(const char *function, CK_SESSION_HANDLE session, enum nh_op op, CK_BYTE_PTR part, CK_ULONG part_len) {
    CK_RV rv = begin(function);
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if ((rv = op_continue(se, op)) != CKR_OK) return end(rv);
    if (part == NULL && part_len > 0) {
        end_operation(se);
        return end(CKR_ARGUMENTS_BAD);
    }
    nh_hmac_update(&se->hmac, part, part_len);
    se->op_parts = 1;
    return end(CKR_OK);
}

static CK_RV nh_SignInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key) {
    CK_RV rv = begin("C_SignInit");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    return end(mac_init(se, mechanism, key, 1));
}

static CK_RV nh_Sign(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR signature,
                     CK_ULONG_PTR signature_len) {
    CK_RV rv = begin("C_Sign");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if ((rv = op_continue(se, NH_OP_SIGN)) != CKR_OK) return end(rv);
    if (se->op_parts) return end(CKR_OPERATION_ACTIVE);  // a multi-part signature is under way
    if (signature_len == NULL || (data == NULL && data_len > 0)) {
        end_operation(se);
        return end(CKR_ARGUMENTS_BAD);
    }
    if (!output_ready(signature, signature_len, &rv)) return end(rv);
    nh_hmac_update(&se->hmac, data, data_len);
    nh_hmac_final(&se->hmac, signature);
    *signature_len = NH_HMAC_LEN;
    end_operation(se);
    return end(CKR_OK);
}

static CK_RV nh_SignUpdate(CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len) {
    return mac_update("C_SignUpdate", session, NH_OP_SIGN, part, part_len);
}

static CK_RV nh_SignFinal(CK_SESSION_HANDLE session, CK_BYTE_PTR signature, CK_ULONG_PTR signature_len) {
    CK_RV rv = begin("C_SignFinal");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if ((rv = op_continue(se, NH_OP_SIGN)) != CKR_OK) return end(rv);
    if (signature_len == NULL) {
        end_operation(se);
        return end(CKR_ARGUMENTS_BAD);
    }
    if (!output_ready(signature, signature_len, &rv)) return end(rv);
    nh_hmac_final(&se->hmac, signature);
    *signature_len = NH_HMAC_LEN;
    end_operation(se);
    return end(CKR_OK);
}

static CK_RV nh_VerifyInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key) {
    CK_RV rv = begin("C_VerifyInit");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    return end(mac_init(se, mechanism, key, 0));
}

// Ends the verify operation, whatever the outcome.
static CK_RV verify_finish(struct nh_session *se, const uint8_t *signature, CK_ULONG signature_len) {
    uint8_t mac[NH_HMAC_LEN];
    CK_RV rv;
    if (signature_len != NH_HMAC_LEN) {
        rv = CKR_SIGNATURE_LEN_RANGE;
    } else {
        nh_hmac_final(&se->hmac, mac);
        uint8_t diff = 0;
        for (int i = 0; i < NH_HMAC_LEN; i++) diff |= (uint8_t)(mac[i] ^ signature[i]);
        rv = diff == 0 ? CKR_OK : CKR_SIGNATURE_INVALID;
    }
    end_operation(se);
    se->validation_flags = rv == CKR_OK ? CKS_LAST_VALIDATION_OK : 0;
    return rv;
}

// C_Verify and C_VerifySignature: the whole data at once, against signature (the caller's, or the
// one C_VerifySignatureInit was given).
static CK_RV verify_single(struct nh_session *se, enum nh_op op, CK_BYTE_PTR data, CK_ULONG data_len,
                           const uint8_t *signature, CK_ULONG signature_len) {
    CK_RV rv = op_continue(se, op);
    if (rv != CKR_OK) return rv;
    if (se->op_parts) return CKR_OPERATION_ACTIVE;
    if (signature == NULL || (data == NULL && data_len > 0)) {
        end_operation(se);
        return CKR_ARGUMENTS_BAD;
    }
    nh_hmac_update(&se->hmac, data, data_len);
    return verify_finish(se, signature, signature_len);
}

static CK_RV nh_Verify(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR signature,
                       CK_ULONG signature_len) {
    CK_RV rv = begin("C_Verify");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    return end(verify_single(se, NH_OP_VERIFY, data, data_len, signature, signature_len));
}

static CK_RV nh_VerifyUpdate(CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len) {
    return mac_update("C_VerifyUpdate", session, NH_OP_VERIFY, part, part_len);
}

static CK_RV nh_VerifyFinal(CK_SESSION_HANDLE session, CK_BYTE_PTR signature, CK_ULONG signature_len) {
    CK_RV rv = begin("C_VerifyFinal");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if ((rv = op_continue(se, NH_OP_VERIFY)) != CKR_OK) return end(rv);
    if (signature == NULL) {
        end_operation(se);
        return end(CKR_ARGUMENTS_BAD);
    }
    return end(verify_finish(se, signature, signature_len));
}

// MARK: encrypt and decrypt (CKM_AES_ECB, CKM_AES_CBC, CKM_AES_CBC_PAD)
//
// The state between calls (mechanism, a copy of the key, the CBC chaining value, the input not
// yet processed) is se->cipher, on the server. Every call first computes its whole output and the
// state after it, and changes the session only when the output is delivered: a length query
// (NULL output) or CKR_BUFFER_TOO_SMALL leaves the operation exactly as it was, any other error
// ends it, and so does a successful C_Encrypt/C_Decrypt/C_*Final.

#define NH_MAX_CRYPT_INPUT ((CK_ULONG)1 << 30)  // bytes per call

static CK_RV cipher_init(struct nh_session *se, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key, int encrypt) {
    if (mechanism == NULL) return CKR_ARGUMENTS_BAD;
    if (se->op != NH_OP_NONE) return CKR_OPERATION_ACTIVE;
    CK_MECHANISM_TYPE type = mechanism->mechanism;
    if (type != CKM_AES_ECB && type != CKM_AES_CBC && type != CKM_AES_CBC_PAD) return CKR_MECHANISM_INVALID;
    CK_RV rv = type == CKM_AES_ECB ? mechanism_check(mechanism, type)
               : mechanism->pParameter == NULL || mechanism->ulParameterLen != NH_AES_BLOCK ? CKR_MECHANISM_PARAM_INVALID
                                                                                           : CKR_OK;
    if (rv != CKR_OK) return rv;
    struct nh_object *o = object_of(key);
    if (o == NULL || !is_key_object(o)) return CKR_KEY_HANDLE_INVALID;
    if ((rv = may_use(o)) != CKR_OK) return rv;
    if (o->klass != CKO_SECRET_KEY || o->key_type != CKK_AES) return CKR_KEY_TYPE_INCONSISTENT;
    if (!(encrypt ? o->encrypt : o->decrypt)) return CKR_KEY_FUNCTION_NOT_PERMITTED;
    end_operation(se);
    se->cipher.mechanism = type;
    se->cipher.key_len = o->value_len;
    memcpy(se->cipher.key, o->value, o->value_len);
    if (type != CKM_AES_ECB) memcpy(se->cipher.iv, mechanism->pParameter, NH_AES_BLOCK);
    se->op = encrypt ? NH_OP_ENCRYPT : NH_OP_DECRYPT;
    se->op_key = o->id;
    se->op_key_private = o->private_;
    se->op_needs_context_login = !encrypt && o->always_authenticate;  // PKCS#11: sign or decrypt
    return CKR_OK;
}

// The output of one call, in memory of this process until it is handed over.
struct cipher_output {
    uint8_t *data;
    size_t len, size;
};

static void cipher_output_free(struct cipher_output *out) {
    if (out->data != NULL) {
        explicit_bzero(out->data, out->size);
        free(out->data);
    }
    out->data = NULL;
}

// Runs the cipher over the buffered input plus in[0, in_len); final: also over what is left
// (ECB/CBC: must be whole blocks; CBC_PAD: padding added or checked and removed). *next gets the
// state after the call (unused after a final step), *out the output.
static CK_RV cipher_step(const struct nh_cipher *c, int encrypt, const uint8_t *in, CK_ULONG in_len, int final,
                         struct nh_cipher *next, struct cipher_output *out) {
    CK_RV length_error = encrypt ? CKR_DATA_LEN_RANGE : CKR_ENCRYPTED_DATA_LEN_RANGE;
    *next = *c;
    memset(out, 0, sizeof *out);
    if (in_len > NH_MAX_CRYPT_INPUT) return length_error;
    int pad = c->mechanism == CKM_AES_CBC_PAD;
    size_t total = c->buffered + (size_t)in_len, process;
    if (!final)
        // CBC_PAD decryption holds back the last block, which may be the padding.
        process = !encrypt && pad ? (total == 0 ? 0 : (total - 1) / NH_AES_BLOCK * NH_AES_BLOCK)
                                  : total / NH_AES_BLOCK * NH_AES_BLOCK;
    else if (encrypt)
        process = pad ? total / NH_AES_BLOCK * NH_AES_BLOCK + NH_AES_BLOCK : total;
    else
        process = total;
    if (final && (process % NH_AES_BLOCK != 0 || (!encrypt && pad && process == 0))) return length_error;

    out->size = (total > process ? total : process) + 1;
    out->data = malloc(out->size);
    if (out->data == NULL) return CKR_HOST_MEMORY;
    uint8_t *work = out->data;
    memcpy(work, c->buffer, c->buffered);
    if (in_len > 0) memcpy(work + c->buffered, in, in_len);
    if (final && encrypt && pad) memset(work + total, (int)(process - total), process - total);  // PKCS#7 padding

    // What stays for the next call, and the chaining value after this one.
    next->buffered = (uint32_t)(total > process ? total - process : 0);
    memcpy(next->buffer, work + process, next->buffered);
    uint8_t last_input[NH_AES_BLOCK];
    if (process > 0) memcpy(last_input, work + process - NH_AES_BLOCK, NH_AES_BLOCK);

    const uint8_t *iv = c->mechanism == CKM_AES_ECB ? NULL : c->iv;
    if (nh_aes_blocks(encrypt, c->key, c->key_len, iv, work, process, work) != 0) return CKR_DEVICE_ERROR;
    if (process > 0 && iv != NULL) memcpy(next->iv, encrypt ? work + process - NH_AES_BLOCK : last_input, NH_AES_BLOCK);
    out->len = process;

    if (final && !encrypt && pad) {
        uint8_t n = work[process - 1];
        uint8_t bad = n == 0 || n > NH_AES_BLOCK;
        for (size_t i = 1; !bad && i <= n; i++) bad |= work[process - i] != n;
        if (bad) return CKR_ENCRYPTED_DATA_INVALID;
        out->len = process - n;
    }
    return CKR_OK;
}

// One output-producing call: single-part (C_Encrypt, C_Decrypt), an update or a final.
static CK_RV cipher_call(struct nh_session *se, int encrypt, int single, const uint8_t *in, CK_ULONG in_len, int final,
                         CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
    struct nh_cipher next;
    struct cipher_output result;
    CK_RV rv = cipher_step(&se->cipher, encrypt, in, in_len, final, &next, &result);
    if (rv != CKR_OK) {
        end_operation(se);
    } else if (out == NULL) {
        *out_len = result.len;  // length query: the operation stays as it was
    } else if (*out_len < result.len) {
        *out_len = result.len;
        rv = CKR_BUFFER_TOO_SMALL;  // the operation stays as it was
    } else {
        if (result.len > 0) memcpy(out, result.data, result.len);
        *out_len = result.len;
        if (final) {
            end_operation(se);
        } else {
            se->cipher = next;
            if (!single) se->op_parts = 1;
        }
    }
    explicit_bzero(&next, sizeof next);
    cipher_output_free(&result);
    return rv;
}

static CK_RV nh_EncryptInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key) {
    CK_RV rv = begin("C_EncryptInit");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    return end(cipher_init(se, mechanism, key, 1));
}

static CK_RV single_part(const char *function, CK_SESSION_HANDLE session, int encrypt, CK_BYTE_PTR in,
                         CK_ULONG in_len, CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
    CK_RV rv = begin(function);
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if ((rv = op_continue(se, encrypt ? NH_OP_ENCRYPT : NH_OP_DECRYPT)) != CKR_OK) return end(rv);
    if (se->op_parts) return end(CKR_OPERATION_ACTIVE);  // a multi-part operation is under way
    if (out_len == NULL || (in == NULL && in_len > 0)) {
        end_operation(se);
        return end(CKR_ARGUMENTS_BAD);
    }
    return end(cipher_call(se, encrypt, 1, in, in_len, 1, out, out_len));
}

static CK_RV update_part(const char *function, CK_SESSION_HANDLE session, int encrypt, CK_BYTE_PTR in,
                         CK_ULONG in_len, CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
    CK_RV rv = begin(function);
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if ((rv = op_continue(se, encrypt ? NH_OP_ENCRYPT : NH_OP_DECRYPT)) != CKR_OK) return end(rv);
    if (out_len == NULL || (in == NULL && in_len > 0)) {
        end_operation(se);
        return end(CKR_ARGUMENTS_BAD);
    }
    return end(cipher_call(se, encrypt, 0, in, in_len, 0, out, out_len));
}

static CK_RV final_part(const char *function, CK_SESSION_HANDLE session, int encrypt, CK_BYTE_PTR out,
                        CK_ULONG_PTR out_len) {
    CK_RV rv = begin(function);
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if ((rv = op_continue(se, encrypt ? NH_OP_ENCRYPT : NH_OP_DECRYPT)) != CKR_OK) return end(rv);
    if (out_len == NULL) {
        end_operation(se);
        return end(CKR_ARGUMENTS_BAD);
    }
    return end(cipher_call(se, encrypt, 0, NULL, 0, 1, out, out_len));
}

static CK_RV nh_Encrypt(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR encrypted,
                        CK_ULONG_PTR encrypted_len) {
    return single_part("C_Encrypt", session, 1, data, data_len, encrypted, encrypted_len);
}

static CK_RV nh_EncryptUpdate(CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len,
                              CK_BYTE_PTR encrypted, CK_ULONG_PTR encrypted_len) {
    return update_part("C_EncryptUpdate", session, 1, part, part_len, encrypted, encrypted_len);
}

static CK_RV nh_EncryptFinal(CK_SESSION_HANDLE session, CK_BYTE_PTR last, CK_ULONG_PTR last_len) {
    return final_part("C_EncryptFinal", session, 1, last, last_len);
}

static CK_RV nh_DecryptInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key) {
    CK_RV rv = begin("C_DecryptInit");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    return end(cipher_init(se, mechanism, key, 0));
}

static CK_RV nh_Decrypt(CK_SESSION_HANDLE session, CK_BYTE_PTR encrypted, CK_ULONG encrypted_len, CK_BYTE_PTR data,
                        CK_ULONG_PTR data_len) {
    return single_part("C_Decrypt", session, 0, encrypted, encrypted_len, data, data_len);
}

static CK_RV nh_DecryptUpdate(CK_SESSION_HANDLE session, CK_BYTE_PTR encrypted, CK_ULONG encrypted_len,
                              CK_BYTE_PTR part, CK_ULONG_PTR part_len) {
    return update_part("C_DecryptUpdate", session, 0, encrypted, encrypted_len, part, part_len);
}

static CK_RV nh_DecryptFinal(CK_SESSION_HANDLE session, CK_BYTE_PTR last, CK_ULONG_PTR last_len) {
    return final_part("C_DecryptFinal", session, 0, last, last_len);
}

// MARK: keys and random numbers

static CK_RV nh_GenerateKey(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_ATTRIBUTE_PTR tmpl,
                            CK_ULONG count, CK_OBJECT_HANDLE_PTR key) {
    CK_RV rv = begin("C_GenerateKey");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (mechanism == NULL || key == NULL || (tmpl == NULL && count > 0)) return end(CKR_ARGUMENTS_BAD);
    CK_ULONG key_type = mechanism->mechanism == CKM_AES_KEY_GEN              ? CKK_AES
                        : mechanism->mechanism == CKM_GENERIC_SECRET_KEY_GEN ? CKK_GENERIC_SECRET
                                                                             : NH_FROM_TEMPLATE;
    if (key_type == NH_FROM_TEMPLATE) return end(CKR_MECHANISM_INVALID);
    if ((rv = mechanism_check(mechanism, mechanism->mechanism)) != CKR_OK) return end(rv);
    struct nh_object o;
    rv = nh_template_apply(&o, tmpl, count, NH_GENERATE, CKO_SECRET_KEY, key_type);
    if (rv == CKR_OK) rv = may_write(se, &o);
    if (rv == CKR_OK && nh_random(o.value, o.value_len) != 0) rv = CKR_DEVICE_ERROR;
    if (rv == CKR_OK) rv = store_object(se, &o, key);
    explicit_bzero(&o, sizeof o);
    return end(rv);
}

// CKM_EC_KEY_PAIR_GEN on P-256: the public template needs CKA_EC_PARAMS (the private one may
// repeat it); the public key gets CKA_EC_POINT, the private key the scalar as CKA_VALUE.
static CK_RV nh_GenerateKeyPair(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_ATTRIBUTE_PTR public_tmpl,
                                CK_ULONG public_count, CK_ATTRIBUTE_PTR private_tmpl, CK_ULONG private_count,
                                CK_OBJECT_HANDLE_PTR public_key, CK_OBJECT_HANDLE_PTR private_key) {
    CK_RV rv = begin("C_GenerateKeyPair");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (mechanism == NULL || public_key == NULL || private_key == NULL || (public_tmpl == NULL && public_count > 0) ||
        (private_tmpl == NULL && private_count > 0))
        return end(CKR_ARGUMENTS_BAD);
    if ((rv = mechanism_check(mechanism, CKM_EC_KEY_PAIR_GEN)) != CKR_OK) return end(rv);
    struct nh_object pub, priv;
    rv = nh_template_apply(&pub, public_tmpl, public_count, NH_GENERATE, CKO_PUBLIC_KEY, CKK_EC);
    if (rv == CKR_OK) rv = nh_template_apply(&priv, private_tmpl, private_count, NH_GENERATE, CKO_PRIVATE_KEY, CKK_EC);
    if (rv == CKR_OK && priv.ec_params_len != 0 &&
        (priv.ec_params_len != pub.ec_params_len || memcmp(priv.ec_params, pub.ec_params, pub.ec_params_len) != 0))
        rv = CKR_TEMPLATE_INCONSISTENT;
    if (rv == CKR_OK) rv = may_write(se, &pub);
    if (rv == CKR_OK) rv = may_write(se, &priv);
    uint8_t point[NH_EC_POINT];
    if (rv == CKR_OK && nh_ec_generate(priv.value, point) != 0) rv = CKR_DEVICE_ERROR;
    if (rv == CKR_OK) {
        memcpy(priv.ec_params, pub.ec_params, pub.ec_params_len);
        priv.ec_params_len = pub.ec_params_len;
        priv.value_len = NH_EC_SCALAR;
        pub.ec_point[0] = 0x04;  // DER OCTET STRING
        pub.ec_point[1] = NH_EC_POINT;
        memcpy(pub.ec_point + 2, point, NH_EC_POINT);
        pub.ec_point_len = NH_EC_POINT_DER;
        rv = store_object(se, &pub, public_key);
        if (rv == CKR_OK && (rv = store_object(se, &priv, private_key)) != CKR_OK) {
            struct nh_object *stored = object_of(*public_key);  // both or neither
            if (stored != NULL) nh_object_free(stored);
            *public_key = CK_INVALID_HANDLE;
        }
    }
    explicit_bzero(&priv, sizeof priv);
    return end(rv);
}

// The parameter of CKM_AES_KEY_WRAP: none (the RFC 3394 default IV) or an 8-byte IV.
static CK_RV key_wrap_iv(CK_MECHANISM_PTR mechanism, const uint8_t **iv) {
    if (mechanism->mechanism != CKM_AES_KEY_WRAP) return CKR_MECHANISM_INVALID;
    *iv = NULL;
    if (mechanism->pParameter == NULL && mechanism->ulParameterLen == 0) return CKR_OK;
    if (mechanism->pParameter == NULL || mechanism->ulParameterLen != 8) return CKR_MECHANISM_PARAM_INVALID;
    *iv = mechanism->pParameter;
    return CKR_OK;
}

// CKM_AES_KEY_WRAP of a secret key (AES or generic, a multiple of 8 bytes, at least 16).
static CK_RV nh_WrapKey(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE wrapping_key,
                        CK_OBJECT_HANDLE key, CK_BYTE_PTR wrapped, CK_ULONG_PTR wrapped_len) {
    CK_RV rv = begin("C_WrapKey");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (mechanism == NULL || wrapped_len == NULL) return end(CKR_ARGUMENTS_BAD);
    const uint8_t *iv;
    if ((rv = key_wrap_iv(mechanism, &iv)) != CKR_OK) return end(rv);
    struct nh_object *kek = object_of(wrapping_key);
    if (kek == NULL || !is_key_object(kek)) return end(CKR_WRAPPING_KEY_HANDLE_INVALID);
    if ((rv = may_use(kek)) != CKR_OK) return end(rv);
    if (kek->klass != CKO_SECRET_KEY || kek->key_type != CKK_AES) return end(CKR_WRAPPING_KEY_TYPE_INCONSISTENT);
    if (!kek->wrap) return end(CKR_KEY_FUNCTION_NOT_PERMITTED);
    struct nh_object *k = object_of(key);
    if (k == NULL || !is_key_object(k)) return end(CKR_KEY_HANDLE_INVALID);
    if ((rv = may_use(k)) != CKR_OK) return end(rv);
    if (k->klass != CKO_SECRET_KEY) return end(CKR_KEY_NOT_WRAPPABLE);
    if (!k->extractable) return end(CKR_KEY_UNEXTRACTABLE);
    if (k->value_len % 8 != 0 || k->value_len < 16) return end(CKR_KEY_SIZE_RANGE);
    CK_ULONG need = k->value_len + 8;
    if (wrapped == NULL) {
        *wrapped_len = need;
        return end(CKR_OK);
    }
    if (*wrapped_len < need) {
        *wrapped_len = need;
        return end(CKR_BUFFER_TOO_SMALL);
    }
    if (nh_aes_wrap(kek->value, kek->value_len, iv, k->value, k->value_len, wrapped) != 0) return end(CKR_DEVICE_ERROR);
    *wrapped_len = need;
    return end(CKR_OK);
}

// CKM_AES_KEY_WRAP back to a secret key; class, key type (generic unless CKK_AES) and the other
// attributes from the template. CKA_VALUE_LEN, if given, must be the unwrapped length.
static CK_RV nh_UnwrapKey(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE unwrapping_key,
                          CK_BYTE_PTR wrapped, CK_ULONG wrapped_len, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count,
                          CK_OBJECT_HANDLE_PTR key) {
    CK_RV rv = begin("C_UnwrapKey");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (mechanism == NULL || key == NULL || (wrapped == NULL && wrapped_len > 0) || (tmpl == NULL && count > 0))
        return end(CKR_ARGUMENTS_BAD);
    const uint8_t *iv;
    if ((rv = key_wrap_iv(mechanism, &iv)) != CKR_OK) return end(rv);
    struct nh_object *kek = object_of(unwrapping_key);
    if (kek == NULL || !is_key_object(kek)) return end(CKR_UNWRAPPING_KEY_HANDLE_INVALID);
    if ((rv = may_use(kek)) != CKR_OK) return end(rv);
    if (kek->klass != CKO_SECRET_KEY || kek->key_type != CKK_AES) return end(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT);
    if (!kek->unwrap) return end(CKR_KEY_FUNCTION_NOT_PERMITTED);
    struct nh_object o;
    rv = nh_template_apply(&o, tmpl, count, NH_UNWRAP, CKO_SECRET_KEY, NH_FROM_TEMPLATE);
    CK_ULONG len = wrapped_len >= 8 ? wrapped_len - 8 : 0;
    if (rv == CKR_OK && (wrapped_len % 8 != 0 || wrapped_len < 24 || len > NH_MAX_VALUE ||
                         !nh_secret_length_ok(o.key_type, len)))
        rv = CKR_WRAPPED_KEY_LEN_RANGE;
    if (rv == CKR_OK && o.value_len != 0 && o.value_len != len) rv = CKR_TEMPLATE_INCONSISTENT;
    if (rv == CKR_OK) rv = may_write(se, &o);
    if (rv == CKR_OK) {
        int result = nh_aes_unwrap(kek->value, kek->value_len, iv, wrapped, wrapped_len, o.value);
        rv = result == 0 ? CKR_OK : result == 1 ? CKR_WRAPPED_KEY_INVALID : CKR_DEVICE_ERROR;
    }
    if (rv == CKR_OK) {
        o.value_len = (uint32_t)len;
        rv = store_object(se, &o, key);
    }
    explicit_bzero(&o, sizeof o);
    return end(rv);
}

// The peer's point of CKM_ECDH1_DERIVE: the raw uncompressed point, or it in a DER OCTET STRING.
static const uint8_t *ecdh_peer(const CK_ECDH1_DERIVE_PARAMS *p) {
    const uint8_t *data = p->pPublicData;
    if (data == NULL) return NULL;
    if (p->ulPublicDataLen == NH_EC_POINT && data[0] == 0x04) return data;
    if (p->ulPublicDataLen == NH_EC_POINT_DER && data[0] == 0x04 && data[1] == NH_EC_POINT && data[2] == 0x04)
        return data + 2;
    return NULL;
}

// C_DeriveKey: CKM_ECDH1_DERIVE (CKD_NULL; the key is the trailing CKA_VALUE_LEN bytes of the
// shared x coordinate, all 32 by default, as SoftHSM does), CKM_CONCATENATE_BASE_AND_DATA and
// CKM_SHA256_KEY_DERIVATION (the leading CKA_VALUE_LEN bytes of base value || data, or of
// SHA-256(base value); without CKA_VALUE_LEN a generic secret key takes them all, an AES key is
// CKR_TEMPLATE_INCOMPLETE, as PKCS#11 says for key types without a fixed length).
static CK_RV nh_DeriveKey(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE base_key,
                          CK_ATTRIBUTE_PTR tmpl, CK_ULONG count, CK_OBJECT_HANDLE_PTR key) {
    CK_RV rv = begin("C_DeriveKey");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (mechanism == NULL || key == NULL || (tmpl == NULL && count > 0)) return end(CKR_ARGUMENTS_BAD);

    // The mechanism and its parameter.
    CK_MECHANISM_TYPE type = mechanism->mechanism;
    const uint8_t *peer = NULL;
    const CK_KEY_DERIVATION_STRING_DATA *string = NULL;
    CK_OBJECT_CLASS base_class = CKO_SECRET_KEY;
    switch (type) {
    case CKM_ECDH1_DERIVE: {
        const CK_ECDH1_DERIVE_PARAMS *p = mechanism->pParameter;
        if (p == NULL || mechanism->ulParameterLen != sizeof *p || p->kdf != CKD_NULL || p->pSharedData != NULL ||
            p->ulSharedDataLen != 0 || (peer = ecdh_peer(p)) == NULL)
            return end(CKR_MECHANISM_PARAM_INVALID);
        base_class = CKO_PRIVATE_KEY;
        break;
    }
    case CKM_CONCATENATE_BASE_AND_DATA:
        string = mechanism->pParameter;
        if (string == NULL || mechanism->ulParameterLen != sizeof *string ||
            (string->pData == NULL && string->ulLen > 0) || string->ulLen > NH_MAX_VALUE)
            return end(CKR_MECHANISM_PARAM_INVALID);
        break;
    case CKM_SHA256_KEY_DERIVATION:
        if ((rv = mechanism_check(mechanism, type)) != CKR_OK) return end(rv);
        break;
    default:
        return end(CKR_MECHANISM_INVALID);
    }

    // The base key.
    struct nh_object *base = object_of(base_key);
    if (base == NULL || !is_key_object(base)) return end(CKR_KEY_HANDLE_INVALID);
    if ((rv = may_use(base)) != CKR_OK) return end(rv);
    if (base->klass != base_class) return end(CKR_KEY_TYPE_INCONSISTENT);
    if (!base->derive) return end(CKR_KEY_FUNCTION_NOT_PERMITTED);

    struct nh_object o;
    uint8_t material[2 * NH_MAX_VALUE];  // base value || data at most
    size_t available = 0;
    int take_trailing = 0;
    rv = nh_template_apply(&o, tmpl, count, NH_DERIVE, CKO_SECRET_KEY, NH_FROM_TEMPLATE);
    if (rv == CKR_OK) rv = may_write(se, &o);
    if (rv == CKR_OK && type == CKM_ECDH1_DERIVE) {
        int result = nh_ecdh(base->value, peer, material);
        rv = result == 0 ? CKR_OK : result == 1 ? CKR_MECHANISM_PARAM_INVALID : CKR_DEVICE_ERROR;
        available = NH_EC_SCALAR;
        take_trailing = 1;
        if (o.value_len == 0) o.value_len = NH_EC_SCALAR;  // generic or AES-256, as SoftHSM
    } else if (rv == CKR_OK && type == CKM_CONCATENATE_BASE_AND_DATA) {
        memcpy(material, base->value, base->value_len);
        if (string->ulLen > 0) memcpy(material + base->value_len, string->pData, string->ulLen);
        available = base->value_len + string->ulLen;
    } else if (rv == CKR_OK) {
        nh_sha256(base->value, base->value_len, material);
        available = NH_HMAC_LEN;
    }
    if (rv == CKR_OK && o.value_len == 0) {
        if (o.key_type == CKK_AES)
            rv = CKR_TEMPLATE_INCOMPLETE;
        else if (available > NH_MAX_VALUE)
            rv = CKR_TEMPLATE_INCONSISTENT;
        else
            o.value_len = (uint32_t)available;
    }
    if (rv == CKR_OK && (o.value_len > available || !nh_secret_length_ok(o.key_type, o.value_len)))
        rv = CKR_TEMPLATE_INCONSISTENT;  // more than the mechanism yields
    if (rv == CKR_OK) {
        memcpy(o.value, material + (take_trailing ? available - o.value_len : 0), o.value_len);
        // PKCS#11: "always sensitive" and "never extractable" only if the base key was too.
        o.always_sensitive = base->always_sensitive && o.sensitive;
        o.never_extractable = base->never_extractable && !o.extractable;
        rv = store_object(se, &o, key);
    }
    explicit_bzero(material, sizeof material);
    explicit_bzero(&o, sizeof o);
    return end(rv);
}

static CK_RV nh_SeedRandom(CK_SESSION_HANDLE session, CK_BYTE_PTR seed, CK_ULONG seed_len) {
    CK_RV rv = begin("C_SeedRandom");
    if (rv != CKR_OK) return rv;
    if (session_of(session) == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (seed == NULL && seed_len > 0) return end(CKR_ARGUMENTS_BAD);
    return end(CKR_RANDOM_SEED_NOT_SUPPORTED);
}

static CK_RV nh_GenerateRandom(CK_SESSION_HANDLE session, CK_BYTE_PTR out, CK_ULONG len) {
    CK_RV rv = begin("C_GenerateRandom");
    if (rv != CKR_OK) return rv;
    if (session_of(session) == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (out == NULL && len > 0) return end(CKR_ARGUMENTS_BAD);
    if (len > 0 && nh_random(out, len) != 0) return end(CKR_DEVICE_ERROR);
    return end(CKR_OK);
}

// MARK: legacy parallel functions (PKCS#11: always CKR_FUNCTION_NOT_PARALLEL)

static CK_RV nh_GetFunctionStatus(CK_SESSION_HANDLE session) {
    (void)session;
    return CKR_FUNCTION_NOT_PARALLEL;
}

static CK_RV nh_CancelFunction(CK_SESSION_HANDLE session) {
    (void)session;
    return CKR_FUNCTION_NOT_PARALLEL;
}

// MARK: PKCS#11 3.2 (README "PKCS#11 3.2")

// C_VerifySignatureInit: CKM_SHA256_HMAC like C_VerifyInit, with the signature given now (its
// length is checked now: CKR_SIGNATURE_LEN_RANGE starts nothing). A NULL mechanism ends an
// operation in progress.
static CK_RV nh_VerifySignatureInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key,
                                    CK_BYTE_PTR signature, CK_ULONG signature_len) {
    CK_RV rv = begin("C_VerifySignatureInit");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (mechanism == NULL) {
        if (se->op != NH_OP_VERIFY_SIGNATURE) return end(CKR_OPERATION_NOT_INITIALIZED);
        end_operation(se);
        return end(CKR_OK);
    }
    if (signature == NULL) return end(CKR_ARGUMENTS_BAD);
    if (se->op == NH_OP_NONE && signature_len != NH_HMAC_LEN) return end(CKR_SIGNATURE_LEN_RANGE);
    if ((rv = mac_init(se, mechanism, key, 0)) != CKR_OK) return end(rv);
    memcpy(se->op_signature, signature, NH_HMAC_LEN);
    se->op = NH_OP_VERIFY_SIGNATURE;
    return end(CKR_OK);
}

// In an asynchronous session the verification's result (CKR_OK, CKR_SIGNATURE_INVALID,
// CKR_SIGNATURE_LEN_RANGE) waits for C_AsyncComplete: the call answers CKR_PENDING (the work is
// done at once; only its answer is held on the server). Other errors are answered at once.
static CK_RV async_hold(struct nh_session *se, const char *function, CK_RV rv) {
    if (!se->async || (rv != CKR_OK && rv != CKR_SIGNATURE_INVALID && rv != CKR_SIGNATURE_LEN_RANGE)) return rv;
    se->async_pending = 1;
    se->async_rv = rv;
    se->async_id = ++client.srv->next_async_id;
    snprintf(se->async_function, sizeof se->async_function, "%s", function);
    return CKR_PENDING;
}

static CK_RV nh_VerifySignature(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len) {
    CK_RV rv = begin("C_VerifySignature");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    rv = verify_single(se, NH_OP_VERIFY_SIGNATURE, data, data_len, se->op_signature, NH_HMAC_LEN);
    return end(async_hold(se, "C_VerifySignature", rv));
}

static CK_RV nh_VerifySignatureUpdate(CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len) {
    return mac_update("C_VerifySignatureUpdate", session, NH_OP_VERIFY_SIGNATURE, part, part_len);
}

static CK_RV nh_VerifySignatureFinal(CK_SESSION_HANDLE session) {
    CK_RV rv = begin("C_VerifySignatureFinal");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if ((rv = op_continue(se, NH_OP_VERIFY_SIGNATURE)) != CKR_OK) return end(rv);
    return end(async_hold(se, "C_VerifySignatureFinal", verify_finish(se, se->op_signature, NH_HMAC_LEN)));
}

// CKS_LAST_VALIDATION_OK: 1 when the session's last finished verification succeeded, else 0.
static CK_RV nh_GetSessionValidationFlags(CK_SESSION_HANDLE session, CK_SESSION_VALIDATION_FLAGS_TYPE type, CK_FLAGS *flags) {
    CK_RV rv = begin("C_GetSessionValidationFlags");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (flags == NULL || type != CKS_LAST_VALIDATION_OK) return end(CKR_ARGUMENTS_BAD);
    *flags = se->validation_flags;
    return end(CKR_OK);
}

// The EC key of a key encapsulation: of class klass, allowed by its CKA_ENCAPSULATE/CKA_DECAPSULATE.
static CK_RV kem_key(CK_OBJECT_HANDLE handle, CK_OBJECT_CLASS klass, struct nh_object **out) {
    struct nh_object *o = object_of(handle);
    if (o == NULL || !is_key_object(o)) return CKR_KEY_HANDLE_INVALID;
    CK_RV rv = may_use(o);
    if (rv != CKR_OK) return rv;
    if (o->klass != klass || o->key_type != CKK_EC) return CKR_KEY_TYPE_INCONSISTENT;
    if (!(klass == CKO_PUBLIC_KEY ? o->encapsulate : o->decapsulate)) return CKR_KEY_FUNCTION_NOT_PERMITTED;
    *out = o;
    return CKR_OK;
}

// The new secret key of C_EncapsulateKey / C_DecapsulateKey: its template (a generic secret of
// 32 bytes unless it says otherwise: CKA_VALUE_LEN 1-32, or an AES key of 16, 24 or 32 bytes),
// its value the leading bytes of SHA-256 of the shared x coordinate.
static CK_RV kem_secret(struct nh_session *se, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count, const uint8_t x[NH_EC_SCALAR],
                        CK_OBJECT_HANDLE_PTR key) {
    struct nh_object o;
    uint8_t secret[NH_HMAC_LEN];
    CK_RV rv = nh_template_apply(&o, tmpl, count, NH_UNWRAP, CKO_SECRET_KEY, NH_FROM_TEMPLATE);
    if (rv == CKR_OK && o.value_len == 0) o.value_len = o.key_type == CKK_AES ? 32 : NH_HMAC_LEN;
    if (rv == CKR_OK && (o.value_len > NH_HMAC_LEN || !nh_secret_length_ok(o.key_type, o.value_len)))
        rv = CKR_TEMPLATE_INCONSISTENT;
    if (rv == CKR_OK) rv = may_write(se, &o);
    if (rv == CKR_OK) {
        nh_sha256(x, NH_EC_SCALAR, secret);
        memcpy(o.value, secret, o.value_len);
        rv = store_object(se, &o, key);
    }
    explicit_bzero(secret, sizeof secret);
    explicit_bzero(&o, sizeof o);
    return rv;
}

#define NH_KEM_CIPHERTEXT NH_EC_POINT  // the ephemeral public point, uncompressed

static CK_RV nh_EncapsulateKey(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE public_key,
                               CK_ATTRIBUTE_PTR tmpl, CK_ULONG count, CK_BYTE_PTR ciphertext, CK_ULONG_PTR ciphertext_len,
                               CK_OBJECT_HANDLE_PTR key) {
    CK_RV rv = begin("C_EncapsulateKey");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (mechanism == NULL || ciphertext_len == NULL || key == NULL || (tmpl == NULL && count > 0))
        return end(CKR_ARGUMENTS_BAD);
    if ((rv = mechanism_check(mechanism, CKM_NETHSM_ECDH_P256_KEM)) != CKR_OK) return end(rv);
    struct nh_object *pub;
    if ((rv = kem_key(public_key, CKO_PUBLIC_KEY, &pub)) != CKR_OK) return end(rv);
    // The output convention of PKCS#11 section 5.2: a NULL buffer asks for the length.
    if (ciphertext == NULL || *ciphertext_len < NH_KEM_CIPHERTEXT) {
        *ciphertext_len = NH_KEM_CIPHERTEXT;
        return end(ciphertext == NULL ? CKR_OK : CKR_BUFFER_TOO_SMALL);
    }
    uint8_t ephemeral[NH_EC_SCALAR], point[NH_EC_POINT], x[NH_EC_SCALAR];
    if (nh_ec_generate(ephemeral, point) != 0 || nh_ecdh(ephemeral, pub->ec_point + 2, x) != 0) rv = CKR_DEVICE_ERROR;
    if (rv == CKR_OK) rv = kem_secret(se, tmpl, count, x, key);
    if (rv == CKR_OK) {
        memcpy(ciphertext, point, NH_KEM_CIPHERTEXT);
        *ciphertext_len = NH_KEM_CIPHERTEXT;
    }
    se->validation_flags = 0;
    explicit_bzero(ephemeral, sizeof ephemeral);
    explicit_bzero(x, sizeof x);
    return end(rv);
}

static CK_RV nh_DecapsulateKey(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE private_key,
                               CK_ATTRIBUTE_PTR tmpl, CK_ULONG count, CK_BYTE_PTR ciphertext, CK_ULONG ciphertext_len,
                               CK_OBJECT_HANDLE_PTR key) {
    CK_RV rv = begin("C_DecapsulateKey");
    if (rv != CKR_OK) return rv;
    struct nh_session *se = session_of(session);
    if (se == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (mechanism == NULL || key == NULL || ciphertext == NULL || (tmpl == NULL && count > 0)) return end(CKR_ARGUMENTS_BAD);
    if ((rv = mechanism_check(mechanism, CKM_NETHSM_ECDH_P256_KEM)) != CKR_OK) return end(rv);
    struct nh_object *priv;
    if ((rv = kem_key(private_key, CKO_PRIVATE_KEY, &priv)) != CKR_OK) return end(rv);
    if (ciphertext_len != NH_KEM_CIPHERTEXT) return end(CKR_WRAPPED_KEY_LEN_RANGE);
    uint8_t x[NH_EC_SCALAR];
    int result = nh_ecdh(priv->value, ciphertext, x);
    rv = result == 0 ? CKR_OK : result == 1 ? CKR_WRAPPED_KEY_INVALID : CKR_DEVICE_ERROR;
    if (rv == CKR_OK) rv = kem_secret(se, tmpl, count, x, key);
    se->validation_flags = 0;
    explicit_bzero(x, sizeof x);
    return end(rv);
}

// The asynchronous calls: the held result of `name` in the session (async_hold). The ID names it
// server-wide, so C_AsyncJoin from any session of any connection takes the result over, as a
// network HSM's client reconnecting after C_Finalize would.
static int async_holds(const struct nh_session *se, const char *name) {
    return se->async_pending && strcmp(se->async_function, name) == 0;
}

static CK_RV async_begin(const char *function, CK_SESSION_HANDLE session, CK_UTF8CHAR_PTR name, struct nh_session **se) {
    CK_RV rv = begin(function);
    if (rv != CKR_OK) return rv;
    if ((*se = session_of(session)) == NULL) return end(CKR_SESSION_HANDLE_INVALID);
    if (name == NULL) return end(CKR_ARGUMENTS_BAD);
    return CKR_OK;
}

static CK_RV nh_AsyncComplete(CK_SESSION_HANDLE session, CK_UTF8CHAR_PTR name, CK_ASYNC_DATA_PTR result) {
    (void)result;  // the functions held here have no output
    struct nh_session *se;
    CK_RV rv = async_begin("C_AsyncComplete", session, name, &se);
    if (rv != CKR_OK) return rv;
    if (!async_holds(se, (const char *)name)) return end(CKR_OPERATION_NOT_INITIALIZED);
    se->async_pending = 0;
    return end((CK_RV)se->async_rv);
}

static CK_RV nh_AsyncGetID(CK_SESSION_HANDLE session, CK_UTF8CHAR_PTR name, CK_ULONG_PTR id) {
    struct nh_session *se;
    CK_RV rv = async_begin("C_AsyncGetID", session, name, &se);
    if (rv != CKR_OK) return rv;
    if (id == NULL) return end(CKR_ARGUMENTS_BAD);
    if (!async_holds(se, (const char *)name)) return end(CKR_OPERATION_NOT_INITIALIZED);
    *id = se->async_id;
    return end(CKR_OK);
}

static CK_RV nh_AsyncJoin(CK_SESSION_HANDLE session, CK_UTF8CHAR_PTR name, CK_ULONG id, CK_BYTE_PTR data, CK_ULONG data_len) {
    (void)data, (void)data_len;  // no output buffer to replace
    struct nh_session *se;
    CK_RV rv = async_begin("C_AsyncJoin", session, name, &se);
    if (rv != CKR_OK) return rv;
    for (int i = 0; i < NH_MAX_SESSIONS; i++) {
        struct nh_session *held = &client.srv->sessions[i];
        if (!held->in_use || !async_holds(held, (const char *)name) || held->async_id != id) continue;
        held->async_pending = 0;
        se->async_pending = 1;
        se->async_id = held->async_id;
        se->async_rv = held->async_rv;
        memcpy(se->async_function, held->async_function, sizeof se->async_function);
        return end(CKR_OK);
    }
    return end(CKR_SAVED_STATE_INVALID);
}

// MARK: not supported

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#define UNSUPPORTED(name, params) \
    static CK_RV nh_##name params { return CKR_FUNCTION_NOT_SUPPORTED; }

UNSUPPORTED(InitToken, (CK_SLOT_ID a, CK_UTF8CHAR_PTR b, CK_ULONG c, CK_UTF8CHAR_PTR d))
UNSUPPORTED(GetOperationState, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c))
UNSUPPORTED(SetOperationState, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_OBJECT_HANDLE d, CK_OBJECT_HANDLE e))
UNSUPPORTED(GetObjectSize, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ULONG_PTR c))
UNSUPPORTED(DigestKey, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b))
UNSUPPORTED(SignRecoverInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c))
UNSUPPORTED(SignRecover, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e))
UNSUPPORTED(VerifyRecoverInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c))
UNSUPPORTED(VerifyRecover, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e))
UNSUPPORTED(DigestEncryptUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e))
UNSUPPORTED(DecryptDigestUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e))
UNSUPPORTED(SignEncryptUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e))
UNSUPPORTED(DecryptVerifyUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e))
UNSUPPORTED(WaitForSlotEvent, (CK_FLAGS a, CK_SLOT_ID_PTR b, CK_VOID_PTR c))
// 3.0: user names and the message-based functions.
UNSUPPORTED(LoginUser, (CK_SESSION_HANDLE a, CK_USER_TYPE b, CK_UTF8CHAR_PTR c, CK_ULONG d, CK_UTF8CHAR_PTR e, CK_ULONG f))
UNSUPPORTED(SessionCancel, (CK_SESSION_HANDLE a, CK_FLAGS b))
#define MESSAGE_INIT(name) UNSUPPORTED(name, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c))
#define MESSAGE_FINAL(name) UNSUPPORTED(name, (CK_SESSION_HANDLE a))
#define MESSAGE_BEGIN(name) UNSUPPORTED(name, (CK_SESSION_HANDLE a, CK_VOID_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG e))
#define MESSAGE_NEXT(name) \
    UNSUPPORTED(name, (CK_SESSION_HANDLE a, CK_VOID_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG e, CK_BYTE_PTR f, CK_ULONG_PTR g, CK_FLAGS h))
#define MESSAGE_ONE(name, last) \
    UNSUPPORTED(name, (CK_SESSION_HANDLE a, CK_VOID_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG e, CK_BYTE_PTR f, CK_ULONG g, CK_BYTE_PTR h, last))
MESSAGE_INIT(MessageEncryptInit) MESSAGE_INIT(MessageDecryptInit) MESSAGE_INIT(MessageSignInit) MESSAGE_INIT(MessageVerifyInit)
MESSAGE_FINAL(MessageEncryptFinal) MESSAGE_FINAL(MessageDecryptFinal) MESSAGE_FINAL(MessageSignFinal) MESSAGE_FINAL(MessageVerifyFinal)
MESSAGE_BEGIN(EncryptMessageBegin) MESSAGE_BEGIN(DecryptMessageBegin)
MESSAGE_NEXT(EncryptMessageNext) MESSAGE_NEXT(DecryptMessageNext)
MESSAGE_ONE(EncryptMessage, CK_ULONG_PTR i) MESSAGE_ONE(DecryptMessage, CK_ULONG_PTR i)
UNSUPPORTED(SignMessageBegin, (CK_SESSION_HANDLE a, CK_VOID_PTR b, CK_ULONG c))
UNSUPPORTED(VerifyMessageBegin, (CK_SESSION_HANDLE a, CK_VOID_PTR b, CK_ULONG c))
UNSUPPORTED(SignMessage, (CK_SESSION_HANDLE a, CK_VOID_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG e, CK_BYTE_PTR f, CK_ULONG_PTR g))
UNSUPPORTED(SignMessageNext, (CK_SESSION_HANDLE a, CK_VOID_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG e, CK_BYTE_PTR f, CK_ULONG_PTR g))
UNSUPPORTED(VerifyMessage, (CK_SESSION_HANDLE a, CK_VOID_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG e, CK_BYTE_PTR f, CK_ULONG g))
UNSUPPORTED(VerifyMessageNext, (CK_SESSION_HANDLE a, CK_VOID_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG e, CK_BYTE_PTR f, CK_ULONG g))
#undef MESSAGE_INIT
#undef MESSAGE_FINAL
#undef MESSAGE_BEGIN
#undef MESSAGE_NEXT
#undef MESSAGE_ONE
// 3.2: authenticated key wrapping (AES-GCM/CCM message parameters, which this module lacks).
UNSUPPORTED(WrapKeyAuthenticated, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c, CK_OBJECT_HANDLE d,
                                   CK_BYTE_PTR e, CK_ULONG f, CK_BYTE_PTR g, CK_ULONG_PTR h))
UNSUPPORTED(UnwrapKeyAuthenticated, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c, CK_BYTE_PTR d,
                                     CK_ULONG e, CK_ATTRIBUTE_PTR f, CK_ULONG g, CK_BYTE_PTR h, CK_ULONG i,
                                     CK_OBJECT_HANDLE_PTR j))

#undef UNSUPPORTED
#pragma GCC diagnostic pop

// MARK: the function lists and interfaces, and the three exports

static CK_RV nh_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);
static CK_RV nh_GetInterfaceList(CK_INTERFACE_PTR interfaces, CK_ULONG_PTR count);
static CK_RV nh_GetInterface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR interface, CK_FLAGS flags);

#define F(name) .C_##name = nh_##name
#define ENTRIES_240 \
    F(Initialize), F(Finalize), F(GetInfo), F(GetFunctionList), F(GetSlotList), F(GetSlotInfo), F(GetTokenInfo), \
    F(GetMechanismList), F(GetMechanismInfo), F(InitToken), F(InitPIN), F(SetPIN), F(OpenSession), F(CloseSession), \
    F(CloseAllSessions), F(GetSessionInfo), F(GetOperationState), F(SetOperationState), F(Login), F(Logout), \
    F(CreateObject), F(CopyObject), F(DestroyObject), F(GetObjectSize), F(GetAttributeValue), F(SetAttributeValue), \
    F(FindObjectsInit), F(FindObjects), F(FindObjectsFinal), F(EncryptInit), F(Encrypt), F(EncryptUpdate), \
    F(EncryptFinal), F(DecryptInit), F(Decrypt), F(DecryptUpdate), F(DecryptFinal), F(DigestInit), F(Digest), \
    F(DigestUpdate), F(DigestKey), F(DigestFinal), F(SignInit), F(Sign), F(SignUpdate), F(SignFinal), \
    F(SignRecoverInit), F(SignRecover), F(VerifyInit), F(Verify), F(VerifyUpdate), F(VerifyFinal), \
    F(VerifyRecoverInit), F(VerifyRecover), F(DigestEncryptUpdate), F(DecryptDigestUpdate), F(SignEncryptUpdate), \
    F(DecryptVerifyUpdate), F(GenerateKey), F(GenerateKeyPair), F(WrapKey), F(UnwrapKey), F(DeriveKey), \
    F(SeedRandom), F(GenerateRandom), F(GetFunctionStatus), F(CancelFunction), F(WaitForSlotEvent)
#define ENTRIES_30 \
    F(GetInterfaceList), F(GetInterface), F(LoginUser), F(SessionCancel), F(MessageEncryptInit), F(EncryptMessage), \
    F(EncryptMessageBegin), F(EncryptMessageNext), F(MessageEncryptFinal), F(MessageDecryptInit), F(DecryptMessage), \
    F(DecryptMessageBegin), F(DecryptMessageNext), F(MessageDecryptFinal), F(MessageSignInit), F(SignMessage), \
    F(SignMessageBegin), F(SignMessageNext), F(MessageSignFinal), F(MessageVerifyInit), F(VerifyMessage), \
    F(VerifyMessageBegin), F(VerifyMessageNext), F(MessageVerifyFinal)

static CK_FUNCTION_LIST function_list = {.version = {2, 40}, ENTRIES_240};
static CK_FUNCTION_LIST_3_0 function_list_30 = {.version = {3, 0}, ENTRIES_240, ENTRIES_30};
static CK_FUNCTION_LIST_3_2 function_list_32 = {
    .version = {3, 2}, ENTRIES_240, ENTRIES_30,
    F(EncapsulateKey), F(DecapsulateKey), F(VerifySignatureInit), F(VerifySignature), F(VerifySignatureUpdate),
    F(VerifySignatureFinal), F(GetSessionValidationFlags), F(AsyncComplete), F(AsyncGetID), F(AsyncJoin),
    F(WrapKeyAuthenticated), F(UnwrapKeyAuthenticated),
};
#undef ENTRIES_30
#undef ENTRIES_240
#undef F

// Newest first: C_GetInterface with no version gives 3.2. No flags: this module is not fork safe.
static CK_INTERFACE interfaces[] = {
    {(CK_UTF8CHAR_PTR)"PKCS 11", &function_list_32, 0},
    {(CK_UTF8CHAR_PTR)"PKCS 11", &function_list_30, 0},
    {(CK_UTF8CHAR_PTR)"PKCS 11", &function_list, 0},
};
#define INTERFACE_COUNT (sizeof interfaces / sizeof interfaces[0])

static CK_RV nh_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
    if (list == NULL) return CKR_ARGUMENTS_BAD;
    *list = &function_list;
    return CKR_OK;
}

static CK_RV nh_GetInterfaceList(CK_INTERFACE_PTR list, CK_ULONG_PTR count) {
    if (count == NULL) return CKR_ARGUMENTS_BAD;
    CK_RV rv = CKR_OK;
    if (list != NULL) {
        if (*count < INTERFACE_COUNT)
            rv = CKR_BUFFER_TOO_SMALL;
        else
            memcpy(list, interfaces, sizeof interfaces);
    }
    *count = INTERFACE_COUNT;
    return rv;
}

static CK_RV nh_GetInterface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR interface, CK_FLAGS flags) {
    if (interface == NULL) return CKR_ARGUMENTS_BAD;
    for (size_t i = 0; i < INTERFACE_COUNT; i++) {
        const CK_VERSION *offered = interfaces[i].pFunctionList;
        if (name != NULL && strcmp((const char *)name, (const char *)interfaces[i].pInterfaceName) != 0) continue;
        if (version != NULL && (version->major != offered->major || version->minor != offered->minor)) continue;
        if ((interfaces[i].flags & flags) != flags) continue;
        *interface = &interfaces[i];
        return CKR_OK;
    }
    return CKR_ARGUMENTS_BAD;
}

#define EXPORT __attribute__((visibility("default")))
EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) { return nh_GetFunctionList(list); }
EXPORT CK_RV C_GetInterfaceList(CK_INTERFACE_PTR list, CK_ULONG_PTR count) { return nh_GetInterfaceList(list, count); }
EXPORT CK_RV C_GetInterface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR interface, CK_FLAGS flags) {
    return nh_GetInterface(name, version, interface, flags);
}
