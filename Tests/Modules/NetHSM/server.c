// NetHSM test module: the "server" — the state file shared by every process and every loaded
// copy of the module, and the bookkeeping of connections, sessions and objects inside it.
// Every function here except nh_server_open/close expects the server lock to be held.
#define _GNU_SOURCE
#include "nethsm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#define STATE_FILE "nethsm.state"

// MARK: randomness

int nh_random(void *buf, size_t len) {
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = getrandom(p, len, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        p += n;
        len -= (size_t)n;
    }
    if (len == 0) return 0;
    // No getrandom(2): fall back to the device.
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            close(fd);
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    close(fd);
    return 0;
}

static uint32_t random_below(uint32_t bound) {
    uint32_t r = 0;
    if (nh_random(&r, sizeof r) != 0) r = (uint32_t)getpid() * 2654435761u;
    return r % bound;
}

// MARK: log

void nh_log(const char *path, const char *format, ...) {
    if (path == NULL || path[0] == '\0') return;
    char line[1024];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(line, sizeof line - 1, format, args);
    va_end(args);
    if (n < 0) return;
    if ((size_t)n > sizeof line - 2) n = (int)(sizeof line - 2);
    line[n++] = '\n';
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    ssize_t written = write(fd, line, (size_t)n);  // one write: lines from processes never interleave
    (void)written;
    close(fd);
}

// MARK: opening the state

static void pad_copy(uint8_t *dst, size_t size, const char *src) {
    memset(dst, ' ', size);
    size_t n = strlen(src);
    memcpy(dst, src, n < size ? n : size);
}

static int pin_from_env(const char *name, const char *fallback, uint8_t *pin, uint32_t *len, char *why,
                        size_t why_size) {
    const char *value = getenv(name);
    if (value == NULL) value = fallback;
    size_t n = strlen(value);
    if (n < NH_MIN_PIN || n > NH_MAX_PIN) {
        snprintf(why, why_size, "%s must be %d to %d characters long", name, NH_MIN_PIN, NH_MAX_PIN);
        return -1;
    }
    memcpy(pin, value, n);
    *len = (uint32_t)n;
    return 0;
}

// Fills a new, zeroed state file. Runs under the file's flock, so only one process does it.
static int create_state(struct nh_state *s, char *why, size_t why_size) {
    const char *label = getenv("NETHSM_LABEL");
    if (label == NULL || label[0] == '\0') label = "nethsm";
    pad_copy(s->label, sizeof s->label, label);
    if (pin_from_env("NETHSM_PIN", "1234", s->user_pin, &s->user_pin_len, why, why_size) != 0) return -1;
    if (pin_from_env("NETHSM_SO_PIN", "5678", s->so_pin, &s->so_pin_len, why, why_size) != 0) return -1;

    uint8_t serial[8];
    if (nh_random(serial, sizeof serial) != 0) {
        snprintf(why, why_size, "no random numbers (getrandom and /dev/urandom failed)");
        return -1;
    }
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 8; i++) {
        s->serial[2 * i] = (uint8_t)hex[serial[i] >> 4];
        s->serial[2 * i + 1] = (uint8_t)hex[serial[i] & 15];
    }

    pthread_mutexattr_t attributes;
    pthread_mutexattr_init(&attributes);
    pthread_mutexattr_setpshared(&attributes, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attributes, PTHREAD_MUTEX_ROBUST);
    int rc = pthread_mutex_init(&s->lock, &attributes);
    pthread_mutexattr_destroy(&attributes);
    if (rc != 0) {
        snprintf(why, why_size, "cannot create the server lock: %s", strerror(rc));
        return -1;
    }
    s->next_connection = 1;
    s->next_session = 1;
    s->next_object = 1;
    s->next_seq = 1;
    s->layout = NH_LAYOUT;
    s->size = (uint32_t)sizeof *s;
    __atomic_store_n(&s->magic, NH_MAGIC, __ATOMIC_RELEASE);
    return 0;
}

