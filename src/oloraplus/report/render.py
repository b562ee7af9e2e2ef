"""Step 4 of the report: the document rendered to Markdown and to self-contained HTML by templates/*.j2.

The templates hold the layout (and the HTML one the CSS); the words are already in
the document. Escaping is done here, as filters: `md_cell` for Markdown table cells,
`html` and `html_cell` for HTML (html.escape, quotes included).
"""

from __future__ import annotations

import base64
import functools
import html
from pathlib import Path

import jinja2
from markupsafe import Markup

from oloraplus.report.blocks import Cell, Document
from oloraplus.report.wording import templates


def _md_cell(cell: Cell) -> str:
    text = cell.text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    return f"**{text}**" if cell.tag in ("better", "worse") else text


def _html(text: str) -> Markup:
    return Markup(html.escape(str(text)))


def _html_cell(text: str) -> Markup:
    return Markup(html.escape(str(text)).replace("\n", "<br>"))


def _data_uri(path: Path) -> Markup:
    return Markup("data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii"))


@functools.cache
def _environment() -> jinja2.Environment:
    env = templates(
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(md_cell=_md_cell, html=_html, html_cell=_html_cell, data_uri=_data_uri)
    return env


def render_markdown(document: Document, root: Path) -> str:
    """report.md; figures are linked relative to `root` (the study folder)."""
    return _environment().get_template("report.md.j2").render(items=list(document.flat()), root=Path(root))


def render_html(document: Document) -> str:
    """report.html, with the CSS inline and every figure embedded as a data URI: one file to send."""
    return _environment().get_template("report.html.j2").render(title=document.title, items=list(document.flat()))
