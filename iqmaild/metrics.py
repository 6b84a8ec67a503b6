"""Prometheus metrics for ``GET /metrics``, through ``prometheus_client``.

Every family is declared here, with its HELP text and, where its labels come
from the fixed vocabulary, every label value created at start: a rate() over a
series that appears only after its first event misses that event, and an alert
on "failures > 0" cannot tell "none yet" from "not exported".

The worker process counts in its own ``Metrics``; it sends the daemon a
snapshot of its additive samples (counters, histogram buckets, sums, counts)
over a pipe once a second (``service.Supervisor``), and the daemon adds them to
its own when it renders. Snapshots carry totals, not deltas, so a lost one
costs nothing; a restarted worker's last totals are kept as a base, so counters
never go backwards. (prometheus_client's multiprocess mode would need a shared
directory and an environment variable fixed before import, in every test too;
the pipe needs neither.) Gauges (queues, ages, relay times) are computed by the
daemon from the database and from the worker's status at scrape time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from iqmaild.core.vocabulary import Decision, MailKind, Reason

try:  # no *_created series: they double the output and nobody alerts on them
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
except ImportError:  # pragma: no cover - older prometheus_client
    pass

KINDS = tuple(k.value for k in MailKind)
DECISIONS = tuple(d.value for d in Decision)
REASONS = (*(r.value for r in Reason), "none")
SMTP_CODES = (
    "220", "221", "250", "354", "421", "450", "451", "452",
    "500", "501", "502", "503", "504", "550", "552", "553", "554", "555",
)  # fmt: skip
SUPPRESSION_REASONS = (
    "bounced",
    "recipient_rate_limit",
    "ticket_rate_limit",
    "unknown_sender_rate_limit",
    "unknown_sender_domain_rate_limit",
    "answers_a_notice",
)
REJECT_REASONS = ("recipient", "size", "storage")
STAGES = ("commit", "classify", "deliver")
MESSAGE_STATES = ("received", "processed", "dead")
# held and deleted: an operator's `outbox hold` and `outbox delete`
OUTBOX_STATES = ("queued", "sending", "sent", "failed", "held", "deleted")
# Stage latencies span a fast commit (ms) to a slow relay (minutes).
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# name -> (help, label names, values for each label to create at start)
COUNTERS: dict[str, tuple[str, tuple[str, ...], tuple[tuple[str, ...], ...]]] = {
    "smtp_accepted_total": ("Messages accepted (250 after their commit).", (), ()),
    "smtp_rejected_total": (
        "Messages or recipients refused, by reason.",
        ("reason",),
        (REJECT_REASONS,),
    ),
    "smtp_replies_total": (
        "SMTP/LMTP replies sent, by code (a multi-line reply counts once).",
        ("code",),
        (SMTP_CODES,),
    ),
    "messages_classified_total": ("Messages classified, by decision.", ("decision",), (DECISIONS,)),
    "message_reasons_total": (
        "Messages classified, by decision and each reason of the verdict ('none': no reason).",
        ("decision", "reason"),
        (DECISIONS, REASONS),
    ),
    "messages_failed_total": (
        "Processing failures, by the state the message was left in.",
        ("state",),
        (("received", "dead"),),
    ),
    "outbox_sent_total": ("Mail the relay accepted, by kind.", ("kind",), (KINDS,)),
    "outbox_deferred_total": ("Deliveries deferred (retried later), by kind.", ("kind",), (KINDS,)),
    "outbox_failed_total": ("Deliveries given up, by kind.", ("kind",), (KINDS,)),
    "outbox_returned_total": (
        "Reports (bounces) about our own mail, by the kind of mail they are about.",
        ("kind",),
        (KINDS,),
    ),
    "autoreplies_suppressed_total": (
        "Automatic mail not sent, by reason (rate limits, suppression after a bounce).",
        ("why",),
        (SUPPRESSION_REASONS,),
    ),
    "authlinks_confirmed_total": ("Authorization links confirmed (POST).", (), ()),
    "imap_accepted_total": ("Messages taken from the IMAP folder and committed.", (), ()),
    "imap_filed_total": (
        "Messages filed into a folder by their decision (IMAP mode), by folder.",
        ("folder",),
        (("Authorized", "Pending", "Unauthorized", "Ignored", "none"),),
    ),
    "imap_reconnects_total": ("IMAP sessions made again after a failure.", (), ()),
    "authorize_rate_limited_total": ("Link page requests answered 429.", (), ()),
    "panel_rate_limited_total": ("Panel API requests answered 429.", (), ()),
}
HISTOGRAMS = {
    "stage_seconds": (
        "Seconds per stage: commit (a group of received messages), classify (a batch), "
        "deliver (one mail to the relay).",
        ("stage",),
        (STAGES,),
    ),
}
GAUGES = {
    "messages": ("Stored messages, by state.", ("state",), (MESSAGE_STATES,)),
    "outbox": ("Outbox rows, by state.", ("state",), (OUTBOX_STATES,)),
    "outbox_depth": ("Mail waiting to be sent (queued or sending), by kind.", ("kind",), (KINDS,)),
    "outbox_oldest_seconds": (
        "Age of the oldest mail waiting to be sent, by kind (0: none waits).",
        ("kind",),
        (KINDS,),
    ),
    "classifier_backlog": ("Received messages not yet classified.", (), ()),
    "classifier_oldest_seconds": ("Age of the oldest message not yet classified.", (), ()),
    "relay_last_success_seconds": (
        "Seconds since the relay last accepted a mail (-1: not since start).",
        (),
        (),
    ),
    "relay_last_failure_seconds": (
        "Seconds since a delivery last failed at the relay (-1: not since start).",
        (),
        (),
    ),
    "worker_up": ("1 while the worker process runs (or no worker is configured).", (), ()),
}


def _combinations(values: tuple[tuple[str, ...], ...]) -> Iterator[tuple[str, ...]]:
    if not values:
        yield ()
        return
    for head in values[0]:
        for rest in _combinations(values[1:]):
            yield (head, *rest)


class Metrics:
    """One process's metrics; ``render`` adds what the worker process reported."""

    def __init__(self) -> None:
        # Only _Merged is registered: each family is collected once, through it.
        self.registry = CollectorRegistry(auto_describe=False)
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        self._gauges: dict[str, Gauge] = {}
        for name, (text, labels, values) in COUNTERS.items():
            metric = Counter(f"iqmaild_{name}", text, labels, registry=None)
            self._counters[name] = metric
            for combo in _combinations(values) if labels else ():
                metric.labels(*combo)
        for name, (text, labels, values) in HISTOGRAMS.items():
            hist = Histogram(f"iqmaild_{name}", text, labels, registry=None, buckets=BUCKETS)
            self._histograms[name] = hist
            for combo in _combinations(values):
                hist.labels(*combo)
        for name, (text, labels, values) in GAUGES.items():
            gauge = Gauge(f"iqmaild_{name}", text, labels, registry=None)
            self._gauges[name] = gauge
            for combo in _combinations(values) if labels else ():
                gauge.labels(*combo).set(0)
        # The worker's reports: its current totals and those of workers that ended.
        self.remote: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.remote_base: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.registry.register(_Merged(self))

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        counter = self._counters[name]
        (counter.labels(**labels) if labels else counter).inc(amount)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        hist = self._histograms[name]
        (hist.labels(**labels) if labels else hist).observe(max(seconds, 0.0))

    def set(self, name: str, value: float, **labels: str) -> None:
        gauge = self._gauges[name]
        (gauge.labels(**labels) if labels else gauge).set(value)

    def snapshot(self) -> list[list[Any]]:
        """This process's additive samples: what the worker sends the daemon."""
        out: list[list[Any]] = []
        for family in self._local():
            if family.type not in ("counter", "histogram"):
                continue
            out.extend([s.name, s.labels, s.value] for s in family.samples)
        return out

    def merge_remote(self, snapshot: Iterable[list[Any]]) -> None:
        self.remote = {
            (name, tuple(sorted(labels.items()))): value for name, labels, value in snapshot
        }

    def remote_restarted(self) -> None:
        """The worker ended: its last totals become the base its successor adds to."""
        for key, value in self.remote.items():
            self.remote_base[key] += value
        self.remote = {}

    def remote_value(self, name: str, labels: dict[str, str]) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self.remote.get(key, 0.0) + self.remote_base.get(key, 0.0)

    def _local(self) -> Iterator[Metric]:
        for metric in (*self._counters.values(), *self._histograms.values()):
            yield from metric.collect()

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class _Merged(Collector):
    """The registry's view: our counters and histograms plus the worker's, and gauges."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        for family in m._local():
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples = [
                Sample(
                    s.name,
                    s.labels,
                    s.value + m.remote_value(s.name, s.labels),
                    s.timestamp,
                    s.exemplar,
                )
                for s in family.samples
            ]
            yield merged
        for gauge in m._gauges.values():
            yield from gauge.collect()
