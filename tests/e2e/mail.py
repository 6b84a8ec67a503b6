"""Mail as customers' clients write it, sent into Postfix; mailboxes read over IMAP."""

from __future__ import annotations

import base64
import email
import email.utils
import imaplib
import quopri
import re
import smtplib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from typing import Any

from tests.e2e.servers import PASSWORD

TAG = re.compile(r"\[IQ\.pl#(\d+)(?::([0-9a-f]{20}))?\]", re.IGNORECASE)


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


# -- Reading mailboxes -----------------------------------------------------------


@dataclass
class Received:
    uid: int
    raw: bytes
    seen_at: float  # time.monotonic() of the first poll that saw it

    @property
    def msg(self) -> EmailMessage:
        return parse(self.raw)

    def header(self, name: str) -> str:
        value = self.msg[name]
        return "" if value is None else str(value)

    @property
    def subject(self) -> str:
        return self.header("Subject")

    def text(self) -> str:
        body = self.msg.get_body(preferencelist=("plain", "html"))
        return "" if body is None else str(body.get_content())

    def all_text(self) -> str:
        """Every text part, decoded, also inside attached messages (a DSN's returned mail)."""
        out = []
        for part in self.msg.walk():
            if part.get_content_maintype() == "text":
                try:
                    out.append(str(part.get_content()))
                except (LookupError, ValueError):
                    out.append(part.get_payload(decode=True).decode("utf-8", "replace"))
        return "\n".join(out)


class Mailbox:
    """One Dovecot user's INBOX over IMAP (stdlib imaplib), polled with NOOP."""

    def __init__(self, port: int, user: str) -> None:
        self.port = port
        self.user = user
        self.imap: imaplib.IMAP4 | None = None
        self.known: dict[int, Received] = {}

    def _conn(self) -> imaplib.IMAP4:
        if self.imap is None:
            imap = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
            try:
                imap.login(self.user, PASSWORD)
                imap.select("INBOX")
            except Exception:
                imap.shutdown()
                raise
            self.imap = imap
        return self.imap

    def poll(self) -> list[Received]:
        """Everything in the INBOX now, oldest first; new UIDs are fetched once."""
        imap = self._conn()
        imap.noop()
        typ, data = imap.uid("SEARCH", "ALL")
        assert typ == "OK", data
        uids = [int(u) for u in (data[0] or b"").split()]
        now = time.monotonic()
        for uid in uids:
            if uid in self.known:
                continue
            typ, parts = imap.uid("FETCH", str(uid), "(BODY.PEEK[])")
            assert typ == "OK", parts
            raw = next(p[1] for p in parts if isinstance(p, tuple))
            self.known[uid] = Received(uid, raw, now)
        return [self.known[u] for u in uids if u in self.known]

    def wait_for(
        self,
        match: Callable[[Received], bool] | None = None,
        count: int = 1,
        timeout: float = 20.0,
        interval: float = 0.05,
    ) -> list[Received]:
        """At least ``count`` messages that match; fails with what did arrive."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.poll() if match is None or match(r)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                subjects = [(r.header("X-IQ-Authorization"), r.subject) for r in self.poll()]
                raise AssertionError(
                    f"{self.user}: {len(found)} of {count} expected message(s) after "
                    f"{timeout:g}s; the mailbox holds {subjects}"
                )
            time.sleep(interval)

    def stays_without(
        self, match: Callable[[Received], bool], seconds: float, count: int = 0
    ) -> list[Received]:
        """Wait ``seconds``; assert no more than ``count`` matching messages came."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = [r for r in self.poll() if match(r)]
            assert len(found) <= count, [r.subject for r in found]
            time.sleep(0.1)
        return [r for r in self.poll() if match(r)]

    def close(self) -> None:
        if self.imap is not None:
            try:
                self.imap.logout()
            except (OSError, imaplib.IMAP4.error):
                self.imap.shutdown()
            self.imap = None


