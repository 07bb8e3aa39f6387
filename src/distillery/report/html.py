"""Self-contained HTML reports: the Markdown the lab writes (headings, paragraphs, lists and
pipe tables) turned into HTML, PNG plots embedded as data URIs, the config, the command line,
the hardware and a timestamp. No external URL is referenced, so a file can be mailed alone."""

from __future__ import annotations

import base64
import html
import os
import re
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch
import yaml

from distillery.files import atomic_write_text

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
code, pre { font-family: ui-monospace, monospace; background: #f5f5f5; }
pre { padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
img { max-width: 100%; }
.meta td:first-child { font-weight: bold; }
"""
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`]+)`")
BOLD = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
ITALIC = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
LIST_ITEM = re.compile(r"^\s*(?:[-*]|\d+\.)\s+")


def machine() -> str:
    """A short name of this machine: the GPU's name, else the CPU core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu, {os.cpu_count()} cores"


def png_data_uri(png: Path | bytes) -> str:
    """A PNG (a file, or its bytes) as a ``data:`` URI."""
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(image: Path | tuple[str, bytes]) -> str:
    name, data = (image.name, image.read_bytes()) if isinstance(image, Path) else image
    alt = html.escape(Path(name).stem)
    return (
        f'<figure><img alt="{alt}" src="{png_data_uri(data)}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
    )


def _image(alt: str, src: str, base: Path | None) -> str:
    path = Path(src) if base is None else base / src
    if src.startswith(("http:", "https:", "//")) or not path.is_file():
        return html.escape(f"[{alt}: {src}]")  # kept as text: nothing is fetched
    return f'<img alt="{html.escape(alt)}" src="{png_data_uri(path)}">'


def inline(text: str, base: Path | None = None) -> str:
    """One line of Markdown as escaped HTML: code spans, bold, italics, images, links as text."""
    pieces, last = [], 0
    for match in CODE.finditer(text):  # code spans are kept verbatim (escaped)
        pieces.append(_plain(text[last : match.start()], base))
        pieces.append(f"<code>{html.escape(match.group(1))}</code>")
        last = match.end()
    pieces.append(_plain(text[last:], base))
    return "".join(pieces)


def _plain(text: str, base: Path | None) -> str:
    images: list[str] = []

    def keep(match: re.Match[str]) -> str:
        images.append(_image(match.group(1), match.group(2), base))
        return f"\x00{len(images) - 1}\x00"

    text = html.escape(IMAGE.sub(keep, text), quote=False)
    text = LINK.sub(lambda m: f"{m.group(1)} ({m.group(2)})", text)
    text = BOLD.sub(r"<strong>\1</strong>", text)
    text = ITALIC.sub(r"<em>\1</em>", text)
    return re.sub("\x00(\\d+)\x00", lambda m: images[int(m.group(1))], text)


def split_row(line: str) -> list[str]:
    """The cells of one pipe-table row (``\\|`` is a literal bar)."""
    line = line.strip().removeprefix("|")
    line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def _is_separator(line: str) -> bool:
    cells = split_row(line)
    return bool(cells) and all(re.fullmatch(r":?-{1,}:?", c) for c in cells)


def table_html(lines: list[str], base: Path | None = None) -> str:
    """A Markdown pipe table (header, ``|---|---:|`` separator, rows) as an HTML table."""
    header, rows = split_row(lines[0]), [split_row(line) for line in lines[2:]]
    align = []
    for cell in split_row(lines[1]):
        align.append("right" if cell.endswith(":") and not cell.startswith(":") else "left")
    if all(a == "left" for a in align):
        align = ["left"] * len(header)

    def cells(row: list[str], tag: str) -> str:
        padded = row + [""] * (len(header) - len(row))
        return "".join(
            f'<{tag} style="text-align:{align[i] if i < len(align) else "left"}">'
            f"{inline(c, base)}</{tag}>"
            for i, c in enumerate(padded)
        )

    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    return f"<table><thead><tr>{cells(header, 'th')}</tr></thead><tbody>{body}</tbody></table>"


def markdown_to_html(text: str, base: Path | None = None) -> str:
    """The Markdown the lab writes as HTML: ``#`` headings, pipe tables, ``-`` lists, fenced
    code, paragraphs; images relative to ``base`` are embedded."""
    out: list[str] = []
    lines, i = text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            stop = len(lines) if end is None else end
            out.append(f"<pre>{html.escape(chr(10).join(lines[i + 1 : stop]))}</pre>")
            i = stop + 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", line):
            level = len(m.group(1))
            out.append(f"<h{level}>{inline(m.group(2), base)}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _is_separator(lines[i + 1]):
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out.append(table_html(lines[i:j], base))
            i = j
        elif LIST_ITEM.match(line):
            items: list[str] = []
            while i < len(lines) and lines[i].strip():
                if LIST_ITEM.match(lines[i]) or not items:
                    items.append(LIST_ITEM.sub("", lines[i]))
                else:
                    items[-1] += " " + lines[i].strip()
                i += 1
            out.append("<ul>" + "".join(f"<li>{inline(t, base)}</li>" for t in items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not _starts_block(lines, i):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{inline(' '.join(para), base)}</p>")
    return "\n".join(out)


def _starts_block(lines: list[str], i: int) -> bool:
    line = lines[i]
    table = line.lstrip().startswith("|") and i + 1 < len(lines) and _is_separator(lines[i + 1])
    return table or line.startswith(("#", "```")) or bool(LIST_ITEM.match(line))


def referenced_images(markdown: str, base: Path) -> set[Path]:
    """The files ``![alt](file)`` images in ``markdown`` point to, relative to ``base``."""
    return {Path(base) / m.group(2) for m in IMAGE.finditer(markdown)}


def first_heading(markdown: str, default: str) -> str:
    """The text of the first ``#`` heading, else ``default``."""
    found = re.search(r"^#{1,6}\s+(.+)$", markdown, flags=re.MULTILINE)
    return found.group(1).strip() if found else default


def html_page(
    title: str,
    markdown: str,
    *,
    images: Sequence[Path | tuple[str, bytes]] = (),
    base: Path | None = None,
    config: str | dict | None = None,
    command: str | None = None,
    hardware: str | None = None,
) -> str:
    """One self-contained page: the Markdown, then ``images`` (PNG files or (name, bytes)
    pairs, embedded), the config (YAML),
    the command line, the hardware and when it was written."""
    if isinstance(config, dict):
        config = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    command = command if command is not None else shlex.join(sys.argv)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    body = markdown_to_html(markdown, base)
    if not body.lstrip().startswith("<h1>"):
        body = f"<h1>{html.escape(title)}</h1>\n{body}"
    figures = "".join(_figure(image) for image in images)
    meta = [("command", command), ("hardware", hardware or machine()), ("written", stamp)]
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(v)}</code></td></tr>" for k, v in meta
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        body,
        f"<h2>Plots</h2>{figures}" if figures else "",
        f"<h2>Config</h2><pre>{html.escape(config)}</pre>" if config else "",
        f'<h2>Provenance</h2><table class="meta">{rows}</table>',
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def write_html(dest: Path, title: str, markdown: str, **kw: object) -> Path:
    """``html_page(title, markdown, **kw)`` written atomically to ``dest``."""
    atomic_write_text(Path(dest), html_page(title, markdown, **kw))  # type: ignore[arg-type]
    return Path(dest)
