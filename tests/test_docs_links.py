"""Every relative link and every file reference in README.md and docs/*.md resolves inside the repository.

A link ``[text](target)`` resolves relative to the page that holds it, and a ``#fragment`` must name a heading of
the target page. A file reference is a path in backticks (inline or in a code block): one whose first part is a
folder of the repository must exist from the root; a bare source or documentation file name (``.py``, ``.sh``,
``.md``, ``.toml``) must exist somewhere in the repository. Run outputs (``checkpoint.pth``, ``log.txt``, ...) and
paths under other roots (``out/``, ``/data/``) are not files of the repository and are not checked.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCE_SUFFIXES = (".py", ".sh", ".md", ".toml")
TOP_LEVEL = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
REPO_FILES = {p.name for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", page.read_text(), flags=re.M)}


def links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", text)


def file_references(text: str) -> list[str]:
    spans = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    spans += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    refs = []
    for span in spans:
        for token in re.split(r"[\s'\"(),=]+", span):
            token = token.rstrip(".:;")
            if not token or any(c in token for c in "<>*$[]{}") or token.startswith(("/", "http", "-")):
                continue
            first = token.split("/", 1)[0]
            if "/" in token and first in TOP_LEVEL:
                refs.append(token)
            elif "/" not in token and token.endswith(SOURCE_SUFFIXES) and not token.startswith("."):
                refs.append(token)
    return refs


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https://, mailto: ...
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or ROOT not in (resolved, *resolved.parents):
            broken.append(f"{target}: no file {resolved}")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_file_references_resolve(page: Path) -> None:
    refs = file_references(page.read_text())
    missing = [ref for ref in refs if not ((ROOT / ref).exists() if "/" in ref else ref in REPO_FILES)]
    assert not missing, f"{page.name} names files that are not in the repository: {missing}"


def test_the_checks_catch_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    text = ("See `docs/nowhere.md`, `sviite-behaviour.md` and [x](README.md#no-such-heading); `checkpoint.pth` and "
            "`out/digits/log.txt` are outputs.\n```bash\nbash cmd/quickstart.sh\n```\n")
    assert file_references(text) == ["cmd/quickstart.sh", "docs/nowhere.md", "sviite-behaviour.md"]
    assert "no-such-heading" not in anchors(ROOT / "README.md") and "models" in anchors(ROOT / "docs" / "flags.md")
    assert links(text) == ["README.md#no-such-heading"]


def source_files() -> list[Path]:
    return [p for p in ROOT.rglob("*") if p.suffix in (".py", ".sh", ".md") and p != Path(__file__)
            and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def test_no_source_file_points_outside_the_repository() -> None:
    """Runtime messages and comments cite docs/, never the notes this project was built from."""
    pattern = re.compile(r"sviite-behaviour\.md|shared/reference|(?<!docs/)\banchors\.md")
    offenders = [p.relative_to(ROOT).as_posix() for p in source_files() if pattern.search(p.read_text())]
    assert not offenders, offenders


def test_docs_cited_by_code_exist_with_their_headings() -> None:
    """A message or comment citing docs/PAGE.md#heading names a page and a heading that exist."""
    cited = {m for p in source_files() if p.suffix != ".md"
             for m in re.findall(r"docs/[\w.-]+\.md(?:#[\w-]+)?", p.read_text())}
    assert "docs/original-sviite.md#the-mask-index-bug-before-2021-08-14" in cited
    broken = [c for c in cited if not (ROOT / c.split("#")[0]).exists()
              or ("#" in c and c.split("#")[1] not in anchors(ROOT / c.split("#")[0]))]
    assert not broken, broken
