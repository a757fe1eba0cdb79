// p11fork-broker: serves the real PKCS#11 module to the descendants of the process that started
// it, with that process's rights (docs/FORK.md "The broker").
//
// libp11fork.so starts it just before the application's first fork, with posix_spawn, so it
// keeps the application's user, groups, capabilities, namespaces, limits and environment. It is
// given:
//   fd 3  one end of a SOCK_SEQPACKET socketpair; the application keeps the other end, and every
//         child inherits it (close-on-exec: a program the application executes does not);
//   fd 4  the application's trace file, when tracing is on (--trace-format text|json).
// It loads the real module only when the first child asks for it, never inheriting any state.
//
// A child asks for the module with one message on that channel: the word "connect", a listening
// Unix socket in a folder only the child's user may enter, and the write end of a pipe. The
// kernel adds the sender's pid and uid (SO_PASSCRED); a third descriptor, the child's lane
// (lane.c), may come with them. The broker answers on the pipe (the module's C_Initialize result,
// 8 bytes), serving the lane from then on, accepts one connection on the socket from that pid
// only, and serves p11-kit's RPC protocol over it (p11_kit_remote_serve_module, one thread per
// child). Every child shares one initialised module, as the threads of one application would;
// a child's C_Initialize/C_Finalize/C_CloseAllSessions/C_Logout act on what that child opened.
//
// It ends when every holder of the channel has closed it (the application and all its
// descendants) and every connection has ended: a SIGKILLed application leaves no broker once its
// children are gone. It never reads a PIN from anywhere but a child's C_Login over its connection.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "broker.h"

enum { CONTROL_FD = 3, TRACE_FD = 4, ACCEPT_SECONDS = 10 };

static const char *module_path;
/// --trace-file: a trace named per process (its `%p` becomes the broker's pid), made new.
static const char *trace_template;
/// --eager: load and initialise the module at once (P11FORK_STRATEGY=broker: every child will ask).
static int eager;
static int trace_fd = -1;
static int trace_json;

// MARK: trace lines, in the application's trace format

void trace(const char *format, ...) {
    if (trace_fd < 0) return;
    char message[768];
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(message, sizeof message, format, arguments);
    va_end(arguments);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct tm utc;
    gmtime_r(&now.tv_sec, &utc);
    char stamp[40];
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &utc);
    char line[1024];
    int length;
    long tid = syscall(SYS_gettid);
    if (trace_json) {
        // The messages are the broker's own words; none holds a quote or a backslash.
        length = snprintf(line, sizeof line, "{\"time\":\"%s.%06ldZ\",\"pid\":%d,\"tid\":%ld,\"event\":\"broker\",\"message\":\"%s\"}\n",
                          stamp, now.tv_nsec / 1000, (int)getpid(), tid, message);
    } else {
        length = snprintf(line, sizeof line, "%s.%06ldZ p11fork[%d/%ld] broker: %s\n", stamp, now.tv_nsec / 1000,
                          (int)getpid(), tid, message);
    }
    if (length > (int)sizeof line) length = sizeof line;
    // O_APPEND was set by the application: one write is one line, whoever else writes.
    if (write(trace_fd, line, (size_t)length) < 0) trace_fd = -1;
}

static const char *rv_name(CK_RV rv) {
    switch (rv) {
    case CKR_OK: return "CKR_OK";
    case CKR_GENERAL_ERROR: return "CKR_GENERAL_ERROR";
    case CKR_FUNCTION_FAILED: return "CKR_FUNCTION_FAILED";
    case CKR_DEVICE_ERROR: return "CKR_DEVICE_ERROR";
    case CKR_TOKEN_NOT_PRESENT: return "CKR_TOKEN_NOT_PRESENT";
    case CKR_CRYPTOKI_ALREADY_INITIALIZED: return "CKR_CRYPTOKI_ALREADY_INITIALIZED";
    case CKR_HOST_MEMORY: return "CKR_HOST_MEMORY";
    default: return "another code";
    }
}

// MARK: the shared module

CK_FUNCTION_LIST *real;
CK_FUNCTION_LIST view;
static CK_RV module_state = CKR_CRYPTOKI_NOT_INITIALIZED;
static pthread_mutex_t module_lock = PTHREAD_MUTEX_INITIALIZER;

