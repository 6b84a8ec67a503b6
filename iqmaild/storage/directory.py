"""The directory: accounts, their addresses and services, and shares.

Read side builds the `DirectoryView` the rules need; write side is what the
CLI and `directory import` call. Addresses are stored normalized.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from iqmaild.core.addresses import normalize
from iqmaild.core.facts import AddressEntry, DirectoryView, ShareEntry
from iqmaild.core.vocabulary import Role
from iqmaild.storage.models import Account, Address, Service, Share


class DirectoryError(Exception):
    """A directory change that cannot be made (unknown account, bad address)."""


def email_or_error(value: str) -> str:
    norm = normalize(value)
    if norm is None:
        raise DirectoryError(f"{value!r} is not an email address")
    return norm


async def view_for(session: AsyncSession, emails: Iterable[str]) -> DirectoryView:
    wanted = sorted(set(emails))
    if not wanted:
        return DirectoryView()
    addresses: dict[str, list[AddressEntry]] = defaultdict(list)
    shares: dict[str, list[ShareEntry]] = defaultdict(list)
    for chunk in _chunks(wanted, 500):
        rows = await session.execute(
            select(Address.email, Address.account_id, Address.role).where(Address.email.in_(chunk))
        )
        for email, account_id, role in rows:
            addresses[email].append(AddressEntry(account_id, Role(role)))
        rows = await session.execute(
            select(Share.email, Service.account_id, Service.id)
            .join(Service, Service.id == Share.service_id)
            .where(Share.email.in_(chunk))
        )
        for email, account_id, service_id in rows:
            shares[email].append(ShareEntry(account_id, service_id))
    return DirectoryView(
        {k: tuple(v) for k, v in addresses.items()}, {k: tuple(v) for k, v in shares.items()}
    )


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def primary_of(session: AsyncSession, account_id: str) -> str | None:
    return await session.scalar(
        select(Address.email).where(
            Address.account_id == account_id, Address.role == Role.PRIMARY.value
        )
    )


async def upsert_account(
    session: AsyncSession,
    account_id: str,
    primary: str,
    name: str | None = None,
    lang: str | None = None,
    *,
    now: datetime,
) -> Account:
    primary = email_or_error(primary)
    account = await session.get(Account, account_id)
    if account is None:
        account = Account(id=account_id, name=name or "", lang=lang or "pl", created_at=now)
        session.add(account)
    else:
        if name is not None:
            account.name = name
        if lang is not None:
            account.lang = lang
    await session.flush()
    old = await session.scalars(
        select(Address).where(Address.account_id == account_id, Address.role == "primary")
    )
    for row in old:
        if row.email != primary:
            await session.delete(row)
    await session.flush()
    await _set_address(session, account_id, primary, Role.PRIMARY)
    return account


async def _set_address(session: AsyncSession, account_id: str, email: str, role: Role) -> None:
    row = await session.scalar(
        select(Address).where(Address.account_id == account_id, Address.email == email)
    )
    if row is None:
        session.add(Address(account_id=account_id, email=email, role=role.value))
    else:
        row.role = role.value
    await session.flush()


async def add_address(session: AsyncSession, account_id: str, email: str, role: str) -> None:
    if role not in (Role.TECHNICAL.value, Role.ADDITIONAL.value):
        raise DirectoryError("role must be technical or additional")
    await _require_account(session, account_id)
    email = email_or_error(email)
    existing = await session.scalar(
        select(Address).where(Address.account_id == account_id, Address.email == email)
    )
    if existing is not None and existing.role == Role.PRIMARY.value:
        raise DirectoryError(f"{email} is the primary address of {account_id}")
    await _set_address(session, account_id, email, Role(role))


async def add_service(
    session: AsyncSession, account_id: str, service_id: str, name: str | None = None
) -> None:
    await _require_account(session, account_id)
    service = await session.get(Service, service_id)
    if service is None:
        session.add(Service(id=service_id, account_id=account_id, name=name or ""))
    elif service.account_id != account_id:
        raise DirectoryError(f"service {service_id} belongs to account {service.account_id}")
    elif name is not None:
        service.name = name
    await session.flush()


async def grant_share(session: AsyncSession, service_id: str, email: str) -> bool:
    if await session.get(Service, service_id) is None:
        raise DirectoryError(f"no service {service_id}")
    email = email_or_error(email)
    exists = await session.scalar(
        select(Share.id).where(Share.service_id == service_id, Share.email == email)
    )
    if exists is None:
        session.add(Share(service_id=service_id, email=email))
        await session.flush()
    return exists is None


async def revoke_share(session: AsyncSession, service_id: str, email: str) -> bool:
    result = await session.execute(
        delete(Share).where(Share.service_id == service_id, Share.email == email_or_error(email))
    )
    return bool(getattr(result, "rowcount", 0))


async def _require_account(session: AsyncSession, account_id: str) -> None:
    if await session.get(Account, account_id) is None:
        raise DirectoryError(f"no account {account_id}")


async def import_directory(session: AsyncSession, data: Any, now: datetime) -> dict[str, int]:
    """Idempotent upsert of a JSON directory export.

    Shape: ``{"accounts": [{"id", "primary", "name"?, "lang"?, "technical": [..],
    "additional": [..], "services": [{"id", "name"?, "shared_with": [..]}]}]}``.
    """
    if not isinstance(data, dict) or not isinstance(data.get("accounts"), list):
        raise DirectoryError('expected an object with an "accounts" list')
    counts = {"accounts": 0, "addresses": 0, "services": 0, "shares": 0}
    for item in data["accounts"]:
        if not isinstance(item, dict) or "id" not in item or "primary" not in item:
            raise DirectoryError('every account needs "id" and "primary"')
        account_id = str(item["id"])
        await upsert_account(
            session, account_id, str(item["primary"]), item.get("name"), item.get("lang"), now=now
        )
        counts["accounts"] += 1
        for role in ("technical", "additional"):
            for email in item.get(role, []) or []:
                await add_address(session, account_id, str(email), role)
                counts["addresses"] += 1
        for service in item.get("services", []) or []:
            await add_service(session, account_id, str(service["id"]), service.get("name"))
            counts["services"] += 1
            for email in service.get("shared_with", []) or []:
                await grant_share(session, str(service["id"]), str(email))
                counts["shares"] += 1
    return counts
