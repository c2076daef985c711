#!/usr/bin/env python3
"""A COMPRESS=DEFLATE (RFC 4978) IMAP client over TLS, for tests/imap_compress.rs.

Python's zlib with wbits=-15 (raw DEFLATE) both ways, a sync flush after each command
as interactive clients do. Logs in through mailgate, turns COMPRESS on, selects INBOX,
runs a header sync (its raw answer written to --fetch-out for the test to compare with
Dovecot's), IDLEs while a message is appended through a direct Dovecot session, asks for
COMPRESS again, logs out. Prints one JSON object of what it saw; exits 1 on any surprise.
"""

import argparse
import imaplib
import json
import re
import socket
import ssl
import sys
import zlib

FETCH = "UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])"


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.deflate = None
        self.inflate = None
        self.wire_in = 0
        self.plain_in = 0

    def start_compression(self):
        self.deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.inflate = zlib.decompressobj(-15)
        # Bytes already read after the OK are the server's DEFLATE stream.
        early, self.buf = self.buf, b""
        self.buf = self.inflate.decompress(early)

    def send(self, data):
        if self.deflate:
            data = self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("server closed the connection")
        if self.inflate:
            self.wire_in += len(chunk)
            chunk = self.inflate.decompress(chunk)
            self.plain_in += len(chunk)
        self.buf += chunk

    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def response(self):
        """One response: its lines and literals, raw."""
        out = b""
        while True:
            line = self.line()
            out += line
            m = re.search(rb"\{(\d+)\+?\}\r\n$", line)
            if not m:
                return out
            n = int(m.group(1))
            while len(self.buf) < n:
                self.fill()
            out += self.buf[:n]
            self.buf = self.buf[n:]

    def command(self, tag, text):
        self.send(f"{tag} {text}\r\n".encode())
        return self.until(tag)

    def until(self, tag):
        responses = []
        while True:
            r = self.response()
            responses.append(r)
            if r.startswith(tag.encode() + b" "):
                return responses


def fail(message):
    print(json.dumps({"error": message}))
    sys.exit(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--dovecot-port", type=int, required=True)
    p.add_argument("--dovecot-ca", required=True)
    p.add_argument("--fetch-out", required=True)
    a = p.parse_args()

    ctx = ssl.create_default_context(cafile=a.cafile)
    raw = socket.create_connection((a.host, a.port), timeout=60)
    conn = Conn(ctx.wrap_socket(raw, server_hostname="localhost"))
    seen = {}
    greeting = conn.line()
    if not greeting.startswith(b"* OK"):
        fail(f"greeting {greeting!r}")
    login = conn.command("a", f'LOGIN "{a.user}" "{a.password}"')[-1]
    if not login.startswith(b"a OK") or b"COMPRESS=DEFLATE" not in login:
        fail(f"login {login!r}")
    caps = conn.command("b", "CAPABILITY")
    if b"COMPRESS=DEFLATE" not in caps[0]:
        fail(f"capability {caps!r}")
    ok = conn.command("c", "COMPRESS DEFLATE")
    if ok != [b"c OK DEFLATE active\r\n"]:
        fail(f"compress {ok!r}")
    conn.start_compression()

    select = conn.command("d", "SELECT INBOX")
    exists = None
    for r in select:
        m = re.match(rb"\* (\d+) EXISTS", r)
        if m:
            exists = int(m.group(1))
    if exists is None or not select[-1].startswith(b"d OK"):
        fail(f"select {select!r}")
    seen["exists"] = exists

    wire_before, plain_before = conn.wire_in, conn.plain_in
    fetch = conn.command("e", FETCH)
    if not fetch[-1].startswith(b"e OK"):
        fail(f"fetch {fetch[-1]!r}")
    with open(a.fetch_out, "wb") as f:
        f.write(b"".join(fetch))
    seen["fetch_responses"] = sum(1 for r in fetch if re.match(rb"\* \d+ FETCH ", r))
    seen["fetch_wire"] = conn.wire_in - wire_before
    seen["fetch_plain"] = conn.plain_in - plain_before

    # IDLE: a message appended elsewhere must be announced at once (each burst flushed).
    conn.send(b"f IDLE\r\n")
    cont = conn.line()
    if not cont.startswith(b"+"):
        fail(f"idle {cont!r}")
    dctx = ssl.create_default_context(cafile=a.dovecot_ca)
    direct = imaplib.IMAP4_SSL(a.host, a.dovecot_port, ssl_context=dctx)
    direct.login(a.user, a.password)
    message = b"From: carol@example.org\r\nSubject: while idling\r\n\r\nhello\r\n"
    direct.append("INBOX", None, None, message)
    direct.logout()
    while True:
        r = conn.line()
        m = re.match(rb"\* (\d+) EXISTS", r)
        if m:
            seen["idle_exists"] = int(m.group(1))
            break
    conn.send(b"DONE\r\n")
    done = conn.until("f")
    if not done[-1].startswith(b"f OK"):
        fail(f"idle done {done!r}")
    new = conn.command("g", f"UID FETCH {exists + 1}:* (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    seen["new_subject"] = b"Subject: while idling" in b"".join(new)

    again = conn.command("h", "COMPRESS DEFLATE")
    seen["second_compress"] = again[-1].decode().strip()
    noop = conn.command("i", "NOOP")
    seen["noop"] = noop[-1].decode().strip()
    bye = conn.command("j", "LOGOUT")
    seen["logout"] = [r.decode().strip() for r in bye]
    seen["wire_in"] = conn.wire_in
    seen["plain_in"] = conn.plain_in
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
