#!/usr/bin/env python3
"""An emulated SmartCard-HSM (the Nitrokey HSM 2's chip) behind pcscd's virtual reader.

Connects to vsmartcard's vpcd driver, which pcscd loads from /etc/reader.conf.d/vpcd
(Debian package vsmartcard-vpcd), so OpenSC's own sc-hsm driver, its PKCS#15 emulation and
its PKCS#11 module run unchanged against it, over pcscd, as with a stick. It answers the
commands OpenSC 0.23's card-sc-hsm.c sends, as the SmartCard-HSM's reference describes them:

- SELECT the applet (E8 2B 06 01 04 01 81 C3 1F 02 01) or a file by its identifier, answering
  the file control parameters OpenSC reads (size, version in the proprietary tag 85);
- READ BINARY and UPDATE BINARY with the odd instruction (B1, D7: file in P1-P2, offset in tag
  54, data in tag 53), DELETE FILE (E4), ENUMERATE OBJECTS (80 58);
- VERIFY the user PIN (reference 81): without data it reports the tries left; three wrong
  PINs block it; the applet's selection logs out;
- GENERATE ASYMMETRIC KEY PAIR (46): an RSA key, answered as an authenticated certificate
  request holding its public key, which OpenSC stores beside the key and reads the public
  key from;
- DECIPHER (80 62, algorithm 21): raw RSA with the private key, which never leaves this
  process (OpenSC removes the padding on the host, as with a stick);
- GET CHALLENGE (84);
- INITIALIZE DEVICE (80 50: user PIN, number of DKEK shares; everything but the device's own
  key and certificate wiped), IMPORT DKEK SHARE (80 52: the shares XORed into the DKEK, the
  answer giving shares total, outstanding and a check value), WRAP KEY (80 72) and UNWRAP KEY
  (80 74). A key generated while the card had no DKEK shares can never be wrapped (6A88, which
  OpenSC reports as "Data object not found"); a wrapped key is the private key encrypted under
  the DKEK (AES-256-GCM here: only this emulator reads it), and unwrapping with another DKEK
  fails without touching the card.

The device certificate (EF.C_DevAut, 2F02) carries the serial number OpenSC reports. State
lives in memory, a fresh card each start with the user PIN from --pin, or with --state FILE in
that file, read at start and written after every change, so a stick can be unplugged (the
process stopped) and plugged in again. Every card command takes --delay seconds (a stick takes
about 150 ms per operation; default 0).

Usage: card.py --pin 648219 [--serial DENK0100000] [--state FILE] [--port 35963] [--delay 0]
Runs until pcscd closes the connection for good or the process is signalled.
"""

import argparse
import hashlib
import json
import os
import secrets
import signal
import socket
import struct
import sys
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

AID = bytes.fromhex("E82B0601040181C31F0201")
# A Nitrokey HSM 2's ATR, one of those OpenSC's sc-hsm driver matches.
ATR = bytes.fromhex("3BDE18FF8191FE1FC38031815448534D317380214081071C")
# id-TA-RSA-v1-5-SHA-256 (BSI TR-03110), the public key algorithm in the card's certificates.
RSA_OID = bytes.fromhex("04007F00070202020102")

SW_OK = b"\x90\x00"
SW_NOT_FOUND = b"\x6a\x82"
SW_REF_NOT_FOUND = b"\x6a\x88"
SW_SECURITY = b"\x69\x82"
SW_BLOCKED = b"\x69\x83"
SW_WRONG_DATA = b"\x6a\x80"
SW_INS = b"\x6d\x00"
SW_OFFSET = b"\x6b\x00"
SW_EXISTS = b"\x6a\x89"
SW_CONDITIONS = b"\x69\x85"

KEY_PREFIX = 0xCC
PROTECTED_DATA_PREFIX = 0xCD


def tlv(tag, value):
    """BER-TLV with a one- or two-byte tag and a definite length."""
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82, n >> 8, n & 0xFF])
    tag_bytes = tag.to_bytes(2 if tag > 0xFF else 1, "big")
    return tag_bytes + length + value


