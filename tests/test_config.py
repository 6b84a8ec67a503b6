"""The config: validation messages, and config.example.toml documents every key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from iqmaild.config import Config, ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out |= _keys(annotation, key + ".")
        else:
            out.add(key)
    return out


def _flatten(data: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def _base(tmp: Path | None = None) -> dict[str, Any]:
    """The example with its two site-specific values filled in."""
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    data["database"]["url"] = f"sqlite+aiosqlite:///{tmp or Path('/tmp')}/iqmaild.db"
    data["security"]["secret_key"] = "x" * 40
    return data


def test_example_documents_every_key_and_is_valid() -> None:
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert _flatten(data) == _keys(Config)
    config = parse_config(_base())
    assert config.tickets.tag_prefix == "IQ.pl"


def test_the_example_key_and_unusable_databases_are_refused(tmp_path: Path) -> None:
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    data["database"]["url"] = f"sqlite+aiosqlite:///{tmp_path}/d.db"
    with pytest.raises(ConfigError, match=r"security\.secret_key: still the example"):
        parse_config(data)
    for url, expected in (
        ("not a url", "not a database URL"),
        ("postgresql://u@h/db", "use sqlite+aiosqlite or postgresql+asyncpg"),
        (f"sqlite+aiosqlite:///{tmp_path}/missing/d.db", "does not exist"),
    ):
        data = _base(tmp_path)
        data["database"]["url"] = url
        with pytest.raises(ConfigError, match=re.escape(expected)):
            parse_config(data)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["smtp"].pop("desk_addresses"), "smtp.desk_addresses: missing required key"),
        (lambda d: d["smtp"].update(listen="localhost"), "smtp.listen: must be host:port"),
        (lambda d: d["smtp"].update(lisen="x"), "smtp.lisen: unknown key"),
        (lambda d: d["security"].update(secret_key="short"), "security.secret_key"),
        (lambda d: d["http"].update(public_url="bok.iq.pl"), "http.public_url"),
        (lambda d: d["outbound"].pop("from"), "outbound.from: missing required key"),
        (lambda d: d["smtp"].update(desk_addresses=["not an address"]), "smtp.desk_addresses"),
        (lambda d: d["security"].update(admin_header_patterns=["X-Mailer: ("]), "admin_header"),
        (lambda d: d["tickets"].update(number_start=0), "tickets.number_start"),
    ],
)
def test_errors_name_the_key_in_one_line(change: Any, expected: str) -> None:
    data = _base()
    change(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_file_problems_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\nlisten=", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    text = EXAMPLE.read_text(encoding="utf-8").replace("CHANGE-ME", "changed-it")
    path.write_text(text.replace("/var/lib/iqmaild", str(tmp_path)), encoding="utf-8")
    monkeypatch.setenv("IQMAILD_CONFIG", str(path))
    assert load_config().smtp.listen == "127.0.0.1:2526"


def _imap(**values: Any) -> dict[str, Any]:
    data = _base()
    data["imap"].update({"host": "imap.iq.pl", "user": "bok@iq.pl", "password": "pw", **values})
    return data


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"user": ""}, "imap: Value error, user: needed"),
        ({"password_file": "/etc/passwd"}, "set exactly one of password and password_file"),
        ({"password": "", "password_file": "/nonexistent/pw"}, "cannot read /nonexistent/pw"),
        ({"security": "plain"}, "only to a loopback host"),
        ({"security": "smoke"}, "imap.security"),
        ({"folder": "Pending"}, "is also a filing or staff folder (mail would loop)"),
        ({"staff_folder": "inbox"}, "is also a filing or staff folder"),
        ({"staff_folder": "Authorized"}, "staff_folder: is one of the decision folders"),
        ({"keyword_prefix": "IQ "}, "keyword_prefix"),
        ({"idle_renew_seconds": 1800}, "imap.idle_renew_seconds"),
        ({"folder": 'In"box'}, "without quotes or line breaks"),
    ],
)
def test_imap_mistakes_are_refused(values: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_imap(**values))
    assert expected.removeprefix("imap: Value error, ") in str(info.value)


def test_imap_is_off_by_default_and_plain_is_for_loopback(tmp_path: Path) -> None:
    assert not parse_config(_base()).imap.enabled
    config = parse_config(_imap(security="plain", host="127.0.0.1"))
    assert config.imap.enabled and config.imap.effective_port == 143
    assert parse_config(_imap(security="plain", host="::1")).imap.enabled
    assert parse_config(_imap(security="plain", allow_plain=True)).imap.security == "plain"
    assert parse_config(_imap()).imap.effective_port == 993
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n", encoding="utf-8")
    config = parse_config(_imap(password="", password_file=str(secret)))
    assert config.imap.read_password() == "s3cret"
