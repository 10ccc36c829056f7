"""Reports: a folder's figures, tables and text as `report.md` and a self-contained `index.html` gallery.

A report is a title, an optional intro and a list of `Section`s, each holding `Item`s (a figure or file, a Markdown
block, or both). The HTML page needs no network: CSS is inline, figures are referenced by relative paths, and the
few Markdown constructs we write (headings, paragraphs, lists, pipe tables, **bold**, `code`, [links](url)) are
converted here rather than by a dependency. Paths are kept relative to the report directory, so the folder can be
moved or zipped.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from qkvtrace.files import atomic_write_text

IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif")


@dataclass
class Item:
    """One thing shown in a section: a figure or file at `path`, a Markdown block, or both (figure first)."""
    caption: str
    path: Path | None = None       # a figure (.png/.svg/.html) or a file to link (.csv); relative to the report dir
    markdown: str | None = None    # a table or text block in Markdown, shown inline


@dataclass
class Section:
    """A heading, Markdown text shown before the items, and the items."""
    title: str
    text: str = ""
    items: list[Item] = field(default_factory=list)


def write_report(out_dir: Path, title: str, sections: list[Section], intro: str = "") -> tuple[Path, Path]:
    """Write `out_dir/report.md` and `out_dir/index.html` (atomically); returns (report.md, index.html).

    Item paths may be absolute or relative to `out_dir`; both files refer to them relative to `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "index.html"
    atomic_write_text(md_path, render_markdown(out_dir, title, sections, intro))
    atomic_write_text(html_path, render_html(out_dir, title, sections, intro))
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
    from urllib.parse import quote

    return quote(rel, safe="/-_.~")


# --- Markdown ---

def render_markdown(out_dir: Path, title: str, sections: list[Section], intro: str = "") -> str:
    """The report as Markdown text."""
    parts = [f"# {title}\n"]
    if intro.strip():
        parts.append(intro.strip() + "\n")
    for section in sections:
        parts.append(f"## {section.title}\n")
        if section.text.strip():
            parts.append(section.text.strip() + "\n")
        for item in section.items:
            if item.path is not None:
                rel = _rel(out_dir, item.path)
                if Path(rel).suffix.lower() in IMAGE_SUFFIXES:
                    parts.append(f"![{_md_text(item.caption)}]({_url(rel)})\n\n*{_md_text(item.caption)}*\n")
                else:
                    parts.append(f"[{_md_text(item.caption)}]({_url(rel)}) (`{rel}`)\n")
            elif item.caption:
                parts.append(f"**{_md_text(item.caption)}**\n")
            if item.markdown and item.markdown.strip():
                parts.append(item.markdown.strip() + "\n")
    return "\n".join(parts)


def _md_text(text: str) -> str:
    """A caption on one line, with the characters that would end a link or image text escaped."""
    return " ".join(text.split()).replace("[", "\\[").replace("]", "\\]").replace("*", "\\*")


# --- HTML ---

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;max-width:1200px;margin:0 auto;
padding:1.5em 2em;background:#fff}
h1{font-size:1.7em;margin:.2em 0 .6em}h2{font-size:1.35em;margin:1.8em 0 .5em;border-bottom:1px solid #ddd;
padding-bottom:.2em}h3,h4{font-size:1.1em;margin:1.2em 0 .4em}
nav{background:#f6f8fa;padding:.6em 1em;border-radius:6px;margin-bottom:1.5em}nav a{margin-right:1.2em}
figure{margin:1.2em 0;padding:0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.92em;margin-top:.3em}
iframe{width:100%;height:560px;border:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:.2em .55em}th{background:#f6f8fa}td.r,th.r{text-align:right}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px;font-size:.92em}
pre{background:#f6f8fa;padding:.7em;overflow-x:auto}.item{margin:1em 0 1.6em}.caption{font-weight:600}
"""


def render_html(out_dir: Path, title: str, sections: list[Section], intro: str = "") -> str:
    """The report as one self-contained HTML page (inline CSS, no scripts, no network)."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    if intro.strip():
        body.append(markdown_to_html(intro))
    if len(sections) > 1:
        links = " ".join(f'<a href="#s{i}">{html.escape(s.title)}</a>' for i, s in enumerate(sections, 1))
        body.append(f"<nav>{links}</nav>")
    for i, section in enumerate(sections, 1):
        body.append(f'<section id="s{i}"><h2>{html.escape(section.title)}</h2>')
        if section.text.strip():
            body.append(markdown_to_html(section.text))
        for item in section.items:
            body.append(_item_html(out_dir, item))
        body.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _item_html(out_dir: Path, item: Item) -> str:
    caption = html.escape(item.caption)
    out = ['<div class="item">']
    if item.path is not None:
        rel = _rel(out_dir, item.path)
        href = html.escape(_url(rel), quote=True)
        suffix = Path(rel).suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            out.append(f'<figure><a href="{href}"><img src="{href}" alt="{caption}" loading="lazy"></a>'
                       f"<figcaption>{caption}</figcaption></figure>")
        elif suffix in (".html", ".htm"):
            out.append(f'<figure><iframe src="{href}" title="{caption}" loading="lazy"></iframe>'
                       f'<figcaption>{caption} (<a href="{href}">open {html.escape(rel)}</a>)</figcaption></figure>')
        else:
            out.append(f'<p><a href="{href}">{caption}</a> <code>{html.escape(rel)}</code></p>')
    elif item.caption:
        out.append(f'<p class="caption">{caption}</p>')
    if item.markdown and item.markdown.strip():
        out.append(markdown_to_html(item.markdown))
    out.append("</div>")
    return "\n".join(out)


_INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|\[([^\]]+)\]\(([^)\s]+)\)|(?<![\w*])\*([^*\s][^*]*?)\*(?!\w)")


def inline_html(text: str) -> str:
    """`code`, **bold**, *italic* and [text](url) in one line of Markdown as escaped HTML; the rest is escaped."""
    out, pos = [], 0
    text = text.replace("\\|", "|")
    for m in _INLINE.finditer(text):
        out.append(_escape_md(text[pos:m.start()]))
        code, bold, link_text, url, italic = m.groups()
        if code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        elif bold is not None:
            out.append(f"<strong>{inline_html(bold)}</strong>")
        elif link_text is not None:
            out.append(f'<a href="{html.escape(url, quote=True)}">{inline_html(link_text)}</a>')
        else:
            out.append(f"<em>{inline_html(italic)}</em>")
        pos = m.end()
    out.append(_escape_md(text[pos:]))
    return "".join(out)


def _escape_md(text: str) -> str:
    """Escape for HTML and drop Markdown's backslash escapes (\\[ -> [)."""
    return html.escape(re.sub(r"\\([\\`*_\[\]()#|!])", r"\1", text))


