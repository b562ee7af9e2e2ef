"""The report's building blocks: paragraphs, lists, quotes, tables, figures, sections and the document.

document.py and verdicts.py fill them, render.py walks them (Document.flat) to
Markdown and HTML: one document, so the two can never say different things.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

NONE = "—"  # an empty cell: nothing to show


@dataclass(frozen=True)
class Cell:
    """A table cell; its tag (better / worse / undecided / diverged) is what the renderers highlight."""

    text: str
    tag: str = ""


@dataclass(frozen=True)
class Heading:
    kind: ClassVar[str] = "heading"
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    kind: ClassVar[str] = "paragraph"
    text: str


@dataclass(frozen=True)
class BulletList:
    kind: ClassVar[str] = "list"
    items: tuple[str, ...]


@dataclass(frozen=True)
class Quote:
    """A labelled verbatim text (an instruction, a reference answer): its line breaks are kept."""

    kind: ClassVar[str] = "quote"
    label: str
    text: str


@dataclass(frozen=True)
class Table:
    kind: ClassVar[str] = "table"
    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]


@dataclass(frozen=True)
class Figure:
    """A PNG under the study folder and its caption."""

    kind: ClassVar[str] = "figure"
    caption: str
    path: Path


Block = Paragraph | BulletList | Quote | Table | Figure


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block | Section, ...]
    level: int = 2

    def flat(self) -> Iterator[Heading | Block]:
        yield Heading(self.level, self.title)
        for b in self.blocks:
            yield from b.flat() if isinstance(b, Section) else (b,)


@dataclass(frozen=True)
class Document:
    title: str
    intro: tuple[Block, ...]
    sections: tuple[Section, ...]

    def flat(self) -> Iterator[Heading | Block]:
        """Headings and blocks in reading order: what the renderers walk through."""
        yield Heading(1, self.title)
        yield from self.intro
        for s in self.sections:
            yield from s.flat()


def table(headers: list[str], rows: list[list[Any]]) -> Table:
    return Table(tuple(headers), tuple(tuple(c if isinstance(c, Cell) else Cell(str(c)) for c in r) for r in rows))