def cv_certificate(modulus, exponent, car, chr_):
    """A card verifiable certificate as the card issues them (the signature is not checked
    by OpenSC when it reads the public key, so it is random here)."""
    public_key = tlv(0x7F49, tlv(0x06, RSA_OID) + tlv(0x81, modulus) + tlv(0x82, exponent))
    body = (
        tlv(0x5F29, b"\x00")
        + tlv(0x42, car.encode())
        + public_key
        + tlv(0x5F20, chr_.encode())
    )
    return tlv(0x7F21, tlv(0x7F4E, body) + tlv(0x5F37, secrets.token_bytes(256)))


def parse_apdu(apdu):
    """(cla, ins, p1, p2, data, le) of a short or extended command APDU; le None when absent
    (an Le of 0 means 256 in a short APDU, 65536 in an extended one)."""
    cla, ins, p1, p2 = apdu[:4]
    body = apdu[4:]
    if not body:
        return cla, ins, p1, p2, b"", None
    if len(body) == 1:
        return cla, ins, p1, p2, b"", body[0] or 256
    if body[0] == 0 and len(body) >= 3:
        if len(body) == 3:
            return cla, ins, p1, p2, b"", int.from_bytes(body[1:3], "big") or 65536
        lc = int.from_bytes(body[1:3], "big")
        data = body[3 : 3 + lc]
        rest = body[3 + lc :]
        le = (int.from_bytes(rest[-2:], "big") or 65536) if rest else None
        return cla, ins, p1, p2, data, le
    lc = body[0]
    data = body[1 : 1 + lc]
    rest = body[1 + lc :]
    le = (rest[0] or 256) if rest else None
    return cla, ins, p1, p2, data, le


def tag_value(data, tag):
    """The value of the first TLV with a one-byte `tag` in `data` (lengths up to 82 xx xx)."""
    i = 0
    while i < len(data):
        t = data[i]
        n = data[i + 1]
        i += 2
        if n == 0x81:
            n = data[i]
            i += 1
        elif n == 0x82:
            n = int.from_bytes(data[i : i + 2], "big")
            i += 2
        if t == tag:
            return data[i : i + n], i + n
        i += n
    return None, None


