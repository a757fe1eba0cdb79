// What the C test drivers and the doctor's scenarios share: return-code names, one-write output lines, finding a token.
#ifndef P11FORK_TOOL_SUPPORT_H
#define P11FORK_TOOL_SUPPORT_H
#include <p11-kit-1/p11-kit/pkcs11.h>

// The CKR_ name of a return code, or its hex value (in a per-thread buffer).
const char *tool_rv_name(CK_RV rv);
// Writes one line to stdout with a single write(2): lines of parents and children never interleave.
void tool_say(const char *format, ...) __attribute__((format(printf, 1, 2)));
// Says "result: fail REASON" and returns 1 (the drivers' exit status for a failed scenario).
int tool_fail(const char *format, ...) __attribute__((format(printf, 1, 2)));
// The slot whose token's label is `label` (blank-padded, as in CK_TOKEN_INFO).
CK_RV tool_find_slot(CK_FUNCTION_LIST_PTR p11, const char *label, CK_SLOT_ID *out);
// Up to `max` objects of `class` labelled `label`, their number in `*count`: the first failing
// code of C_FindObjectsInit/C_FindObjects/C_FindObjectsFinal, CKR_OBJECT_HANDLE_INVALID for none.
CK_RV tool_find_objects(CK_FUNCTION_LIST_PTR p11, CK_SESSION_HANDLE session, CK_OBJECT_CLASS class,
                        const char *label, CK_OBJECT_HANDLE *found, CK_ULONG max, CK_ULONG *count);

#endif
