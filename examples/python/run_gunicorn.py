#!/usr/bin/env python3
"""Starts gunicorn_app.py under gunicorn (preload, 2 sync workers, or WORKERS) on a free loopback
port, posts data to /sign, verifies every signature with the public key, and stops gunicorn. At
least two workers are made to sign: one request is held half-sent, which keeps the sync worker
that accepted it busy, so the other requests go to the other worker(s); then the held request is
completed.

    PIN=... python run_gunicorn.py [--worker-user USER] {pykcs11|python-pkcs11} MODULE TOKEN_LABEL KEY_LABEL [REQUESTS] [WORKERS]

Exits 0 when every signature verifies and at least two distinct workers signed. With --worker-user
(run as root), gunicorn's workers switch to USER (and its group) after fork: gunicorn.conf.py's
`user` and `group`.
"""
import argparse
import base64
import grp
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from cryptography.hazmat.primitives import serialization

from p11signer import verifies

HERE = os.path.dirname(os.path.abspath(__file__))
REQUEST_SECONDS = 15
START_SECONDS = 30


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(library, module, token_label, key_label, workers=2, worker_user=None):
    """gunicorn's master process and the base URL, once it serves; retries another port if taken."""
    environment = dict(os.environ, PKCS11_LIBRARY=library, PKCS11_MODULE=module, TOKEN_LABEL=token_label,
                       KEY_LABEL=key_label)
    if worker_user:
        environment.update(WORKER_USER=worker_user, WORKER_GROUP=grp.getgrgid(pwd.getpwnam(worker_user).pw_gid).gr_name)
    for _ in range(5):
        url = f"http://127.0.0.1:{free_port()}"
        log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty module cannot block gunicorn
        master = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", url[7:],
                                   "--workers", str(workers), "gunicorn_app:application"], cwd=HERE, env=environment, stderr=log)
        master.log = log
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and master.poll() is None:
            try:
                with urllib.request.urlopen(url + "/public-key", timeout=2) as reply:
                    return master, url, reply.read()
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        stop(master)
        if "Address already in use" not in log_of(master):
            raise SystemExit(f"gunicorn did not start:\n{log_of(master)}")
    raise SystemExit("gunicorn found no free port")


def log_of(master):
    master.log.seek(0)
    return master.log.read().decode(errors="replace")


def started(pid):
    """A process's start time (clock ticks after boot): with the pid, it names one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def stop(master):
    """Stops gunicorn; a worker stuck inside the module (deaf to SIGTERM) is killed."""
    try:
        with open(f"/proc/{master.pid}/task/{master.pid}/children") as f:
            workers = {int(pid): started(pid) for pid in f.read().split()}
    except OSError:
        workers = {}
    if master.poll() is None:
        master.send_signal(signal.SIGTERM)  # the master stops its workers
        try:
            master.wait(10)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()
    for pid, start_time in workers.items():
        if start_time is not None and started(pid) == start_time:
            os.kill(pid, signal.SIGKILL)


def answer_of(status, body):
    try:
        return json.loads(body)
    except ValueError:
        return {"error": f"HTTP {status}"}


def post(url, number):
    data = f"request {number}".encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/sign", data=data), timeout=REQUEST_SECONDS) as r:
            return data, answer_of(r.status, r.read())
    except urllib.error.HTTPError as error:
        return data, answer_of(error.code, error.read())
    except (urllib.error.URLError, OSError) as error:
        return data, {"error": f"no answer within {REQUEST_SECONDS} s ({error})"}


class HeldRequest:
    """A /sign request sent up to its last byte: the worker that accepted it waits for the rest."""

    def __init__(self, url, number):
        self.data = f"request {number}".encode()
        host, port = url[7:].split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=REQUEST_SECONDS)
        self.sock.sendall(f"POST /sign HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(self.data)}\r\n"
                          f"Connection: close\r\n\r\n".encode() + self.data[:-1])

    def finish(self):
        try:
            self.sock.sendall(self.data[-1:])
            reply = b""
            while chunk := self.sock.recv(65536):
                reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            return self.data, answer_of(head.split(b" ")[1].decode() if head else "?", body)
        except OSError as error:
            return self.data, {"error": f"no answer within {REQUEST_SECONDS} s ({error})"}
        finally:
            self.sock.close()


def main():
    arguments = argparse.ArgumentParser(usage=__doc__.split("\n\n")[1].strip())
    arguments.add_argument("--worker-user")
    for name in ("library", "module", "token_label", "key_label"):
        arguments.add_argument(name)
    arguments.add_argument("requests", nargs="?", type=int, default=12)
    arguments.add_argument("workers", nargs="?", type=int, default=2)
    options = arguments.parse_args()
    if "PIN" not in os.environ:
        raise SystemExit(__doc__)
    requests = options.requests
    master, url, pem = start(options.library, options.module, options.token_label, options.key_label, options.workers,
                             options.worker_user)
    del os.environ["PIN"]
    public_key = serialization.load_pem_public_key(pem)
    answers = []
    try:
        held = HeldRequest(url, 0)
        time.sleep(0.5)  # a worker accepts it and waits for its last byte
        with ThreadPoolExecutor(4) as threads:
            answers += threads.map(lambda n: post(url, n), range(1, requests))
        answers.insert(0, held.finish())
    finally:
        stop(master)

    verified, pids = 0, set()
    for number, (data, answer) in enumerate(answers):
        pid = answer.get("pid", "?")
        ok = "signature" in answer and verifies(public_key, base64.b64decode(answer["signature"]), data)
        print(f"request {number}: worker {pid}: " + ("signature verified" if ok else answer.get("error", "signature does not verify")))
        if ok:
            verified += 1
            pids.add(pid)
    print(f"{verified} of {len(answers)} signatures verified, made by {len(pids)} worker(s)"
          + (f" (pids {', '.join(map(str, sorted(pids)))})" if pids else "")
          + f"; {len({a['pid'] for _, a in answers if 'pid' in a})} worker(s) answered")
    if verified != len(answers) or len(pids) < 2:
        print(f"gunicorn's log:\n{log_of(master)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
