"""The report as one self-contained HTML page: report.md rendered by markdown-it-py, its figures inlined.

The page is a rendering of the Markdown report, not a second report: whatever report.md says (tables,
figures, notes, definitions) the page says. Figures become `data:` URIs and the style sheet is inline, so the
file can be mailed or opened from anywhere: it loads nothing. Raw HTML in the Markdown is escaped, not passed
through (policy names and run ids come from devices).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from markdown_it import MarkdownIt

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 82rem;
       padding: 0 1.5rem; color: #1d2330; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #d8dde6; }
table { border-collapse: collapse; font-size: 0.82rem; margin: 0.8rem 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #d8dde6; padding: 0.25rem 0.5rem; white-space: nowrap; }
th { background: #eef1f6; } tr:nth-child(even) td { background: #f8f9fb; }
img { max-width: 100%; height: auto; border: 1px solid #e3e7ee; }
code { background: #eef1f6; padding: 0 0.2rem; border-radius: 3px; }
em { color: #4a5468; }
"""

_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"cannot inline {path.name}: not one of {sorted(_MIME)}")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def render_html(markdown_text: str, images_dir: Path, *, title: str = "edgecascade results") -> str:
    """The page for `markdown_text`; images it names are read from `images_dir` (names only, no paths)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown_text)
    for token in tokens:
        for child in token.children or []:
            if child.type != "image":
                continue
            src = str(child.attrGet("src") or "")
            if Path(src).name != src:  # the report names its own files: nothing from elsewhere is read
                raise ValueError(f"image {src!r} is not a file of the report's folder")
            child.attrSet("src", _data_uri(images_dir / src))
    body = md.renderer.render(tokens, md.options, {})
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n{body}</body>\n</html>\n"
    )
