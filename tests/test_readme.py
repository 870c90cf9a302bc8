"""The README is a front door: short, the set-up commands first, one working example per method, and a table of
links that reaches every docs/ page. What it leaves out lives in docs/ (tests/test_docs.py binds that)."""
from __future__ import annotations

import re
import shlex

import checkpoint_tool
import main
from conftest import ROOT

README = ROOT / "README.md"
MAX_LINES = 150


def test_readme_is_at_most_150_lines() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move detail into a docs/ page and link it"


def test_readme_starts_with_the_setup_commands() -> None:
    head = README.read_text()[:600]
    assert "bash cmd/quickstart.sh" in head and "bash cmd/test.sh" in head and "bash cmd/test.sh --fast" in head


def test_readme_links_every_docs_page_and_each_link_resolves() -> None:
    linked = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)\s]*)?\)", README.read_text())
    missing = [target for target in linked if not (ROOT / target).is_file()]
    assert not missing, f"README.md links to docs pages that do not exist: {missing}"
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages - set(linked) == set(), f"README.md's table of links lacks: {sorted(pages - set(linked))}"


def main_commands(text: str, program: str = "main.py") -> list[list[str]]:
    """The arguments of every `python <program> ...` command in the bash blocks of ``text``, continuations joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["python", program]:
                commands.append(words[2:])
    return commands


def test_readme_has_one_parsable_example_per_method() -> None:
    parser = main.get_args_parser()
    runs = [parser.parse_args(argv) for argv in main_commands(README.read_text())]
    tool = checkpoint_tool.get_args_parser()
    evaluations = [tool.parse_args(argv) for argv in main_commands(README.read_text(), "checkpoint_tool.py")]
    examples = {
        "SViTE": [a for a in runs if a.density is not None and a.pruning_type == "unstructure" and not a.token_selection],
        "S²ViTE": [a for a in runs if a.pruning_type.startswith("structure")],
        "SViTE+": [a for a in runs if a.token_selection],
        "evaluation": [a for a in runs + evaluations if a.eval and a.resume],
    }
    assert all(examples.values()), {kind: len(found) for kind, found in examples.items()}


def test_main_commands_reads_continued_lines() -> None:
    text = "```bash\n# a comment\npython main.py --model m \\\n    --density 0.5  # note\nbash cmd/test.sh\n```\n"
    assert main_commands(text) == [["--model", "m", "--density", "0.5"]]