/// Loads and initialises the module once, at the first child's request.
static CK_RV module_ready(void) {
    pthread_mutex_lock(&module_lock);
    if (module_state == CKR_CRYPTOKI_NOT_INITIALIZED) {
        void *handle = dlopen(module_path, RTLD_NOW | RTLD_LOCAL);
        CK_C_GetFunctionList get = handle ? (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList") : NULL;
        if (!get || get(&real) != CKR_OK || !real) {
            trace("cannot load the module %s: %s", module_path, handle ? "no function list" : dlerror());
            module_state = CKR_GENERAL_ERROR;
        } else {
            CK_C_INITIALIZE_ARGS arguments = { .flags = CKF_OS_LOCKING_OK };
            CK_RV rv = real->C_Initialize(&arguments);
            module_state = rv == CKR_CRYPTOKI_ALREADY_INITIALIZED ? CKR_OK : rv;
            trace("module %s initialised for the application's children: %s (0x%lx)", module_path, rv_name(rv), rv);
        }
    }
    CK_RV state = module_state;
    pthread_mutex_unlock(&module_lock);
    return state;
}

static void *load_in_background(void *unused) {
    (void)unused;
    module_ready();
    return NULL;
}

// MARK: one child's view of the shared module

__thread Connection *current;
/// Connections that hold a login of the shared module; guarded by state_lock.
static int logins;
static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t state_changed = PTHREAD_COND_INITIALIZER;
static int active;

/// With connection->lock held.
static void forget_session(Connection *connection, CK_SESSION_HANDLE session) {
    for (size_t i = 0; i < connection->count; i++) {
        if (connection->sessions[i] != session) continue;
        connection->count--;
        connection->sessions[i] = connection->sessions[connection->count];
        connection->slots[i] = connection->slots[connection->count];
        return;
    }
}

/// Closes what the connection opened in `slot` (every slot when `all`), and gives up its login.
static void close_sessions(Connection *connection, CK_SLOT_ID slot, int all) {
    pthread_mutex_lock(&connection->lock);
    size_t i = 0;
    while (i < connection->count) {
        if (all || connection->slots[i] == slot) {
            real->C_CloseSession(connection->sessions[i]);
            forget_session(connection, connection->sessions[i]);
        } else {
            i++;
        }
    }
    pthread_mutex_unlock(&connection->lock);
    if (all && connection->logged_in) {
        pthread_mutex_lock(&state_lock);
        logins--;
        pthread_mutex_unlock(&state_lock);
        connection->logged_in = 0;
    }
}

static CK_RV view_initialize(CK_VOID_PTR arguments) {
    (void)arguments;
    if (current->initialized) return CKR_CRYPTOKI_ALREADY_INITIALIZED;
    current->initialized = 1;
    return CKR_OK;
}

static CK_RV view_finalize(CK_VOID_PTR reserved) {
    if (reserved) return CKR_ARGUMENTS_BAD;
    if (!current->initialized) return CKR_CRYPTOKI_NOT_INITIALIZED;
    close_sessions(current, 0, 1);
    current->initialized = 0;
    return CKR_OK;
}

static CK_RV view_open_session(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application, CK_NOTIFY notify, CK_SESSION_HANDLE_PTR session) {
    (void)application;
    (void)notify;  // A callback cannot cross processes; p11-kit's client passes none.
    if (current->count >= MAX_SESSIONS) return CKR_SESSION_COUNT;
    CK_RV rv = real->C_OpenSession(slot, flags, NULL, NULL, session);
    if (rv == CKR_OK && session) {
        pthread_mutex_lock(&current->lock);
        if (current->count < MAX_SESSIONS) {
            current->sessions[current->count] = *session;
            current->slots[current->count] = slot;
            current->count++;
        }
        pthread_mutex_unlock(&current->lock);
    }
    return rv;
}

static CK_RV view_close_session(CK_SESSION_HANDLE session) {
    CK_RV rv = real->C_CloseSession(session);
    if (rv == CKR_OK) {
        pthread_mutex_lock(&current->lock);
        forget_session(current, session);
        pthread_mutex_unlock(&current->lock);
    }
    return rv;
}

static CK_RV view_close_all_sessions(CK_SLOT_ID slot) {
    close_sessions(current, slot, 0);
    return CKR_OK;
}

/// A session of the broker's own on each slot a child logged in to: the login is the
/// application's, as long-lived as the parent's, and must not lapse when the child that made it
/// ends (closing the last session of an application logs it out; tpm2-pkcs11 then hid the
/// private key from the next child, which found itself "already logged in"). The next child's
/// login replay finds the token logged in, and its first signature needs no login.
enum { MAX_ANCHORS = 64 };
static CK_SLOT_ID anchor_slots[MAX_ANCHORS];
static CK_SESSION_HANDLE anchor_sessions[MAX_ANCHORS];
static int anchors;

static void keep_login(CK_SESSION_HANDLE session) {
    CK_SESSION_INFO info;
    if (real->C_GetSessionInfo(session, &info) != CKR_OK) return;
    pthread_mutex_lock(&state_lock);
    int found = 0;
    for (int i = 0; i < anchors; i++) found |= anchor_slots[i] == info.slotID;
    CK_SESSION_HANDLE anchor;
    if (!found && anchors < MAX_ANCHORS && real->C_OpenSession(info.slotID, CKF_SERIAL_SESSION, NULL, NULL, &anchor) == CKR_OK) {
        anchor_slots[anchors] = info.slotID;
        anchor_sessions[anchors] = anchor;
        anchors++;
        trace("the login on slot 0x%lx is kept for the application's children (a session of the broker's own)", info.slotID);
    }
    pthread_mutex_unlock(&state_lock);
}

/// One login at a time: children replay theirs at the same moment, and a token's login is one
/// state (seen: two children logging in at once on tpm2-pkcs11, and one then found no private key).
static pthread_mutex_t login_lock = PTHREAD_MUTEX_INITIALIZER;

static CK_RV view_login(CK_SESSION_HANDLE session, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG length) {
    pthread_mutex_lock(&login_lock);
    CK_RV rv = real->C_Login(session, user, pin, length);
    pthread_mutex_unlock(&login_lock);
    if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN) {
        if (!current->logged_in) {
            pthread_mutex_lock(&state_lock);
            logins++;
            pthread_mutex_unlock(&state_lock);
            current->logged_in = 1;
        }
        keep_login(session);
    }
    return rv;
}

