"""One module per scenario; each has ``run(Settings) -> Report``."""

from __future__ import annotations

from collections.abc import Callable

from bench.report import Report
from bench.scenarios import burst, e2e, ingest, latency, scale, soak
from bench.scenarios.common import Settings

SCENARIOS: dict[str, Callable[[Settings], Report]] = {
    "ingest": ingest.run,
    "e2e": e2e.run,
    "burst": burst.run,
    "latency": latency.run,
    "scale": scale.run,
    "soak": soak.run,
}

# ``all`` leaves out what takes an hour on its own
NOT_IN_ALL = {"soak"}
