#!/usr/bin/env python3
"""A parent logs in and finds its key once, then a pool of forked workers signs with the
parent's session and key handles -- the pattern of prefork servers, gunicorn, celery and
multiprocessing. Plain ctypes, no PKCS#11 package needed.

    PIN=... python3 examples/fork_workers.py MODULE TOKEN_LABEL KEY_LABEL [WORKERS] [JOBS]

MODULE is the real module (to see it fail) or libp11fork.so with P11FORK_MODULE set (to see it
work). Prints one line per job and a summary; exits 0 when every signature verifies.
"""
import ctypes
import multiprocessing
import os
import signal
import sys

CK_ULONG = ctypes.c_ulong
CKR = {0x0: "CKR_OK", 0x5: "CKR_GENERAL_ERROR", 0x30: "CKR_DEVICE_ERROR", 0x82: "CKR_OBJECT_HANDLE_INVALID",
       0x60: "CKR_KEY_HANDLE_INVALID", 0xB3: "CKR_SESSION_HANDLE_INVALID", 0x101: "CKR_USER_NOT_LOGGED_IN",
       0x190: "CKR_CRYPTOKI_NOT_INITIALIZED", 0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED", 0xA0: "CKR_PIN_INCORRECT"}
CKO_PUBLIC_KEY, CKO_PRIVATE_KEY = 2, 3
CKA_CLASS, CKA_LABEL = 0x0, 0x3
CKM_SHA256_RSA_PKCS = 0x40
CKF_SERIAL_SESSION, CKF_RW_SESSION, CKF_OS_LOCKING_OK, CKU_USER = 0x4, 0x2, 0x2, 1


class Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", CK_ULONG), ("pParameter", ctypes.c_void_p), ("ulParameterLen", CK_ULONG)]


class Attribute(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", CK_ULONG)]


class InitArgs(ctypes.Structure):
    _fields_ = [("create", ctypes.c_void_p), ("destroy", ctypes.c_void_p), ("lock", ctypes.c_void_p),
                ("unlock", ctypes.c_void_p), ("flags", CK_ULONG), ("reserved", ctypes.c_void_p)]


# The PKCS#11 2.40 function list, in order (only the names are needed to find the slots).
NAMES = """Initialize Finalize GetInfo GetFunctionList GetSlotList GetSlotInfo GetTokenInfo GetMechanismList
GetMechanismInfo InitToken InitPIN SetPIN OpenSession CloseSession CloseAllSessions GetSessionInfo GetOperationState
SetOperationState Login Logout CreateObject CopyObject DestroyObject GetObjectSize GetAttributeValue SetAttributeValue
FindObjectsInit FindObjects FindObjectsFinal EncryptInit Encrypt EncryptUpdate EncryptFinal DecryptInit Decrypt
DecryptUpdate DecryptFinal DigestInit Digest DigestUpdate DigestKey DigestFinal SignInit Sign SignUpdate SignFinal
SignRecoverInit SignRecover VerifyInit Verify""".split()


P, U = ctypes.c_void_p, CK_ULONG
SIGNATURES = {"Initialize": [P], "Finalize": [P], "GetSlotList": [ctypes.c_ubyte, P, P], "GetTokenInfo": [U, P],
              "OpenSession": [U, U, P, P, P], "Login": [U, U, ctypes.c_char_p, U], "FindObjectsInit": [U, P, U],
              "FindObjects": [U, P, U, P], "FindObjectsFinal": [U], "SignInit": [U, P, U],
              "Sign": [U, ctypes.c_char_p, U, P, P], "VerifyInit": [U, P, U], "Verify": [U, ctypes.c_char_p, U, ctypes.c_char_p, U]}


class FunctionList(ctypes.Structure):
    _fields_ = [("version", Version)] + [(name, ctypes.c_void_p) for name in NAMES]


class Module:
    def __init__(self, path):
        self.library = ctypes.CDLL(path)
        pointer = ctypes.POINTER(FunctionList)()
        check("C_GetFunctionList", self.library.C_GetFunctionList(ctypes.byref(pointer)))
        self.functions = pointer.contents

    def __getattr__(self, name):
        return ctypes.CFUNCTYPE(CK_ULONG, *SIGNATURES[name])(getattr(self.functions, name))


def name(rv):
    return CKR.get(rv, hex(rv))


def check(call, rv):
    if rv != 0:
        raise RuntimeError(f"{call}: {name(rv)}")


def find(module, session, object_class, label):
    cls = CK_ULONG(object_class)
    text = label.encode()
    template = (Attribute * 2)(Attribute(CKA_CLASS, ctypes.addressof(cls), 8),
                               Attribute(CKA_LABEL, ctypes.cast(ctypes.c_char_p(text), ctypes.c_void_p), len(text)))
    check("C_FindObjectsInit", module.FindObjectsInit(session, template, 2))
    found, count = CK_ULONG(), CK_ULONG()
    check("C_FindObjects", module.FindObjects(session, ctypes.byref(found), 1, ctypes.byref(count)))
    module.FindObjectsFinal(session)
    if count.value != 1:
        raise RuntimeError(f"no {label} key on the token")
    return found.value


MESSAGE = b"signed by a forked worker"

# Set in the parent, inherited by the workers.
module = session = private_key = None


def sign(job):
    """Runs in a worker: sign with the session and key handles the parent had."""
    signal.alarm(20)  # a hung worker is a failure, not a stuck example
    try:
        mechanism = Mechanism(CKM_SHA256_RSA_PKCS, None, 0)
        rv = module.SignInit(session, ctypes.byref(mechanism), private_key)
        if rv == 0:
            out, length = ctypes.create_string_buffer(1024), CK_ULONG(1024)
            rv = module.Sign(session, MESSAGE, len(MESSAGE), out, ctypes.byref(length))
            if rv == 0:
                return job, os.getpid(), 0, out.raw[:length.value]
        return job, os.getpid(), rv, b""
    finally:
        signal.alarm(0)


def main():
    global module, session, private_key
    if len(sys.argv) < 4 or "PIN" not in os.environ:
        sys.exit(__doc__)
    path, token, label = sys.argv[1:4]
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    jobs = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    pin = os.environ["PIN"].encode()

    module = Module(path)
    args = InitArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
    check("C_Initialize", module.Initialize(ctypes.byref(args)))
    slots, count = (CK_ULONG * 16)(), CK_ULONG(16)
    check("C_GetSlotList", module.GetSlotList(1, slots, ctypes.byref(count)))
    session = CK_ULONG()
    for slot in slots[:count.value]:
        info = ctypes.create_string_buffer(256)
        if module.GetTokenInfo(slot, info) == 0 and info.raw[:32].decode().rstrip() == token:
            check("C_OpenSession", module.OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, None, None, ctypes.byref(session)))
            break
    else:
        sys.exit(f"no token labelled {token}")
    session = session.value
    check("C_Login", module.Login(session, CKU_USER, pin, len(pin)))
    private_key = find(module, session, CKO_PRIVATE_KEY, label)
    public_key = find(module, session, CKO_PUBLIC_KEY, label)
    print(f"parent {os.getpid()}: logged in, session {session:#x}, key {private_key:#x}; forking {workers} workers")

    good = 0
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.imap_unordered(sign, range(jobs))
        for _ in range(jobs):
            try:
                job, pid, rv, signature = results.next(timeout=30)
            except multiprocessing.TimeoutError:
                # A worker that hung (or was killed by its alarm) never reports: say so and stop.
                print("a worker did not answer within 30 s (hung or killed)")
                break
            if rv == 0:
                mechanism = Mechanism(CKM_SHA256_RSA_PKCS, None, 0)
                verify = module.VerifyInit(session, ctypes.byref(mechanism), public_key)
                verify = verify or module.Verify(session, MESSAGE, len(MESSAGE), signature, len(signature))
                good += verify == 0
                print(f"job {job:2d} worker {pid}: signed, {'verified' if verify == 0 else 'NOT verified: ' + name(verify)}")
            else:
                print(f"job {job:2d} worker {pid}: {name(rv)}")
    print(f"{good} of {jobs} signatures made by forked workers verified")
    module.Finalize(None)
    sys.exit(0 if good == jobs else 1)


if __name__ == "__main__":
    main()
