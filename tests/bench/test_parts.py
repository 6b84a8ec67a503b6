"""The benchmark's own parts: relay, client, mail, ledger, statistics, config, loader."""

from __future__ import annotations

import asyncio
import email
import email.policy
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import daemon, directory, expect, mail, report  # noqa: E402
from bench.backends import SqliteBackend, postgres_available  # noqa: E402
from bench.load import Outgoing, send_closed  # noqa: E402
from bench.relay import Captured, Relay  # noqa: E402


def captured(raw: bytes, rcpts: list[str], t: float = 1.0) -> Captured:
    return Captured(1, t, "bok@desk.test", rcpts, raw)


def test_relay_captures_what_the_client_sent(tmp_path: Path) -> None:
    tricky = b"Subject: dots\r\n\r\n.starts with a dot\r\n..two\r\n.\r\nend\r\n"
    messages = [
        mail.build(index=1, run="t", kind="new", sender="a@x.test", subject="Zażółć", size=2048),
        mail.build(index=2, run="t", kind="new", sender="b@x.test", subject="big", size=1 << 20),
        Outgoing("k3", "c@x.test", ("bok@desk.test", "other@desk.test"), mail.dot_stuff(tricky)),
    ]
    with Relay(tmp_path) as relay:
        sent = asyncio.run(send_closed(relay.port, messages, sessions=2, per_connection=2))
        assert all(s.ok for s in sent)
        ok = asyncio.run(relay.wait_until(lambda: len(relay.items) == 3, 10))
        assert ok
    by_from = {c.mail_from: c for c in relay.items}
    assert by_from["c@x.test"].raw == tricky
    assert by_from["c@x.test"].rcpts == ["bok@desk.test", "other@desk.test"]
    assert by_from["b@x.test"].raw.replace(b"\r\n..", b"\r\n.") == messages[1].data.replace(
        b"\r\n..", b"\r\n."
    )
    assert len(by_from["b@x.test"].raw) > 1_000_000
    assert by_from["a@x.test"].subject == "Zażółć"
    assert by_from["a@x.test"].message_id == "t.1.new@client.bench.test"
    assert sorted(s.key for s in sent) == sorted(m.key for m in messages)


def test_built_mail_is_clean_mime_of_about_the_size() -> None:
    for size in (2048, 10240, 1 << 20):
        m = mail.build(
            index=5,
            run="r",
            kind="new",
            sender="owner5@acct5.test",
            subject=mail.subject_for(5),
            size=size,
            in_reply_to="iq.1.a.b@desk.test",
        )
        parsed = email.message_from_bytes(m.data, policy=email.policy.default)
        assert not parsed.defects
        assert parsed["Message-ID"] == f"<{m.key}>"
        assert parsed["In-Reply-To"] == "<iq.1.a.b@desk.test>"
        assert str(parsed["Subject"]) == mail.subject_for(5)
        assert "Państwo" in parsed.get_body(("plain",)).get_content() or size > 0
        assert abs(len(m.data) - size) < max(400, size * 0.1)


def test_captured_mail_parsing() -> None:
    raw = (
        b"X-IQ-Authorization: pending\r\nMessage-ID:\r\n <abc@client>\r\n"
        b"In-Reply-To: <iq.7.x.y@desk.test>\r\n"
        b"Subject: =?utf-8?q?Re=3A_=5BIQ=2Epl=2312=3A0123456789abcdef0123=5D_Prze?=\r\n"
        b" =?utf-8?q?niesienie?=\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Link: http://h/authorize/AbCdEfGhIjKlMnOp=\r\nQrStUvWxYz_-0123456789\r\n"
    )
    c = captured(raw, ["Owner@x"])
    assert c.verdict == "pending"
    assert c.message_id == "abc@client"
    assert c.in_reply_to == "iq.7.x.y@desk.test"
    assert c.subject == "Re: [IQ.pl#12:0123456789abcdef0123] Przeniesienie"
    assert c.tag("IQ.pl") == (12, "0123456789abcdef0123")
    assert c.link_token == "AbCdEfGhIjKlMnOpQrStUvWxYz_-0123456789"
    assert captured(b"Subject: [iq.PL#5] x\r\n\r\nno link\r\n", []).tag("IQ.pl") == (5, None)
    assert captured(b"Subject: x\r\n\r\nno link\r\n", []).link_token is None


