"""Delivery status notifications (RFC 3464): which recipients failed for good."""

from __future__ import annotations

import email
import re
from email import policy

from iqmaild.core.addresses import normalize

_MSGID = re.compile(r"^message-id:\s*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)


def returned_message_id(raw: bytes) -> str | None:
    """The Message-ID of the returned message, from the report's headers part."""
    try:
        msg = email.message_from_bytes(raw, policy=policy.default)
        for part in msg.walk():
            ctype = part.get_content_type()
            if ctype == "text/rfc822-headers":
                text = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
            elif ctype == "message/rfc822":
                inner = part.get_payload()
                text = "".join(f"{k}: {v}\n" for k, v in inner[0].items()) if inner else ""
            else:
                continue
            match = _MSGID.search(text)
            if match:
                return match.group(1)
    except Exception:
        return None
    return None


def permanent_failures(raw: bytes) -> list[tuple[str, str]]:
    """(address, status) for every per-recipient block with Action: failed / 5.x.x."""
    try:
        msg = email.message_from_bytes(raw, policy=policy.default)
        out: list[tuple[str, str]] = []
        for part in msg.walk():
            if part.get_content_type() != "message/delivery-status":
                continue
            for block in part.get_payload() or []:
                if not hasattr(block, "get"):
                    continue
                action = str(block.get("action", "")).strip().lower()
                status = str(block.get("status", "")).strip()
                recipient = str(
                    block.get("final-recipient") or block.get("original-recipient") or ""
                )
                address = normalize(recipient.split(";", 1)[-1].strip())
                if address and (action == "failed" or status.startswith("5")):
                    out.append((address, status or "5.0.0"))
        return out
    except Exception:
        return []
