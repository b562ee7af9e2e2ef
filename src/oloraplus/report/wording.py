"""The report's words: every sentence, heading, caption and column name is a macro of templates/text.j2.

`say("summary_intro")` renders one macro to one line of plain text (the template
wraps long sentences over several lines; they are joined with single spaces);
`columns("summary_columns", ...)` renders one to a list, one item per line. The
text is made once and put in the document, so Markdown and HTML say the same words.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2

from oloraplus.plots import lambda_label


def templates(**options: Any) -> jinja2.Environment:
    """The templates shipped in the package (templates/*.j2), undefined names being errors."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("oloraplus.report", "templates"), undefined=jinja2.StrictUndefined, **options
    )


@functools.cache
def _macros() -> Any:
    """text.j2's macros. Plain text: nothing escaped (the renderers escape), block tags keep their newlines."""
    env = templates(autoescape=False)
    env.filters["g"] = lambda x: f"{x:g}"
    env.filters["lambda_label"] = lambda x: lambda_label(float(x))
    return env.get_template("text.j2").module


def _lines(name: str, args: dict[str, Any]) -> list[str]:
    macro = getattr(_macros(), name, None)
    if macro is None:
        raise KeyError(f"templates/text.j2 has no macro {name!r}")
    return [line.strip() for line in str(macro(**args)).splitlines() if line.strip()]


def say(name: str, /, **args: Any) -> str:
    """One macro of text.j2 as one line of text."""
    return " ".join(_lines(name, args))


def columns(name: str, /, **args: Any) -> list[str]:
    """One macro of text.j2 as a list of short texts (table column names), one per line."""
    return _lines(name, args)
