#!/usr/bin/env python3
"""Checks mailgate with Python's imaplib (and a raw TLS socket where imaplib can't help).

Standard library only (Python 3.11). Run against a mailgate IMAP listener whose upstream
knows two users:

    imaplib_suite.py --host 127.0.0.1 --port N --cafile ca.pem --mode implicit|starttls \
        --user alice --password 'pw' --user2 bob --password2 'pw2'

`--user`/`--password` may need a literal (space, quote, backslash, braces, non-ASCII);
`--user2`/`--password2` must be quotable. Every check prints one `ok ...` line; the first
failure prints `FAIL ...` to stderr and exits with status 1. Every socket has a timeout
and a watchdog ends the whole run (exit status 3) after `--deadline` seconds.
"""

import argparse
import base64
import imaplib
import os
import random
import re
import socket
import ssl
import sys
import threading
import time
import traceback

IO_TIMEOUT = 30.0  # per socket operation
BIG_SIZE = 10 * 1024 * 1024
CRLF = b"\r\n"


class CheckFailed(Exception):
    pass


def fail(message):
    raise CheckFailed(message)


def expect(condition, message):
    if not condition:
        fail(message)


# --------------------------------------------------------------------------- TLS + imaplib


def tls_context(cafile):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class TlsImap(imaplib.IMAP4_SSL):
    """IMAP4_SSL that connects to an IP address but verifies the certificate for `tls_name`."""

    def __init__(self, host, port, ssl_context, tls_name, timeout):
        self.tls_name = tls_name
        super().__init__(host, port, ssl_context=ssl_context, timeout=timeout)

    def _create_socket(self, timeout):
        sock = imaplib.IMAP4._create_socket(self, timeout)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.tls_name)


class StartTlsImap(imaplib.IMAP4):
    """IMAP4 whose STARTTLS verifies the certificate for `tls_name` (not the IP it dialled)."""

    def __init__(self, host, port, tls_name, timeout):
        self.tls_name = tls_name
        super().__init__(host, port, timeout=timeout)

    def starttls(self, ssl_context=None):
        host = self.host
        self.host = self.tls_name  # imaplib uses self.host as server_hostname
        try:
            return super().starttls(ssl_context)
        finally:
            self.host = host


def connect(args):
    """An imaplib session on TLS (implicit or after STARTTLS), not yet logged in."""
    ctx = tls_context(args.cafile)
    if args.mode == "implicit":
        return TlsImap(args.host, args.port, ctx, args.tls_name, IO_TIMEOUT)
    M = StartTlsImap(args.host, args.port, args.tls_name, IO_TIMEOUT)
    caps = set(M.capabilities)
    expect("STARTTLS" in caps, f"STARTTLS not announced before TLS: {sorted(caps)}")
    expect("LOGINDISABLED" in caps, f"LOGINDISABLED not announced before TLS: {sorted(caps)}")
    expect(not any(c.startswith("AUTH=") for c in caps),
           f"AUTH= mechanisms announced before TLS: {sorted(caps)}")
    M.starttls(ctx)
    caps = set(M.capabilities)
    expect("STARTTLS" not in caps and "LOGINDISABLED" not in caps,
           f"pre-TLS capabilities still announced after STARTTLS: {sorted(caps)}")
    return M


def ok(typ, dat, what):
    expect(typ == "OK", f"{what}: expected OK, got {typ} {dat!r}")
    return dat


def text(dat):
    """The text of the last element of an imaplib response list."""
    last = dat[-1] if dat else b""
    if isinstance(last, tuple):
        last = last[0]
    return last.decode("utf-8", "replace") if isinstance(last, bytes) else str(last)


def login_literal(args, user, password):
    """LOGIN with the password as a (synchronizing) literal."""
    M = connect(args)
    M.literal = password.encode("utf-8")
    typ, dat = M._simple_command("LOGIN", user)
    ok(typ, dat, f"LOGIN {user} <literal>")
    M.state = "AUTH"
    return M


def login_quoted(args, user, password):
    M = connect(args)
    typ, dat = M.login(user, password)
    ok(typ, dat, f"LOGIN {user} <quoted>")
    return M


