"""The dependencies every processing stage shares, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from iqmaild.config import Config
from iqmaild.core.addresses import normalize, split_extension
from iqmaild.core.facts import PolicyConfig
from iqmaild.core.tag import TagFormat
from iqmaild.deliver.compose import Composer
from iqmaild.metrics import Metrics
from iqmaild.parse.message import ParseContext
from iqmaild.rendering import Renderer


@dataclass
class Desk:
    config: Config
    renderer: Renderer
    log: Any
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        config = self.config
        self.tags = TagFormat(config.tickets.tag_prefix)
        self.composer = Composer(config, self.renderer, self.tags)
        split = (p.partition(":") for p in config.security.admin_header_patterns)
        patterns = tuple((name.strip().lower(), pattern.strip()) for name, _, pattern in split)
        self.policy = PolicyConfig(
            desk_addresses=frozenset(config.smtp.desk_addresses),
            admin_header_patterns=patterns,
            admin_senders=frozenset(
                n for a in config.security.admin_senders if (n := normalize(a)) is not None
            ),
            dmarc_enforce=config.security.dmarc_enforce,
            notify_unknown_senders=config.notices.notify_unknown_senders,
            max_hops=config.processing.max_hops,
            delimiter=config.smtp.recipient_delimiter,
            return_path=config.return_path_base,
        )
        self.parse_context = ParseContext(
            tags=self.tags,
            key=config.key,
            msgid_domain=self.composer.domain,
            trusted_authserv_ids=frozenset(a.lower() for a in config.security.trusted_authserv_ids),
            wanted_headers=frozenset(name for name, _ in patterns),
            return_path=config.return_path_base,
            delimiter=config.smtp.recipient_delimiter,
            link_prefix=f"{config.http.public_url}/authorize/",
        )

    @property
    def key(self) -> bytes:
        return self.config.key

    def desk_extensions(self, rcpt_to: list[str]) -> list[str]:
        """The sub-address extensions (bok+faktury@ -> faktury) the mail was sent to."""
        out = []
        for address in rcpt_to:
            norm = normalize(address)
            if norm is None:
                continue
            base, extension = split_extension(norm, self.config.smtp.recipient_delimiter)
            if extension and base in self.policy.desk_addresses:
                out.append(extension)
        return out
