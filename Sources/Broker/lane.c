// The broker's side of a child's lane (docs/FORK.md "The lane"; the region: ../CPKCS11/lane.h).
//
// A child that reaches the broker may also hand it a region of shared memory. One thread serves
// it: it waits for a request (spinning briefly, then sleeping on a futex), copies it out of the
// region, checks it, calls the module, and writes the reply back. It carries the calls of a
// worker's signing path and of its recovery; everything else, and every call whose arguments it
// cannot carry, goes over p11-kit's RPC as before. Both reach the same module and the same
// sessions, so a child may mix them freely.
//
// The child is not trusted with the broker's memory: a request is read only from the broker's
// own copy, every length is checked against what was received, and nothing the child sends
// becomes a pointer the module follows (mechanism parameters only of the flat kinds below,
// no attribute that holds an array of attributes). A request that breaks these rules closes the
// lane (the child goes on over the RPC).
//
// The message: native words (CK_ULONG) and byte strings (a word with the length, then the bytes,
// padded to a word). A request starts with the operation, a reply with the CK_RV. The operations,
// with the Swift side (Sources/P11ForkCore/Loader/Lane.swift), which must number them alike:
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <fcntl.h>

#include "broker.h"
#include "../CPKCS11/lane.h"

enum {
    OP_GET_SESSION_INFO = 1,
    OP_SIGN_INIT = 2,
    OP_VERIFY_INIT = 3,
    OP_SIGN = 4,
    OP_SIGN_UPDATE = 5,
    OP_SIGN_FINAL = 6,
    OP_VERIFY = 7,
    OP_FIND_OBJECTS_INIT = 8,
    OP_FIND_OBJECTS = 9,
    OP_FIND_OBJECTS_FINAL = 10,
    OP_GET_ATTRIBUTE_VALUE = 11,
    OP_GET_SLOT_LIST = 12,
    OP_GET_SLOT_INFO = 13,
    OP_GET_TOKEN_INFO = 14,
    OP_OPEN_SESSION = 15,
    OP_CLOSE_SESSION = 16,
    OP_GENERATE_RANDOM = 17,
    OP_GET_MECHANISM_INFO = 18,
};

/// Attributes whose value is an array of attributes (with pointers inside) never use the lane.
#define ARRAY_ATTRIBUTE 0x40000000UL

struct LaneServer {
    P11ForkLane *lane;
    Connection *connection;
    pthread_t thread;
    _Atomic int stop;
    unsigned char request[P11FORK_LANE_CAPACITY];
    unsigned char reply[P11FORK_LANE_CAPACITY];
};

// MARK: reading a request, writing a reply

typedef struct Reader {
    const unsigned char *at, *end;
    int bad;
} Reader;

static CK_ULONG word(Reader *reader) {
    CK_ULONG value = 0;
    if ((size_t)(reader->end - reader->at) < sizeof value) {
        reader->bad = 1;
        return 0;
    }
    memcpy(&value, reader->at, sizeof value);
    reader->at += sizeof value;
    return value;
}

/// A byte string of the request; NULL (and `*length` 0) for an empty one.
static unsigned char *bytes(Reader *reader, CK_ULONG *length) {
    *length = word(reader);
    size_t padded = (*length + sizeof(CK_ULONG) - 1) / sizeof(CK_ULONG) * sizeof(CK_ULONG);
    if (reader->bad || *length > P11FORK_LANE_CAPACITY || (size_t)(reader->end - reader->at) < padded) {
        reader->bad = 1;
        *length = 0;
        return NULL;
    }
    unsigned char *start = (unsigned char *)reader->at;
    reader->at += padded;
    return *length ? start : NULL;
}

typedef struct Writer {
    unsigned char *at, *end;
    int bad;
} Writer;

static void put(Writer *writer, CK_ULONG value) {
    if ((size_t)(writer->end - writer->at) < sizeof value) {
        writer->bad = 1;
        return;
    }
    memcpy(writer->at, &value, sizeof value);
    writer->at += sizeof value;
}