def logout(M):
    try:
        M.logout()
    except Exception:
        pass


def select(M, mailbox, readonly=False):
    typ, dat = M.select(mailbox, readonly=readonly)
    ok(typ, dat, f"{'EXAMINE' if readonly else 'SELECT'} {mailbox}")
    return int(dat[0])


def uid_search(M, *criteria):
    typ, dat = M.uid("SEARCH", *criteria)
    ok(typ, dat, f"UID SEARCH {' '.join(criteria)}")
    return [int(x) for x in b" ".join(d for d in dat if d).split()]


def append(M, mailbox, message, flags=None):
    """APPENDs and returns the new UID from APPENDUID (UIDPLUS)."""
    typ, dat = M.append(mailbox, flags, None, message)
    ok(typ, dat, f"APPEND to {mailbox} ({len(message)} bytes)")
    match = re.search(rb"\[APPENDUID (\d+) (\d+)\]", dat[-1] or b"")
    expect(match is not None, f"APPEND response without APPENDUID: {dat!r}")
    M.untagged_responses.pop("APPENDUID", None)
    return int(match.group(2))


def fetch_body(M, uid):
    typ, dat = M.uid("FETCH", str(uid), "(RFC822.SIZE BODY.PEEK[])")
    ok(typ, dat, f"UID FETCH {uid} BODY.PEEK[]")
    parts = [d for d in dat if isinstance(d, tuple)]
    expect(len(parts) == 1, f"UID FETCH {uid}: expected one literal, got {len(parts)}: "
           f"{[d[0] if isinstance(d, tuple) else d for d in dat]!r}")
    head, body = parts[0]
    expect(re.search(rb"\bUID %d\b" % uid, head) is not None, f"FETCH for the wrong UID: {head!r}")
    size = re.search(rb"RFC822\.SIZE (\d+)", head)
    return body, int(size.group(1)) if size else None


def small_message(subject, token, body="Hello from imaplib_suite.\r\n"):
    return (
        f"From: Suite <suite@example.test>\r\n"
        f"To: Someone <someone@example.test>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
        f"Message-ID: <{token}@imaplib-suite.example.test>\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"\r\n"
        f"{body}"
    ).encode("utf-8")


def big_message(token, size):
    """A valid RFC 5322 message of exactly `size` bytes: CRLF lines of at most 78 octets
    and an 8-bit (Latin-1) body with no NUL, CR or LF in the text."""
    header = (
        "From: Suite <suite@example.test>\r\n"
        "To: Someone <someone@example.test>\r\n"
        f"Subject: big 8-bit message {token}\r\n"
        "Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
        f"Message-ID: <big-{token}@imaplib-suite.example.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=iso-8859-1\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
    ).encode("ascii")
    rng = random.Random(token)
    remaining = size - len(header)
    line_len = 76  # + CRLF = 78
    lines, total = [], 0
    raw = rng.randbytes(remaining)
    # Anything but NUL, LF and CR (mapped to printable ASCII).
    table = bytes(b if b not in (0, 10, 13) else 0x41 + b % 26 for b in range(256))
    raw = raw.translate(table)
    pos = 0
    while total < remaining:
        left = remaining - total
        if left <= line_len + 2:
            n = max(left - 2, 0)
            line = raw[pos:pos + n] + CRLF if left >= 2 else b"x" * left
        else:
            line = raw[pos:pos + line_len] + CRLF
        pos += len(line)
        total += len(line)
        lines.append(line)
    message = header + b"".join(lines)
    assert len(message) == size, len(message)
    return message


# --------------------------------------------------------------------------- raw client


