"""Composing customer mail: µs per mail, EmailMessage (before) against bytes (now).

    python -m bench.compose            # medians of 9 rounds
    python -m bench.compose --rounds 25 --json
    python -m bench.compose --short    # a quick pass that only checks it runs (CI)

Every round composes the same mix of mails (each template, both languages,
replies with References and an Outlook Thread-Index, a UTF-8 recipient) once per
path, the paths interleaved so both see the same load; the table gives the
median of the rounds' per-mail means and, in brackets, the lowest and highest.

Rows:
- ``render``: Jinja2 only (`Composer.render`), what both paths share;
- ``mime: EmailMessage`` / ``mime: bytes``: a rendered mail to its bytes,
  `Composer.write_email_message` (the former code) and `Composer.write`;
- ``total: ...``: `render` + the path, as `Composer.customer_mail` runs it;
- ``render, no auto_reload`` and ``render, html looked up once``: where the
  render time goes (a stat per template per mail, and a failed loader search
  for the templates without HTML). They use a private Renderer; the shipped one
  is measured as it is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from jinja2 import TemplateNotFound

from iqmaild.config import Config, parse_config
from iqmaild.core.tag import TagFormat
from iqmaild.core.vocabulary import MailKind
from iqmaild.deliver.compose import Composer, ThreadInfo, TicketRef
from iqmaild.rendering import RenderedMail, Renderer

DESK = "bok@desk.test"
SUBJECT = "Problem z pocztą – nie działa wysyłanie z Outlooka od wczoraj"
TAG = "[IQ.pl#23328:1be837cbaa33d1c9254c]"
SHORT_TAG = "[IQ.pl#23328]"
THREAD = ThreadInfo(
    message_id="CAF3x9=YqgT+c2vQ@mail.client.example.com",
    references=(
        "first.1732528800@client.example.com",
        "iq.23328.abcdef01.0123456789abcdef@desk.test",
    ),
    thread_index="AdnBzX4kLw5Oq1ZzS3mFwH2uYxk3nQ==",
)
REASONS = ("unknown_sender", "code_missing")


def make_config() -> Config:
    return parse_config(
        {
            "database": {"url": "sqlite+aiosqlite:///:memory:"},
            "smtp": {"listen": "127.0.0.1:0", "desk_addresses": [DESK]},
            "http": {"listen": "127.0.0.1:0", "public_url": "https://bok.example.pl"},
            "outbound": {"from": f"BOK IQ <{DESK}>", "staff_address": "staff@desk.test"},
            "tickets": {"tag_prefix": "IQ.pl"},
            "security": {"secret_key": "bench-secret-key-0123456789abcdef-xyz"},
        }
    )


def cases() -> list[dict[str, Any]]:
    """One mail of each kind per language: what `customer_mail` is called with."""
    out: list[dict[str, Any]] = []
    for lang in ("pl", "en"):
        ticket = TicketRef(23328, TAG, SUBJECT)
        short = TicketRef(23328, SHORT_TAG, SUBJECT)
        link = "https://bok.example.pl/authorize/Ab-_9xYz0123456789abcdefghijklmnopqrstuv"
        out += [
            dict(kind=MailKind.AUTH_REQUEST, ticket=short, ctx={"link": link, "expires_hours": 72}),
            dict(kind=MailKind.ACKNOWLEDGEMENT, ticket=ticket, ctx={"via": "link"}),
            dict(
                kind=MailKind.NOTICE,
                ticket=short,
                ctx={
                    "reasons": REASONS,
                    "unshared": ("obcy@example.net",),
                    "includes_code": False,
                    "ticket_authorized": False,
                    "code_changed": False,
                },
            ),
            dict(kind=MailKind.REFUSAL, ticket=None, ctx={"reasons": REASONS}),
            dict(kind=MailKind.CODE_CHANGED, ticket=ticket, ctx={}),
            dict(
                kind=MailKind.STAFF_REPLY,
                ticket=ticket,
                automatic=False,
                ctx={"body": "Dzień dobry,\n\nskrzynka działa już poprawnie.\n\nJan z BOK\n"},
            ),
        ]
        for case in out[-6:]:
            case["lang"] = lang
            case.setdefault("automatic", True)
            case["thread"] = THREAD
            case["recipient"] = "jan.kowalski@example.com"
    out[0] = {**out[0], "recipient": "łukasz.żółw@example.pl"}  # RFC 6531
    return out


class _HtmlOnce(Renderer):
    """The shipped Renderer, with the answer "no HTML template" remembered."""

    def __init__(self) -> None:
        super().__init__()
        self.env.auto_reload = False
        self._no_html: set[str] = set()
        real = self.env.get_template

        def get_template(name: str, *args: Any, **kwargs: Any) -> Any:
            if name in self._no_html:
                raise TemplateNotFound(name)
            try:
                return real(name, *args, **kwargs)
            except TemplateNotFound:
                self._no_html.add(name)
                raise

        self.env.get_template = get_template  # type: ignore[method-assign]


def _time(fn: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return (time.perf_counter() - start) / count * 1e6


def run(rounds: int, repeat: int) -> dict[str, list[float]]:
    config = make_config()
    tags = TagFormat("IQ.pl")
    composer = Composer(config, Renderer(), tags)
    no_reload = Renderer()
    no_reload.env.auto_reload = False
    composer_no_reload = Composer(config, no_reload, tags)
    composer_html_once = Composer(config, _HtmlOnce(), tags)
    mails = cases()

    def rendered_all(c: Composer) -> list[RenderedMail]:
        return [
            c.render(m["kind"], m["lang"], m["ticket"], m["recipient"], m["ctx"]) for m in mails
        ]

    rendered = rendered_all(composer)
    args = [
        (r, m["ticket"], m["recipient"], m["thread"], m["automatic"])
        for r, m in zip(rendered, mails, strict=True)
    ]

    def per_mail(fn: Callable[[], object]) -> float:
        return _time(fn, repeat) / len(mails)

    def total(write: Callable[..., object]) -> Callable[[], None]:
        def go() -> None:
            for m in mails:
                r = composer.render(m["kind"], m["lang"], m["ticket"], m["recipient"], m["ctx"])
                write(r, m["ticket"], m["recipient"], m["thread"], m["automatic"])

        return go

    steps: dict[str, Callable[[], object]] = {
        "render": lambda: rendered_all(composer),
        "render, no auto_reload": lambda: rendered_all(composer_no_reload),
        "render, html looked up once": lambda: rendered_all(composer_html_once),
        "mime: EmailMessage": lambda: [composer.write_email_message(*a) for a in args],
        "mime: bytes": lambda: [composer.write(*a) for a in args],
        "total: render + EmailMessage": total(composer.write_email_message),
        "total: render + bytes": total(composer.write),
    }
    for fn in steps.values():  # warm: templates compiled, caches filled
        fn()
    results: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            results[name].append(per_mail(fn))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=40, help="passes over the mix per round")
    parser.add_argument("--short", action="store_true", help="2 rounds of 2: does it run")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    rounds, repeat = (2, 2) if opts.short else (opts.rounds, opts.repeat)
    results = run(rounds, repeat)
    summary = {
        name: {
            "median_us": statistics.median(values),
            "min_us": min(values),
            "max_us": max(values),
        }
        for name, values in results.items()
    }
    if opts.json:
        json.dump(
            {"mails_per_pass": len(cases()), "rounds": rounds, "results": summary},
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    print(f"µs per mail, median of {rounds} rounds × {repeat} passes over {len(cases())} mails")
    for name, s in summary.items():
        print(f"  {name:32} {s['median_us']:8.1f}   [{s['min_us']:.1f} – {s['max_us']:.1f}]")
    old = summary["total: render + EmailMessage"]["median_us"]
    new = summary["total: render + bytes"]["median_us"]
    old_mime = summary["mime: EmailMessage"]["median_us"]
    new_mime = summary["mime: bytes"]["median_us"]
    print(f"  MIME alone: {old_mime / new_mime:.1f}× faster; with the render: {old / new:.1f}×")
    print(f"  render share of the new total: {summary['render']['median_us'] / new:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
