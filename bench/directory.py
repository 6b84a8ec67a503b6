"""Generated directories: who the customers are.

Account ``i`` has the primary address ``owner{i}@acct{i}.test``; every fourth
account also declares a technical and an additional address, and the next one
has a service shared with a contact at an agency. Four accounts thus hold seven
addresses, so a directory of 10^6 addresses has about 571,000 accounts.

Two ways to load it:

- ``to_json`` for ``iqmaild directory import`` (the stable interface; used by
  every scenario up to a few thousand accounts). It upserts row by row: about
  500 accounts/s on the 2-core VM, which would take over half an hour for 10^6.
- ``bulk_load`` writes the same rows straight into the daemon's tables (sqlite3
  ``executemany``, PostgreSQL ``COPY``), used by the directory-scale scenario.
  It is the one place in the benchmarks that knows the schema; it checks the
  columns first, and ``tests/bench`` checks that it produces the same rows as the
  CLI import, so a schema change fails loudly instead of benchmarking nonsense.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bench.backends import Backend, PostgresBackend, SqliteBackend, psql
from bench.proc import BenchError


def primary(i: int) -> str:
    return f"owner{i}@acct{i}.test"


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    lang: str
    primary: str
    technical: tuple[str, ...] = ()
    additional: tuple[str, ...] = ()
    services: tuple[tuple[str, str, tuple[str, ...]], ...] = field(default=())  # id, name, shares

    @property
    def addresses(self) -> int:
        shares = sum(len(s[2]) for s in self.services)
        return 1 + len(self.technical) + len(self.additional) + shares


def account(i: int) -> Account:
    domain = f"acct{i}.test"
    technical = (f"tech{i}@{domain}",) if i % 4 == 0 else ()
    additional = (f"biuro{i}@{domain}",) if i % 4 == 0 else ()
    services = ((f"svc{i}", "WWW", (f"dev{i}@agency{i % 997}.test",)),) if i % 4 == 1 else ()
    return Account(
        id=f"acct{i:07d}",
        name=f"Firma {i} sp. z o.o.",
        lang="en" if i % 10 == 9 else "pl",
        primary=primary(i),
        technical=technical,
        additional=additional,
        services=services,
    )


def accounts(count: int, start: int = 0) -> Iterator[Account]:
    for i in range(start, start + count):
        yield account(i)


def accounts_for_addresses(addresses: int) -> int:
    """How many accounts hold about that many addresses (7 per 4 accounts)."""
    return max(1, math.ceil(addresses * 4 / 7))


def address_count(count: int) -> int:
    return sum(account(i).addresses for i in range(count))


def to_json(count: int, start: int = 0) -> dict[str, Any]:
    out = []
    for a in accounts(count, start):
        entry: dict[str, Any] = {"id": a.id, "primary": a.primary, "name": a.name, "lang": a.lang}
        if a.technical:
            entry["technical"] = list(a.technical)
        if a.additional:
            entry["additional"] = list(a.additional)
        if a.services:
            entry["services"] = [
                {"id": sid, "name": name, "shared_with": list(shares)}
                for sid, name, shares in a.services
            ]
        out.append(entry)
    return {"accounts": out}


# ---------------------------------------------------------------------------
# bulk load (schema-aware)
# ---------------------------------------------------------------------------

TABLES = {
    "accounts": ("id", "name", "lang", "created_at"),
    "addresses": ("account_id", "email", "role"),
    "services": ("id", "account_id", "name"),
    "shares": ("service_id", "email"),
}


def rows(count: int, start: int = 0) -> dict[str, list[tuple[Any, ...]]]:
    now = datetime.now(UTC)
    out: dict[str, list[tuple[Any, ...]]] = {name: [] for name in TABLES}
    for a in accounts(count, start):
        out["accounts"].append((a.id, a.name, a.lang, now))
        out["addresses"].append((a.id, a.primary, "primary"))
        out["addresses"] += [(a.id, e, "technical") for e in a.technical]
        out["addresses"] += [(a.id, e, "additional") for e in a.additional]
        for sid, name, shares in a.services:
            out["services"].append((sid, a.id, name))
            out["shares"] += [(sid, e) for e in shares]
    return out


def _check_columns(found: dict[str, set[str]]) -> None:
    for table, columns in TABLES.items():
        missing = set(columns) - found.get(table, set())
        if missing:
            raise BenchError(
                f"bulk directory load: table {table!r} lacks {sorted(missing)}; the daemon's "
                "schema changed, update bench/directory.py (or load through the CLI)"
            )


def _bulk_sqlite(db: SqliteBackend, data: dict[str, list[tuple[Any, ...]]]) -> None:
    con = db.connect()
    try:
        _check_columns({t: {r[1] for r in con.execute(f"PRAGMA table_info({t})")} for t in TABLES})
        with con:
            for table, columns in TABLES.items():
                values = data[table]
                if table == "accounts":  # SQLAlchemy's SQLite DATETIME text, in UTC
                    values = [(*r[:3], r[3].strftime("%Y-%m-%d %H:%M:%S.%f")) for r in values]
                marks = ", ".join("?" * len(columns))
                con.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", values
                )
    finally:
        con.close()


def _copy_text(values: list[tuple[Any, ...]]) -> bytes:
    buf = io.StringIO()
    for row in values:
        buf.write("\t".join(v.isoformat() if isinstance(v, datetime) else str(v) for v in row))
        buf.write("\n")
    return buf.getvalue().encode()


def _bulk_postgres(db: PostgresBackend, data: dict[str, list[tuple[Any, ...]]]) -> None:
    listing = psql(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public'",
        db.dsn,
    )
    found: dict[str, set[str]] = {}
    for line in listing.splitlines():
        table, _, column = line.partition("|")
        found.setdefault(table, set()).add(column)
    _check_columns(found)
    for table, columns in TABLES.items():
        psql(f"COPY {table} ({', '.join(columns)}) FROM STDIN", db.dsn, _copy_text(data[table]))
    psql("ANALYZE", db.dsn)


def bulk_load(db: Backend, count: int, start: int = 0) -> None:
    """Write ``count`` generated accounts straight into the directory tables."""
    data = rows(count, start)
    if isinstance(db, SqliteBackend):
        _bulk_sqlite(db, data)
    elif isinstance(db, PostgresBackend):
        _bulk_postgres(db, data)
    else:
        raise BenchError(f"no bulk loader for {db.name}")


def dump(db: Backend) -> dict[str, set[tuple[str, ...]]]:
    """The directory rows without ids and times (to compare two ways of loading)."""
    queries = {
        "accounts": "SELECT id, name, lang FROM accounts",
        "addresses": "SELECT account_id, email, role FROM addresses",
        "services": "SELECT id, account_id, name FROM services",
        "shares": "SELECT service_id, email FROM shares",
    }
    out: dict[str, set[tuple[str, ...]]] = {}
    if isinstance(db, SqliteBackend):
        con = db.connect()
        try:
            for table, sql in queries.items():
                out[table] = {tuple(map(str, r)) for r in con.execute(sql)}
        finally:
            con.close()
    elif isinstance(db, PostgresBackend):
        for table, sql in queries.items():
            out[table] = {tuple(line.split("|")) for line in psql(sql, db.dsn).splitlines()}
    return out
