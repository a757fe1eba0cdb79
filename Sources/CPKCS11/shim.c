#define _GNU_SOURCE
#include "CPKCS11.h"
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

long CPKCS11_gettid(void) { return syscall(SYS_gettid); }

// Initial-exec, like CPKCS11_thread_copy_generation (which puts this library's thread-local block
// in the static TLS room anyway): general-dynamic costs a call to __tls_get_addr at each use, on
// every trace line.
static __thread long cached_tid __attribute__((tls_model("initial-exec")));
static __thread long cached_tid_pid __attribute__((tls_model("initial-exec")));

long CPKCS11_cached_tid(long pid) {
    if (cached_tid_pid != pid || cached_tid == 0) {
        cached_tid = syscall(SYS_gettid);
        cached_tid_pid = pid;
    }
    return cached_tid;
}

// A pointer per thread, not the buffer itself: this library's thread-local block must stay small
// (it uses the initial-exec model, so it lives in the static TLS room every dlopen shares). The
// buffer is allocated on a thread's first trace line and freed when the thread ends.
static __thread unsigned char *trace_buffer __attribute__((tls_model("initial-exec")));
static __thread int trace_buffer_in_use __attribute__((tls_model("initial-exec")));
static pthread_key_t trace_buffer_key;
static pthread_once_t trace_buffer_once = PTHREAD_ONCE_INIT;

static void trace_buffer_key_make(void) { pthread_key_create(&trace_buffer_key, free); }

void *CPKCS11_trace_buffer_take(void) {
    if (trace_buffer_in_use) return 0;
    if (!trace_buffer) {
        pthread_once(&trace_buffer_once, trace_buffer_key_make);
        trace_buffer = malloc(4096 + 256);  // the line, then the header cache (TraceLine.HeaderCache)
        if (!trace_buffer) return 0;
        pthread_setspecific(trace_buffer_key, trace_buffer);
    }
    trace_buffer_in_use = 1;
    return trace_buffer;
}

void CPKCS11_trace_buffer_give_back(void) { trace_buffer_in_use = 0; }

uint64_t CPKCS11_monotonic_nanoseconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void *CPKCS11_dlmopen_new(const char *path, int flags) { return dlmopen(LM_ID_NEWLM, path, flags); }

#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif
#ifndef MADV_DONTDUMP
#define MADV_DONTDUMP 16
#endif
int CPKCS11_madv_wipeonfork(void) { return MADV_WIPEONFORK; }
int CPKCS11_madv_dontdump(void) { return MADV_DONTDUMP; }

const char *CPKCS11_image_path(const void *address) {
    Dl_info info;
    if (dladdr(address, &info) == 0) return NULL;
    return info.dli_fname;
}

#include <link.h>
#include <string.h>

struct CPKCS11_match { const char *needle; int count; };

static int CPKCS11_count_match(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    struct CPKCS11_match *match = data;
    if (info->dlpi_name && strstr(info->dlpi_name, match->needle)) match->count++;
    return 0;
}

int CPKCS11_loaded_count(const char *needle) {
    struct CPKCS11_match match = { needle, 0 };
    dl_iterate_phdr(CPKCS11_count_match, &match);
    return match.count;
}

#include <sys/auxv.h>
int CPKCS11_secure_execution(void) { return getauxval(AT_SECURE) != 0; }

extern char **environ;

// The environment libc reads. Under RTLD_DEEPBIND (pkcs11-provider opens its module so) this
// library's `environ` can be libc's own, unused variable rather than the program's copy of it
// (environment.c): the program's, found through the program's own scope, is the one to change.
static char ***process_environ(void) {
    static char ***found;
    if (!found) {
        void *program = dlopen(NULL, RTLD_NOW);
        char ***symbol = program ? dlsym(program, "environ") : NULL;
        found = symbol ? symbol : &environ;
    }
    return found;
}

char **CPKCS11_swap_environ(char **replacement) {
    char ***variable = process_environ();
    char **previous = *variable;
    *variable = replacement;
    return previous;
}

// Per-thread set-up of a module copy's own libc (see CPKCS11.h).
__thread unsigned long CPKCS11_thread_copy_generation __attribute__((tls_model("initial-exec"), visibility("hidden")));
unsigned long CPKCS11_copy_generation __attribute__((visibility("hidden")));
void (*CPKCS11_copy_ctype_init)(void);