/// The login is the whole application's: a child's logout ends it only when no other child holds
/// it (and then the kept sessions go too, so that a later login starts from nothing).
static CK_RV view_logout(CK_SESSION_HANDLE session) {
    if (!current->logged_in) {
        // A child that found the application's login in place (it sent no PIN) gives up its view
        // of it: the login stays, for the children that rely on it as this one did.
        pthread_mutex_lock(&state_lock);
        int kept = logins > 0 || anchors > 0;
        pthread_mutex_unlock(&state_lock);
        if (kept) return CKR_OK;
        return real->C_Logout(session);
    }
    pthread_mutex_lock(&state_lock);
    int others = --logins;
    pthread_mutex_unlock(&state_lock);
    current->logged_in = 0;
    if (others > 0) return CKR_OK;
    CK_RV rv = real->C_Logout(session);
    pthread_mutex_lock(&state_lock);
    for (int i = 0; i < anchors; i++) real->C_CloseSession(anchor_sessions[i]);
    anchors = 0;
    pthread_mutex_unlock(&state_lock);
    return rv;
}

static void make_view(void) {
    view = *real;
    // p11-kit reads only the 2.40 list through this pointer.
    view.version.major = 2;
    view.version.minor = 40;
    view.C_Initialize = view_initialize;
    view.C_Finalize = view_finalize;
    view.C_OpenSession = view_open_session;
    view.C_CloseSession = view_close_session;
    view.C_CloseAllSessions = view_close_all_sessions;
    view.C_Login = view_login;
    view.C_Logout = view_logout;
}

// MARK: serving a child

typedef int (*ServeModule)(CK_FUNCTION_LIST *, int, int);
static ServeModule serve_module;

typedef struct Request {
    int listener;
    int answer;
    /// The child's lane (a sealed memfd), or -1; once answered, its server.
    int lane;
    LaneServer *server;
    /// What the child opens, from the answer on.
    Connection *connection;
    pid_t pid;
    uid_t uid;
} Request;

/// Accepts one connection from the child that asked, within ACCEPT_SECONDS; -1 otherwise.
static int accept_child(const Request *request) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long left = ACCEPT_SECONDS * 1000L - ((now.tv_sec - start.tv_sec) * 1000L + (now.tv_nsec - start.tv_nsec) / 1000000L);
        if (left <= 0) return -1;
        struct pollfd wait = { .fd = request->listener, .events = POLLIN };
        int ready = poll(&wait, 1, (int)left);
        if (ready < 0 && errno == EINTR) continue;
        if (ready <= 0) return -1;
        int fd = accept4(request->listener, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) continue;
        struct ucred peer;
        socklen_t size = sizeof peer;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &size) == 0 && peer.pid == request->pid) return fd;
        trace("refused a connection from pid %d on the socket of pid %d", (int)peer.pid, (int)request->pid);
        close(fd);
    }
}

