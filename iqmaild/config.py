"""Configuration: TOML validated once into frozen models.

`config.example.toml` documents every key; a test keeps the two in step. A
wrong or missing key stops start-up with one line naming the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from iqmaild.core.addresses import normalize, split_extension
from iqmaild.core.keys import KeyRing
from iqmaild.core.retention import Periods

ENV_VAR = "IQMAILD_CONFIG"
DEFAULT_PATH = Path("/etc/iqmaild/iqmaild.toml")


class ConfigError(Exception):
    """A configuration problem, worded as one line for the operator."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port")
    return value


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


HostPort = Annotated[str, Field(min_length=3)]


SUPPORTED_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")


class DatabaseConfig(_Section):
    url: str
    pool_size: int = Field(default=5, ge=1, le=100)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("not a database URL") from None
        if url.drivername not in SUPPORTED_DRIVERS:
            raise ValueError(f"use {' or '.join(SUPPORTED_DRIVERS)}, not {url.drivername}")
        if url.drivername.startswith("sqlite") and url.database not in (None, "", ":memory:"):
            parent = Path(url.database).expanduser().resolve().parent
            if not parent.is_dir():
                raise ValueError(f"directory {parent} does not exist")
        return value


class SmtpConfig(_Section):
    listen: HostPort = "127.0.0.1:2526"
    protocol: Literal["smtp", "lmtp"] = "smtp"
    hostname: str = "localhost"
    desk_addresses: tuple[str, ...]
    max_message_size: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_recipients: int = Field(default=100, ge=1)
    group_commit_max: int = Field(default=64, ge=1, le=10000)
    # Sub-addresses of the desk (bok+faktury@) and our signed envelope senders.
    recipient_delimiter: str = Field(default="+", max_length=1)
    max_connections: int = Field(default=200, ge=1)
    idle_timeout: float = Field(default=300.0, gt=0)
    # Bytes of message data all sessions together may hold in memory while receiving.
    max_inflight_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)

    _listen = field_validator("listen")(lambda v: _host_port(v))

    @field_validator("desk_addresses")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one address")
        out = []
        for item in value:
            norm = normalize(item)
            if norm is None:
                raise ValueError(f"{item!r} is not an email address")
            out.append(norm)
        return tuple(out)


class HttpConfig(_Section):
    listen: HostPort = "127.0.0.1:8026"
    public_url: str
    panel_token: str = Field(default="", description="Bearer token of the Customer Panel")
    authorize_attempts_per_minute: int = Field(default=30, ge=1)
    panel_failures_per_minute: int = Field(default=10, ge=1)
    trusted_proxies: tuple[str, ...] = ()
    max_connections: int = Field(default=500, ge=1)
    # "" = /healthz, /metrics and the panel API on `listen` too; else only there.
    admin_listen: str = ""

    @field_validator("admin_listen")
    @classmethod
    def _admin_listen(cls, value: str) -> str:
        return _host_port(value) if value else value

    @field_validator("panel_token")
    @classmethod
    def _token(cls, value: str) -> str:
        if value and (len(value) < 32 or not value.isprintable() or not value.isascii()):
            raise ValueError("at least 32 printable ASCII characters (or empty: API closed)")
        return value

    _listen = field_validator("listen")(lambda v: _host_port(v))

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


class RateLimitConfig(_Section):
    per_recipient_10min: int = Field(default=5, ge=0)
    per_recipient_day: int = Field(default=20, ge=0)
    per_ticket_day: int = Field(default=10, ge=0)
    unknown_sender_domain_hour: int = Field(default=10, ge=0)
    unknown_sender_hour: int = Field(default=30, ge=0)