static void put_bytes(Writer *writer, const void *data, CK_ULONG length) {
    put(writer, length);
    size_t padded = (length + sizeof(CK_ULONG) - 1) / sizeof(CK_ULONG) * sizeof(CK_ULONG);
    if (writer->bad || (size_t)(writer->end - writer->at) < padded) {
        writer->bad = 1;
        return;
    }
    if (length) memcpy(writer->at, data, length);
    writer->at += padded;
}

/// An output buffer the child asked for: its capacity, and whether it gave one (a length query
/// otherwise). The broker's buffer for it lies in the reply area, after what is written so far.
typedef struct Output {
    int present;
    CK_ULONG capacity;
} Output;

static Output output(Reader *reader) {
    Output out = { .present = word(reader) != 0 };
    out.capacity = word(reader);
    if (out.capacity > P11FORK_LANE_CAPACITY / 2) reader->bad = 1;
    return out;
}

// MARK: mechanisms

/// Parameters the lane carries: none, or a structure of plain words (RSA-PSS). Anything else
/// would put a pointer of the child's making into the module's hands.
static int flat_parameter(CK_MECHANISM_TYPE type, CK_ULONG length) {
    if (length == 0) return 1;
    switch (type) {
    case CKM_RSA_PKCS_PSS:
    case CKM_SHA1_RSA_PKCS_PSS:
    case CKM_SHA224_RSA_PKCS_PSS:
    case CKM_SHA256_RSA_PKCS_PSS:
    case CKM_SHA384_RSA_PKCS_PSS:
    case CKM_SHA512_RSA_PKCS_PSS:
        return length == sizeof(CK_RSA_PKCS_PSS_PARAMS);
    default:
        return 0;
    }
}

// MARK: the operations

/// An output byte string, produced by `call` into the reply area: the length word, then the
/// bytes when the call succeeded and the child gave a buffer.
#define OUTPUT_CALL(writer, out, call_with)                                                         \
    do {                                                                                            \
        unsigned char *length_at = (writer)->at;                                                    \
        put(writer, 0);                                                                             \
        put(writer, 0);                                                                             \
        unsigned char *buffer = (writer)->at;                                                       \
        if ((writer)->bad || (size_t)((writer)->end - buffer) < (out).capacity + sizeof(CK_ULONG)) { \
            reader.bad = 1;                                                                         \
            break;                                                                                  \
        }                                                                                           \
        CK_ULONG produced = (out).capacity;                                                         \
        rv = call_with((out).present ? buffer : NULL, &produced);                                   \
        int sent = rv == CKR_OK && (out).present && produced <= (out).capacity;                     \
        memcpy(length_at, &produced, sizeof produced);                                              \
        CK_ULONG carried = sent ? produced : 0;                                                     \
        memcpy(length_at + sizeof(CK_ULONG), &carried, sizeof carried);                             \
        (writer)->at = buffer + (carried + sizeof(CK_ULONG) - 1) / sizeof(CK_ULONG) * sizeof(CK_ULONG); \
    } while (0)