struct nh_state *nh_server_open(const char *dir, char *why, size_t why_size) {
    char path[4096];
    if (snprintf(path, sizeof path, "%s/%s", dir, STATE_FILE) >= (int)sizeof path) {
        snprintf(why, why_size, "NETHSM_DIR is too long");
        return NULL;
    }
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        snprintf(why, why_size, "cannot create NETHSM_DIR %s: %s", dir, strerror(errno));
        return NULL;
    }
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(why, why_size, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    struct nh_state *s = NULL;
    struct stat st;
    while (flock(fd, LOCK_EX) != 0 && errno == EINTR) {
    }
    if (fstat(fd, &st) != 0) {
        snprintf(why, why_size, "cannot stat %s: %s", path, strerror(errno));
        goto done;
    }
    int fresh = st.st_size == 0;
    if (fresh && ftruncate(fd, (off_t)sizeof *s) != 0) {
        snprintf(why, why_size, "cannot size %s: %s", path, strerror(errno));
        goto done;
    }
    if (!fresh && st.st_size != (off_t)sizeof *s) {
        snprintf(why, why_size, "%s has the wrong size (made by another build of the module?): delete it", path);
        goto done;
    }
    void *map = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        snprintf(why, why_size, "cannot map %s: %s", path, strerror(errno));
        goto done;
    }
    s = map;
    if (fresh) {
        if (create_state(s, why, why_size) != 0) {
            munmap(map, sizeof *s);
            s = NULL;
            (void)ftruncate(fd, 0);  // let the next C_Initialize try again
        }
    } else if (__atomic_load_n(&s->magic, __ATOMIC_ACQUIRE) != NH_MAGIC || s->layout != NH_LAYOUT ||
               s->size != sizeof *s) {
        snprintf(why, why_size, "%s is not a NetHSM state file of this build: delete it", path);
        munmap(map, sizeof *s);
        s = NULL;
    }
done:
    flock(fd, LOCK_UN);
    close(fd);  // the mapping stays
    return s;
}

void nh_server_close(struct nh_state *s) { munmap(s, sizeof *s); }

int nh_server_lock(struct nh_state *s) {
    int rc = pthread_mutex_lock(&s->lock);
    if (rc == EOWNERDEAD) {
        // A process died inside a call: the server carries on with what it has.
        pthread_mutex_consistent(&s->lock);
        rc = 0;
    }
    return rc;
}

void nh_server_unlock(struct nh_state *s) { pthread_mutex_unlock(&s->lock); }

// MARK: ids

static int session_id_used(struct nh_state *s, uint32_t id) {
    for (int i = 0; i < NH_MAX_SESSIONS; i++)
        if (s->sessions[i].in_use && s->sessions[i].id == id) return 1;
    return 0;
}

static int object_id_used(struct nh_state *s, uint32_t id) {
    for (int i = 0; i < NH_MAX_OBJECTS; i++)
        if (s->objects[i].in_use && s->objects[i].id == id) return 1;
    return 0;
}

// Server ids count up and are not reused until they wrap (after 2^20 - 1), so a stale handle
// finds nothing rather than someone else's object.
static uint32_t next_id(uint32_t *counter, struct nh_state *s, int (*used)(struct nh_state *, uint32_t)) {
    for (;;) {
        uint32_t id = *counter;
        *counter = id >= NH_ID_MASK ? 1 : id + 1;
        if (id != 0 && !used(s, id)) return id;
    }
}

// MARK: connections

struct nh_connection *nh_connection_find(struct nh_state *s, uint32_t id) {
    for (int i = 0; i < NH_MAX_CONNECTIONS; i++)
        if (s->connections[i].in_use && s->connections[i].id == id) return &s->connections[i];
    return NULL;
}

static int tag_or_slot_taken(struct nh_state *s, uint32_t tag, uint64_t slot) {
    for (int i = 0; i < NH_MAX_CONNECTIONS; i++) {
        struct nh_connection *c = &s->connections[i];
        if (c->in_use && (c->tag == tag || c->slot == slot)) return 1;
    }
    return 0;
}

struct nh_connection *nh_connection_open(struct nh_state *s, pid_t pid) {
    nh_reap_dead_connections(s);
    struct nh_connection *c = NULL;
    for (int i = 0; i < NH_MAX_CONNECTIONS && c == NULL; i++)
        if (!s->connections[i].in_use) c = &s->connections[i];
    if (c == NULL) return NULL;
    memset(c, 0, sizeof *c);
    // Handle prefix and slot ID: random, and different from every live connection's, so that a
    // handle or slot ID of another process (or copy) never works here.
    uint32_t tag;
    uint64_t slot;
    do {
        tag = 1 + random_below(0xfff);
        slot = 100 + random_below(900);
    } while (tag_or_slot_taken(s, tag, slot));
    c->tag = tag;
    c->slot = slot;
    c->id = s->next_connection++;
    if (s->next_connection == 0) s->next_connection = 1;
    c->pid = (int32_t)pid;
    c->login = NH_LOGIN_NONE;
    c->in_use = 1;
    return c;
}