class OutboundConfig(_Section):
    relay: HostPort = "127.0.0.1:25"
    from_: str = Field(alias="from")
    staff_address: str
    message_id_domain: str = ""
    return_path: str = ""
    connect_timeout: float = Field(default=15.0, gt=0)
    command_timeout: float = Field(default=300.0, gt=0)
    data_timeout: float = Field(default=600.0, gt=0)
    queue_lifetime_hours: float = Field(default=120.0, gt=0)
    retry_base_seconds: float = Field(default=30.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    idle_close_seconds: float = Field(default=20.0, gt=0)
    # Connections to the relay used side by side.
    connections: int = Field(default=2, ge=1, le=32)
    bounce_suppress_hours: int = Field(default=72, ge=0)
    rate_limit: RateLimitConfig = RateLimitConfig()

    _relay = field_validator("relay")(lambda v: _host_port(v))

    @field_validator("staff_address")
    @classmethod
    def _staff(cls, value: str) -> str:
        if normalize(value) is None:
            raise ValueError(f"{value!r} is not an email address")
        return value

    @field_validator("return_path")
    @classmethod
    def _return_path(cls, value: str) -> str:
        if value and normalize(value) is None:
            raise ValueError(f"{value!r} is not an email address")
        return value


class TicketsConfig(_Section):
    tag_prefix: str = "IQ.pl"
    number_start: int = Field(default=1, ge=1)
    link_ttl_hours: int = Field(default=72, ge=1)

    @field_validator("tag_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,32}", value):
            raise ValueError("letters, digits, dot, dash or underscore, at most 32")
        return value


def _secret(value: str) -> str:
    if len(value) < 32:
        raise ValueError("at least 32 characters")
    if "CHANGE-ME" in value:
        raise ValueError("still the example's placeholder: set a long random key")
    return value


class SecretKeyEntry(_Section):
    """One key of the ring: a stable id (what it signed names it) and the key."""

    id: int = Field(ge=0, le=65535)
    key: str

    _key = field_validator("key")(lambda v: _secret(v))


class SecurityConfig(_Section):
    # One key (the ring of one, key id 0), or a ring: current first, then previous.
    secret_key: str = ""
    secret_keys: tuple[SecretKeyEntry, ...] = Field(default=(), max_length=8)

    @field_validator("secret_key")
    @classmethod
    def _not_the_example(cls, value: str) -> str:
        return _secret(value) if value else value

    @model_validator(mode="after")
    def _one_ring(self) -> SecurityConfig:
        if bool(self.secret_key) == bool(self.secret_keys):
            raise ValueError(
                "secret_key: set secret_key or secret_keys (a ring, current first), not both"
                if self.secret_key
                else "secret_key: missing required key (or secret_keys)"
            )
        ids = [entry.id for entry in self.secret_keys]
        if len(set(ids)) != len(ids):
            raise ValueError("secret_keys: key ids must be distinct")
        keys = [entry.key for entry in self.secret_keys]
        if len(set(keys)) != len(keys):
            raise ValueError("secret_keys: the same key twice")
        return self

    admin_header_patterns: tuple[str, ...] = ("X-Mailer: IQ\\.Admin",)
    admin_senders: tuple[str, ...] = ()
    dmarc_enforce: bool = False
    trusted_authserv_ids: tuple[str, ...] = ()

    @field_validator("admin_header_patterns")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            name, sep, pattern = item.partition(":")
            if not sep or not name.strip():
                raise ValueError(f"{item!r} must be 'Header-Name: regex'")
            try:
                re.compile(pattern.strip())
            except re.error as exc:
                raise ValueError(f"{item!r}: {exc}") from None
        return value


class NoticesConfig(_Section):
    notify_unknown_senders: bool = True
    default_lang: Literal["pl", "en"] = "pl"
    panel_url: str = "https://panel.iq.pl"


class ProcessingConfig(_Section):
    max_attempts: int = Field(default=5, ge=1)
    retry_seconds: float = Field(default=30.0, gt=0)
    max_hops: int = Field(default=30, ge=5)
    # 1: classification and delivery run in a worker process of their own (the
    # second core); 0: in the daemon's own process.
    workers: int = Field(default=1, ge=0, le=1)
    batch_size: int = Field(default=64, ge=1, le=1000)
    lease_seconds: float = Field(default=60.0, ge=10)
    # Mail queued by another process (the CLI, another instance) is seen this soon.
    poll_seconds: float = Field(default=0.5, gt=0, le=60)
    # The worker's CPU priority below intake's (nice increment): when the cores are
    # busy, the 250s the MTA waits for go first and the backlog waits, durably.
    worker_nice: int = Field(default=10, ge=0, le=19)


class TemplatesConfig(_Section):
    override_dir: str = ""


class HealthConfig(_Section):
    """Beyond these /healthz answers 503 (what an operator is paged for)."""

    outbox_backlog_max: int = Field(default=1000, ge=1)
    outbox_oldest_max_seconds: float = Field(default=3600.0, gt=0)
    classifier_backlog_max: int = Field(default=1000, ge=1)
    classifier_oldest_max_seconds: float = Field(default=600.0, gt=0)
    relay_failing_max_seconds: float = Field(default=300.0, gt=0)


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class RetentionConfig(_Section):
    """The seed's RODO/GDPR periods as defaults (README, "Data retention and GDPR")."""

    # Personal data of the correspondence, after its communication ended.
    personal_data_months: int = Field(default=3, ge=1, le=120)
    # The minimal claims record (numbers, dates, decisions, hashes).
    claims_years: int = Field(default=6, ge=1, le=30)
    # Security events (authorization attempts, link confirmations, refused mail).
    security_years: int = Field(default=2, ge=1, le=30)
    # Rows per transaction of a run.
    batch_size: int = Field(default=200, ge=1, le=10000)
    # The daemon runs retention by itself once a day.
    daily: bool = True

    @model_validator(mode="after")
    def _claims_outlive_personal_data(self) -> RetentionConfig:
        if self.claims_years * 12 < self.personal_data_months:
            raise ValueError(
                "claims_years: shorter than personal_data_months (the claims record "
                "is what remains of purged correspondence)"
            )
        return self

    @property
    def periods(self) -> Periods:
        return Periods(self.personal_data_months, self.claims_years, self.security_years)


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_ATOM = re.compile(r"[A-Za-z0-9!#$&'+,./:;<=>?@^_`|~-]{1,64}")


def is_loopback(host: str) -> bool:
    """Plain IMAP is refused unless the server is this machine (no password on the wire)."""
    import ipaddress

    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ImapFoldersConfig(_Section):
    """Where a processed message is filed, by decision (created when missing)."""

    authorized: str = "Authorized"
    pending: str = "Pending"
    unauthorized: str = "Unauthorized"
    ignored: str = "Ignored"


class ImapConfig(_Section):
    """IMAP mode: take mail from a desk mailbox instead of (or beside) SMTP."""

    host: str = ""  # "" = IMAP mode off
    port: int = Field(default=0, ge=0, le=65535)  # 0 = 993 for tls, 143 otherwise
    security: Literal["tls", "starttls", "plain"] = "tls"
    allow_plain: bool = False
    ca_file: str = ""
    user: str = ""
    password: str = ""
    password_file: str = ""
    folder: str = "INBOX"
    folders: ImapFoldersConfig = ImapFoldersConfig()
    keyword_prefix: str = "IQ-"
    batch_size: int = Field(default=50, ge=1, le=1000)
    max_batch_bytes: int = Field(default=32 * 1024 * 1024, ge=1024 * 1024)
    poll_seconds: float = Field(default=60.0, gt=0, le=3600)
    idle_renew_seconds: float = Field(default=1500.0, gt=0, le=1740)
    timeout_seconds: float = Field(default=60.0, gt=0)
    reconnect_max_seconds: float = Field(default=60.0, ge=1)
    staff_folder: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ImapConfig:
        if not self.host:
            return self
        if not self.user:
            raise ValueError("user: needed when host is set")
        if bool(self.password) == bool(self.password_file):
            raise ValueError("password: set exactly one of password and password_file")
        if self.password_file and not os.access(self.password_file, os.R_OK):
            raise ValueError(f"password_file: cannot read {self.password_file}")
        if self.security == "plain" and not self.allow_plain and not is_loopback(self.host):
            raise ValueError(
                "security: plain sends the password in clear; only to a loopback host "
                "(or set allow_plain = true)"
            )
        if self.ca_file and not os.access(self.ca_file, os.R_OK):
            raise ValueError(f"ca_file: cannot read {self.ca_file}")
        targets = [
            self.folders.authorized,
            self.folders.pending,
            self.folders.unauthorized,
            self.folders.ignored,
        ]
        names = [self.folder, *targets] + ([self.staff_folder] if self.staff_folder else [])
        if any(not n or any(c in n for c in '\r\n\0"') for n in names):
            raise ValueError("folders: names must be non-empty, without quotes or line breaks")
        folded = [n.upper() if n.upper() == "INBOX" else n for n in names]
        if folded[0] in folded[1:]:
            raise ValueError(
                f"folder: {self.folder!r} is also a filing or staff folder (mail would loop)"
            )
        if self.staff_folder and self.staff_folder in targets:
            raise ValueError("staff_folder: is one of the decision folders")
        if not _ATOM.fullmatch(self.keyword_prefix + "1"):
            raise ValueError("keyword_prefix: letters, digits and IMAP atom characters only")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.host)

    @property
    def effective_port(self) -> int:
        return self.port or (993 if self.security == "tls" else 143)

    def read_password(self) -> str:
        """Read at each login, so a rotated password file is picked up."""
        if self.password:
            return self.password
        text = Path(self.password_file).read_text(encoding="utf-8")
        return text.splitlines()[0] if text else ""