def _cells(line: str) -> list[str]:
    """Cells of a pipe-table row; `\\|` inside a cell is a literal bar."""
    s = line.strip()
    s = s[1:] if s.startswith("|") else s
    s = s[:-1] if s.endswith("|") and not s.endswith("\\|") else s
    return [c.strip() for c in re.split(r"(?<!\\)\|", s)]


_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def markdown_to_html(text: str) -> str:
    """A small Markdown subset as HTML: #-headings, paragraphs, - / * / 1. lists, pipe tables, ``` blocks,
    images ![alt](src), **bold**, *italic*, `code` and [links](url). Everything else is shown as escaped text."""
    lines = text.strip("\n").splitlines()
    out: list[str] = []
    para: list[str] = []
    i = 0

    def flush():
        if para:
            out.append("<p>" + "<br>\n".join(inline_html(p) for p in para) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if not s:
            flush()
            i += 1
        elif s.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", s):
            flush()
            level = min(len(m.group(1)) + 1, 6)  # the page's own h1/h2 come first
            out.append(f"<h{level}>{inline_html(m.group(2))}</h{level}>")
            i += 1
        elif m := re.match(r"^!\[([^\]]*)\]\(([^)\s]+)\)$", s):
            flush()
            out.append(f'<figure><img src="{html.escape(m.group(2), quote=True)}" alt="{html.escape(m.group(1))}">'
                       "</figure>")
            i += 1
        elif s.startswith("|") and i + 1 < len(lines) and _RULE.match(lines[i + 1]):
            flush()
            header = _cells(s)
            aligns = ["r" if c.strip().endswith(":") else "" for c in _cells(lines[i + 1])]
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                rows.append(_cells(lines[j]))
                j += 1
            cls = lambda k: f' class="{aligns[k]}"' if k < len(aligns) and aligns[k] else ""
            head = "".join(f"<th{cls(k)}>{inline_html(c)}</th>" for k, c in enumerate(header))
            body = "".join("<tr>" + "".join(f"<td{cls(k)}>{inline_html(c)}</td>" for k, c in enumerate(r)) + "</tr>"
                           for r in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            i = j
        elif re.match(r"^([-*+]|\d+[.)])\s+", s):
            flush()
            ordered = bool(re.match(r"^\d", s))
            tag = "ol" if ordered else "ul"
            items = []
            while i < len(lines) and (m := re.match(r"^\s*([-*+]|\d+[.)])\s+(.*)$", lines[i])):
                items.append(f"<li>{inline_html(m.group(2))}</li>")
                i += 1
            out.append(f"<{tag}>" + "".join(items) + f"</{tag}>")
        else:
            para.append(s)
            i += 1
    flush()
    return "\n".join(out)