/// Serves one request of `length` bytes (in server->request); returns the reply's length, or
/// -1 when the request broke the lane's rules.
static long handle(LaneServer *server, size_t length) {
    Reader reader = { server->request, server->request + length, 0 };
    Writer writer = { server->reply, server->reply + sizeof server->reply, 0 };
    CK_ULONG operation = word(&reader);
    CK_RV rv = CKR_OK;
    put(&writer, 0);  // the CK_RV, written at the end
    switch (operation) {
    case OP_GET_SESSION_INFO: {
        CK_SESSION_HANDLE session = word(&reader);
        if (reader.bad) break;
        CK_SESSION_INFO info = { 0 };
        rv = real->C_GetSessionInfo(session, &info);
        put(&writer, info.slotID);
        put(&writer, info.state);
        put(&writer, info.flags);
        put(&writer, info.ulDeviceError);
        break;
    }
    case OP_SIGN_INIT:
    case OP_VERIFY_INIT: {
        CK_SESSION_HANDLE session = word(&reader);
        CK_MECHANISM mechanism = { .mechanism = word(&reader) };
        CK_OBJECT_HANDLE key = word(&reader);
        mechanism.pParameter = bytes(&reader, &mechanism.ulParameterLen);
        if (reader.bad || !flat_parameter(mechanism.mechanism, mechanism.ulParameterLen)) {
            reader.bad = 1;
            break;
        }
        rv = operation == OP_SIGN_INIT ? real->C_SignInit(session, &mechanism, key) : real->C_VerifyInit(session, &mechanism, key);
        break;
    }
    case OP_SIGN: {
        CK_SESSION_HANDLE session = word(&reader);
        CK_ULONG data_length;
        unsigned char *data = bytes(&reader, &data_length);
        Output out = output(&reader);
        if (reader.bad) break;
#define SIGN(buffer, produced) real->C_Sign(session, data, data_length, buffer, produced)
        OUTPUT_CALL(&writer, out, SIGN);
#undef SIGN
        break;
    }
    case OP_SIGN_UPDATE: {
        CK_SESSION_HANDLE session = word(&reader);
        CK_ULONG part_length;
        unsigned char *part = bytes(&reader, &part_length);
        if (reader.bad) break;
        rv = real->C_SignUpdate(session, part, part_length);
        break;
    }
    case OP_SIGN_FINAL: {
        CK_SESSION_HANDLE session = word(&reader);
        Output out = output(&reader);
        if (reader.bad) break;
#define SIGN_FINAL(buffer, produced) real->C_SignFinal(session, buffer, produced)
        OUTPUT_CALL(&writer, out, SIGN_FINAL);
#undef SIGN_FINAL
        break;
    }
    case OP_VERIFY: {
        CK_SESSION_HANDLE session = word(&reader);
        CK_ULONG data_length, signature_length;
        unsigned char *data = bytes(&reader, &data_length);
        unsigned char *signature = bytes(&reader, &signature_length);
        if (reader.bad) break;
        rv = real->C_Verify(session, data, data_length, signature, signature_length);
        break;
    }
    case OP_FIND_OBJECTS_INIT: {
        CK_SESSION_HANDLE session = word(&reader);
        CK_ULONG count = word(&reader);
        if (reader.bad || count > 256) {
            reader.bad = 1;
            break;
        }
        CK_ATTRIBUTE template[256];
        for (CK_ULONG i = 0; i < count && !reader.bad; i++) {
            template[i].type = word(&reader);
            int present = word(&reader) != 0;
            template[i].pValue = bytes(&reader, &template[i].ulValueLen);
            // A value the child gave as a pointer with no bytes still points somewhere valid.
            if (present && !template[i].pValue) template[i].pValue = server->request;
            if (!present && template[i].ulValueLen) reader.bad = 1;
            if (template[i].type & ARRAY_ATTRIBUTE) reader.bad = 1;
        }
        if (reader.bad) break;
        rv = real->C_FindObjectsInit(session, count ? template : NULL, count);
        break;
    }
    case OP_FIND_OBJECTS: {
        CK_SESSION_HANDLE session = word(&reader);
        CK_ULONG most = word(&reader);
        if (reader.bad || most > (P11FORK_LANE_CAPACITY / sizeof(CK_ULONG)) - 8) {
            reader.bad = 1;
            break;
        }
        CK_ULONG found = 0;
        unsigned char *count_at = writer.at;
        put(&writer, 0);
        CK_OBJECT_HANDLE *handles = (CK_OBJECT_HANDLE *)(void *)writer.at;
        rv = real->C_FindObjects(session, handles, most, &found);
        if (found > most) found = most;
        if (rv != CKR_OK) found = 0;
        memcpy(count_at, &found, sizeof found);
        writer.at += found * sizeof(CK_ULONG);
        break;
    }
    case OP_FIND_OBJECTS_FINAL:
    case OP_CLOSE_SESSION: {
        CK_SESSION_HANDLE session = word(&reader);
        if (reader.bad) break;
        rv = operation == OP_FIND_OBJECTS_FINAL ? real->C_FindObjectsFinal(session) : view.C_CloseSession(session);
        break;
    }
    case OP_GET_ATTRIBUTE_VALUE: {
        CK_SESSION_HANDLE session = word(&reader);
        CK_OBJECT_HANDLE object = word(&reader);
        CK_ULONG count = word(&reader);
        if (reader.bad || count > 256) {
            reader.bad = 1;
            break;
        }
        CK_ATTRIBUTE template[256];
        // The values are written into the reply area, each after its length word.
        unsigned char *lengths_at[256];
        size_t room = (size_t)(writer.end - writer.at);
        size_t needed = 0;
        for (CK_ULONG i = 0; i < count && !reader.bad; i++) {
            template[i].type = word(&reader);
            Output out = output(&reader);
            if (template[i].type & ARRAY_ATTRIBUTE) reader.bad = 1;
            template[i].ulValueLen = out.capacity;
            needed += 2 * sizeof(CK_ULONG) + (out.present ? (out.capacity + sizeof(CK_ULONG) - 1) / sizeof(CK_ULONG) * sizeof(CK_ULONG) : 0);
            if (needed > room) reader.bad = 1;
            template[i].pValue = out.present ? (void *)1 : NULL;  // placed below
        }
        if (reader.bad) break;
        for (CK_ULONG i = 0; i < count; i++) {
            lengths_at[i] = writer.at;
            put(&writer, 0);
            put(&writer, 0);
            if (template[i].pValue) {
                template[i].pValue = writer.at;
                writer.at += (template[i].ulValueLen + sizeof(CK_ULONG) - 1) / sizeof(CK_ULONG) * sizeof(CK_ULONG);
            }
        }
        CK_ULONG capacities[256];
        for (CK_ULONG i = 0; i < count; i++) capacities[i] = template[i].ulValueLen;
        rv = real->C_GetAttributeValue(session, object, template, count);
        // Per attribute: the length the module set, and whether its value was written (it fit).
        int answered = rv == CKR_OK || rv == CKR_ATTRIBUTE_SENSITIVE || rv == CKR_ATTRIBUTE_TYPE_INVALID || rv == CKR_BUFFER_TOO_SMALL;
        for (CK_ULONG i = 0; i < count; i++) {
            CK_ULONG length = template[i].ulValueLen;
            CK_ULONG written = answered && template[i].pValue && length != CK_UNAVAILABLE_INFORMATION && length <= capacities[i];
            memcpy(lengths_at[i], &length, sizeof length);
            memcpy(lengths_at[i] + sizeof(CK_ULONG), &written, sizeof written);
        }
        break;
    }
    case OP_GET_SLOT_LIST: {
        CK_BBOOL present = word(&reader) != 0;
        Output out = output(&reader);
        if (reader.bad || out.capacity > (P11FORK_LANE_CAPACITY / sizeof(CK_ULONG)) - 8) {
            reader.bad = 1;
            break;
        }
        unsigned char *count_at = writer.at;
        put(&writer, 0);
        CK_ULONG count = out.capacity;
        rv = real->C_GetSlotList(present, out.present ? (CK_SLOT_ID *)(void *)writer.at : NULL, &count);
        memcpy(count_at, &count, sizeof count);
        if (rv == CKR_OK && out.present && count <= out.capacity) writer.at += count * sizeof(CK_ULONG);
        break;
    }
    case OP_GET_SLOT_INFO: {
        CK_SLOT_ID slot = word(&reader);
        if (reader.bad) break;
        CK_SLOT_INFO info;
        memset(&info, 0, sizeof info);
        rv = real->C_GetSlotInfo(slot, &info);
        put_bytes(&writer, &info, sizeof info);
        break;
    }
    case OP_GET_TOKEN_INFO: {
        CK_SLOT_ID slot = word(&reader);
        if (reader.bad) break;
        CK_TOKEN_INFO info;
        memset(&info, 0, sizeof info);
        rv = real->C_GetTokenInfo(slot, &info);
        put_bytes(&writer, &info, sizeof info);
        break;
    }
    case OP_GET_MECHANISM_INFO: {
        CK_SLOT_ID slot = word(&reader);
        CK_MECHANISM_TYPE type = word(&reader);
        if (reader.bad) break;
        CK_MECHANISM_INFO info = { 0 };
        rv = real->C_GetMechanismInfo(slot, type, &info);
        put(&writer, info.ulMinKeySize);
        put(&writer, info.ulMaxKeySize);
        put(&writer, info.flags);
        break;
    }
    case OP_OPEN_SESSION: {
        CK_SLOT_ID slot = word(&reader);
        CK_FLAGS flags = word(&reader);
        if (reader.bad) break;
        CK_SESSION_HANDLE session = 0;
        rv = view.C_OpenSession(slot, flags, NULL, NULL, &session);
        put(&writer, session);
        break;
    }
    case OP_GENERATE_RANDOM: {
        CK_SESSION_HANDLE session = word(&reader);
        CK_ULONG wanted = word(&reader);
        if (reader.bad || wanted > P11FORK_LANE_CAPACITY / 2) {
            reader.bad = 1;
            break;
        }
        put(&writer, wanted);
        rv = real->C_GenerateRandom(session, writer.at, wanted);
        writer.at += (wanted + sizeof(CK_ULONG) - 1) / sizeof(CK_ULONG) * sizeof(CK_ULONG);
        break;
    }
    default:
        reader.bad = 1;
    }
    if (reader.bad || writer.bad || reader.at != reader.end) return -1;
    memcpy(server->reply, &rv, sizeof rv);
    return writer.at - server->reply;
}