def test_ledger_matches_expected_mail_and_names_what_is_missing() -> None:
    ledger = expect.Ledger("staff@desk.test", "IQ.pl")
    ledger.staff_copy("m1@c", "pending")
    ledger.reply("m1@c", expect.AUTH)
    ledger.staff_copy("m2@c", "unauthorized")
    ledger.reply("m2@c", expect.NOTICE)
    ledger.acknowledgement("owner@x", 12, after=5.0)
    ledger.reply("m3@c", expect.NOTICE, required=False)  # may be capped: never waited for
    staff1 = captured(
        b"X-IQ-Authorization: pending\r\nMessage-ID: <iq.1.s1.x@d>\r\nIn-Reply-To: <m1@c>\r\n\r\n",
        ["staff@desk.test"],
    )
    auth1 = captured(
        b"In-Reply-To: <m1@c>\r\n\r\nhttp://h/authorize/" + b"A" * 43 + b"\r\n", ["owner@x"], t=2.0
    )
    wrong = captured(
        b"X-IQ-Authorization: pending\r\nMessage-ID: <m2@c>\r\n\r\n", ["staff@desk.test"]
    )
    early_ack = captured(
        b"Subject: Re: [IQ.pl#12:0123456789abcdef0123] x\r\n\r\n", ["owner@x"], 4.0
    )
    ledger.feed([staff1, auth1, wrong, early_ack])
    assert not ledger.done()
    problems = "\n".join(ledger.problems())
    assert "1 notice" in problems and "1 staff" in problems and "1 acknowledgement" in problems
    assert "X-IQ-Authorization: pending" in problems
    ack = captured(b"Subject: Re: [IQ.pl#12:0123456789abcdef0123] x\r\n\r\n", ["Owner@X"], 6.0)
    notice = captured(b"In-Reply-To: <m2@c>\r\n\r\nnot accepted\r\n", ["u@y"], 7.0)
    staff2 = captured(
        b"X-IQ-Authorization: unauthorized\r\nMessage-ID: <m2@c>\r\n\r\n", ["staff@desk.test"], 8.0
    )
    ledger.feed([ack, notice, staff2])
    assert ledger.done() and ledger.problems() == []
    assert ledger.optional_counts() == (0, 1) and ledger.optional_open() == 1
    assert ledger.last_arrival() == 8.0
    assert ledger.arrivals(expect.AUTH) == [2.0]


def test_statistics_and_tables() -> None:
    assert report.percentile([1, 2, 3, 4], 50) == 2.5
    assert report.percentile(list(range(101)), 99) == 99
    assert report.percentile([], 50) is None
    assert report.ratio(1.0, 0) is None and report.ratio(2.0, 4.0) == 0.5
    t = report.Table("x", ["name", "value"])
    t.add("a", "1.00×")
    lines = t.markdown().splitlines()
    assert lines[2].startswith("| name") and lines[3].endswith(":|")


def test_config_is_valid_toml_with_the_documented_keys() -> None:
    data = daemon.config(
        "sqlite+aiosqlite:////tmp/x.db",
        1,
        2,
        3,
        daemon.Options(group_commit_max=1, overrides={"outbound": {"idle_close_seconds": 1.5}}),
    )
    parsed = tomllib.loads(daemon.to_toml(data))
    assert parsed == data
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    for section, values in parsed.items():
        for key in values:
            assert key in example[section], f"{section}.{key} is not a documented key"


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_bulk_loader_writes_what_the_cli_import_writes(tmp_path: Path, backend: str) -> None:
    """The directory-scale scenario's loader must stay equal to ``directory import``."""
    if backend == "postgres" and (why := postgres_available()):
        pytest.skip(why)
    template = daemon.prepare(tmp_path / "template", backend)  # migrated, empty
    (tmp_path / "cli").mkdir()
    (tmp_path / "sql").mkdir()
    via_cli, via_sql = template.clone(tmp_path / "cli"), template.clone(tmp_path / "sql")
    try:
        daemon.import_directory(via_cli, tmp_path / "cli", 24)
        directory.bulk_load(via_sql, 24)
        rows = directory.dump(via_sql)
        assert directory.dump(via_cli) == rows
        assert len(rows["addresses"]) + len(rows["shares"]) == directory.address_count(24)
        assert {r[2] for r in rows["addresses"]} == {"primary", "technical", "additional"}
    finally:
        for db in (template, via_cli, via_sql):
            if not isinstance(db, SqliteBackend):
                db.drop()
