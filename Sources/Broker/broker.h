// What the broker's files share (broker.c: the channel, the module, the children's views;
// lane.c: the lane each child may use beside p11-kit's RPC, docs/FORK.md "The lane").
#ifndef P11FORK_BROKER_H
#define P11FORK_BROKER_H

#include <pthread.h>
#include <sys/types.h>

#include <p11-kit-1/p11-kit/pkcs11.h>

enum { MAX_SESSIONS = 4096 };

/// What one connection (one child) opened: closed when it finalizes or goes away. The lane's
/// thread and the RPC's thread both serve it: `lock` guards the session list.
typedef struct Connection {
    pid_t pid;
    uid_t uid;
    int initialized;
    int logged_in;
    pthread_mutex_t lock;
    size_t count;
    CK_SESSION_HANDLE sessions[MAX_SESSIONS];
    CK_SLOT_ID slots[MAX_SESSIONS];
} Connection;

/// The real module, and the view of it a child is served (its own sessions and login).
extern CK_FUNCTION_LIST *real;
extern CK_FUNCTION_LIST view;
/// The connection the calling thread serves.
extern __thread Connection *current;

/// One line in the application's trace, marked `broker:`.
void trace(const char *format, ...) __attribute__((format(printf, 1, 2)));

/// A child's lane: the region it made (mapped here), served by a thread of its own.
typedef struct LaneServer LaneServer;
/// Maps the region of descriptor `fd` (checked: sealed at the lane's size) and starts serving it
/// for `connection`; NULL when it cannot (the child then uses p11-kit's RPC alone).
LaneServer *lane_start(int fd, Connection *connection);
/// Stops serving (the child has gone): waits for a call in progress, then unmaps.
void lane_stop(LaneServer *server);

#endif