// MARK: serving

static int stopping(void *context) {
    LaneServer *server = context;
    return atomic_load(&server->stop);
}

static void *serve_lane(void *argument) {
    LaneServer *server = argument;
    P11ForkLane *lane = server->lane;
    current = server->connection;
    // A new region: the child's first call is number 1 (it may be posted before this thread runs).
    uint32_t served = 0;
    // The child's first call follows its connection within about a millisecond (it recovers its
    // sessions and keys over the lane): watched for 2 ms. After each reply the next call usually
    // follows within microseconds: watched for 100 µs. Then the thread sleeps.
    uint64_t watch_ns = 2000000;
    for (;;) {
        if (!p11fork_lane_wait(&lane->request, served, &lane->broker_sleeps, watch_ns, 200, stopping, server)) break;
        watch_ns = 100000;
        served = atomic_load_explicit(&lane->request, memory_order_acquire);
        uint32_t length = atomic_load_explicit(&lane->length, memory_order_relaxed);
        long answer = -1;
        if (length <= P11FORK_LANE_CAPACITY) {
            memcpy(server->request, p11fork_lane_data(lane), length);
            answer = handle(server, length);
        }
        if (answer < 0) {
            trace("pid %d sent a request the lane does not carry: its lane is closed (its calls go over p11-kit's RPC)", (int)server->connection->pid);
            atomic_store(&lane->closed, 1);
            p11fork_lane_post(&lane->reply, served, &lane->child_sleeps);
            break;
        }
        memcpy(p11fork_lane_data(lane), server->reply, (size_t)answer);
        atomic_store_explicit(&lane->length, (uint32_t)answer, memory_order_relaxed);
        p11fork_lane_post(&lane->reply, served, &lane->child_sleeps);
    }
    return NULL;
}

