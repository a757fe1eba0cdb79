"""A WSGI app for gunicorn with preload_app = True: the master logs in and finds the key when it
imports this module; every worker signs with the master's session and key handle.

    POST /sign        body = the data; answers {"pid": worker pid, "signature": base64}
                      (or status 500 and {"pid", "error": the module's return code})
    GET  /public-key  the key's public half (PEM), read from the token by the master

Settings come from the environment: PKCS11_LIBRARY (pykcs11 or python-pkcs11), PKCS11_MODULE
(libp11fork.so, with P11FORK_MODULE naming the real module), TOKEN_LABEL, KEY_LABEL, PIN (removed
from the environment once the master has logged in). Run it with gunicorn.conf.py beside it.
"""
import base64
import json
import os

from cryptography.hazmat.primitives import serialization

from p11signer import open_signer

signer = open_signer(os.environ["PKCS11_LIBRARY"], os.environ["PKCS11_MODULE"], os.environ["TOKEN_LABEL"],
                     os.environ.pop("PIN"), os.environ["KEY_LABEL"])
public_pem = signer.public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)


def application(environ, start_response):
    def answer(status, body, content_type="application/json"):
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    if path == "/public-key" and method == "GET":
        return answer("200 OK", public_pem, "application/x-pem-file")
    if path != "/sign" or method != "POST":
        return answer("404 Not Found", b'{"error": "POST /sign or GET /public-key"}')
    data = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    try:
        reply = {"pid": os.getpid(), "signature": base64.b64encode(signer.sign(data)).decode()}
        status = "200 OK"
    except Exception as error:  # the module's answer goes back to the client
        reply = {"pid": os.getpid(), "error": signer.describe(error)}
        status = "500 Internal Server Error"
    return answer(status, json.dumps(reply).encode())
