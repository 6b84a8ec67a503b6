"""Robustness run over the shared mail corpus (/work/shared/corpus/README.md).

Every file goes over real SMTP into one daemon, then one drain: each must be
stored, processed, with a decision of the fixed vocabulary, nothing parked as a
dead letter, and the daemon must still answer /healthz. The corpus carries no
expected outcomes; the decision counts are printed (``pytest -s``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from iqmaild.core.vocabulary import Decision, Reason
from iqmaild.storage.models import Message, OutboxItem
from tests.harness import DESK, STAFF, Harness, start_harness, stop_harness
from tests.test_nasty import as_received

# The production default (config.py); the harness's 1 MiB would refuse part of the corpus.
MAX_SIZE = 25 * 1024 * 1024
ENVELOPE_SENDER = "corpus-run@sender.test"


def as_from_the_mta(raw: bytes) -> bytes:
    """The files are stored with Unix line ends; Postfix hands mail on with CRLF.

    Sent as they are, LF-only files arrive as one SMTP "line" of up to 1.5 MB
    (bare LF is tested by tests/data/nasty_lf_only.eml). Bare CR stays as it is.
    """
    return re.sub(rb"\r?\n", b"\r\n", raw)


def corpus_dir() -> Path:
    configured = os.environ.get("IQMAILD_CORPUS")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def corpus_files() -> list[Path]:
    folder = corpus_dir()
    if not folder.is_dir():
        pytest.skip(f"no mail corpus at {folder} (set IQMAILD_CORPUS to its folder)")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md")
    if not files:
        pytest.skip(f"the mail corpus at {folder} holds no files")
    return files


@pytest.fixture
async def corpus_desk(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_harness(tmp_path, smtp={"max_message_size": MAX_SIZE})
    try:
        yield h
    finally:
        await stop_harness(h)


async def test_every_corpus_file_is_stored_and_classified(corpus_desk: Harness) -> None:
    desk = corpus_desk
    files = corpus_files()
    sent: dict[Path, str] = {}
    for path in files:
        raw = as_from_the_mta(path.read_bytes())
        assert len(raw) <= MAX_SIZE, path
        code, text = await desk.send_raw(raw, ENVELOPE_SENDER, [DESK])
        assert code == 250, (path, code, text)
        sent[path] = hashlib.sha256(as_received(raw)).hexdigest()
    await desk.drain()

    async with desk.db.read() as session:
        rows = {m.raw_sha256: m for m in await session.scalars(select(Message))}
        staff = Counter(
            item.message_id
            for item in await session.scalars(select(OutboxItem).where(OutboxItem.kind == "staff"))
        )
        outbox = Counter(
            (item.kind, item.state) for item in await session.scalars(select(OutboxItem))
        )
    decisions = {d.value for d in Decision}
    reasons = {r.value for r in Reason}
    problems = []
    for path, sha in sent.items():
        row = rows.get(sha)
        name = str(path.relative_to(corpus_dir()))
        if row is None:
            problems.append(f"{name}: not stored")
        elif row.state != "processed" or row.decision not in decisions:
            problems.append(f"{name}: {row.state} {row.decision} {row.last_error}")
        elif not set(row.reasons) <= reasons:
            problems.append(f"{name}: reasons {row.reasons}")
        elif row.decision != Decision.IGNORED and row.ticket_id is None:
            problems.append(f"{name}: {row.decision} without a ticket")
        elif staff[row.id] != 1:
            problems.append(f"{name}: {staff[row.id]} staff copies")
    assert not problems, "\n".join(problems)
    assert not [m for m in rows.values() if m.state == "dead"]
    assert all(item_state != "queued" for _, item_state in outbox), outbox

    async with desk.http.get(desk.base_url + "/healthz") as resp:
        assert resp.status == 200, await resp.text()

    counts = Counter(rows[sha].decision for sha in set(sent.values()))
    print(
        f"\ncorpus: {len(files)} files, {len(set(sent.values()))} distinct messages;"
        f" decisions {dict(sorted(counts.items()))}; outbox {dict(sorted(outbox.items()))};"
        f" staff mail captured {sum(1 for m in desk.relay.messages if m.rcpt_tos == [STAFF])}"
    )
