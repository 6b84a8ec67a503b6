"""Text from incoming mail made safe to show and to put in a header of ours.

Every stage that displays or reuses customer text (subjects, names, ids) goes
through here, so that a CR/LF hidden in an encoded word can never become a
header of ours (CVE-2024-6923).
"""

from __future__ import annotations

import re

_CONTROLS = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]+")
# Raw 8-bit bytes the email package could not decode (surrogate escapes): a str
# holding them cannot be encoded for the database, a log line or a mail.
SURROGATES = re.compile(r"[\ud800-\udfff]")
_MSGID = re.compile(r"<([\x21-\x3b\x3d\x3f-\x7e]{1,250})>")  # ASCII only: never an encoded word
HEADER_VALUE_LIMIT = 2000


def clean_text(value: str, limit: int = HEADER_VALUE_LIMIT) -> str:
    """Decoded header text with CR/LF/NUL and other controls removed."""
    value = SURROGATES.sub("\ufffd", value)
    return " ".join(_CONTROLS.sub(" ", value).split())[:limit]


def message_ids(value: str) -> list[str]:
    """Message ids in a header value, ASCII only, without angle brackets."""
    return _MSGID.findall(value or "")
