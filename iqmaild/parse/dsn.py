"""Delivery status notifications (RFC 3464): which recipients failed, for good or not yet."""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage

from iqmaild.core.addresses import normalize


@dataclass(frozen=True)
class DeliveryReport:
    failed: tuple[tuple[str, str], ...] = ()  # (address, status) with Action failed / 5.x.x
    delayed: tuple[str, ...] = ()  # addresses with Action delayed (a warning, not a failure)


def read_report(msg: EmailMessage) -> DeliveryReport | None:
    """The per-recipient blocks of a delivery-status report, or None when there are none."""
    failed: list[tuple[str, str]] = []
    delayed: list[str] = []
    found = False
    try:
        for part in msg.walk():
            if part.get_content_type() != "message/delivery-status":
                continue
            found = True
            for block in part.get_payload() or []:
                if not hasattr(block, "get"):
                    continue
                action = str(block.get("action", "")).strip().lower()
                status = str(block.get("status", "")).strip()
                recipient = str(
                    block.get("final-recipient") or block.get("original-recipient") or ""
                )
                address = normalize(recipient.split(";", 1)[-1].strip())
                if not address:
                    continue
                if action == "failed" or status.startswith("5"):
                    failed.append((address, status or "5.0.0"))
                elif action == "delayed":
                    delayed.append(address)
    except Exception:
        return None
    return DeliveryReport(tuple(failed[:50]), tuple(delayed[:50])) if found else None
