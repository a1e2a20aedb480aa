"""An HTML report page being assembled: markup, and the PNGs it shows.

Every image is embedded in ``index.html`` as a data URI, so the page alone is the whole report: it opens
from a local file, from an object-store browser or a presigned link, or as a mail attachment. The
same PNGs are also written beside it (``images/<name>.png``), to be linked or reused on their own.
"""

from __future__ import annotations

import base64
import html
import re
from datetime import datetime, timezone
from typing import Sequence

from lafite_core.store import layout
from lafite_core.store.layout import REPORT_PAGE
from lafite_core.store.storage import Store

IMAGE_DIR = "images"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f0f0f0; } td.l, th.l { text-align: left; }
tr.mean td { font-weight: bold; background: #fafafa; }
.missing { color: #a60; font-style: italic; }
.fig { max-width: 100%; height: auto; }
.strip { display: inline-block; margin: .4em 1em .8em 0; vertical-align: top; }
.strip img { margin-right: 3px; border: 1px solid #ddd; }
.caption { font-size: .8em; color: #444; max-width: 48em; word-break: break-all; }
dl.kv { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dl.kv dt { font-weight: bold; } dl.kv dd { margin: 0; }
"""

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal; "-" for None."""
    return "-" if value is None else f"{100 * value:.1f}"


class Page:
    """Markup parts and images of one report; :meth:`files` renders them as {relative path: bytes}."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []
        self.images: dict[str, bytes] = {}

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def section(self, title: str) -> None:
        self.add(f"<h2>{esc(title)}</h2>")

    def missing(self, why: str) -> None:
        self.add(f'<p class="missing">{esc(why)}</p>')

    def image(self, name: str, png: bytes, alt: str, css: str = "fig", width: int | None = None) -> str:
        """The <img> markup of a PNG kept as ``images/<name>.png``; names are plain and unique."""
        if not _NAME.match(name) or name in self.images:
            raise ValueError(f"image name {name!r} is not a plain, unused file name")
        self.images[name] = png
        data = base64.b64encode(png).decode("ascii")
        size = f' width="{width}"' if width else ""
        return (f'<img class="{css}" src="data:image/png;base64,{data}" alt="{esc(alt)}" '
                f'data-file="{IMAGE_DIR}/{name}.png"{size}>')

    def table(self, head: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1,
              classes: Sequence[str] | None = None) -> None:
        """A table; the first ``left`` columns left-aligned (names), the rest right-aligned (numbers)."""
        def cells(tag: str, values: Sequence[object]) -> str:
            return "".join(f'<{tag}{" class=l" if i < left else ""}>{esc(v)}</{tag}>' for i, v in enumerate(values))

        body = "".join(f'<tr{f" class={esc(c)}" if c else ""}>{cells("td", r)}</tr>'
                       for r, c in zip(rows, classes or [""] * len(rows)))
        self.add(f"<table><tr>{cells('th', head)}</tr>{body}</table>")

    def facts(self, items: Sequence[tuple[str, object]]) -> None:
        self.add('<dl class="kv">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>")

    def files(self) -> dict[str, bytes]:
        """{"index.html": page, "images/<name>.png": png, ...}."""
        created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(self.title)}</title>'
                f"<style>{_STYLE}</style></head><body><h1>{esc(self.title)}</h1>"
                f"<p>report written {created}</p>\n" + "\n".join(self.parts) + "\n</body></html>\n")
        return {REPORT_PAGE: page.encode(), **{f"{IMAGE_DIR}/{n}.png": png for n, png in self.images.items()}}


def write_files(store: Store, run_id: str, files: dict[str, bytes]) -> str:
    """Write a report's files under ``reports/<run_id>/``, the page last; returns the page's URL."""
    for path in sorted(files, key=lambda p: p == REPORT_PAGE):
        store.write_bytes(layout.report(run_id, *path.split("/")), files[path])
    return store.url(*layout.report(run_id, REPORT_PAGE))