/// The child has gone (its connection closed, or it never came): no call of its runs on the lane
/// once this returns, and what it opened is closed.
static void end_connection(Request *request) {
    // Its connection has closed: the child has gone (or finalized).
    if (request->server) lane_stop(request->server);
    request->server = NULL;
    Connection *connection = request->connection;
    if (!connection) return;
    if (connection->count > 0)
        trace("pid %d went away with %zu session(s) open: closed", (int)request->pid, connection->count);
    close_sessions(connection, 0, 1);
    pthread_mutex_destroy(&connection->lock);
    free(connection);
    request->connection = NULL;
}

/// Answers a child's request on its pipe with the module's C_Initialize result (loading the
/// module at the first request), from the main thread: the child waits for one wake-up, not for a
/// new thread as well. The child's lane is served from the answer on, whether or not its RPC
/// connection follows. Returns whether the child is to be served.
static int answer_child(Request *request) {
    CK_RV rv = module_ready();
    if (rv == CKR_OK) {
        pthread_mutex_lock(&module_lock);
        if (view.C_Initialize == NULL) make_view();
        pthread_mutex_unlock(&module_lock);
        request->connection = calloc(1, sizeof *request->connection);
        if (!request->connection) rv = CKR_HOST_MEMORY;
    }
    if (request->connection) {
        Connection *connection = request->connection;
        connection->pid = request->pid;
        connection->uid = request->uid;
        pthread_mutex_init(&connection->lock, NULL);
        request->server = request->lane >= 0 ? lane_start(request->lane, connection) : NULL;
    }
    uint64_t answer = rv;
    ssize_t written = write(request->answer, &answer, sizeof answer);
    close(request->answer);
    request->answer = -1;
    if (request->lane >= 0) close(request->lane);
    request->lane = -1;
    if (rv == CKR_OK && written == sizeof answer) return 1;
    end_connection(request);
    return 0;
}

/// A thread per child: accepts its connection and serves it until it ends, then closes what the
/// child left open.
static void *serve(void *argument) {
    Request request = *(Request *)argument;
    free(argument);
    int fd = accept_child(&request);
    close(request.listener);
    if (fd >= 0) {
        current = request.connection;
        trace("serving pid %d (uid %u)%s", (int)request.pid, (unsigned)request.uid, request.server ? ", with a lane" : "");
        serve_module(&view, fd, fd);
        close(fd);
    } else {
        trace("pid %d did not connect within %d s", (int)request.pid, ACCEPT_SECONDS);
    }
    end_connection(&request);
    pthread_mutex_lock(&state_lock);
    active--;
    pthread_cond_broadcast(&state_changed);
    pthread_mutex_unlock(&state_lock);
    return NULL;
}

/// Reads one request; 0 at the end (every holder of the channel closed it), -1 on a bad message.
static int next_request(Request *request) {
    char word[16];
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(3 * sizeof(int)) + CMSG_SPACE(sizeof(struct ucred))];
    } control;
    struct iovec part = { .iov_base = word, .iov_len = sizeof word };
    struct msghdr message = { .msg_iov = &part, .msg_iovlen = 1, .msg_control = control.bytes, .msg_controllen = sizeof control.bytes };
    ssize_t got;
    do got = recvmsg(CONTROL_FD, &message, MSG_CMSG_CLOEXEC);
    while (got < 0 && errno == EINTR);
    if (got == 0) return 0;
    if (got < 0) {
        trace("the channel failed: %s", strerror(errno));
        return 0;
    }
    int fds[3] = { -1, -1, -1 };
    int have_fds = 0, have_credentials = 0;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level != SOL_SOCKET) continue;
        if (header->cmsg_type == SCM_RIGHTS) {
            size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *received = (int *)CMSG_DATA(header);
            for (size_t i = 0; i < count; i++) {
                if (i < 3) fds[i] = received[i]; else close(received[i]);
            }
            // The socket and the pipe; a third, the lane, when the child made one.
            have_fds = count == 2 || count == 3;
        } else if (header->cmsg_type == SCM_CREDENTIALS) {
            struct ucred credentials;
            memcpy(&credentials, CMSG_DATA(header), sizeof credentials);
            request->pid = credentials.pid;
            request->uid = credentials.uid;
            have_credentials = 1;
        }
    }
    if (got != 7 || memcmp(word, "connect", 7) != 0 || !have_fds || !have_credentials || (message.msg_flags & MSG_CTRUNC)) {
        for (int i = 0; i < 3; i++) if (fds[i] >= 0) close(fds[i]);
        trace("ignored a malformed request");
        return -1;
    }
    request->listener = fds[0];
    request->answer = fds[1];
    request->lane = fds[2];
    return 1;
}