class Config(_Section):
    database: DatabaseConfig
    smtp: SmtpConfig
    http: HttpConfig
    outbound: OutboundConfig
    tickets: TicketsConfig = TicketsConfig()
    security: SecurityConfig
    notices: NoticesConfig = NoticesConfig()
    processing: ProcessingConfig = ProcessingConfig()
    templates: TemplatesConfig = TemplatesConfig()
    logging: LoggingConfig = LoggingConfig()
    retention: RetentionConfig = RetentionConfig()
    imap: ImapConfig = ImapConfig()
    health: HealthConfig = HealthConfig()

    @model_validator(mode="after")
    def _no_loops(self) -> Config:
        """Mail to staff or to our envelope sender must never come back as customer mail."""
        delimiter = self.smtp.recipient_delimiter
        desk = set(self.smtp.desk_addresses)
        staff = normalize(self.outbound.staff_address) or ""
        if staff in desk or split_extension(staff, delimiter)[0] in desk:
            raise ValueError("outbound.staff_address: is a desk address (its copies would loop)")
        if staff == self.return_path_base:
            raise ValueError("outbound.staff_address: is the return path (bounces would loop)")
        return self

    @property
    def key(self) -> bytes:
        """The current key (what signs now); verification uses ``keys``."""
        return self.keys.current[1]

    @cached_property
    def keys(self) -> KeyRing:
        """The key ring: ``secret_keys`` in order, or ``secret_key`` as key id 0."""
        security = self.security
        if security.secret_keys:
            return KeyRing(tuple((e.id, e.key.encode()) for e in security.secret_keys))
        return KeyRing(((0, security.secret_key.encode()),))

    @cached_property
    def return_path_base(self) -> str:
        """Base of our signed envelope senders (``base+bounce-N-sig@domain``)."""
        return normalize(self.outbound.return_path or self.desk_address) or ""

    @cached_property
    def desk_address(self) -> str:
        """The address in ``outbound.from`` (our envelope sender, named in mail)."""
        from email.policy import default

        header = default.header_factory("from", self.outbound.from_)
        addresses = getattr(header, "addresses", ())
        return addresses[0].addr_spec if addresses else self.outbound.from_

    @cached_property
    def message_id_domain(self) -> str:
        domain = self.desk_address.rpartition("@")[2]
        return self.outbound.message_id_domain or domain or "localhost"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]).replace("from_", "from")
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        message = "missing required key"
    elif err["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{key}: {message}" if key else message


def resolve_path(path: str | os.PathLike[str] | None) -> Path:
    if path:
        return Path(path)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the config; every problem is one ConfigError line."""
    file = resolve_path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {file} not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {file}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {file}: not valid TOML: {exc}") from None
    return parse_config(data, source=str(file))


def parse_config(data: dict[str, object], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc)}") from None