class Raw:
    """A raw IMAP connection with bounded reads; understands literals in responses."""

    def __init__(self, args):
        self.args = args
        self.buf = bytearray()
        sock = socket.create_connection((args.host, args.port), timeout=IO_TIMEOUT)
        ctx = tls_context(args.cafile)
        if args.mode == "implicit":
            self.sock = ctx.wrap_socket(sock, server_hostname=args.tls_name)
            self.greeting = self.response(time.monotonic() + IO_TIMEOUT)
        else:
            self.sock = sock
            self.greeting = self.response(time.monotonic() + IO_TIMEOUT)
            self.send(b"S STARTTLS\r\n")
            answers = self.until_tagged(b"S")
            expect(answers[-1].startswith(b"S OK"), f"STARTTLS refused: {answers!r}")
            expect(not self.buf, f"bytes after STARTTLS OK in clear text: {bytes(self.buf)!r}")
            self.sock = ctx.wrap_socket(sock, server_hostname=args.tls_name)
        expect(self.greeting.startswith(b"* OK"), f"bad greeting {self.greeting!r}")

    def send(self, data):
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.sendall(data)

    def _more(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline passed")
        self.sock.settimeout(min(left, IO_TIMEOUT))
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed by mailgate")
        self.buf += chunk

    def _line(self, deadline):
        while True:
            i = self.buf.find(CRLF)
            if i >= 0:
                line = bytes(self.buf[:i + 2])
                del self.buf[:i + 2]
                return line
            self._more(deadline)

    def response(self, deadline):
        """One whole response (line, and literals with their continuation lines), no CRLF."""
        out = b""
        while True:
            line = self._line(deadline)
            out += line
            m = re.search(rb"\{(\d+)\}\r\n$", line)
            if not m:
                return out[:-2]
            n = int(m.group(1))
            while len(self.buf) < n:
                self._more(deadline)
            out += bytes(self.buf[:n])
            del self.buf[:n]

    def until_tagged(self, tag, timeout=IO_TIMEOUT):
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            r = self.response(deadline)
            seen.append(r)
            if r.startswith(tag + b" "):
                return seen

    def login(self, user, password):
        pw = password.encode("utf-8")
        self.send(b"L LOGIN " + user.encode() + b" {%d}\r\n" % len(pw))
        cont = self.response(time.monotonic() + IO_TIMEOUT)
        expect(cont.startswith(b"+"), f"no continuation for the password literal: {cont!r}")
        self.send(pw + CRLF)
        answers = self.until_tagged(b"L")
        expect(answers[-1].startswith(b"L OK"), f"raw LOGIN {user} failed: {answers!r}")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- checks


class Suite:
    def __init__(self, args):
        self.args = args
        self.token = f"{os.getpid()}-{int(time.time() * 1000)}-{random.randrange(1 << 30)}"

    def sasl_plain(self, user, password):
        return b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8")

    # -- authentication

    def check_login_literal(self):
        a = self.args
        M = login_literal(a, a.user, a.password)
        select(M, "INBOX")
        logout(M)
        return f"LOGIN {a.user} with the password as a literal ({len(a.password.encode())} bytes, "\
               "space/quote/backslash/braces/UTF-8)"

    def check_login_quoted(self):
        a = self.args
        M = login_quoted(a, a.user2, a.password2)
        select(M, "INBOX")
        logout(M)
        return f"LOGIN {a.user2} with imaplib's quoting (M.login)"

    def check_authenticate_plain(self):
        a = self.args
        M = connect(a)
        typ, dat = M.authenticate("PLAIN", lambda challenge: self.sasl_plain(a.user, a.password))
        ok(typ, dat, "AUTHENTICATE PLAIN (continuation)")
        select(M, "INBOX")
        logout(M)
        return f"AUTHENTICATE PLAIN without SASL-IR (continuation) as {a.user}"

    def check_authenticate_plain_ir(self):
        a = self.args
        for user, password in ((a.user, a.password), (a.user2, a.password2)):
            M = connect(a)
            initial = base64.b64encode(self.sasl_plain(user, password)).decode("ascii")
            typ, dat = M._simple_command("AUTHENTICATE", "PLAIN", initial)
            ok(typ, dat, f"AUTHENTICATE PLAIN <initial response> as {user}")
            M.state = "AUTH"
            select(M, "INBOX")
            logout(M)
        return f"AUTHENTICATE PLAIN with SASL-IR as {a.user} and {a.user2}"

    def check_wrong_password(self):
        a = self.args
        M = connect(a)
        typ, dat = M._simple_command("LOGIN", a.user2, M._quote(a.wrong_password))
        expect(typ == "NO", f"LOGIN with a wrong password: expected NO, got {typ} {dat!r}")
        expect("[AUTHENTICATIONFAILED]" in text(dat),
               f"LOGIN with a wrong password: NO without [AUTHENTICATIONFAILED]: {dat!r}")
        # Same connection: literal password, then SASL, both wrong; then a right one.
        M.literal = a.wrong_password.encode()
        typ, dat = M._simple_command("LOGIN", a.user)
        expect(typ == "NO" and "[AUTHENTICATIONFAILED]" in text(dat),
               f"LOGIN (literal) with a wrong password: {typ} {dat!r}")
        initial = base64.b64encode(self.sasl_plain(a.user, a.wrong_password)).decode()
        typ, dat = M._simple_command("AUTHENTICATE", "PLAIN", initial)
        expect(typ == "NO" and "[AUTHENTICATIONFAILED]" in text(dat),
               f"AUTHENTICATE PLAIN with a wrong password: {typ} {dat!r}")
        typ, dat = M.login(a.user2, a.password2)
        ok(typ, dat, "LOGIN with the right password after failures on the same connection")
        logout(M)
        return "wrong password -> NO [AUTHENTICATIONFAILED] (LOGIN quoted, LOGIN literal, " \
               "AUTHENTICATE PLAIN), then a good LOGIN on the same connection"

    # -- mail

    def check_big_append(self):
        a = self.args
        M = login_literal(a, a.user, a.password)
        message = big_message(self.token, BIG_SIZE)
        started = time.monotonic()
        uid = append(M, "INBOX", message)
        appended = time.monotonic()
        select(M, "INBOX")
        expect(uid in uid_search(M, "UID", str(uid)), f"UID {uid} from APPENDUID not found")
        found = uid_search(M, "HEADER", "Message-ID", f'"<big-{self.token}@imaplib-suite.example.test>"')
        expect(found == [uid], f"UID SEARCH by Message-ID found {found}, expected [{uid}]")
        body, size = fetch_body(M, uid)
        fetched = time.monotonic()
        expect(size == len(message), f"RFC822.SIZE {size} != {len(message)}")
        if body != message:
            at = next((i for i, (x, y) in enumerate(zip(body, message)) if x != y),
                      min(len(body), len(message)))
            fail(f"fetched message differs: {len(body)} bytes back for {len(message)} sent, "
                 f"first difference at offset {at}: sent {message[at:at + 40]!r}, "
                 f"got {body[at:at + 40]!r}")
        self.big_uid = uid
        M.close()
        logout(M)
        return (f"APPEND {len(message)} bytes (8-bit, CRLF) -> UID {uid}, UID FETCH BODY[] "
                f"identical (append {appended - started:.2f}s, fetch {fetched - appended:.2f}s)")

    def check_idle(self):
        a = self.args
        raw = Raw(a)
        try:
            raw.login(a.user, a.password)
            raw.send(b"s SELECT INBOX\r\n")
            answers = raw.until_tagged(b"s")
            expect(answers[-1].startswith(b"s OK"), f"SELECT INBOX: {answers!r}")
            exists = [int(m.group(1)) for r in answers
                      for m in [re.match(rb"\* (\d+) EXISTS$", r)] if m]
            expect(exists, f"SELECT without EXISTS: {answers!r}")
            before = exists[-1]
            raw.send(b"i IDLE\r\n")
            cont = raw.response(time.monotonic() + IO_TIMEOUT)
            expect(cont.startswith(b"+"), f"IDLE: expected '+', got {cont!r}")

            result = {}

            def appender():
                try:
                    M = login_literal(a, a.user, a.password)
                    result["uid"] = append(M, "INBOX", small_message(f"idle {self.token}", f"idle-{self.token}"))
                    logout(M)
                except BaseException as e:  # reported by the main thread
                    result["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()

            t = threading.Thread(target=appender, daemon=True)
            started = time.monotonic()
            t.start()
            deadline = started + 10.0
            seen, got = [], None
            while got is None:
                try:
                    r = raw.response(deadline)
                except (socket.timeout, TimeoutError):
                    t.join(timeout=5)
                    fail(f"no EXISTS during IDLE within 10 s of the APPEND; seen {seen!r}; "
                         f"appender: {result!r}")
                seen.append(r)
                m = re.match(rb"\* (\d+) EXISTS$", r)
                if m:
                    got = int(m.group(1))
            waited = time.monotonic() - started
            t.join(timeout=IO_TIMEOUT)
            expect(not t.is_alive(), "appending session did not finish")
            expect("error" not in result, f"appending session failed: {result.get('error')}")
            expect(got > before, f"EXISTS went from {before} to {got}")
            raw.send(b"DONE\r\n")
            answers = raw.until_tagged(b"i")
            expect(answers[-1].startswith(b"i OK"), f"IDLE completion: {answers!r}")
            raw.send(b"z LOGOUT\r\n")
            answers = raw.until_tagged(b"z")
            expect(answers[-1].startswith(b"z OK"), f"LOGOUT: {answers!r}")
        finally:
            raw.close()
        return f"IDLE saw '* {got} EXISTS' {waited:.2f}s after another session's APPEND; DONE -> OK"

    def check_move(self):
        a = self.args
        M = login_literal(a, a.user, a.password)
        typ, dat = M.create("Archive")
        expect(typ == "OK" or "ALREADYEXISTS" in text(dat), f"CREATE Archive: {typ} {dat!r}")
        token = f"move-{self.token}"
        uid = append(M, "INBOX", small_message(f"to be moved {token}", token))
        select(M, "INBOX")
        typ, dat = M.uid("MOVE", str(uid), "Archive")
        ok(typ, dat, f"UID MOVE {uid} Archive")
        expect(uid_search(M, "UID", str(uid)) == [], f"UID {uid} still in INBOX after MOVE")
        expect(uid_search(M, "SUBJECT", f'"{token}"') == [], "moved message still found in INBOX")
        select(M, "Archive")
        found = uid_search(M, "SUBJECT", f'"{token}"')
        expect(len(found) == 1, f"moved message in Archive: found UIDs {found}")
        M.close()
        logout(M)
        return f"CREATE Archive, UID MOVE {uid} INBOX -> Archive: gone from INBOX, in Archive"

    def check_search_store(self):
        a = self.args
        M = login_literal(a, a.user, a.password)
        token = f"distinctive-{self.token}"
        uid = append(M, "INBOX", small_message(f"Quarterly {token} report", token))
        select(M, "INBOX")
        found = uid_search(M, "SUBJECT", f'"{token}"')
        expect(found == [uid], f"UID SEARCH SUBJECT found {found}, expected [{uid}]")
        typ, dat = M.uid("FETCH", str(uid), "(FLAGS)")
        ok(typ, dat, "UID FETCH FLAGS")
        expect(b"\\Flagged" not in b" ".join(d for d in dat if isinstance(d, bytes)),
               f"already flagged: {dat!r}")
        typ, dat = M.uid("STORE", str(uid), "+FLAGS", "(\\Flagged)")
        ok(typ, dat, "UID STORE +FLAGS (\\Flagged)")
        typ, dat = M.uid("FETCH", str(uid), "(FLAGS)")
        ok(typ, dat, "UID FETCH FLAGS")
        flags = b" ".join(d for d in dat if isinstance(d, bytes))
        expect(re.search(rb"UID %d\b" % uid, flags) and b"\\Flagged" in flags,
               f"UID FETCH FLAGS after STORE: {dat!r}")
        found = uid_search(M, "FLAGGED", "SUBJECT", f'"{token}"')
        expect(found == [uid], f"UID SEARCH FLAGGED found {found}")
        M.close()
        logout(M)
        return f"UID SEARCH SUBJECT -> [{uid}], UID STORE +FLAGS (\\Flagged) visible in UID FETCH FLAGS"

    def check_pipelining(self):
        a = self.args
        raw = Raw(a)
        try:
            raw.login(a.user, a.password)
            raw.send(b"a NOOP\r\nb SELECT INBOX\r\nc UID SEARCH ALL\r\nd LOGOUT\r\n")
            responses = []
            deadline = time.monotonic() + IO_TIMEOUT
            while not any(r.startswith(b"d ") for r in responses):
                try:
                    responses.append(raw.response(deadline))
                except EOFError:
                    fail(f"connection closed before 'd' was answered: {responses!r}")
            tagged = [r for r in responses if not r.startswith((b"*", b"+"))]
            tags = [r.split(b" ", 1)[0] for r in tagged]
            expect(tags == [b"a", b"b", b"c", b"d"], f"tagged answers out of order: {tagged!r}")
            expect(all(r.split(b" ")[1] == b"OK" for r in tagged), f"not all OK: {tagged!r}")
            c_at = tags.index(b"c")
            search = [r for r in responses if r.startswith(b"* SEARCH")]
            expect(len(search) == 1, f"expected one * SEARCH: {responses!r}")
            expect(responses.index(search[0]) < responses.index(tagged[c_at]),
                   "* SEARCH after c's completion")
            expect(any(r.startswith(b"* BYE") for r in responses), f"no BYE: {responses!r}")
        finally:
            raw.close()
        return "4 commands pipelined in one write after LOGIN: a, b, c, d answered in order, all OK"

    def check_pipelined_login(self):
        """LOGIN (LITERAL+ password) and the next commands in a single write."""
        a = self.args
        raw = Raw(a)
        try:
            pw = a.password.encode("utf-8")
            raw.send(b"L LOGIN " + a.user.encode() + b" {%d+}\r\n" % len(pw) + pw + CRLF +
                     b"a NOOP\r\nb EXAMINE INBOX\r\nc UID SEARCH ALL\r\nd LOGOUT\r\n")
            responses = []
            deadline = time.monotonic() + IO_TIMEOUT
            while not any(r.startswith(b"d ") for r in responses):
                try:
                    responses.append(raw.response(deadline))
                except EOFError:
                    fail(f"connection closed before 'd' was answered: {responses!r}")
            tagged = [r for r in responses if not r.startswith((b"*", b"+"))]
            tags = [r.split(b" ", 1)[0] for r in tagged]
            expect(tags == [b"L", b"a", b"b", b"c", b"d"], f"tagged answers: {tagged!r}")
            expect(all(r.split(b" ")[1] == b"OK" for r in tagged), f"not all OK: {tagged!r}")
        finally:
            raw.close()
        return "LOGIN with a LITERAL+ password and 4 more commands in one write: all answered in order"

    def check_misc(self):
        a = self.args
        M = login_literal(a, a.user, a.password)
        typ, dat = M.create("Archive")
        expect(typ == "OK" or "ALREADYEXISTS" in text(dat), f"CREATE Archive: {typ} {dat!r}")
        token = f"copy-{self.token}"
        uid = append(M, "INBOX", small_message(f"to be copied {token}", token))
        # STATUS
        typ, dat = M.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN)")
        ok(typ, dat, "STATUS INBOX")
        m = re.search(rb"MESSAGES (\d+)", dat[0])
        expect(m is not None and re.search(rb"UIDNEXT (\d+)", dat[0]), f"STATUS: {dat!r}")
        status_messages = int(m.group(1))
        uidnext = int(re.search(rb"UIDNEXT (\d+)", dat[0]).group(1))
        expect(uidnext > uid, f"STATUS UIDNEXT {uidnext} <= appended UID {uid}")
        # SELECT + COPY by sequence number
        exists = select(M, "INBOX")
        expect(exists == status_messages, f"SELECT EXISTS {exists} != STATUS MESSAGES {status_messages}")
        seq = exists  # the message just appended is the last one
        typ, dat = M.fetch(str(seq), "(UID)")
        ok(typ, dat, f"FETCH {seq} (UID)")
        expect(re.search(rb"UID %d\b" % uid, dat[0] or b""), f"last message is not UID {uid}: {dat!r}")
        typ, dat = M.copy(str(seq), "Archive")
        ok(typ, dat, f"COPY {seq} Archive")
        expect(b"COPYUID" in (dat[-1] or b""), f"COPY without COPYUID: {dat!r}")
        expect(uid_search(M, "UID", str(uid)) == [uid], "copied message left INBOX")
        # UNSELECT
        typ, dat = M.unselect()
        ok(typ, dat, "UNSELECT")
        expect(M.state == "AUTH", f"imaplib state after UNSELECT: {M.state}")
        # LIST
        typ, dat = M.list()
        ok(typ, dat, "LIST")
        names = [d for d in dat if isinstance(d, bytes)]
        expect(any(re.search(rb'"?INBOX"?$', n) for n in names), f"LIST lacks INBOX: {dat!r}")
        expect(any(re.search(rb'"?Archive"?$', n) for n in names), f"LIST lacks Archive: {dat!r}")
        typ, dat = M.list('""', "Arch*")
        ok(typ, dat, "LIST \"\" Arch*")
        expect(len([d for d in dat if d]) == 1, f"LIST Arch*: {dat!r}")
        # EXAMINE
        count = select(M, "Archive", readonly=True)
        expect("READ-ONLY" in M.untagged_responses, f"EXAMINE without [READ-ONLY]: "
               f"{M.untagged_responses!r}")
        found = uid_search(M, "SUBJECT", f'"{token}"')
        expect(len(found) == 1, f"copied message in Archive: UIDs {found}")
        expect(count >= 1, f"EXAMINE Archive: {count} messages")
        typ, dat = M.close()
        ok(typ, dat, "CLOSE")
        typ, dat = M.noop()
        ok(typ, dat, "NOOP")
        typ, dat = M.logout()
        expect(typ == "BYE", f"LOGOUT: expected BYE, got {typ} {dat!r}")
        return (f"STATUS, SELECT, COPY (COPYUID), UNSELECT, LIST, EXAMINE (READ-ONLY, "
                f"{count} in Archive), CLOSE, NOOP, LOGOUT (BYE)")

    def run(self):
        checks = [
            ("login-literal", self.check_login_literal),
            ("login-quoted", self.check_login_quoted),
            ("authenticate-plain", self.check_authenticate_plain),
            ("authenticate-plain-sasl-ir", self.check_authenticate_plain_ir),
            ("wrong-password", self.check_wrong_password),
            ("append-10mb", self.check_big_append),
            ("idle", self.check_idle),
            ("move", self.check_move),
            ("uid-search-store", self.check_search_store),
            ("pipelining", self.check_pipelining),
            ("pipelined-login", self.check_pipelined_login),
            ("copy-list-status-examine-unselect-close-logout", self.check_misc),
        ]
        only = set(self.args.only.split(",")) if self.args.only else None
        for name, check in checks:
            if only is not None and name not in only:
                continue
            started = time.monotonic()
            try:
                detail = check()
            except CheckFailed as e:
                print(f"FAIL [{self.args.mode}] {name}: {e}", file=sys.stderr, flush=True)
                return 1
            except (imaplib.IMAP4.error, OSError, EOFError, ssl.SSLError, ValueError) as e:
                print(f"FAIL [{self.args.mode}] {name}: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
                traceback.print_exc(file=sys.stderr)
                return 1
            print(f"ok [{self.args.mode}] {name} ({time.monotonic() - started:.2f}s): {detail}",
                  flush=True)
        return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--mode", choices=["implicit", "starttls"], required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--user2", required=True)
    p.add_argument("--password2", required=True)
    p.add_argument("--wrong-password", default="definitely-Not-the-password-1")
    p.add_argument("--tls-name", default="localhost",
                   help="name the certificate is verified for (SNI)")
    p.add_argument("--deadline", type=float, default=150.0,
                   help="seconds before the watchdog ends the run")
    p.add_argument("--only", help="comma-separated check names")
    args = p.parse_args()
    if args.password2 != args.password2.strip() or any(c in args.password2 for c in '"\\\r\n') \
            or not args.password2.isascii():
        p.error("--password2 must be quotable by imaplib (ASCII, no quote or backslash)")

    def watchdog():
        print(f"FAIL [{args.mode}] watchdog: the suite did not finish within {args.deadline}s",
              file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(args.deadline, watchdog)
    timer.daemon = True
    timer.start()
    status = Suite(args).run()
    timer.cancel()
    if status == 0:
        print(f"all checks passed [{args.mode}]", flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
