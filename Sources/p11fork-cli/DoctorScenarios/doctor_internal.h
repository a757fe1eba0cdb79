// Shared by the setup (doctor_setup.c) and the fork scenarios (doctor_scenarios.c).
#ifndef DOCTOR_INTERNAL_H
#define DOCTOR_INTERNAL_H

#include "CPKCS11.h"
#include "tool_support.h"
#include "DoctorScenarios.h"

#define DOCTOR_MAX_SIGNATURE 1024

enum { DOCTOR_OK = 0, DOCTOR_FAIL = 1, DOCTOR_NOT_APPLICABLE = 3, DOCTOR_ERROR = 4 };

/// The key the scenarios sign with, and how its signatures are checked.
typedef struct {
    CK_OBJECT_HANDLE handle;
    CK_OBJECT_HANDLE verifier;            // public key for non-deterministic signatures, or CK_INVALID_HANDLE
    CK_OBJECT_CLASS key_class;
    CK_KEY_TYPE type;
    char label[129];
    unsigned char id[64];
    CK_ULONG id_length;
    CK_MECHANISM_TYPE sign_mechanism;     // single-part, over doctor_message[0..<32]
    CK_MECHANISM_TYPE multipart_mechanism; // 0: the module has none for this key
    int deterministic;                    // the same data always gives the same signature
    unsigned char reference[DOCTOR_MAX_SIGNATURE]; // the parent's signature over doctor_message[0..<32]
    CK_ULONG reference_length;
} doctor_key;

extern CK_FUNCTION_LIST_PTR doctor_p11;
extern const doctor_options *doctor_opts;
extern CK_SLOT_ID doctor_slot;
extern CK_SESSION_HANDLE doctor_session;
extern doctor_key doctor_signing_key;
extern const unsigned char doctor_message[64];

// Output: one write(2) per line, so lines of parent and children never interleave.
void doctor_say(const char *format, ...) __attribute__((format(printf, 1, 2)));
int doctor_result(int status, const char *format, ...) __attribute__((format(printf, 2, 3)));
const char *doctor_mechanism_name(CK_MECHANISM_TYPE mechanism);

int doctor_has_mechanism(CK_MECHANISM_TYPE mechanism, CK_FLAGS needed);
/// Logs the user in on `session` with the PIN the doctor gave; "already logged in" counts as done.
CK_RV doctor_login(CK_SESSION_HANDLE session);
/// Finds the token the options name; on failure writes why to `problem`.
CK_RV doctor_find_token(CK_SLOT_ID *slot, char *problem, size_t size);
/// Finds the chosen key again (by class, label and ID), e.g. in a child that initialised afresh.
CK_RV doctor_refind_key(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE *key);

/// One signature of `data` with `mechanism`; `*step` names the call that failed.
CK_RV doctor_sign(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key, CK_MECHANISM_TYPE mechanism,
                  const unsigned char *data, CK_ULONG length, unsigned char *signature, CK_ULONG *signature_length,
                  const char **step);
/// Checks a signature of doctor_message[0..<32]: equal to the reference when signatures are
/// deterministic, else verified with the public key (CKR_OK unchecked when there is none).
CK_RV doctor_check_signature(const unsigned char *signature, CK_ULONG length);
/// What a checked signature means, for result lines.
const char *doctor_check_description(void);

int doctor_run_fork_scenario(const char *scenario);

#endif
