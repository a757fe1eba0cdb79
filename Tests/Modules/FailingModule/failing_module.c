// A "module" whose C_GetFunctionList fails: p11fork must refuse it with a clear message.
// Built only for the tests (libp11fork-test-failing.so).
#include "failing_module.h"

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList) {
    (void)ppFunctionList;
    return CKR_DEVICE_ERROR;
}