int main(int argc, char **argv) {
    int tracing = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--module") == 0) module_path = argv[i + 1];
        else if (strcmp(argv[i], "--eager") == 0) eager = strcmp(argv[i + 1], "yes") == 0;
        else if (strcmp(argv[i], "--trace-format") == 0) {
            tracing = 1;
            trace_json = strcmp(argv[i + 1], "json") == 0;
        }
        else if (strcmp(argv[i], "--trace-file") == 0) trace_template = argv[i + 1];
    }
    if (!module_path) {
        fprintf(stderr, "p11fork-broker is started by libp11fork.so, not by hand\n");
        return 2;
    }
    // Nothing else the application had open stays open here (its listening sockets, pipes).
    // The application's trace file is fd 4, unless the broker makes its own (--trace-file).
    if (tracing && !trace_template) trace_fd = TRACE_FD;
    int keep = trace_fd >= 0 ? TRACE_FD : CONTROL_FD;
    close_range((unsigned)keep + 1, ~0U, 0);
    // Terminal and reload signals sent to the application's process group are not for the
    // broker: it ends by itself when the application and its children have gone.
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGQUIT, SIG_IGN);
    // Outlive the spawner's wait: the broker is not a child the application would reap.
    pid_t pid = fork();
    if (pid < 0) return 3;
    if (pid > 0) _exit(0);
    setsid();
    if (trace_template) {
        // Made now, in the broker's own name; never through a link, never an existing file.
        char path[4096];
        size_t at = 0;
        for (const char *c = trace_template; *c && at + 16 < sizeof path; c++) {
            if (c[0] == '%' && c[1] == 'p') { at += (size_t)snprintf(path + at, sizeof path - at, "%d", (int)getpid()); c++; }
            else path[at++] = *c;
        }
        path[at] = 0;
        if (tracing) trace_fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    }

    int on = 1;
    void *kit = dlopen("libp11-kit.so.0", RTLD_NOW | RTLD_LOCAL);
    serve_module = kit ? (ServeModule)dlsym(kit, "p11_kit_remote_serve_module") : NULL;
    char hello[32];
    int length;
    if (!serve_module || setsockopt(CONTROL_FD, SOL_SOCKET, SO_PASSCRED, &on, sizeof on) != 0) {
        length = snprintf(hello, sizeof hello, "failed");
    } else {
        length = snprintf(hello, sizeof hello, "ready %d", (int)getpid());
    }
    if (send(CONTROL_FD, hello, (size_t)length, 0) != length || !serve_module) return 4;
    trace("started for the application's children (module %s)", module_path);
    if (eager) {
        // In the background: the application goes on with its fork meanwhile.
        pthread_t loader;
        if (pthread_create(&loader, NULL, load_in_background, NULL) == 0) pthread_detach(loader);
    }

    for (;;) {
        Request request = { 0 };
        int got = next_request(&request);
        if (got == 0) break;
        if (got < 0) continue;
        if (!answer_child(&request)) {
            close(request.listener);
            continue;
        }
        Request *copy = malloc(sizeof *copy);
        if (!copy) {
            end_connection(&request);
            close(request.listener);
            continue;
        }
        *copy = request;
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        pthread_mutex_lock(&state_lock);
        active++;
        pthread_mutex_unlock(&state_lock);
        pthread_t thread;
        if (pthread_create(&thread, &attributes, serve, copy) != 0) {
            pthread_mutex_lock(&state_lock);
            active--;
            pthread_mutex_unlock(&state_lock);
            end_connection(copy);
            close(copy->listener);
            free(copy);
        }
        pthread_attr_destroy(&attributes);
    }
    pthread_mutex_lock(&state_lock);
    if (active > 0) trace("the application and its children closed the channel; %d connection(s) still served", active);
    while (active > 0) pthread_cond_wait(&state_changed, &state_lock);
    pthread_mutex_unlock(&state_lock);
    if (real && module_state == CKR_OK) real->C_Finalize(NULL);
    trace("ending: the application and every child it served have gone");
    return 0;
}
