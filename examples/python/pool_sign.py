#!/usr/bin/env python3
"""A multiprocessing pool (fork start method) whose workers sign with the parent's session and key.

    PIN=... python pool_sign.py [--worker-user USER] {pykcs11|python-pkcs11} MODULE TOKEN_LABEL KEY_LABEL [WORKERS] [JOBS]

The parent logs in and finds the key once; each job is signed in a forked worker with the
parent's handles; the parent verifies every signature with the public key, then signs once more
itself. MODULE is the real module (to see the workers fail) or libp11fork.so with
P11FORK_MODULE naming the real module (to see them work). Exits 0 when every signature verifies.

With --worker-user (run as root), each worker switches to USER in the pool's initializer, before
its first job, as a server's workers give up root's rights: the workers then lack the rights the
module needs (e.g. a token folder only root may read), and p11fork's broker, started with the
parent's rights, runs the module for them.
"""
import argparse
import multiprocessing
import os
import pwd
import sys

from p11signer import open_signer

WAIT_SECONDS = 30
signer = None  # made in the parent, inherited by the workers
switched = False  # the workers switch user (--worker-user)


def become(uid, gid):
    """The pool's initializer with --worker-user: the worker gives up root's rights for good."""
    global switched
    switched = True
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def sign_job(job):
    data = f"job {job}".encode()
    try:
        return job, worker(), signer.sign(data), None
    except Exception as error:  # the module's answer is the point of the example
        return job, worker(), None, signer.describe(error)


def worker():
    """The worker's pid, and its user when it switched to one."""
    return f"{os.getpid()}" + (f" ({pwd.getpwuid(os.getuid()).pw_name})" if switched else "")


def main():
    global signer
    arguments = argparse.ArgumentParser(usage=__doc__.split("\n\n")[1].strip())
    arguments.add_argument("--worker-user")
    for name in ("library", "module", "token_label", "key_label"):
        arguments.add_argument(name)
    arguments.add_argument("workers", nargs="?", type=int, default=2)
    arguments.add_argument("jobs", nargs="?", type=int, default=6)
    options = arguments.parse_args()
    if "PIN" not in os.environ:
        raise SystemExit(__doc__)
    jobs = options.jobs
    initializer, initargs = None, ()
    if options.worker_user:
        entry = pwd.getpwnam(options.worker_user)  # looked up once, in the parent
        initializer, initargs = become, (entry.pw_uid, entry.pw_gid)
    signer = open_signer(options.library, options.module, options.token_label, os.environ.pop("PIN"), options.key_label)

    pool = multiprocessing.get_context("fork").Pool(options.workers, initializer, initargs)
    try:
        results = pool.map_async(sign_job, range(jobs), chunksize=1).get(WAIT_SECONDS)
        pool.close()
    except multiprocessing.TimeoutError:
        print(f"the workers did not answer within {WAIT_SECONDS} s (a worker hangs)")
        results = []
    finally:
        pool.terminate()
        pool.join()

    verified = 0
    for job, pid, signature, error in results:
        if error is None and signer.verify(signature, f"job {job}".encode()):
            verified += 1
            print(f"job {job}: worker {pid}: signature verified")
        else:
            print(f"job {job}: worker {pid}: {error or 'signature does not verify'}")
    pids = {pid for _, pid, _, _ in results}
    print(f"{verified} of {jobs} signatures made by forked workers verified ({len(pids)} worker(s))")

    try:
        parent_ok = signer.verify(signer.sign(b"parent"), b"parent")
        print("the parent still signs" if parent_ok else "the parent's signature does not verify")
    except Exception as error:
        parent_ok = False
        print(f"the parent no longer signs: {signer.describe(error)}")
    return 0 if verified == jobs and parent_ok else 1


if __name__ == "__main__":
    sys.exit(main())
