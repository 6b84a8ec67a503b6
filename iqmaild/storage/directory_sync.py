"""Directory sync from billing: make the directory equal to a JSON export.

The file is read as a stream (ijson), a chunk of accounts at a time, each
account validated by the pydantic model below (README, "Directory JSON").
Each chunk is compared with what the database holds for those accounts and
the difference written with batched statements; accounts the file no longer
has are removed at the end. It all happens in the caller's one transaction,
so an error anywhere (a bad address in account 99,999) changes nothing.

Memory is bounded by the chunk, plus the ids seen so far (to find duplicates
and what to remove): tens of megabytes at 100,000 accounts.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import IO, Any, Literal

import ijson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from iqmaild.core.addresses import normalize
from iqmaild.storage.directory import DirectoryError
from iqmaild.storage.models import Account, Address, Service, Share

CHUNK = 1000  # accounts compared and written at a time
PAREN = {role: f"({role})" for role in ("primary", "technical", "additional")}


# A plain ASCII address, whose normal form is its lowercase (normalize() agrees):
# billing's 300,000 addresses skip the general path.
_PLAIN = re.compile(
    r"[A-Za-z0-9._%+-]{1,64}@(?![xX][nN]--)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.(?![xX][nN]--)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _email(value: str) -> str:
    if len(value) <= 254 and _PLAIN.fullmatch(value):
        return value.lower()
    norm = normalize(value)
    if norm is None:
        raise ValueError(f"{value!r} is not an email address")
    return norm


def _emails(values: list[str]) -> list[str]:
    return list(dict.fromkeys(_email(v) for v in values))


class ServiceIn(BaseModel):
    """A service of an account, and the contacts it is shared with."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64)
    name: str = Field(default="", max_length=200)
    shared_with: list[str] = Field(default_factory=list)

    _shared = field_validator("shared_with")(lambda v: _emails(v))