void CPKCS11_use_copy(void *ctype_init) {
    CPKCS11_copy_ctype_init = (void (*)(void))ctype_init;
    __atomic_add_fetch(&CPKCS11_copy_generation, 1, __ATOMIC_RELEASE);
}

void CPKCS11_enter_copy_slow(void) {
    if (CPKCS11_copy_ctype_init) CPKCS11_copy_ctype_init();
    CPKCS11_thread_copy_generation = CPKCS11_copy_generation;
}

#include <sys/socket.h>

// One message with file descriptors attached (SCM_RIGHTS), never raising SIGPIPE.
long CPKCS11_send_with_fds(int socket, const void *bytes, size_t count, const int *fds, int fd_count) {
    if (fd_count < 1 || fd_count > 4) return -1;
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(4 * sizeof(int))];
    } control;
    memset(&control, 0, sizeof control);
    struct iovec part = { .iov_base = (void *)bytes, .iov_len = count };
    struct msghdr message = { .msg_iov = &part, .msg_iovlen = 1, .msg_control = control.bytes,
                              .msg_controllen = CMSG_SPACE(fd_count * sizeof(int)) };
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(fd_count * sizeof(int));
    memcpy(CMSG_DATA(header), fds, fd_count * sizeof(int));
    return sendmsg(socket, &message, MSG_NOSIGNAL);
}

#include <poll.h>
#include <signal.h>

// The SIGPIPE guard of a child served by the broker (see CPKCS11.h).
static volatile sig_atomic_t guarded_channel = -1;
static volatile sig_atomic_t broker_gone;
int CPKCS11_broker_gone(void) { return broker_gone; }

static void CPKCS11_sigpipe(int signal_number) {
    struct pollfd channel = { .fd = guarded_channel, .events = POLLIN };
    if (guarded_channel >= 0 && poll(&channel, 1, 0) > 0 && (channel.revents & (POLLHUP | POLLERR))) {
        // The broker has ended: the write that raised this was p11-kit's client's, whose call
        // then answers an error. The application's own broken pipes still end it, as it chose.
        broker_gone = 1;
        return;
    }
    signal(SIGPIPE, SIG_DFL);
    raise(signal_number);
}

void CPKCS11_guard_sigpipe(int channel) {
    guarded_channel = channel;
    struct sigaction current;
    if (sigaction(SIGPIPE, NULL, &current) != 0 || current.sa_handler != SIG_DFL || (current.sa_flags & SA_SIGINFO)) return;
    struct sigaction guard;
    memset(&guard, 0, sizeof guard);
    guard.sa_handler = CPKCS11_sigpipe;
    guard.sa_flags = SA_RESTART;
    sigemptyset(&guard.sa_mask);
    sigaction(SIGPIPE, &guard, NULL);
}

// The lock a process shares with every process forked from it after it was made (see CPKCS11.h).
#include <errno.h>
#include <time.h>

struct tree_lock {
    pthread_mutex_t mutex;
    // The pid holding the mutex (0 when free): for the trace of a process that waits for it.
    int holder;
};
static struct tree_lock *tree_lock;