unsigned nh_connection_reset(struct nh_state *s, struct nh_connection *c) {
    unsigned closed = 0;
    for (int i = 0; i < NH_MAX_SESSIONS; i++) {
        if (s->sessions[i].in_use && s->sessions[i].conn == c->id) {
            nh_session_close(s, &s->sessions[i]);
            closed++;
        }
    }
    c->login = NH_LOGIN_NONE;
    return closed;
}

void nh_connection_close(struct nh_state *s, struct nh_connection *c) {
    nh_connection_reset(s, c);
    memset(c, 0, sizeof *c);
}

void nh_reap_dead_connections(struct nh_state *s) {
    pid_t self = getpid();
    for (int i = 0; i < NH_MAX_CONNECTIONS; i++) {
        struct nh_connection *c = &s->connections[i];
        if (c->in_use && c->pid != self && kill(c->pid, 0) != 0 && errno == ESRCH) nh_connection_close(s, c);
    }
}

// MARK: sessions

struct nh_session *nh_session_new(struct nh_state *s, struct nh_connection *c, int rw) {
    struct nh_session *se = NULL;
    for (int i = 0; i < NH_MAX_SESSIONS && se == NULL; i++)
        if (!s->sessions[i].in_use) se = &s->sessions[i];
    if (se == NULL) {
        nh_reap_dead_connections(s);
        for (int i = 0; i < NH_MAX_SESSIONS && se == NULL; i++)
            if (!s->sessions[i].in_use) se = &s->sessions[i];
        if (se == NULL) return NULL;
    }
    memset(se, 0, sizeof *se);
    se->id = next_id(&s->next_session, s, session_id_used);
    se->conn = c->id;
    se->rw = rw ? 1 : 0;
    se->in_use = 1;
    return se;
}

struct nh_session *nh_session_find(struct nh_state *s, uint32_t conn, uint32_t id) {
    for (int i = 0; i < NH_MAX_SESSIONS; i++) {
        struct nh_session *se = &s->sessions[i];
        if (se->in_use && se->id == id && se->conn == conn) return se;
    }
    return NULL;
}

unsigned nh_session_count(struct nh_state *s, uint32_t conn, int rw_only) {
    unsigned n = 0;
    for (int i = 0; i < NH_MAX_SESSIONS; i++) {
        struct nh_session *se = &s->sessions[i];
        if (se->in_use && se->conn == conn && (!rw_only || se->rw)) n++;
    }
    return n;
}

// Closing a session destroys its session objects; closing a connection's last session returns
// the connection to the public state (PKCS#11 C_CloseSession).
void nh_session_close(struct nh_state *s, struct nh_session *se) {
    uint32_t conn = se->conn;
    for (int i = 0; i < NH_MAX_OBJECTS; i++) {
        struct nh_object *o = &s->objects[i];
        if (o->in_use && !o->token && o->session == se->id && o->conn == se->conn) nh_object_free(o);
    }
    memset(se, 0, sizeof *se);
    if (nh_session_count(s, conn, 0) == 0) {
        struct nh_connection *c = nh_connection_find(s, conn);
        if (c != NULL) c->login = NH_LOGIN_NONE;
    }
}

// MARK: objects

struct nh_object *nh_object_new(struct nh_state *s) {
    for (int i = 0; i < NH_MAX_OBJECTS; i++) {
        struct nh_object *o = &s->objects[i];
        if (!o->in_use) {
            memset(o, 0, sizeof *o);
            o->id = next_id(&s->next_object, s, object_id_used);
            o->seq = s->next_seq++;
            return o;  // in_use is set by the caller once the object is complete
        }
    }
    return NULL;
}

uint32_t nh_session_lowest_id(struct nh_state *s, const struct nh_session *self) {
    for (uint32_t id = 1;; id++) {
        int used = 0;
        for (int i = 0; i < NH_MAX_SESSIONS && !used; i++) {
            const struct nh_session *se = &s->sessions[i];
            used = se != self && se->in_use && se->conn == self->conn && se->id == id;
        }
        if (!used) return id;
    }
}

uint32_t nh_object_lowest_id(struct nh_state *s, const struct nh_object *self) {
    for (uint32_t id = 1;; id++) {
        int used = 0;
        for (int i = 0; i < NH_MAX_OBJECTS && !used; i++) used = &s->objects[i] != self && s->objects[i].in_use && s->objects[i].id == id;
        if (!used) return id;
    }
}

struct nh_object *nh_object_find(struct nh_state *s, uint32_t id) {
    for (int i = 0; i < NH_MAX_OBJECTS; i++)
        if (s->objects[i].in_use && s->objects[i].id == id) return &s->objects[i];
    return NULL;
}

void nh_object_free(struct nh_object *o) { memset(o, 0, sizeof *o); }