class Card:
    def __init__(self, pin, serial, state=None):
        self.pin = pin.encode()
        self.tries = 3
        self.logged_in = False
        self.files = {}
        self.keys = {}
        # Keys generated while the card had DKEK shares: the only ones WRAP KEY exports.
        self.exportable = set()
        self.dkek_shares = 0
        self.outstanding = 0
        self.dkek = bytes(32)
        self.current = None
        self.serial = serial
        self.state = state
        if state and os.path.exists(state):
            self.load()
            return
        # Key 0 is the device's own key, listed by ENUMERATE OBJECTS as on a card, so that
        # OpenSC numbers generated keys from 1.
        dev = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.keys[0] = dev
        numbers = dev.public_key().public_numbers()
        self.files[0x2F02] = cv_certificate(
            numbers.n.to_bytes(128, "big"), b"\x01\x00\x01", "DECA00001", serial + "00001"
        )
        self.save()

    def save(self):
        if not self.state:
            return
        pem = lambda k: k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        state = {
            "pin": self.pin.hex(),
            "tries": self.tries,
            "files": {f"{f:04X}": v.hex() for f, v in self.files.items()},
            "keys": {str(i): pem(k) for i, k in self.keys.items()},
            "exportable": sorted(self.exportable),
            "dkek_shares": self.dkek_shares,
            "outstanding": self.outstanding,
            "dkek": self.dkek.hex(),
        }
        tmp = self.state + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state)

    def load(self):
        with open(self.state) as f:
            state = json.load(f)
        self.pin = bytes.fromhex(state["pin"])
        self.tries = state["tries"]
        self.files = {int(f, 16): bytes.fromhex(v) for f, v in state["files"].items()}
        self.keys = {
            int(i): serialization.load_pem_private_key(k.encode(), None)
            for i, k in state["keys"].items()
        }
        self.exportable = set(state["exportable"])
        self.dkek_shares = state["dkek_shares"]
        self.outstanding = state["outstanding"]
        self.dkek = bytes.fromhex(state["dkek"])

    def handle(self, apdu):
        cla, ins, p1, p2, data, le = parse_apdu(apdu)
        method = {
            0x50: self.initialize,
            0x52: self.import_dkek_share,
            0x72: self.wrap_key,
            0x74: self.unwrap_key,
            0xA4: self.select,
            0xB1: self.read_binary,
            0xD7: self.update_binary,
            0xE4: self.delete_file,
            0x58: self.enumerate,
            0x20: self.verify,
            0x46: self.generate_key,
            0x62: self.decipher,
            0x84: self.challenge,
        }.get(ins)
        if method is None:
            return SW_INS
        response = method(p1, p2, data, le)
        if ins not in (0xA4, 0xB1, 0x58, 0x84, 0x62):
            self.save()
        return response

    def fcp(self, fid):
        size = len(self.files[fid])
        return tlv(
            0x62,
            tlv(0x80, size.to_bytes(2, "big"))
            + tlv(0x82, b"\x01")
            + tlv(0x83, fid.to_bytes(2, "big")),
        )

    def select(self, p1, p2, data, le):
        if p1 == 0x04 and data == AID:
            self.logged_in = False
            self.current = None
            if p2 == 0x0C:
                return SW_OK
            return tlv(0x62, tlv(0x82, b"\x38") + tlv(0x85, b"\x00\x03\x03")) + SW_OK
        if len(data) == 2:
            fid = int.from_bytes(data, "big")
            if fid == 0x3F00:
                return SW_OK
            if fid not in self.files:
                return SW_NOT_FOUND
            self.current = fid
            return SW_OK if p2 == 0x0C else self.fcp(fid) + SW_OK
        return SW_NOT_FOUND

    def target(self, p1, p2):
        fid = (p1 << 8) | p2
        return self.current if fid == 0 else fid

    def readable(self, fid):
        return not (fid >> 8 == PROTECTED_DATA_PREFIX and not self.logged_in)

    def read_binary(self, p1, p2, data, le):
        fid = self.target(p1, p2)
        if fid not in self.files:
            return SW_NOT_FOUND
        if not self.readable(fid):
            return SW_SECURITY
        offset, _ = tag_value(data, 0x54)
        offset = int.from_bytes(offset or b"\x00\x00", "big")
        content = self.files[fid]
        if offset > len(content):
            return SW_OFFSET
        chunk = content[offset:] if le is None else content[offset : offset + le]
        return chunk + SW_OK

    def update_binary(self, p1, p2, data, le):
        fid = self.target(p1, p2)
        if fid is None:
            return SW_NOT_FOUND
        if fid >> 8 in (PROTECTED_DATA_PREFIX, KEY_PREFIX) and not self.logged_in:
            return SW_SECURITY
        offset, _ = tag_value(data, 0x54)
        offset = int.from_bytes(offset or b"\x00\x00", "big")
        value, _ = tag_value(data, 0x53)
        value = value or b""
        content = bytearray(self.files.get(fid, b""))
        if len(content) < offset:
            content.extend(b"\x00" * (offset - len(content)))
        content[offset : offset + len(value)] = value
        self.files[fid] = bytes(content)
        self.current = fid
        return SW_OK

    def delete_file(self, p1, p2, data, le):
        fid = int.from_bytes(data[:2], "big")
        if fid >> 8 == KEY_PREFIX and (fid & 0xFF) in self.keys:
            del self.keys[fid & 0xFF]
            return SW_OK
        if fid not in self.files:
            return SW_NOT_FOUND
        del self.files[fid]
        return SW_OK

    def enumerate(self, p1, p2, data, le):
        ids = [KEY_PREFIX << 8 | k for k in self.keys]
        ids += [f for f in self.files if f >> 8 != 0x2F]
        return b"".join(i.to_bytes(2, "big") for i in sorted(ids)) + SW_OK

    def verify(self, p1, p2, data, le):
        if p2 != 0x81:
            return SW_REF_NOT_FOUND
        if not data:
            if self.logged_in:
                return SW_OK
            return SW_BLOCKED if self.tries == 0 else bytes([0x63, 0xC0 | self.tries])
        if self.tries == 0:
            return SW_BLOCKED
        if data == self.pin:
            self.tries = 3
            self.logged_in = True
            return SW_OK
        self.tries -= 1
        self.logged_in = False
        return SW_BLOCKED if self.tries == 0 else bytes([0x63, 0xC0 | self.tries])

    def generate_key(self, p1, p2, data, le):
        if not self.logged_in:
            return SW_SECURITY
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.keys[p1] = key
        if self.dkek_shares:
            self.exportable.add(p1)
        else:
            self.exportable.discard(p1)
        numbers = key.public_key().public_numbers()
        request = cv_certificate(
            numbers.n.to_bytes(256, "big"),
            numbers.e.to_bytes(3, "big"),
            "UTCA00001",
            self.serial + "00001",
        )
        # An authenticated request: the request, signed again under the device's reference.
        outer = tlv(0x42, (self.serial + "00001").encode()) + tlv(0x5F37, secrets.token_bytes(128))
        return tlv(0x67, request + outer) + SW_OK

    def decipher(self, p1, p2, data, le):
        if not self.logged_in:
            return SW_SECURITY
        key = self.keys.get(p1)
        if key is None:
            return SW_REF_NOT_FOUND
        if p2 != 0x21:
            return SW_WRONG_DATA
        numbers = key.private_numbers()
        n = numbers.public_numbers.n
        c = int.from_bytes(data, "big")
        if c >= n:
            return SW_WRONG_DATA
        m = pow(c, numbers.d, n)
        return m.to_bytes((n.bit_length() + 7) // 8, "big") + SW_OK

    def initialize(self, p1, p2, data, le):
        pin, _ = tag_value(data, 0x81)
        shares, _ = tag_value(data, 0x92)
        if not pin:
            return SW_WRONG_DATA
        self.pin = pin
        self.tries = 3
        self.logged_in = False
        self.files = {f: v for f, v in self.files.items() if f == 0x2F02}
        self.keys = {0: self.keys[0]}
        self.exportable = set()
        self.dkek_shares = shares[0] if shares else 0
        self.outstanding = self.dkek_shares
        self.dkek = bytes(32)
        return SW_OK

    def dkek_status(self):
        check = hashlib.sha256(self.dkek).digest()[:8]
        return bytes([self.dkek_shares, self.outstanding]) + check + SW_OK

    def import_dkek_share(self, p1, p2, data, le):
        if not data:
            return self.dkek_status()
        if len(data) != 32:
            return SW_WRONG_DATA
        if self.outstanding == 0:
            return SW_CONDITIONS
        self.dkek = bytes(a ^ b for a, b in zip(self.dkek, data))
        self.outstanding -= 1
        return self.dkek_status()

    def dkek_ready(self):
        return self.dkek_shares > 0 and self.outstanding == 0

    def wrap_key(self, p1, p2, data, le):
        if not self.logged_in:
            return SW_SECURITY
        if p1 not in self.keys or p1 not in self.exportable:
            return SW_REF_NOT_FOUND
        if not self.dkek_ready():
            return SW_CONDITIONS
        der = self.keys[p1].private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        nonce = secrets.token_bytes(12)
        return nonce + AESGCM(self.dkek).encrypt(nonce, der, b"sc-hsm key") + SW_OK

    def unwrap_key(self, p1, p2, data, le):
        if not self.logged_in:
            return SW_SECURITY
        if not self.dkek_ready():
            return SW_CONDITIONS
        if p1 in self.keys:
            return SW_EXISTS
        try:
            der = AESGCM(self.dkek).decrypt(data[:12], data[12:], b"sc-hsm key")
        except Exception:
            return SW_WRONG_DATA
        self.keys[p1] = serialization.load_der_private_key(der, None)
        self.exportable.add(p1)
        return SW_OK

    def challenge(self, p1, p2, data, le):
        return secrets.token_bytes(le or 8) + SW_OK


def receive(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("vpcd closed the connection")
        buf += chunk
    return buf


def serve(card, port, delay):
    """Connects to vpcd (retrying until pcscd has loaded it) and answers it."""
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            time.sleep(0.1)
    with sock:
        while True:
            (length,) = struct.unpack(">H", receive(sock, 2))
            message = receive(sock, length)
            if length == 1:
                # Control: 0 power off, 1 power on, 2 reset, 4 ATR.
                if message[0] == 4:
                    sock.sendall(struct.pack(">H", len(ATR)) + ATR)
                elif message[0] in (0, 2):
                    card.logged_in = False
                continue
            if delay:
                time.sleep(delay)
            response = card.handle(message)
            sock.sendall(struct.pack(">H", len(response)) + response)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pin", required=True)
    parser.add_argument("--serial", default="DENK0100000")
    parser.add_argument("--port", type=int, default=0x8C7B)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--state")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    card = Card(args.pin, args.serial, args.state)
    try:
        serve(card, args.port, args.delay)
    except (ConnectionError, KeyboardInterrupt):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