class Mailboxes:
    """Lazily opened mailboxes by address: ``mail["owner@acme.test"]``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.boxes: dict[str, Mailbox] = {}

    def __getitem__(self, user: str) -> Mailbox:
        if user not in self.boxes:
            self.boxes[user] = Mailbox(self.port, user)
        return self.boxes[user]

    def close(self) -> None:
        for box in self.boxes.values():
            box.close()
        self.boxes.clear()


def wait_all(
    waits: Iterable[tuple[Mailbox, Callable[[Received], bool]]], timeout: float = 20.0
) -> list[Received]:
    """Poll several mailboxes together; the first match of each, with its arrival time."""
    waits = list(waits)
    deadline = time.monotonic() + timeout
    got: list[Received | None] = [None] * len(waits)
    while True:
        for i, (box, match) in enumerate(waits):
            if got[i] is None:
                got[i] = next((r for r in box.poll() if match(r)), None)
        if all(g is not None for g in got):
            return [g for g in got if g is not None]
        if time.monotonic() > deadline:
            missing = [waits[i][0].user for i, g in enumerate(got) if g is None]
            raise AssertionError(f"no matching mail after {timeout:g}s in {missing}")
        time.sleep(0.02)


# -- Sending into Postfix --------------------------------------------------------


def send_via_mx(
    port: int,
    raw: bytes | EmailMessage,
    mail_from: str,
    rcpts: list[str],
    smtputf8: bool = False,
) -> str:
    """Hand a message to Postfix's MX port as a customer's server would; the queue id."""
    if isinstance(raw, EmailMessage):
        # With SMTPUTF8 a client writes UTF-8 headers as they are (RFC 6532), never an
        # encoded word inside an address (what policy.SMTP would make of łukasz@).
        raw = raw.as_bytes(policy=policy.SMTPUTF8 if smtputf8 else policy.SMTP)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("mail.customer.test")
        options = ["SMTPUTF8", "BODY=8BITMIME"] if smtputf8 else ["BODY=8BITMIME"]
        code, text = client.mail(mail_from, options)
        assert code == 250, (code, text)
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            assert code == 250, (rcpt, code, text)
        code, text = client.data(raw)
        assert code == 250, (code, text)
    m = re.search(rb"queued as ([0-9A-F]+)", text)
    assert m, text
    return m.group(1).decode()


# -- What customers' clients write ----------------------------------------------


def new_mail(
    sender: str,
    subject: str,
    body: str = "Dzień dobry,\nnie działa poczta na koncie.\nPozdrawiam\n",
    to: str = "bok@desk.test",
    cc: list[str] | None = None,
    headers: dict[str, str] | None = None,
    message_id: str | None = None,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = message_id or email.utils.make_msgid(domain="mail.customer.test")
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    return msg


def q_word(text: str, charset: str) -> str:
    """RFC 2047 Q encoded words (at most 75 characters each, folded), as Outlook writes."""
    overhead = len(f"=?{charset}?Q??=")

    def enc(s: str) -> str:
        data = quopri.encodestring(s.encode(charset), header=True).decode("ascii")
        return data.replace("=\n", "").replace("?", "=3F")

    words, chunk = [], ""
    for ch in text:
        if len(enc(chunk + ch)) > 75 - overhead:
            words.append(chunk)
            chunk = ch
        else:
            chunk += ch
    words.append(chunk)
    return "\r\n ".join(f"=?{charset}?Q?{enc(w)}?=" for w in words)


def b_words(text: str) -> str:
    """RFC 2047 B encoded words of at most 75 characters, folded, as Gmail writes them.

    The text is cut between characters, never inside one, so a ticket tag may be
    split over two encoded words (which decoders join without a space).
    """
    words, chunk = [], ""
    for ch in text:
        candidate = chunk + ch
        if len(base64.b64encode(candidate.encode("utf-8"))) > 75 - len("=?UTF-8?B??="):
            words.append(chunk)
            candidate = ch
        chunk = candidate
    words.append(chunk)
    encoded = [f"=?UTF-8?B?{base64.b64encode(w.encode('utf-8')).decode('ascii')}?=" for w in words]
    return "\r\n ".join(encoded)


def _thread_refs(parent: EmailMessage) -> tuple[str, str]:
    mid = str(parent["Message-ID"]).strip()
    refs = str(parent["References"] or "").split()
    return mid, " ".join([*refs, mid][-10:])


def outlook_child_index(parent_index: str | None) -> str:
    """Outlook's Thread-Index: 22 bytes for a new thread, +5 bytes per reply."""
    if parent_index:
        raw = base64.b64decode(parent_index)
        return base64.b64encode(raw + bytes([0x12, 0x34, 0x56, 0x78, 0x9A])).decode()
    return base64.b64encode(bytes([0x01, 0xDA, *range(2, 22)])).decode()


