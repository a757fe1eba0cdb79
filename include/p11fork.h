/*
 * p11fork — a PKCS#11 module that gives the module behind it fork tolerant semantics.
 *
 * Load libp11fork.so wherever a PKCS#11 module path is asked for, and tell p11fork which real
 * module to load. Everything an application does goes through the standard PKCS#11 entry
 * points below; p11fork forwards each call to the real module.
 *
 * Configuration (read once per process; later changes to the environment are not seen, since
 * daemons scrub their workers' environment). The first source that sets a key wins:
 *   (generated from codegen/vocabulary.txt: the sources of settings)
 *   1. the P11FORK_* variables;
 *   2. C_Initialize's pReserved, when the application passes a string starting with p11fork:
 *      (p11-kit's x-init-reserved:): key=value words separated by spaces, the file keys plus
 *      config=FILE (a file read below the words). p11fork keeps such a string to itself: the real
 *      module gets pReserved = NULL. Any other pReserved goes to the real module unchanged;
 *   3. the file named by P11FORK_CONFIG;
 *   4. /etc/p11fork.conf, read only when none of the above names the real module.
 *   (end of the generated sources)
 * When P11FORK_MODULE or P11FORK_CONFIG is set, the settings are read when the module is first
 * asked for its function list (and pReserved settings are not used); otherwise at the first
 * C_Initialize, which loads the real module then.
 * A setuid, setgid or file-capability program (AT_SECURE) ignores the P11FORK_* variables. As
 * root or AT_SECURE, a settings file or the real module is used only when it and every folder
 * above it are owned by root (or the process's own user) and not writable by group or others;
 * any process refuses one that anyone may write (docs/SECURITY.md).
 *
 *   P11FORK_MODULE        Path of the real PKCS#11 module. Required, unless another source
 *                         names it.
 *   P11FORK_CONFIG        Optional file of "key = value" lines with the same settings:
 *                           module       = /usr/lib/vendor/libvendorpkcs11.so
 *                           trace        = stderr | /path/to/file (%p = process id)
 *                           trace_level  = error | fork | calls | full
 *                           trace_format = text | json
 *                           strategy     = auto | fresh-copy | broker | out-of-process | reinitialize   (generated)
 *                           login_replay = on | off
 *                           replay_limit = 1048576 | 64k | 4m | 0
 *                         '#' starts a comment; a value may be in double quotes. A variable
 *                         that is set wins over the same key in the file.
 *   P11FORK_TRACE         Where trace lines go: "stderr", or a file path (opened for appending;
 *                         "%p" becomes the process id, and such a file is always created new).
 *                         Never a symbolic link, FIFO, device or another user's file: those
 *                         are refused with one stderr line, and nothing is traced. Unset: no tracing.
 *   P11FORK_TRACE_LEVEL   error (p11fork's own problems), fork (+ fork events and recovery
 *                         steps), calls (+ every call: arguments, return code, duration; the
 *                         default), full (+ templates, mechanism parameter lengths, real handles).
 *   P11FORK_TRACE_FORMAT  text (default) or json (one object per line). A JSON line about an
 *                         event has "event" (its level) and "message" (for people, may be
 *                         reworded); the events p11fork knows the meaning of also have "kind",
 *                         and as the kind needs, "parent" and "generation" (fork-detected),
 *                         "strategy" (decision), "step", "strategy", "ms" and "outcome"
 *                         (recovery-step):
 *                         event kinds: fork-detected, preparation, decision, recovery-step   (generated)
 *                         event steps: module, module-ready, slots, login, session, object, operation   (generated)
 *   P11FORK_STRATEGY      How a forked child gets a working module: auto (default: a fresh
 *                         private copy where the child can run the module itself, else the
 *                         broker, started with the application's rights before its first fork:
 *                         p11fork-broker, installed beside libp11fork.so), fresh-copy, broker,
 *                         out-of-process, reinitialize.
 *   P11FORK_LOGIN_REPLAY  on (default): a child replays the parent's login with the kept PIN
 *                         (locked, non-dumpable memory); off: no PIN is kept.
 *   P11FORK_REPLAY_LIMIT  bytes kept, in all, to make session objects and operations in progress
 *                         again in a child (default 1048576; 64k, 4m also work; 0 keeps nothing).
 *
 * A configuration problem (no module named, file missing, not a PKCS#11 module, unknown key,
 * bad value, in a variable, a file or pReserved, a file others could change) makes C_Initialize write one line on stderr, naming the problem and the fix, and
 * return CKR_GENERAL_ERROR.
 *
 * Handles: slot IDs are the real module's, valid from the first call after C_Initialize (a
 * configured slot ID needs no C_GetSlotList first); in a forked child whose module numbers slots
 * differently they are translated to the slots holding the same tokens. Session and object
 * handles are p11fork's own values (sessions from 0x5e000001, objects from 0x0b000001). All are
 * stable for the life of the process and across fork: a forked child keeps using the slots,
 * sessions, login and token keys its parent had (docs/FORK.md "Handles in the child"). Traces never contain PINs, secret attribute
 * values or data.
 *
 * This header declares the three symbols libp11fork.so exports; the PKCS#11 types come from a
 * standard PKCS#11 header (for example p11-kit's <p11-kit/pkcs11.h>) included before it. The
 * PKCS#11 3.0 types CK_INTERFACE and CK_VERSION are needed for the last two.
 */
#ifndef P11FORK_H
#define P11FORK_H

#ifdef __cplusplus
extern "C" {
#endif

/* The PKCS#11 2.40 function list: every function forwarded to the real module. */
CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList);

#ifdef CKF_INTERFACE_FORK_SAFE /* a PKCS#11 3.0 header */
/* The interfaces offered: "PKCS 11" 3.0 and 2.40, both with CKF_INTERFACE_FORK_SAFE (session
 * objects, operations and logins carried into a forked child: README "Fork tolerance"). Over a
 * 2.x module the 3.0-only functions answer CKR_FUNCTION_NOT_SUPPORTED. */
CK_RV C_GetInterfaceList(CK_INTERFACE_PTR pInterfacesList, CK_ULONG_PTR pulCount);
CK_RV C_GetInterface(CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION_PTR pVersion,
                     CK_INTERFACE_PTR_PTR ppInterface, CK_FLAGS flags);
#endif

#ifdef __cplusplus
}
#endif

#endif /* P11FORK_H */