int CPKCS11_tree_lock_make(void) {
    if (__atomic_load_n(&tree_lock, __ATOMIC_ACQUIRE)) return 0;
    void *page = mmap(NULL, sizeof(struct tree_lock), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED) return errno;
    struct tree_lock *made = page;
    pthread_mutexattr_t attributes;
    pthread_mutexattr_init(&attributes);
    pthread_mutexattr_setpshared(&attributes, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attributes, PTHREAD_MUTEX_ROBUST);
    pthread_mutexattr_settype(&attributes, PTHREAD_MUTEX_ERRORCHECK);
    int rv = pthread_mutex_init(&made->mutex, &attributes);
    pthread_mutexattr_destroy(&attributes);
    struct tree_lock *none = NULL;
    // Two threads forking at once both run the prepare handler: one page wins.
    if (rv != 0 || !__atomic_compare_exchange_n(&tree_lock, &none, made, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        if (rv == 0) pthread_mutex_destroy(&made->mutex);
        munmap(page, sizeof(struct tree_lock));
    }
    return rv;
}

int CPKCS11_tree_lock_take(long timeout_ms, int given_up_on, int *holder) {
    struct tree_lock *lock = __atomic_load_n(&tree_lock, __ATOMIC_ACQUIRE);
    *holder = 0;
    if (!lock) return -1;
    int rv = pthread_mutex_trylock(&lock->mutex);
    int waited = 0;
    if (rv == EBUSY) {
        waited = 1;
        *holder = __atomic_load_n(&lock->holder, __ATOMIC_RELAXED);
        if (given_up_on && *holder == given_up_on) return ETIMEDOUT;
        struct timespec deadline;
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (timeout_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec += 1;
            deadline.tv_nsec -= 1000000000L;
        }
        do rv = pthread_mutex_clocklock(&lock->mutex, CLOCK_MONOTONIC, &deadline);
        while (rv == EINTR);
        // The holder's pid once more: the one the whole wait was for, when it timed out.
        if (rv == ETIMEDOUT) *holder = __atomic_load_n(&lock->holder, __ATOMIC_RELAXED);
    }
    if (rv == EOWNERDEAD) {
        // Its holder ended while holding it: what it guarded is the module's own files, which the
        // module keeps consistent itself, so the lock is simply taken over.
        *holder = __atomic_load_n(&lock->holder, __ATOMIC_RELAXED);
        pthread_mutex_consistent(&lock->mutex);
        rv = 0;
        waited = 2;
    }
    if (rv != 0) return rv;
    __atomic_store_n(&lock->holder, getpid(), __ATOMIC_RELAXED);
    return waited;
}

void CPKCS11_tree_lock_give(void) {
    struct tree_lock *lock = __atomic_load_n(&tree_lock, __ATOMIC_ACQUIRE);
    if (!lock) return;
    __atomic_store_n(&lock->holder, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&lock->mutex);
}

// MARK: the broker's lane (lane.h; docs/FORK.md "The lane")

#include <fcntl.h>
#include "lane.h"

int CPKCS11_lane_make(void **region) {
    int fd = memfd_create("p11fork-lane", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return -1;
    // Sealed at its size: the broker maps it, and a region that shrank under it would fault.
    if (ftruncate(fd, P11FORK_LANE_SIZE) != 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
        close(fd);
        return -1;
    }
    void *mapped = mmap(NULL, P11FORK_LANE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mapped == MAP_FAILED) {
        close(fd);
        return -1;
    }
    // A forked child makes a lane of its own; it never shares its parent's.
    madvise(mapped, P11FORK_LANE_SIZE, MADV_DONTFORK);
    *region = mapped;
    return fd;
}

typedef struct LaneWatch {
    P11ForkLane *lane;
    int channel;
} LaneWatch;

static int lane_gone(void *context) {
    LaneWatch *watch = context;
    if (atomic_load(&watch->lane->closed)) return 1;
    struct pollfd channel = { .fd = watch->channel, .events = POLLIN };
    return poll(&channel, 1, 0) > 0 && (channel.revents & (POLLHUP | POLLERR));
}

long CPKCS11_lane_call(void *region, unsigned length, int channel) {
    P11ForkLane *lane = region;
    if (atomic_load(&lane->closed)) return -1;
    uint32_t call = atomic_load_explicit(&lane->request, memory_order_relaxed) + 1;
    atomic_store_explicit(&lane->length, length, memory_order_relaxed);
    p11fork_lane_post(&lane->request, call, &lane->broker_sleeps);
    LaneWatch watch = { lane, channel };
    // Spins through a signature's time, then sleeps in slices of 50 ms, looking for the broker.
    int answered = p11fork_lane_wait(&lane->reply, call - 1, &lane->child_sleeps, 400000, 50, lane_gone, &watch);
    if (atomic_load(&lane->closed)) return -1;
    if (!answered || atomic_load_explicit(&lane->reply, memory_order_acquire) != call) return -2;
    uint32_t answer = atomic_load_explicit(&lane->length, memory_order_relaxed);
    return answer <= P11FORK_LANE_CAPACITY ? (long)answer : -2;
}

void *CPKCS11_lane_data(void *region) { return p11fork_lane_data(region); }
unsigned long CPKCS11_lane_capacity(void) { return P11FORK_LANE_CAPACITY; }

int CPKCS11_mlock_on_fault(void *address, size_t length) { return mlock2(address, length, MLOCK_ONFAULT); }
