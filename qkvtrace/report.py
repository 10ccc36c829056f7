"""Reports as data: a `Report` is a title, intro blocks and `Section`s of blocks (`Paragraph`, `Bullets`, `Table`,
`Figure`, `FileLink`), rendered from the same objects to `report.md` and to a self-contained `index.html`.

Nothing is rendered and then parsed back: each block knows how to write itself as Markdown and as HTML. Inline
text is plain; a table cell or a bullet may be `Code`, `Strong` or a list of those and strings. The HTML page needs
no network (inline CSS, no scripts); paths are kept relative to the report directory, so the folder can be moved or
zipped. A `Figure` may carry an `interactive` page (e.g. a plotly HTML file) that index.html links beside the image.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif")


# --- inline content ---

@dataclass(frozen=True)
class Code:
    """Inline code: `x` in Markdown, <code> in HTML."""
    text: str


@dataclass(frozen=True)
class Strong:
    """Bold text."""
    text: str


Inline = str | Code | Strong | list  # a list of Inline pieces is shown one after the other


def _md_inline(x: Inline) -> str:
    if isinstance(x, list):
        return "".join(_md_inline(p) for p in x)
    if isinstance(x, Code):
        tick = "``" if "`" in x.text else "`"
        return f"{tick}{x.text}{tick}" if x.text else ""
    if isinstance(x, Strong):
        return f"**{_md_escape(x.text)}**"
    return _md_escape(str(x))


def _html_inline(x: Inline) -> str:
    if isinstance(x, list):
        return "".join(_html_inline(p) for p in x)
    if isinstance(x, Code):
        return f"<code>{html.escape(x.text)}</code>"
    if isinstance(x, Strong):
        return f"<strong>{html.escape(x.text)}</strong>"
    return html.escape(str(x))


def _md_escape(text: str) -> str:
    """Plain text in Markdown: the characters that would start emphasis, links or break a table are escaped."""
    for ch in "\\*_[]|`":
        text = text.replace(ch, "\\" + ch)
    return text


def _plain(x: Inline) -> str:
    if isinstance(x, list):
        return "".join(_plain(p) for p in x)
    return x.text if isinstance(x, (Code, Strong)) else str(x)


# --- blocks ---

@dataclass
class Paragraph:
    """A paragraph of inline content."""
    text: Inline


@dataclass
class Bullets:
    """An unordered list."""
    items: list


@dataclass
class Table:
    """A table: `columns` headers and `rows` of cells (Inline, int or float; numbers are right-aligned and shown
    with `number_format`)."""
    columns: list
    rows: list
    caption: str = ""
    number_format: str | list = "{:.3f}"   # one format, or one per column

    def cell(self, value, j: int = 0) -> Inline:
        if isinstance(value, bool) or value is None or isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            fmt = self.number_format if isinstance(self.number_format, str) else self.number_format[j]
            return fmt.format(value)
        return value

    def numeric(self, j: int) -> bool:
        return bool(self.rows) and all(isinstance(r[j], (int, float)) and not isinstance(r[j], bool)
                                       for r in self.rows)


@dataclass
class Figure:
    """An image (or an HTML figure shown in a frame) with its caption. `interactive`: an optional HTML page of
    the same figure (e.g. plotly), linked beside the image in index.html and after it in report.md."""
    path: Path
    caption: str
    interactive: Path | None = None


@dataclass
class FileLink:
    """A link to a file of the output (a CSV, a run's run.json)."""
    path: Path
    caption: str


Block = Paragraph | Bullets | Table | Figure | FileLink


@dataclass
class Section:
    """A heading and its blocks."""
    title: str
    blocks: list = field(default_factory=list)


@dataclass
class Report:
    """A whole report: title, intro blocks, sections."""
    title: str
    sections: list[Section]
    intro: list = field(default_factory=list)


def write_report(out_dir: Path | str, report: Report) -> tuple[Path, Path]:
    """Write `out_dir/report.md` and `out_dir/index.html` (atomically) from the same `report`; returns both paths.

    Block paths may be absolute or relative to `out_dir`; both files refer to them relative to `out_dir`.
    """
    from qkvtrace.files import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "index.html"
    atomic_write_text(md_path, render_markdown(out_dir, report))
    atomic_write_text(html_path, render_html(out_dir, report))
    return md_path, html_path


def _rel(out_dir: Path, path: Path | str) -> str:
    """`path` relative to `out_dir`, with forward slashes (URLs and Markdown links want them).

    An absolute path is made relative; a relative one is taken as relative to `out_dir` already, except that a
    path spelled from the current directory through `out_dir` (outputs/x/figures/a.png) has that prefix removed.
    """
    path = Path(path)
    if path.is_absolute():
        return Path(os.path.relpath(path, Path(out_dir).resolve())).as_posix()
    prefix = Path(out_dir).parts
    if prefix and prefix != (".",) and path.parts[:len(prefix)] == prefix:
        path = Path(*path.parts[len(prefix):])
    return path.as_posix()


def _url(rel: str) -> str:
    return quote(rel, safe="/-_.~")


# --- Markdown ---

def render_markdown(out_dir: Path, report: Report) -> str:
    """The report as Markdown text."""
    parts = [f"# {_md_escape(report.title)}\n"]
    parts += [_block_md(out_dir, b) for b in report.intro]
    for section in report.sections:
        parts.append(f"## {_md_escape(section.title)}\n")
        parts += [_block_md(out_dir, b) for b in section.blocks]
    return "\n".join(parts)


def _one_line(text: str) -> str:
    return _md_escape(" ".join(text.split()))


def _block_md(out_dir: Path, b) -> str:
    if isinstance(b, Paragraph):
        return _md_inline(b.text) + "\n"
    if isinstance(b, Bullets):
        return "".join(f"- {_md_inline(i)}\n" for i in b.items)
    if isinstance(b, Table):
        head = (f"**{_one_line(b.caption)}**\n\n" if b.caption else "")
        lines = ["| " + " | ".join(_md_inline(c) for c in b.columns) + " |",
                 "|" + "".join("---:|" if b.numeric(j) else "---|" for j in range(len(b.columns)))]
        lines += ["| " + " | ".join(_md_inline(b.cell(v, j)) for j, v in enumerate(r)) + " |" for r in b.rows]
        return head + "\n".join(lines) + "\n"
    if isinstance(b, Figure):
        rel = _rel(out_dir, b.path)
        text = _one_line(b.caption)
        extra = f" ([interactive]({_url(_rel(out_dir, b.interactive))}))" if b.interactive else ""
        if Path(rel).suffix.lower() in IMAGE_SUFFIXES:
            return f"![{text}]({_url(rel)})\n\n*{text}*{extra}\n"
        return f"[{text}]({_url(rel)}) (`{rel}`){extra}\n"
    if isinstance(b, FileLink):
        rel = _rel(out_dir, b.path)
        return f"[{_one_line(b.caption)}]({_url(rel)}) (`{rel}`)\n"
    raise TypeError(f"not a report block: {b!r}")


# --- HTML ---

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;max-width:1200px;margin:0 auto;
padding:1.5em 2em;background:#fff}
h1{font-size:1.7em;margin:.2em 0 .6em}h2{font-size:1.35em;margin:1.8em 0 .5em;border-bottom:1px solid #ddd;
padding-bottom:.2em}
nav{background:#f6f8fa;padding:.6em 1em;border-radius:6px;margin-bottom:1.5em}nav a{margin-right:1.2em}
figure{margin:1.2em 0;padding:0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.92em;margin-top:.3em}
iframe{width:100%;height:560px;border:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:.2em .55em}th{background:#f6f8fa}td.r,th.r{text-align:right}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px;font-size:.92em}.caption{font-weight:600}
"""


def render_html(out_dir: Path, report: Report) -> str:
    """The report as one self-contained HTML page (inline CSS, no scripts, no network)."""
    body = [f"<h1>{html.escape(report.title)}</h1>"]
    body += [_block_html(out_dir, b) for b in report.intro]
    if len(report.sections) > 1:
        links = " ".join(f'<a href="#s{i}">{html.escape(s.title)}</a>' for i, s in enumerate(report.sections, 1))
        body.append(f"<nav>{links}</nav>")
    for i, section in enumerate(report.sections, 1):
        body.append(f'<section id="s{i}"><h2>{html.escape(section.title)}</h2>')
        body += [_block_html(out_dir, b) for b in section.blocks]
        body.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(report.title)}</title>\n<style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _block_html(out_dir: Path, b) -> str:
    if isinstance(b, Paragraph):
        return f"<p>{_html_inline(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        num = [b.numeric(j) for j in range(len(b.columns))]
        cls = lambda j: ' class="r"' if num[j] else ""
        head = "".join(f"<th{cls(j)}>{_html_inline(c)}</th>" for j, c in enumerate(b.columns))
        rows = "".join("<tr>" + "".join(f"<td{cls(j)}>{_html_inline(b.cell(v, j))}</td>" for j, v in enumerate(r))
                       + "</tr>" for r in b.rows)
        caption = f'<p class="caption">{html.escape(b.caption)}</p>' if b.caption else ""
        return f"{caption}<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if isinstance(b, Figure):
        rel = _rel(out_dir, b.path)
        href = html.escape(_url(rel), quote=True)
        caption = html.escape(b.caption)
        extra = ""
        if b.interactive:
            link = html.escape(_url(_rel(out_dir, b.interactive)), quote=True)
            extra = f' (<a class="interactive" href="{link}">interactive</a>)'
        if Path(rel).suffix.lower() in IMAGE_SUFFIXES:
            return (f'<figure><a href="{href}"><img src="{href}" alt="{caption}" loading="lazy"></a>'
                    f"<figcaption>{caption}{extra}</figcaption></figure>")
        return (f'<figure><iframe src="{href}" title="{caption}" loading="lazy"></iframe>'
                f'<figcaption>{caption} (<a href="{href}">open {html.escape(rel)}</a>){extra}</figcaption></figure>')
    if isinstance(b, FileLink):
        rel = _rel(out_dir, b.path)
        return (f'<p><a href="{html.escape(_url(rel), quote=True)}">{html.escape(b.caption)}</a> '
                f"<code>{html.escape(rel)}</code></p>")
    raise TypeError(f"not a report block: {b!r}")


def similarity_table(t, caption: str = "") -> Table:
    """A compare.SimilarityTable as a report Table: rows = tokens of sentence a, columns = tokens of b."""
    return Table([f"{t.sentence_a} \\ {t.sentence_b}"] + list(t.cols),
                 [[r] + [float(v) for v in row] for r, row in zip(t.rows, t.matrix)], caption=caption,
                 number_format="{:.2f}")