def outlook_reply(parent: EmailMessage, sender: str, tag: str, topic: str, text: str) -> bytes:
    """Outlook 2016, Polish: "RE: Odp:", Thread-Index, windows-1250 quoted-printable."""
    mid, refs = _thread_refs(parent)
    subject = f"RE: Odp: {tag} {topic}"
    quoted = (
        f"{text}\n\nZ poważaniem\nJan Kowalski\n\n"
        f"-----Wiadomość oryginalna-----\nOd: {parent['From']}\n"
        f"Wysłano: {parent['Date']}\nDo: {sender}\nTemat: {parent['Subject']}\n\n"
        + "\n".join(parent_text(parent).splitlines()[:10])
        + "\n"
    )
    body = quopri.encodestring(quoted.encode("windows-1250", "replace")).replace(b"\n", b"\r\n")
    head = [
        f"From: Jan Kowalski <{sender}>",
        "To: BOK IQ <bok@desk.test>",
        f"Subject: {q_word(subject, 'windows-1250')}",
        f"Date: {email.utils.formatdate(localtime=True)}",
        f"Message-ID: <000001da{int(time.time() * 1000):x}$0a1b2c3d$@acme.test>",
        f"In-Reply-To: {mid}",
        f"References: {refs}",
        "MIME-Version: 1.0",
        'Content-Type: text/plain; charset="windows-1250"',
        "Content-Transfer-Encoding: quoted-printable",
        "X-Mailer: Microsoft Outlook 16.0",
        f"Thread-Index: {outlook_child_index(str(parent['Thread-Index'] or '') or None)}",
        "Content-Language: pl",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def thunderbird_reply(parent: EmailMessage, sender: str, tag: str, topic: str, text: str) -> bytes:
    """Thunderbird 115: "Re:", UTF-8 8bit, format=flowed, quote with "W dniu ... pisze:"."""
    mid, refs = _thread_refs(parent)
    quoted = "\n".join(f"> {line}" if line else ">" for line in parent_text(parent).splitlines())
    body = f"{text}\n\nW dniu {parent['Date']}, {parent['From']} pisze:\n{quoted}\n"
    head = [
        f"Message-ID: <{time.time_ns():x}@acme.test>",
        f"Date: {email.utils.formatdate(localtime=True)}",
        "MIME-Version: 1.0",
        "User-Agent: Mozilla Thunderbird",
        f"Subject: Re: {tag} {q_word(topic, 'UTF-8')}",
        "Content-Language: pl",
        "To: BOK IQ <bok@desk.test>",
        f"References: {refs}",
        f"From: Jan Kowalski <{sender}>",
        f"In-Reply-To: {mid}",
        "Content-Type: text/plain; charset=UTF-8; format=flowed",
        "Content-Transfer-Encoding: 8bit",
    ]
    raw = "\r\n".join(head) + "\r\n\r\n" + body.replace("\n", "\r\n")
    return raw.encode("utf-8")


def gmail_reply(parent: EmailMessage, sender: str, tag: str, topic: str, text: str) -> bytes:
    """Gmail web: multipart/alternative, quoted-printable UTF-8, gmail_quote HTML."""
    mid, refs = _thread_refs(parent)
    boundary = f"000000000000{time.time_ns() % 10**12:012x}"
    quoted = "\n".join(f"> {line}" for line in parent_text(parent).splitlines())
    plain = f"{text}\n\nsob., {parent['Date']} {parent['From']} napisał(a):\n\n{quoted}\n"
    html = (
        f'<div dir="ltr">{text}</div><br><div class="gmail_quote"><div dir="ltr" '
        f'class="gmail_attr">{parent["Date"]} napisał(a):<br></div><blockquote '
        f'class="gmail_quote">{"<br>".join(parent_text(parent).splitlines())}'
        "</blockquote></div>\n"
    )

    def qp(s: str) -> str:
        return quopri.encodestring(s.encode("utf-8")).decode("ascii").replace("\n", "\r\n")

    head = [
        "MIME-Version: 1.0",
        f"References: {refs}",
        f"In-Reply-To: {mid}",
        f"From: Jan Kowalski <{sender}>",
        f"Date: {email.utils.formatdate(localtime=True)}",
        f"Message-ID: <CAF{time.time_ns():x}w@mail.gmail.com>",
        f"Subject: {b_words(f'Re: {tag} {topic}')}",
        "To: BOK IQ <bok@desk.test>",
        f'Content-Type: multipart/alternative; boundary="{boundary}"',
    ]
    parts = [
        f"--{boundary}",
        'Content-Type: text/plain; charset="UTF-8"',
        "Content-Transfer-Encoding: quoted-printable",
        "",
        qp(plain),
        f"--{boundary}",
        'Content-Type: text/html; charset="UTF-8"',
        "Content-Transfer-Encoding: quoted-printable",
        "",
        qp(html),
        f"--{boundary}--",
        "",
    ]
    return ("\r\n".join(head) + "\r\n\r\n" + "\r\n".join(parts)).encode("ascii")


def parent_text(parent: EmailMessage) -> str:
    body = parent.get_body(preferencelist=("plain",))
    return "" if body is None else str(body.get_content())


def tag_of(subject: str) -> tuple[int, str | None]:
    m = TAG.search(subject)
    assert m, f"no ticket tag in {subject!r}"
    return int(m.group(1)), m.group(2)


def link_in(received: Received, base_url: str) -> str:
    m = re.search(re.escape(base_url) + r"/authorize/[A-Za-z0-9_-]+", received.all_text())
    assert m, f"no link to {base_url} in:\n{received.all_text()}"
    return m.group(0)


def header_list(received: Received, name: str) -> list[str]:
    value = received.header(name)
    return [v.strip() for v in value.split(",") if v.strip()]


def any_of(*preds: Callable[[Received], bool]) -> Callable[[Received], bool]:
    return lambda r: any(p(r) for p in preds)


def verdict(decision: str, ticket: int | None = None) -> Callable[[Received], bool]:
    """Staff copies with this X-IQ-Authorization (and ticket)."""

    def match(r: Received) -> bool:
        if r.header("X-IQ-Authorization") != decision:
            return False
        return ticket is None or r.header("X-IQ-Ticket") == str(ticket)

    return match


def copy_of(msg: EmailMessage) -> Callable[[Received], bool]:
    """The staff copy of ``msg``: a Message-ID of its own, threaded under the customer's."""
    mid = str(msg["Message-ID"]).strip()
    return lambda r: bool(r.header("X-IQ-Ticket")) and r.header("In-Reply-To") == mid


def copied(r: Received) -> str:
    """The customer's Message-ID a staff copy names (In-Reply-To)."""
    return r.header("In-Reply-To").strip()


def with_header(name: str, value: Any) -> Callable[[Received], bool]:
    return lambda r: r.header(name) == str(value)