class AccountIn(BaseModel):
    """One account of the billing export."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64)
    primary: str
    name: str = Field(default="", max_length=200)
    lang: Literal["pl", "en"] = "pl"
    technical: list[str] = Field(default_factory=list)
    additional: list[str] = Field(default_factory=list)
    services: list[ServiceIn] = Field(default_factory=list)

    _primary = field_validator("primary")(lambda v: _email(v))
    _lists = field_validator("technical", "additional")(lambda v: _emails(v))

    def roles(self) -> dict[str, str]:
        """email -> role; an address has one role on an account."""
        out = {self.primary: "primary"}
        for role in ("technical", "additional"):
            for email in getattr(self, role):
                if email in out:
                    raise DirectoryError(
                        f"account {self.id}: {email} is both {out[email]} and {role}"
                    )
                out[email] = role
        return out


class DirectoryFile(BaseModel):
    """The whole file: ``{"accounts": [...]}`` (other top-level keys are ignored)."""

    accounts: list[AccountIn]


_BATCH = TypeAdapter(list[AccountIn])  # a chunk validated at once: a third cheaper


def read_accounts(stream: IO[bytes]) -> Iterator[AccountIn]:
    """Accounts of a directory file, one at a time, validated a chunk at a time."""
    items = ijson.items(stream, "accounts.item")
    done = 0
    try:
        while raw := list(islice(items, CHUNK)):
            yield from _validated(raw, done)
            done += len(raw)
    except ijson.JSONError as exc:
        raise DirectoryError(f"not valid JSON: {' '.join(str(exc).split())[:200]}") from None


def _validated(raw: list[Any], done: int) -> list[AccountIn]:
    try:
        return _BATCH.validate_python(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        index, *loc = err["loc"]
        item = raw[int(index)]
        name = item.get("id") if isinstance(item, dict) else None
        label = f"account #{done + int(index) + 1}" + (f" ({name})" if name else "")
        message = err["msg"].removeprefix("Value error, ")
        where = ".".join(str(p) for p in loc)
        text = f"{label}: {where}: {message}" if where else f"{label}: {message}"
        raise DirectoryError(text) from None


@dataclass
class Diff:
    """Counts of what changed, by kind: added, changed, removed."""

    counts: dict[str, dict[str, int]] = field(
        default_factory=lambda: {
            kind: {"added": 0, "changed": 0, "removed": 0}
            for kind in ("accounts", "addresses", "services", "shares")
        }
    )

    def summary(self) -> str:
        return "; ".join(
            f"{kind}: +{c['added']} ~{c['changed']} -{c['removed']}"
            for kind, c in self.counts.items()
        )


Emit = Callable[[str], None]


class _Sync:
    def __init__(self, session: AsyncSession, now: datetime, emit: Emit | None) -> None:
        self.session = session
        self.now = now
        self.emit = emit
        self.diff = Diff()
        self.accounts_seen: set[str] = set()
        self.services_seen: dict[str, str] = {}  # service id -> account id in the file

    def note(self, kind: str, what: str, *parts: str) -> None:
        """Count one change; its diff line is only made when someone reads it."""
        self.diff.counts[kind][what] += 1
        if self.emit is not None:
            self.emit(" ".join(parts))

    async def chunk(self, accounts: list[AccountIn]) -> None:
        for account in accounts:
            if account.id in self.accounts_seen:
                raise DirectoryError(f"account {account.id} appears twice")
            self.accounts_seen.add(account.id)
            for service in account.services:
                other = self.services_seen.setdefault(service.id, account.id)
                if other != account.id or sum(s.id == service.id for s in account.services) > 1:
                    raise DirectoryError(f"service {service.id} appears twice ({other})")
        wanted = {a.id: a for a in accounts}
        roles = {a.id: a.roles() for a in accounts}
        services = {s.id: (a.id, s) for a in accounts for s in a.services}
        s = self.session
        ids, service_ids = list(wanted), list(services)
        current = {
            r[0]: (r[1], r[2])
            for r in await self._rows("SELECT id, name, lang FROM accounts WHERE id {}", ids)
        }
        have_addresses: dict[str, dict[str, tuple[int, str]]] = defaultdict(dict)
        for row_id, account_id, email, role in await self._rows(
            "SELECT id, account_id, email, role FROM addresses WHERE account_id {}", ids
        ):
            have_addresses[account_id][email] = (row_id, role)
        # The chunk's services, and those it takes over from accounts elsewhere.
        have_services = {
            r[0]: (r[1], r[2])
            for r in await self._rows(
                "SELECT id, account_id, name FROM services WHERE account_id {}", ids
            )
            + await self._rows("SELECT id, account_id, name FROM services WHERE id {}", service_ids)
        }
        have_shares: dict[str, dict[str, int]] = defaultdict(dict)
        if have_services:
            for row_id, service_id, email in await self._rows(
                "SELECT id, service_id, email FROM shares WHERE service_id {}", list(have_services)
            ):
                have_shares[service_id][email] = row_id

        new_accounts, changed_accounts = [], []
        for a in accounts:
            if a.id not in current:
                new_accounts.append({"id": a.id, "name": a.name, "lang": a.lang})
                self.note("accounts", "added", "+ account", a.id)
            elif current[a.id] != (a.name, a.lang):
                changed_accounts.append({"b_id": a.id, "name": a.name, "lang": a.lang})
                fields = [
                    f
                    for f, old in zip(("name", "lang"), current[a.id], strict=True)
                    if getattr(a, f) != old
                ]
                self.note("accounts", "changed", f"~ account {a.id} ({', '.join(fields)})")

        drop_addresses, role_changes, new_addresses = [], [], []
        for account_id, want in roles.items():
            have = have_addresses.get(account_id, {})
            for email, (row_id, role) in have.items():
                if email not in want:
                    drop_addresses.append(row_id)
                    self.note("addresses", "removed", f"- address {account_id} {email} ({role})")
                elif want[email] != role:
                    role_changes.append({"b_id": row_id, "role": want[email]})
                    line = f"~ address {account_id} {email} ({role} -> {want[email]})"
                    self.note("addresses", "changed", line)
            for email, role in want.items():
                if email not in have:
                    new_addresses.append({"account_id": account_id, "email": email, "role": role})
                    self.note("addresses", "added", "+ address", account_id, email, PAREN[role])

        drop_services, service_changes, new_services = [], [], []
        for service_id, (account_id, _) in sorted(have_services.items()):
            if service_id not in services and account_id in wanted:
                drop_services.append(service_id)
                self.note("services", "removed", f"- service {account_id} {service_id}")
        for service_id, (account_id, service) in services.items():
            had = have_services.get(service_id)
            if had is None:
                new_services.append(
                    {"id": service_id, "account_id": account_id, "name": service.name}
                )
                self.note("services", "added", "+ service", account_id, service_id)
            elif had != (account_id, service.name):
                service_changes.append(
                    {"b_id": service_id, "account_id": account_id, "name": service.name}
                )
                moved = f" (from {had[0]})" if had[0] != account_id else ""
                self.note("services", "changed", f"~ service {account_id} {service_id}{moved}")

        drop_shares, new_shares = [], []
        for service_id in drop_services:
            for email, row_id in sorted(have_shares.get(service_id, {}).items()):
                drop_shares.append(row_id)
                self.note("shares", "removed", f"- share {service_id} {email}")
        for service_id, (_, service) in services.items():
            have = have_shares.get(service_id, {})
            want = set(service.shared_with)
            for email, row_id in have.items():
                if email not in want:
                    drop_shares.append(row_id)
                    self.note("shares", "removed", f"- share {service_id} {email}")
            for email in service.shared_with:
                if email not in have:
                    new_shares.append({"service_id": service_id, "email": email})
                    self.note("shares", "added", "+ share", service_id, email)

        # Deletions first (the unique keys), then the new and changed rows.
        await self._delete(Share, Share.id, drop_shares)
        await self._delete(Service, Service.id, drop_services)
        await self._delete(Address, Address.id, drop_addresses)
        if new_accounts:
            rows = [{**r, "created_at": self.now} for r in new_accounts]
            await s.execute(insert(Account.__table__), rows)
        await self._update(Account, changed_accounts)
        await self._update(Service, service_changes)
        if new_services:
            await self._insert(Service, new_services)
        await self._update(Address, role_changes)
        if new_addresses:
            await self._insert(Address, new_addresses)
        if new_shares:
            await self._insert(Share, new_shares)

    async def _rows(self, sql: str, values: list[str]) -> list[Any]:
        """A read of plain columns by a list of ids, straight through the driver, in
        parts the drivers take: ``{}`` becomes ``IN (?, ...)`` (``IN ($1, ...)`` on
        PostgreSQL). Not ``= ANY($1)``: a prepared statement's generic plan for an
        array, made while the tables were still small, scanned them whole as they grew."""
        conn = await self.session.connection()
        sqlite = conn.dialect.name == "sqlite"
        out: list[Any] = []
        for part in _parts(values, 5000):
            if sqlite:
                marks = ", ".join("?" * len(part))
            else:
                marks = ", ".join(f"${i}" for i in range(1, len(part) + 1))
            result = await conn.exec_driver_sql(sql.format(f"IN ({marks})"), tuple(part))
            out.extend(result.all())
        return out

    async def _insert(self, model: Any, rows: list[dict[str, str]]) -> None:
        """Rows of plain strings straight to the driver: at 700,000 rows SQLAlchemy's
        per-row parameter processing was a third of the import. SQLite takes them as
        one executemany; PostgreSQL as multi-row INSERTs, 1,000 rows a statement
        (asyncpg's executemany is one statement per row on the server)."""
        if not rows:
            return
        names = list(rows[0])
        conn = await self.session.connection()
        values = [tuple(r[n] for n in names) for r in rows]
        head = f"INSERT INTO {model.__table__.name} ({', '.join(names)}) VALUES "
        if conn.dialect.name == "sqlite":
            marks = f"({', '.join('?' * len(names))})"
            await conn.exec_driver_sql(head + marks, values)
            return
        width = len(names)
        for part in _parts(values, 1000):
            groups = (
                "(" + ", ".join(f"${i * width + j + 1}" for j in range(width)) + ")"
                for i in range(len(part))
            )
            params = tuple(v for row in part for v in row)
            await conn.exec_driver_sql(head + ", ".join(groups), params)

    async def _delete(self, model: Any, column: Any, ids: list[Any]) -> None:
        for part in _parts(ids, 5000):
            await self.session.execute(delete(model).where(column.in_(part)))

    async def _update(self, model: Any, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        table = model.__table__
        names = [k for k in rows[0] if k != "b_id"]
        await self.session.execute(
            update(table)
            .where(table.c.id == bindparam("b_id"))
            .values({name: bindparam(name) for name in names}),
            rows,
        )

    async def remove_the_rest(self) -> None:
        """Accounts the file no longer has, with everything of theirs."""
        s = self.session
        gone = sorted(set(await s.scalars(select(Account.id))) - self.accounts_seen)
        for part in _parts(gone, CHUNK):
            for r in await s.execute(
                select(Address.account_id, Address.email, Address.role)
                .where(Address.account_id.in_(part))
                .order_by(Address.account_id, Address.email)
            ):
                self.note("addresses", "removed", f"- address {r.account_id} {r.email} ({r.role})")
            services = list(
                await s.execute(
                    select(Service.id, Service.account_id)
                    .where(Service.account_id.in_(part))
                    .order_by(Service.id)
                )
            )
            service_ids = [r.id for r in services]
            if service_ids:
                for r in await s.execute(
                    select(Share.service_id, Share.email)
                    .where(Share.service_id.in_(service_ids))
                    .order_by(Share.service_id, Share.email)
                ):
                    self.note("shares", "removed", f"- share {r.service_id} {r.email}")
            for r in services:
                self.note("services", "removed", f"- service {r.account_id} {r.id}")
            for account_id in part:
                self.note("accounts", "removed", f"- account {account_id}")
            if service_ids:
                await self._delete(Share, Share.service_id, service_ids)
            await self._delete(Service, Service.account_id, part)
            await self._delete(Address, Address.account_id, part)
            await self._delete(Account, Account.id, part)


def _parts(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def chunks(accounts: Iterable[AccountIn], size: int = CHUNK) -> Iterator[list[AccountIn]]:
    iterator = iter(accounts)
    while part := list(islice(iterator, size)):
        yield part


async def replace_directory(
    session: AsyncSession,
    accounts: Iterable[AccountIn],
    now: datetime,
    emit: Emit | None = None,
) -> Diff:
    """Make the directory equal to ``accounts`` inside the caller's transaction."""
    sync = _Sync(session, now, emit)
    for part in chunks(accounts):
        await sync.chunk(part)
    if not sync.accounts_seen:
        raise DirectoryError("the file has no accounts: refusing to empty the directory")
    await sync.remove_the_rest()
    return sync.diff
