"""Templates: every mail and page in both languages renders, escapes and stays header-safe."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from jinja2 import UndefinedError

from iqmaild.rendering import LANGS, Renderer, one_line, pick_lang, shipped_templates_dir

NASTY = "<script>alert(1)</script> Zażółć\r\nBcc: x@evil.test"
TAG = "[IQ.pl#23328:1be837cbaa33d1c9254c]"
SHORT_TAG = "[IQ.pl#23328]"
LINK = "https://bok.example.pl/authorize/Ab-_9?x=1&y=2"
PANEL = "https://panel.example.pl/tickets"
REASONS = (
    "unknown_sender",
    "technical_address",
    "additional_address",
    "admin_panel",
    "unshared_cc",
    "code_missing",
    "code_mismatch",
    "unknown_ticket",
    "malformed_sender",
    "dmarc_fail",
    "ambiguous_account",
)
MAILS = ("auth_request", "acknowledgement", "notice", "refusal", "code_changed", "staff_reply")
TICKETLESS = {"refusal"}  # to someone who may not act on the ticket: names none
HTML_MAILS = {"auth_request", "acknowledgement"}
STAFF_BODY = "Dzień dobry,\n\nskrzynka <b>działa</b> poprawnie.\n\nJan z BOK\n\n"


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


def mail_ctx(name: str, subject: str = NASTY, **extra: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "ticket": None
        if name in TICKETLESS
        else SimpleNamespace(number=23328, tag=TAG, subject=subject),
        "recipient": "jan.kowalski@example.com",
        "desk_address": "bok@example.pl",
    }
    if name != "staff_reply":
        ctx["panel_url"] = PANEL
    ctx |= {
        "auth_request": {"link": LINK, "expires_hours": 72},
        "acknowledgement": {"via": "link"},
        "notice": {
            "reasons": list(REASONS),
            "unshared": ["obcy@example.net", "inny@example.org"],
            "includes_code": True,
            "ticket_authorized": True,
            "code_changed": False,
        },
        "refusal": {"reasons": list(REASONS)},
        "code_changed": {},
        "staff_reply": {"body": STAFF_BODY},
    }[name]
    return ctx | extra


def page_ctx(name: str) -> dict[str, Any]:
    return {
        "authorize": {
            "ticket_number": 23328,
            "subject": NASTY,
            "sender": "<script>x</script>@example.com",
            "action_url": LINK,
            "account": "<b>ACME</b>",
            "service": "<i>WWW</i>",
            "preview": "<script>alert(3)</script>\nline two",
        },
        "confirmed": {
            "ticket_number": 23328,
            "subject": NASTY,
            "account": "<b>ACME</b>",
            "service": "",
        },
        "error": {"kind": "expired"},
    }[name]


@pytest.mark.parametrize("name", MAILS)
@pytest.mark.parametrize("lang", LANGS)
def test_mail_is_header_safe_and_complete(renderer: Renderer, lang: str, name: str) -> None:
    mail = renderer.render_mail(lang, name, **mail_ctx(name))
    assert mail.subject == mail.subject.strip()
    assert all(ord(c) >= 32 for c in mail.subject), mail.subject
    assert TAG not in mail.subject and not mail.subject.lower().startswith("re:")
    assert mail.text.endswith("\n") and not mail.text.endswith("\n\n")
    assert "\r" not in mail.text
    assert "undefined" not in mail.text.lower()
    assert "bok@example.pl" in mail.text
    if name in TICKETLESS:  # reveals nothing of a ticket, quotes nothing the sender wrote
        assert "23328" not in mail.text + mail.subject and "Zażółć" not in mail.text
        assert "jan.kowalski@example.com" not in mail.text
        return
    assert "Zażółć" in mail.subject and "Bcc: x@evil.test" in mail.subject
    assert TAG in mail.text
    if name == "auth_request":
        assert LINK in mail.text
    if name in HTML_MAILS:
        assert mail.html is not None
        assert "&lt;script&gt;" in mail.html and "<script" not in mail.html
        assert TAG in mail.html and "undefined" not in mail.html.lower()
        assert '<meta charset="utf-8">' in mail.html
        if name == "auth_request":
            assert 'href="https://bok.example.pl/authorize/Ab-_9?x=1&amp;y=2"' in mail.html
    else:
        assert mail.html is None


@pytest.mark.parametrize("includes_code", [True, False])
@pytest.mark.parametrize("name", MAILS)
@pytest.mark.parametrize("lang", LANGS)
def test_mail_lines_stay_short(
    renderer: Renderer, lang: str, name: str, includes_code: bool
) -> None:
    ctx = mail_ctx(name, subject="Problem z pocztą")
    if name == "notice":
        ctx["includes_code"] = ctx["ticket_authorized"] = includes_code
        ctx["code_changed"] = not includes_code
    text = renderer.render_mail(lang, name, **ctx).text
    too_long = [line for line in text.splitlines() if len(line) >= 78]
    assert not too_long


@pytest.mark.parametrize("lang", LANGS)
def test_every_reason_has_its_own_explanation(renderer: Renderer, lang: str) -> None:
    def body(reasons: list[str], name: str = "notice") -> str:
        return renderer.render_mail(lang, name, **mail_ctx(name, reasons=reasons)).text

    baseline = body([])
    texts = {reason: body([reason]) for reason in REASONS}
    assert len(set(texts.values())) == len(REASONS)
    assert baseline not in texts.values()
    # A refusal explains each rule too, except what only a ticket's owner may learn;
    # the ticket-tag reasons share one wording that tells a guesser nothing.
    refusals = {reason: body([reason], "refusal") for reason in REASONS}
    tag_reasons = {"code_missing", "code_mismatch", "unknown_ticket"}
    assert len({refusals[r] for r in tag_reasons}) == 1
    others = {r: t for r, t in refusals.items() if r not in tag_reasons | {"malformed_sender"}}
    assert len(set(others.values())) == len(others)
    assert not any("obcy@example.net" in t for t in refusals.values())
    assert body(["no_such_reason"]) == baseline
    assert body(["code_missing", "code_missing"]) == texts["code_missing"]
    assert "obcy@example.net" in texts["unshared_cc"]
    assert "inny@example.org" in texts["unshared_cc"]
    assert "obcy@example.net" not in texts["unknown_sender"]


@pytest.mark.parametrize("lang", LANGS)
def test_notice_without_code_shows_short_tag_only(renderer: Renderer, lang: str) -> None:
    ctx = mail_ctx("notice", includes_code=False, ticket_authorized=False)
    ctx["ticket"] = SimpleNamespace(number=23328, tag=SHORT_TAG, subject="Hej")
    text = renderer.render_mail(lang, "notice", **ctx).text
    assert SHORT_TAG in text
    assert "1be837cbaa33d1c9254c" not in text


@pytest.mark.parametrize("lang", LANGS)
def test_acknowledgement_depends_on_channel(renderer: Renderer, lang: str) -> None:
    by_link = renderer.render_mail(lang, "acknowledgement", **mail_ctx("acknowledgement"))
    ctx = mail_ctx("acknowledgement", via="panel")
    by_panel = renderer.render_mail(lang, "acknowledgement", **ctx)
    assert by_link.text != by_panel.text
    assert by_link.html != by_panel.html


@pytest.mark.parametrize("lang", LANGS)
def test_staff_reply_keeps_operator_text_and_tag(renderer: Renderer, lang: str) -> None:
    text = renderer.render_mail(lang, "staff_reply", **mail_ctx("staff_reply")).text
    assert text.startswith("Dzień dobry,\n\nskrzynka <b>działa</b> poprawnie.\n\nJan z BOK\n")
    assert text.index(TAG) > text.index("Jan z BOK")


@pytest.mark.parametrize(
    ("lang", "hours", "phrase"),
    [
        ("pl", 1, "1 godzinę"),
        ("pl", 24, "24 godziny"),
        ("pl", 12, "12 godzin"),
        ("pl", 72, "72 godziny"),
        ("pl", 5, "5 godzin"),
        ("en", 1, "1 hour."),
        ("en", 72, "72 hours"),
    ],
)
def test_link_validity_is_worded_naturally(
    renderer: Renderer, lang: str, hours: int, phrase: str
) -> None:
    ctx = mail_ctx("auth_request", expires_hours=hours)
    mail = renderer.render_mail(lang, "auth_request", **ctx)
    assert phrase in mail.text
    assert mail.html is not None and phrase in mail.html


def test_missing_variable_raises(renderer: Renderer) -> None:
    ctx = mail_ctx("auth_request")
    del ctx["link"]
    with pytest.raises(UndefinedError):
        renderer.render_mail("pl", "auth_request", **ctx)
    with pytest.raises(UndefinedError):
        renderer.render_page("en", "authorize", ticket_number=1, subject="s", sender="a@b.c")


def test_override_dir_takes_precedence(tmp_path: Path) -> None:
    (tmp_path / "mail" / "pl").mkdir(parents=True)
    (tmp_path / "mail" / "pl" / "auth_request.txt").write_text(
        "{% block subject %}Własny\r\ntemat {{ ticket.number }}{% endblock %}\n"
        "{% block body %}\n\nLink: {{ link }}\n\n\n{% endblock %}\n",
        encoding="utf-8",
    )
    (tmp_path / "web" / "en").mkdir(parents=True)
    (tmp_path / "web" / "en" / "error.html").write_text("custom {{ kind }}", encoding="utf-8")
    renderer = Renderer(override_dir=tmp_path)
    mail = renderer.render_mail("pl", "auth_request", **mail_ctx("auth_request"))
    assert mail.subject == "Własny temat 23328"
    assert mail.text == f"Link: {LINK}\n"
    assert mail.html is not None and "Potwierdzam zgłoszenie" in mail.html  # shipped
    english = renderer.render_mail("en", "auth_request", **mail_ctx("auth_request"))
    assert english.subject.startswith("Please confirm")
    assert renderer.render_page("en", "error", kind="<used>") == "custom &lt;used&gt;"
    assert "Nieznany link" in renderer.render_page("pl", "error", kind="not_found")


def test_template_without_blocks_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "mail" / "pl").mkdir(parents=True)
    (tmp_path / "mail" / "pl" / "plain.txt").write_text("no blocks", encoding="utf-8")
    with pytest.raises(LookupError, match="subject"):
        Renderer(override_dir=tmp_path).render_mail("pl", "plain")


def test_unknown_lang_falls_back_to_polish(renderer: Renderer) -> None:
    ctx = mail_ctx("auth_request")
    polish = renderer.render_mail("pl", "auth_request", **ctx)
    assert renderer.render_mail("de", "auth_request", **ctx) == polish
    assert renderer.render_mail("", "auth_request", **ctx) == polish
    assert renderer.render_page("xx", "error", kind="used") == renderer.render_page(
        "pl", "error", kind="used"
    )
    assert pick_lang("EN-gb") == "en"
    assert pick_lang("en_US") == "en"
    assert pick_lang("../en") == "pl"


def test_one_line_collapses_control_runs() -> None:
    assert one_line(" a\r\n\t b\x00\x85c\u2028d \n") == "a b c d"


@pytest.mark.parametrize("name", ["authorize", "confirmed", "error"])
@pytest.mark.parametrize("lang", LANGS)
def test_web_page_renders_and_escapes(renderer: Renderer, lang: str, name: str) -> None:
    page = renderer.render_page(lang, name, **page_ctx(name))
    assert page.startswith("<!DOCTYPE html>")
    assert f'<html lang="{lang}">' in page and '<meta charset="utf-8">' in page
    assert "<script" not in page.lower()
    assert "src=" not in page and "<link" not in page and "@import" not in page
    assert "undefined" not in page.lower()
    if name != "error":
        assert "&lt;script&gt;alert(1)&lt;/script&gt; Zażółć Bcc: x@evil.test" in page
        assert "23328" in page
        assert "&lt;b&gt;ACME&lt;/b&gt;" in page
    if name == "authorize":
        action = "https://bok.example.pl/authorize/Ab-_9?x=1&amp;y=2"
        assert f'<form method="post" action="{action}">' in page
        assert page.count("<button") == 1 and 'type="submit"' in page
        assert "&lt;script&gt;x&lt;/script&gt;@example.com" in page
        assert ("Potwierdzam zgłoszenie" if lang == "pl" else "Confirm ticket") in page
        assert "&lt;i&gt;WWW&lt;/i&gt;" in page
        assert "&lt;script&gt;alert(3)&lt;/script&gt;\nline two" in page


@pytest.mark.parametrize("lang", LANGS)
def test_error_kinds_are_distinct(renderer: Renderer, lang: str) -> None:
    kinds = ["not_found", "used", "expired", "revoked", "rate_limited", "unavailable"]
    pages = {kind: renderer.render_page(lang, "error", kind=kind) for kind in kinds}
    titles = {page.split("<h1>")[1].split("</h1>")[0] for page in pages.values()}
    assert len(set(pages.values())) == len(kinds) and len(titles) == len(kinds)
    assert renderer.render_page(lang, "error", kind="<bogus>") == pages["unavailable"]


def test_both_languages_ship_the_same_templates() -> None:
    root = shipped_templates_dir()
    for kind in ("mail", "web"):
        assert names_of(root / kind / "pl") == names_of(root / kind / "en")
    assert {f"{name}.txt" for name in MAILS} <= names_of(root / "mail" / "pl")


def names_of(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_notices_name_other_participants_refusals_name_none() -> None:
    """The owner learns which CCs lack a share; a contact without one learns of no one."""
    renderer = Renderer()
    for lang, cc in (("pl", "W polach Do lub DW"), ("en", "The To or CC fields")):
        common = dict(desk_address="bok@desk.test", panel_url="https://p")
        notice = renderer.render_mail(
            lang,
            "notice",
            ticket={"number": 7, "tag": "[IQ.pl#7]", "subject": "x"},
            recipient="owner@acme.test",
            reasons=["unshared_cc"],
            unshared=["x@other.test"],
            includes_code=False,
            ticket_authorized=False,
            code_changed=False,
            **common,
        ).text
        assert cc in notice and "x@other.test" in notice
        refusal = renderer.render_mail(
            lang,
            "refusal",
            ticket=None,
            recipient="dev@partner.test",
            reasons=["unshared_cc"],
            **common,
        ).text
        assert "x@other.test" not in refusal and "[IQ.pl#7]" not in refusal


def test_a_changed_code_is_announced() -> None:
    renderer = Renderer()
    for lang in LANGS:
        ctx = mail_ctx("notice", code_changed=True)
        changed = renderer.render_mail(lang, "notice", **ctx).text
        unchanged = renderer.render_mail(lang, "notice", **(ctx | {"code_changed": False})).text
        assert changed != unchanged and TAG in changed
