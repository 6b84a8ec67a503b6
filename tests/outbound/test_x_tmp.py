import asyncio, smtplib
from sqlalchemy import select
from iqmaild.storage.models import Message, OutboxItem
from tests.harness import DESK

async def test_utf8(desk):
    raw = "From: użytkownik@przykład.test\r\nTo: bok@desk.test\r\nSubject: zażółć\r\nMessage-ID: <a1@x.test>\r\n\r\nTreść\r\n".encode()
    def run():
        with smtplib.SMTP("127.0.0.1", desk.daemon.smtp_port) as c:
            c.ehlo("x")
            print(c.esmtp_features)
            print(c.mail("użytkownik@przykład.test", ["SMTPUTF8"]))
            print(c.rcpt(DESK))
            return c.data(raw)
    print(await asyncio.to_thread(run))
    row = await desk.last_message()
    print(row.raw == raw, row.mail_from, row.rcpt_to)
    try:
        await desk.drain()
    except Exception as e:
        print("DRAIN RAISED", repr(e))
    async with desk.db.read() as s:
        for r in await s.scalars(select(OutboxItem)):
            print(r.id, r.kind, r.recipient, r.state, r.attempts, r.last_error)
        for r in await s.scalars(select(Message)):
            print(r.id, r.state, r.decision, r.reasons, r.last_error)
