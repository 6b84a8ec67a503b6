"""Customer mail as a desk receives it, built as bytes once before a run.

Each message looks like what a mail client sends through the MTA: a Received
line, an RFC 2047 encoded display name and Subject in Polish, Message-ID,
MIME multipart/alternative (quoted-printable text and HTML), and for large sizes
a base64 attachment. Sizes are approximate (within a few hundred bytes).

Kinds used by the scenarios (see ``expect`` for what each must cause):

- ``new``       no tag, from an account's primary address: a new ticket, pending
- ``tagged``    a follow-up whose Subject carries the full tag with the code
- ``threadref`` a reply to our authorization mail that lost its tag (only
                In-Reply-To/References name the ticket): filed, code_missing
- ``unknown``   from an address that is in no directory
"""

from __future__ import annotations

import base64
import quopri
import random
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime

from bench.load import Outgoing

DESK = "bok@desk.test"
DESK_HEADER = "Biuro Obsługi Klienta <bok@desk.test>"

SUBJECTS = [
    "Nie działa poczta na domenie",
    "Prośba o korektę faktury za hosting",
    "Strona zwraca błąd 500 po aktualizacji",
    "Zmiana hasła do panelu klienta",
    "Certyfikat SSL wygasł – proszę o pomoc",
    "Przeniesienie domeny do IQ",
    "Brak miejsca na serwerze",
    "Wolne ładowanie sklepu internetowego",
    "Pytanie o kopię zapasową bazy danych",
    "Ataki na formularz kontaktowy",
]
NAMES = [
    "Jan Kowalski",
    "Anna Nowak",
    "Łukasz Wiśniewski",
    "Małgorzata Wójcik",
    "Grzegorz Kamiński",
    "Zofia Lewandowska",
    "Paweł Zieliński",
]
PARAGRAPHS = [
    "Dzień dobry, od wczoraj wieczorem nie mogę odebrać poczty na żadnej skrzynce w domenie. "
    "Klient pocztowy zgłasza błąd uwierzytelniania, choć hasło nie było zmieniane.",
    "Proszę o sprawdzenie, czy po Państwa stronie nie było prac serwisowych. Sklep działa "
    "bardzo wolno, a w logach widać dużo zapytań do bazy danych z jednego adresu.",
    "W załączniku przesyłam zrzut ekranu z komunikatem. Będę wdzięczny za szybką odpowiedź, "
    "ponieważ klienci nie mogą złożyć zamówień.",
    "Czy mogą Państwo przywrócić kopię zapasową z zeszłego tygodnia? Po aktualizacji wtyczek "
    "strona wyświetla tylko pustą białą stronę.",
    "Pozdrawiam serdecznie i z góry dziękuję za pomoc. Gdyby potrzebne były dodatkowe "
    "informacje, jestem dostępny pod telefonem w godzinach 9–17.",
]
ATTACH_ABOVE = 32 * 1024


def message_id(run: str, index: int, kind: str) -> str:
    return f"{run}.{index}.{kind}@client.bench.test"


def _text(rng: random.Random, size: int) -> str:
    chunks, length = [], 0
    while length < size:
        p = rng.choice(PARAGRAPHS)
        chunks.append(p)
        length += len(p.encode()) + 2
    return "\r\n\r\n".join(chunks) + "\r\n"


def _qp(text: str) -> bytes:
    encoded = quopri.encodestring(text.replace("\r\n", "\n").encode("utf-8"))
    return encoded.replace(b"\n", b"\r\n")


def _html(text: str) -> str:
    paras = "".join(f"<p>{p}</p>" for p in text.split("\r\n\r\n") if p.strip())
    return f"<html><body>{paras}</body></html>\r\n"


def _alternative(rng: random.Random, boundary: str, text_size: int) -> bytes:
    text = _text(rng, text_size)
    return (
        f"--{boundary}a\r\nContent-Type: text/plain; charset=UTF-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n".encode()
        + _qp(text)
        + f"--{boundary}a\r\nContent-Type: text/html; charset=UTF-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n".encode()
        + _qp(_html(text))
        + f"--{boundary}a--\r\n".encode()
    )


def _b64_lines(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + b"\r\n"


def build(
    *,
    index: int,
    run: str,
    kind: str,
    sender: str,
    subject: str,
    size: int = 2048,
    in_reply_to: str | None = None,
    seed: int = 0,
) -> Outgoing:
    """One message of about ``size`` bytes; its key is its Message-ID."""
    rng = random.Random(f"{seed}:{run}:{index}")
    key = message_id(run, index, kind)
    name = rng.choice(NAMES)
    now = datetime.now(UTC)
    headers = [
        f"Received: from mail.{sender.split('@')[1]} (mail.{sender.split('@')[1]} "
        f"[192.0.2.{index % 250 + 1}])\r\n\tby mx.desk.test (Postfix) with ESMTPS id "
        f"{rng.getrandbits(40):010X}\r\n\tfor <{DESK}>; {format_datetime(now)}",
        f"From: {Header(name, 'utf-8').encode()} <{sender}>",
        f"To: {Header(DESK_HEADER.split(' <')[0], 'utf-8').encode()} <{DESK}>",
        f"Subject: {Header(subject, 'utf-8', maxlinelen=76).encode(linesep=chr(13) + chr(10))}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{key}>",
    ]
    if in_reply_to:
        headers += [f"In-Reply-To: <{in_reply_to}>", f"References: <{in_reply_to}>"]
    boundary = f"b{rng.getrandbits(64):016x}"
    headers += [
        "MIME-Version: 1.0",
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Thunderbird/128.5.0",
        "Content-Language: pl",
    ]
    head_size = sum(len(h.encode()) + 2 for h in headers) + 80
    if size <= ATTACH_ABOVE:
        # text and HTML share what the headers leave; one correction for QP overhead
        target = max(100, size - head_size)
        guess = target // 3
        for _ in range(2):
            body = _alternative(random.Random(f"{seed}:{run}:{index}:text"), boundary, guess)
            guess = max(50, guess * target // max(1, len(body)))
        head = [*headers, f'Content-Type: multipart/alternative; boundary="{boundary}a"']
    else:
        alternative = _alternative(rng, boundary, 1500)
        raw_size = max(0, (size - head_size - len(alternative) - 300) * 57 // 78)
        head = [*headers, f'Content-Type: multipart/mixed; boundary="{boundary}m"']
        body = (
            f"This is a multi-part message in MIME format.\r\n--{boundary}m\r\n"
            f'Content-Type: multipart/alternative; boundary="{boundary}a"\r\n\r\n'.encode()
            + alternative
            + f'--{boundary}m\r\nContent-Type: application/pdf; name="zrzut.pdf"\r\n'
            'Content-Disposition: attachment; filename="zrzut.pdf"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n".encode()
            + _b64_lines(rng.randbytes(raw_size))
            + f"--{boundary}m--\r\n".encode()
        )
    data = "\r\n".join(head).encode() + b"\r\n\r\n" + body
    return Outgoing(key, sender, (DESK,), dot_stuff(data))


def dot_stuff(data: bytes) -> bytes:
    """SMTP transparency (RFC 5321 4.5.2), CRLF line ends, a final CRLF."""
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


def subject_for(index: int) -> str:
    return f"{SUBJECTS[index % len(SUBJECTS)]} (#{index})"
