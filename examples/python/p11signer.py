"""Log in and find an RSA key once, with PyKCS11 or python-pkcs11, and sign with it.

Both examples build one Signer in the parent process (the multiprocessing parent, the gunicorn
master) and let forked workers call Signer.sign with the parent's session and key handle. The
workers never log in or look the key up: that is the pattern PKCS#11 forbids and p11fork allows.
"""
import hashlib
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

LIBRARIES = ("pykcs11", "python-pkcs11")
# DER header of a SHA-256 DigestInfo. Signing it with CKM_RSA_PKCS gives the same signature as
# CKM_SHA256_RSA_PKCS, which openCryptoki's soft token does not offer.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def digest_info(data: bytes) -> bytes:
    return SHA256_DIGEST_INFO + hashlib.sha256(data).digest()


def verifies(public_key, signature: bytes, data: bytes) -> bool:
    """Whether `signature` is an RSA PKCS#1 v1.5 SHA-256 signature of `data` by `public_key`."""
    try:
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        return True
    except InvalidSignature:
        return False


class Signer:
    """A logged-in session and a private key, plus the public key read from the token."""

    def sign(self, data: bytes) -> bytes:
        raise NotImplementedError

    def verify(self, signature: bytes, data: bytes) -> bool:
        return verifies(self.public_key, signature, data)

    @staticmethod
    def describe(error: Exception) -> str:
        """The CKR_ name of a library's error where it has one, else its text."""
        return f"{type(error).__name__}: {error}"


class PyKCS11Signer(Signer):
    def __init__(self, module, token_label, pin, key_label):
        import PyKCS11
        self._pk = PyKCS11
        self.lib = PyKCS11.PyKCS11Lib()
        self.lib.load(module)
        slots = [s for s in self.lib.getSlotList(tokenPresent=True)
                 if self.lib.getTokenInfo(s).label.strip() == token_label]
        if len(slots) != 1:
            raise SystemExit(f"no single token labelled {token_label!r} in {module}")
        self.session = self.lib.openSession(slots[0], PyKCS11.CKF_SERIAL_SESSION)
        self.session.login(pin)
        self.key = self._find(PyKCS11.CKO_PRIVATE_KEY, key_label)
        public = self._find(PyKCS11.CKO_PUBLIC_KEY, key_label)
        modulus, exponent = self.session.getAttributeValue(public, [PyKCS11.CKA_MODULUS, PyKCS11.CKA_PUBLIC_EXPONENT])
        self.public_key = rsa.RSAPublicNumbers(int.from_bytes(bytes(exponent), "big"),
                                               int.from_bytes(bytes(modulus), "big")).public_key()
        self.mechanism = PyKCS11.Mechanism(PyKCS11.CKM_RSA_PKCS)

    def _find(self, object_class, label):
        found = self.session.findObjects([(self._pk.CKA_CLASS, object_class), (self._pk.CKA_LABEL, label)])
        if len(found) != 1:
            raise SystemExit(f"expected one key labelled {label!r}, found {len(found)}")
        return found[0]

    def sign(self, data):
        return bytes(self.session.sign(self.key, digest_info(data), self.mechanism))

    @staticmethod
    def describe(error):
        # PyKCS11Error prints as "CKR_CRYPTOKI_NOT_INITIALIZED (0x00000190)".
        return str(error).split(" ")[0] if type(error).__name__ == "PyKCS11Error" else Signer.describe(error)


class PythonPKCS11Signer(Signer):
    def __init__(self, module, token_label, pin, key_label):
        import pkcs11
        from pkcs11 import Attribute, Mechanism, ObjectClass
        self.lib = pkcs11.lib(module)
        self.session = self.lib.get_token(token_label=token_label).open(user_pin=pin)
        self.key = self.session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=key_label)
        public = self.session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=key_label)
        self.public_key = rsa.RSAPublicNumbers(int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                                               int.from_bytes(public[Attribute.MODULUS], "big")).public_key()
        self.mechanism = Mechanism.RSA_PKCS

    def sign(self, data):
        return self.key.sign(digest_info(data), mechanism=self.mechanism)

    @staticmethod
    def describe(error):
        # python-pkcs11 raises one class per return code (DeviceError = CKR_DEVICE_ERROR), but a
        # plain PKCS11Error for CKR_CRYPTOKI_NOT_INITIALIZED, which it assumes cannot happen.
        name = type(error).__name__
        if "not initialized" in str(error):
            return "CKR_CRYPTOKI_NOT_INITIALIZED"
        if name in ("PKCS11Error", "NoSuchKey", "NoSuchToken", "MultipleObjectsReturned", "MultipleTokensReturned") \
                or not type(error).__module__.startswith("pkcs11"):
            return Signer.describe(error)  # not a return code of the module
        return "CKR_" + re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).upper()


def open_signer(library, module, token_label, pin, key_label) -> Signer:
    kinds = {"pykcs11": PyKCS11Signer, "python-pkcs11": PythonPKCS11Signer}
    if library not in kinds:
        raise SystemExit(f"unknown library {library!r}: choose one of {', '.join(LIBRARIES)}")
    try:
        return kinds[library](module, token_label, pin, key_label)
    except Exception as error:
        raise SystemExit(f"{module}: opening token {token_label!r} and key {key_label!r} failed: "
                         f"{kinds[library].describe(error)}") from None
