"""MkDocs hooks (see `hooks:` in mkdocs.yml).

- Links from a docs page to a repository file outside `docs/` (`../examples/sft_distill.py`, `../tests/...`) work on
  GitHub as they are; on the site they become links to the file on GitHub.
- `cli.md` gets the `--help` output of every `hf-distill` command, rendered from the parsers at build time
  (`docs/gen_cli.py`), at its `<!-- cli-reference -->` marker or else at the end.
- Docstrings' cross-references in the transformers style (`` [`DistillationConfig`] ``,
  `` [`~transformers.PreTrainedModel`] ``) show as plain code on the API page, without brackets or module path.
"""

from __future__ import annotations

import posixpath
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO_BLOB = "https://github.com/hf-distill/hf-distill/blob/main/"
_BRACKETED_CODE = re.compile(r"\[<code>(~?)([^<]*)</code>\]")
_LINK = re.compile(r"(\]\()(\.\./[^)#\s]+)(#[^)\s]*)?(\))")


def _repository_links(markdown: str, page_path: str) -> str:
    page_dir = posixpath.dirname(page_path)

    def rewrite(match: re.Match) -> str:
        target = posixpath.normpath(posixpath.join("docs", page_dir, match.group(2)))
        if target.startswith("docs/") or target.startswith(".."):
            return match.group(0)
        return f"{match.group(1)}{REPO_BLOB}{target}{match.group(3) or ''}{match.group(4)}"

    return _LINK.sub(rewrite, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = _repository_links(markdown, page.file.src_uri)
    if page.file.src_uri == "cli.md":
        sys.path.insert(0, str(DOCS))
        try:
            from gen_cli import MARKER, render_cli_reference
        finally:
            sys.path.remove(str(DOCS))
        reference = render_cli_reference()
        markdown = markdown.replace(MARKER, reference) if MARKER in markdown else f"{markdown.rstrip()}\n\n{reference}"
    return markdown


def on_page_content(html: str, page, config, files) -> str:
    if page.file.src_uri == "api.md":
        # `[`~transformers.PreTrainedModel`]` shows as `PreTrainedModel`, `[`DistillationConfig`]` as is
        html = _BRACKETED_CODE.sub(lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>", html)
    return html