LaneServer *lane_start(int fd, Connection *connection) {
    // Sealed at the lane's size, or it could shrink under the broker's reads.
    struct stat status;
    int seals = fcntl(fd, F_GET_SEALS);
    if (fstat(fd, &status) != 0 || status.st_size != P11FORK_LANE_SIZE || seals < 0 ||
        (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW)) {
        trace("pid %d offered a lane that is not sealed at its size: not used", (int)connection->pid);
        return NULL;
    }
    void *region = mmap(NULL, P11FORK_LANE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (region == MAP_FAILED) return NULL;
    LaneServer *server = calloc(1, sizeof *server);
    if (!server) {
        munmap(region, P11FORK_LANE_SIZE);
        return NULL;
    }
    server->lane = region;
    server->connection = connection;
    if (pthread_create(&server->thread, NULL, serve_lane, server) != 0) {
        munmap(region, P11FORK_LANE_SIZE);
        free(server);
        return NULL;
    }
    return server;
}

void lane_stop(LaneServer *server) {
    atomic_store(&server->stop, 1);
    p11fork_lane_futex(&server->lane->request, FUTEX_WAKE, 1, -1);
    pthread_join(server->thread, NULL);
    atomic_store(&server->lane->closed, 1);
    munmap(server->lane, P11FORK_LANE_SIZE);
    free(server);
}
