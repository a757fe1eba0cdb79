#!/usr/bin/env python3
"""A multiprocessing pool (fork start method) whose workers sign with the parent's session and key.

    PIN=... python pool_sign.py {pykcs11|python-pkcs11} MODULE TOKEN_LABEL KEY_LABEL [WORKERS] [JOBS]

The parent logs in and finds the key once; each job is signed in a forked worker with the
parent's handles; the parent verifies every signature with the public key, then signs once more
itself. MODULE is the real module (to see the workers fail) or libp11fork.so with
P11FORK_MODULE naming the real module (to see them work). Exits 0 when every signature verifies.
"""
import multiprocessing
import os
import sys

from p11signer import open_signer

WAIT_SECONDS = 30
signer = None  # made in the parent, inherited by the workers


def sign_job(job):
    data = f"job {job}".encode()
    try:
        return job, os.getpid(), signer.sign(data), None
    except Exception as error:  # the module's answer is the point of the example
        return job, os.getpid(), None, signer.describe(error)


def main():
    global signer
    if len(sys.argv) < 5 or "PIN" not in os.environ:
        raise SystemExit(__doc__)
    library, module, token_label, key_label = sys.argv[1:5]
    workers = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    jobs = int(sys.argv[6]) if len(sys.argv) > 6 else 6
    signer = open_signer(library, module, token_label, os.environ.pop("PIN"), key_label)

    pool = multiprocessing.get_context("fork").Pool(workers)
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
