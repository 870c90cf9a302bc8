"""The README tells the truth: it names every flag of main.py and the two set-up commands."""
from __future__ import annotations

import main
from conftest import ROOT


def test_readme_names_every_flag() -> None:
    readme = (ROOT / "README.md").read_text()
    parser = main.get_args_parser()
    flags = [opt for action in parser._actions for opt in action.option_strings if opt not in ("-h", "--help")]
    missing = [flag for flag in flags if f"`{flag}`" not in readme]
    assert not missing, f"README.md does not document: {missing}"


def test_readme_starts_with_the_two_setup_commands() -> None:
    head = (ROOT / "README.md").read_text()[:600]
    assert "bash cmd/quickstart.sh" in head and "bash cmd/test.sh" in head


def test_readme_results_section_is_the_generated_one() -> None:
    from benchmarks import readme_results

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(readme_results.START):readme.index(readme_results.END) + len(readme_results.END)]
    assert section == readme_results.render(), "run `python benchmarks/readme_results.py` after new results"
