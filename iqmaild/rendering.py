"""Jinja2 rendering of outbound mail and web pages.

Site templates in an override directory shadow the shipped ones file by file, so an
operator can reword one notice without forking the rest. Undefined variables raise
instead of printing nothing, because a mail that silently lost its link or tag is
worse than a mail that was never sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateNotFound,
    select_autoescape,
)

LANGS = ("pl", "en")
DEFAULT_LANG = LANGS[0]

_PACKAGE_DIR = Path(__file__).resolve().parent
# Runs of whitespace and C0/C1 control characters: they would fold or inject headers.
_CONTROL_RUN = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")


def shipped_templates_dir() -> Path:
    """The installed wheel force-includes templates into the package; a checkout has
    them at the repository root."""
    packaged = _PACKAGE_DIR / "templates"
    return packaged if packaged.is_dir() else _PACKAGE_DIR.parent / "templates"


def one_line(value: object) -> str:
    """Collapse CR/LF/control runs to one space: header-safe and readable in text."""
    return _CONTROL_RUN.sub(" ", str(value)).strip()


def pick_lang(lang: str | None) -> str:
    """Map "en", "EN", "en-GB" to a shipped language; anything else gets Polish."""
    base = (lang or "").strip().lower().replace("_", "-").split("-")[0]
    return base if base in LANGS else DEFAULT_LANG


@dataclass(frozen=True)
class RenderedMail:
    """Subject without tag or "Re:" (the mailer adds them), text body, optional HTML."""

    subject: str
    text: str
    html: str | None


class Renderer:
    """Renders `mail/{lang}/{name}.txt|.html` and `web/{lang}/{name}.html`."""

    def __init__(self, override_dir: Path | None = None, shipped_dir: Path | None = None) -> None:
        loaders: list[BaseLoader] = []
        if override_dir is not None:
            loaders.append(FileSystemLoader(str(override_dir)))
        loaders.append(FileSystemLoader(str(shipped_dir or shipped_templates_dir())))
        self.env = Environment(
            loader=ChoiceLoader(loaders),
            undefined=StrictUndefined,
            autoescape=select_autoescape(["html"]),
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["oneline"] = one_line

    def render_mail(self, lang: str, name: str, **ctx: Any) -> RenderedMail:
        """The text template holds both `subject` and `body` blocks so that a
        translation or override keeps the two together in one file."""
        base = f"mail/{pick_lang(lang)}/{name}"
        template = self.env.get_template(f"{base}.txt")
        subject = one_line(_render_block(template, "subject", ctx))
        text = _render_block(template, "body", ctx).lstrip("\n").rstrip() + "\n"
        try:
            html_template = self.env.get_template(f"{base}.html")
        except TemplateNotFound:
            html = None
        else:
            html = html_template.render(ctx)
        return RenderedMail(subject=subject, text=text, html=html)

    def render_page(self, lang: str, name: str, **ctx: Any) -> str:
        """A web page, autoescaped because every value in it may come from a customer."""
        return self.env.get_template(f"web/{pick_lang(lang)}/{name}.html").render(ctx)


def _render_block(template: Template, block: str, ctx: dict[str, Any]) -> str:
    try:
        render = template.blocks[block]
    except KeyError:
        raise LookupError(f"template {template.name!r} has no block {block!r}") from None
    return "".join(render(template.new_context(ctx)))
