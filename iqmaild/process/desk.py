"""The dependencies every processing stage shares, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from iqmaild.config import Config
from iqmaild.core.facts import PolicyConfig
from iqmaild.core.tag import TagFormat
from iqmaild.metrics import Metrics
from iqmaild.outbound.compose import Composer
from iqmaild.rendering import Renderer


@dataclass
class Desk:
    config: Config
    renderer: Renderer
    log: Any
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        self.tags = TagFormat(self.config.tickets.tag_prefix)
        self.composer = Composer(self.config, self.renderer, self.tags)
        self.policy = PolicyConfig(
            desk_addresses=frozenset(self.config.smtp.desk_addresses),
            admin_header_patterns=tuple(
                (name.strip().lower(), pattern.strip())
                for name, _, pattern in (
                    p.partition(":") for p in self.config.security.admin_header_patterns
                )
            ),
            admin_senders=frozenset(a.lower() for a in self.config.security.admin_senders),
            dmarc_enforce=self.config.security.dmarc_enforce,
            notify_unknown_senders=self.config.notices.notify_unknown_senders,
        )
        self.trusted_authserv_ids = frozenset(
            a.lower() for a in self.config.security.trusted_authserv_ids
        )

    @property
    def key(self) -> bytes:
        return self.config.key
