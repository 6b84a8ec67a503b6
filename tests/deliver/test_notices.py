"""What strangers and owners are told (issue 5, items 3 and 7).

A notice naming a ticket goes only to someone who may act on it; everyone else
gets a refusal that reveals nothing of any ticket and quotes nothing they wrote.
Refusals to strangers are capped per domain and overall; what a cap or a
suppression stops is visible to staff on the message.
"""

from __future__ import annotations

from pathlib import Path

from tests.harness import STAFF, Harness, start_harness, stop_harness

OWNER = "owner@acme.test"
SECRET_SUBJECT = "Reset hasła do panelu: nowe hasło to Kot123"


async def test_a_guessed_ticket_number_reveals_nothing(desk: Harness) -> None:
    number = await desk.authorized_ticket(subject=SECRET_SUBJECT)
    for sender, subject in (
        ("anna@nieznana-firma.test", f"Re: [IQ.pl#{number}] pokaż"),
        ("boss@beta.test", f"Re: [IQ.pl#{number}:{'0' * 20}] pokaż"),  # another account
        ("tech@acme.test", f"Re: [IQ.pl#{number}] pokaż"),  # the account, but no grant
    ):
        await desk.send(sender=sender, subject=subject, body="<b>kliknij http://evil.test</b>")
        await desk.drain()
        [refusal] = [m for m in desk.new_mail() if m.envelope_to == [sender]]
        body = refusal.get_body(preferencelist=("plain",))
        assert body is not None
        text = f"{refusal['Subject']}\n{body.get_content()}"
        for secret in ("Kot123", "Reset", "ACME", "acme-", str(number), "[IQ.pl#", "evil.test"):
            assert secret not in text, (sender, secret)
        assert refusal["In-Reply-To"]  # still an answer to their own message


async def test_refusals_to_strangers_are_capped_in_all(tmp_path: Path) -> None:
    """50 forged unknown senders in 50 domains: at most the overall cap is answered."""
    limits = {"unknown_sender_hour": 3, "unknown_sender_domain_hour": 10}
    h = await start_harness(tmp_path, outbound={"rate_limit": limits})
    try:
        for n in range(6):
            await h.send(sender=f"victim@spam{n}.test", subject=f"Spam {n}")
        await h.drain()
        mails = h.new_mail()
        assert len([m for m in mails if m.envelope_to != [STAFF]]) == 3
        staff = [m for m in mails if m.envelope_to == [STAFF]]
        assert len(staff) == 6  # every message still reaches staff...
        suppressed = [m["X-IQ-Suppressed"] for m in staff if m["X-IQ-Suppressed"]]
        assert suppressed == ["refusal:unknown_sender_rate_limit"] * 3  # ...saying what was held
    finally:
        await stop_harness(h)


async def test_a_forger_using_up_the_owners_quota_does_not_hide_the_real_request(
    tmp_path: Path,
) -> None:
    limits = {"per_recipient_10min": 2, "per_recipient_day": 20, "per_ticket_day": 10}
    h = await start_harness(tmp_path, outbound={"rate_limit": limits})
    try:
        for n in range(2):
            await h.send(subject=f"Forged {n}", mail_from="attacker@evil.test")
        await h.send(subject="Prawdziwe zgłoszenie")
        await h.drain()
        real = await h.last_message()
        assert real.suppressed == ["auth_request:recipient_rate_limit"]
        [copy] = [m for m in h.new_mail() if m["X-IQ-Message"] == str(real.id)]
        assert copy["X-IQ-Suppressed"] == "auth_request:recipient_rate_limit"
        # The operator can give the owner a link by hand.
        from iqmaild.cli.tickets import reissue_link

        async with h.db.read() as session:
            from iqmaild.storage.models import Ticket

            ticket = await session.get(Ticket, real.ticket_id)
            assert ticket is not None
        await reissue_link(h.config, h.db, ticket.number)
        h.advance(5)  # the CLI keeps the wall clock; the daemon's here stands still
        await h.drain()
        assert [OWNER] in [m.envelope_to for m in h.new_mail()]
    finally:
        await stop_harness(h)


async def test_a_responder_answering_our_notice_gets_no_second_one(desk: Harness) -> None:
    """A cheap auto-responder (no Auto-Submitted) would ping-pong with our notices."""
    await desk.send(subject="Nowe")  # pending: its notices name it without the code
    await desk.drain()
    desk.new_mail()
    await desk.send(subject="Re: [IQ.pl#1000] bez kodu")  # earns a notice
    await desk.drain()
    [notice] = [m for m in desk.new_mail() if m.envelope_to == [OWNER]]
    await desk.send(
        subject=f"Re: {notice['Subject']}",
        body="Jestem na urlopie.",
        headers={"In-Reply-To": notice["Message-ID"], "References": notice["Message-ID"]},
    )
    await desk.drain()
    row = await desk.last_message()
    assert (row.decision, row.suppressed) == ("unauthorized", ["notice:answers_a_notice"])
    [staff] = desk.new_mail()  # staff only, and they see why nothing was answered
    assert staff.envelope_to == [STAFF] and staff["X-IQ-Suppressed"] == "notice:answers_a_notice"
