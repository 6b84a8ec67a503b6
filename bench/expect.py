"""Which outbound mail each sent message must cause, and whether it reached the relay.

The rules come from the specification (DESIGN.md), not from the daemon's code:

- every classified message gets a staff copy (to ``outbound.staff_address``) that
  carries ``X-IQ-Authorization: <decision>`` and names the customer's Message-ID
  in In-Reply-To (its own Message-ID is the daemon's);
- a new ticket from a primary address is ``pending`` and its sender gets an
  authorization mail with a link, threaded on the message (In-Reply-To);
- an unauthorized message gets a notice to its sender, threaded the same way
  and without a link. To a sender in no directory the notice is *optional*: it
  may be switched off (``notices.notify_unknown_senders``) or capped against
  backscatter (per domain, and on main since 2026-12-01 30 per hour in all), so
  the check counts such notices but does not wait for them;
- a confirmed link gets an acknowledgement to the clicking address carrying the
  full tag (number and code), and the ticket's pending messages reach staff
  again as ``authorized``.

The scenarios choose senders so that no per-recipient or per-domain limit applies
(one automatic mail per recipient, distinct domains for unknown senders); a mail
the rules do not expect is counted as ``other``, never fails a run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from bench.relay import Captured

STAFF, AUTH, NOTICE, ACK = "staff", "auth_request", "notice", "acknowledgement"


@dataclass
class Want:
    kind: str
    key: str  # our Message-ID (staff, auth, notice) or the recipient (ack)
    verdict: str = ""  # staff copies: the X-IQ-Authorization we expect
    ticket: int | None = None  # acks: the ticket number
    after: float = 0.0  # acks: only mail that arrived after the click
    required: bool = True  # False: counted if it comes, never waited for
    met: Captured | None = None
    seen: str = ""  # what arrived instead (for the error message)

    @property
    def met_at(self) -> float | None:
        return self.met.t if self.met is not None else None


class Ledger:
    """Expected mail, matched against what the relay captured, as it arrives."""

    def __init__(self, staff_address: str, tag_prefix: str) -> None:
        self.staff = staff_address.lower()
        self.prefix = tag_prefix
        self.staff_wants: dict[str, list[Want]] = {}
        self.reply_wants: dict[str, Want] = {}
        self.ack_wants: dict[str, list[Want]] = {}
        self.wants: list[Want] = []
        self.counts: Counter[str] = Counter()
        self._open = 0

    # -- what to expect ---------------------------------------------------

    def _add(self, want: Want) -> Want:
        self.wants.append(want)
        if want.required:
            self._open += 1
        return want

    def staff_copy(self, key: str, verdict: str) -> Want:
        want = self._add(Want(STAFF, key, verdict=verdict))
        self.staff_wants.setdefault(key, []).append(want)
        return want

    def reply(self, key: str, kind: str, required: bool = True) -> Want:
        if kind not in (AUTH, NOTICE):
            raise ValueError(kind)
        want = self._add(Want(kind, key, required=required))
        self.reply_wants[key] = want
        return want

    def acknowledgement(self, recipient: str, ticket: int, after: float) -> Want:
        want = self._add(Want(ACK, recipient.lower(), ticket=ticket, after=after))
        self.ack_wants.setdefault(recipient.lower(), []).append(want)
        return want

    # -- what arrived -----------------------------------------------------

    def feed(self, items: Iterable[Captured]) -> None:
        for item in items:
            self.counts[self._match(item)] += 1

    def _meet(self, want: Want, item: Captured) -> None:
        want.met = item
        if want.required:
            self._open -= 1

    def _match(self, item: Captured) -> str:
        rcpts = [r.lower() for r in item.rcpts]
        if self.staff in rcpts:
            # A staff copy has its own Message-ID and names the customer's in
            # In-Reply-To (a daemon before issue 7 kept the customer's Message-ID).
            wants = self.staff_wants.get(item.in_reply_to) or self.staff_wants.get(
                item.message_id, []
            )
            for want in wants:
                if want.met is None:
                    if item.verdict.lower() == want.verdict:
                        self._meet(want, item)
                        return STAFF
                    want.seen = f"staff copy with X-IQ-Authorization: {item.verdict}"
            return f"{STAFF} (other)"
        want = self.reply_wants.get(item.in_reply_to)
        if want is not None and want.met is None:
            kind = AUTH if item.link_token else NOTICE
            if kind == want.kind:
                self._meet(want, item)
                return kind
            want.seen = f"{kind} instead"
            return f"{kind} (unexpected)"
        for rcpt in rcpts:
            for want in self.ack_wants.get(rcpt, []):
                if want.met is not None or item.t < want.after or item.link_token:
                    continue
                tag = item.tag(self.prefix)
                if tag and tag[0] == want.ticket and tag[1]:
                    self._meet(want, item)
                    return ACK
                want.seen = f"mail with subject {item.subject[:80]!r}"
        return "other"

    # -- results ----------------------------------------------------------

    def done(self) -> bool:
        """Every required mail arrived."""
        return self._open == 0

    def optional_open(self) -> int:
        return sum(1 for w in self.wants if not w.required and w.met is None)

    def optional_counts(self) -> tuple[int, int]:
        """(arrived, expected at most) of the optional mail."""
        optional = [w for w in self.wants if not w.required]
        return sum(1 for w in optional if w.met is not None), len(optional)

    def missing(self) -> list[Want]:
        return [w for w in self.wants if w.met is None and w.required]

    def problems(self, limit: int = 5) -> list[str]:
        missing = self.missing()
        if not missing:
            return []
        by_kind = Counter(w.kind for w in missing)
        lines = [
            "MISSING outbound mail: "
            + ", ".join(f"{n} {kind}" for kind, n in sorted(by_kind.items()))
        ]
        for w in missing[:limit]:
            lines.append(f"  {w.kind} for {w.key}" + (f" ({w.seen})" if w.seen else ""))
        return lines

    def last_arrival(self) -> float | None:
        times = [w.met_at for w in self.wants if w.met_at is not None]
        return max(times) if times else None

    def arrivals(self, kind: str) -> list[float]:
        return sorted(w.met_at for w in self.wants if w.kind == kind and w.met_at is not None)
