"""The docs/ pages tell the truth: every flag of main.py, the models with their shapes, and the generated results."""
from __future__ import annotations

from pathlib import Path

import pytest

import main
from conftest import ROOT

DOCS = ROOT / "docs"


def markdown_table(text: str, header_start: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first markdown table whose header row starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_flags_page_names_every_flag() -> None:
    page = (DOCS / "flags.md").read_text()
    parser = main.get_args_parser()
    flags = [opt for action in parser._actions for opt in action.option_strings if opt not in ("-h", "--help")]
    missing = [flag for flag in flags if f"`{flag}`" not in page]
    assert not missing, f"docs/flags.md does not document: {missing}"


def test_flags_page_model_table_is_models_model_names_with_their_shapes() -> None:
    import torch

    import models

    rows = markdown_table((DOCS / "flags.md").read_text(), "| `--model` |")
    names = [row[0].strip("`") for row in rows]
    assert sorted(names) == sorted(models.MODEL_NAMES), "the table must list exactly the models --help offers"
    for row in rows:
        with torch.device("meta"):
            model = models.create_model(row[0].strip("`"))
        arch = models.architecture(model)
        shape = f"{arch['embed_dim']} / {arch['depth']} / {arch['block_heads'][0]} / {arch['block_mlp_hidden'][0]}"
        assert row[1] == shape and row[2] == f"{model.patch_embed.patch_size[0]} / {arch['img_size']}", row


def test_results_page_section_is_the_generated_one() -> None:
    from benchmarks import readme_results

    page = readme_results.PAGE.read_text()
    assert readme_results.PAGE == DOCS / "results.md"
    section = page[page.index(readme_results.START):page.index(readme_results.END) + len(readme_results.END)]
    assert section == readme_results.render(), "run `python benchmarks/readme_results.py` after new results"


def test_results_generator_rewrites_only_the_marked_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import readme_results

    page = tmp_path / "results.md"
    page.write_text(f"# Results\n\nkept above\n\n{readme_results.START}\nstale\n{readme_results.END}\n\nkept below\n")
    monkeypatch.setattr(readme_results, "PAGE", page)
    readme_results.main()
    assert page.read_text() == f"# Results\n\nkept above\n\n{readme_results.render()}\n\nkept below\n"
    page.write_text("# Results\n\nno markers\n")
    with pytest.raises(SystemExit, match="error: .*lacks the marker lines"):
        readme_results.main()


def test_every_difference_to_dense_is_configuration_minus_dense() -> None:
    """One sign convention in both generated tables: Δ = configuration − dense, negative when below dense."""
    from benchmarks import report, study
    from benchmarks.paired import by_seed, paired_gap
    from benchmarks.paired import read_rows as read_csv_rows

    fake = [{"config": c, "seed": 0, "test_acc1": acc, "params": 1, "params_nonzero": 1, "mmacs_theoretical": 1,
             "mmacs_executed": 1, "samples_per_sec": 1} for c, acc in (("dense", 90.0), ("sviite_d50", 80.0))]
    assert [s["delta_vs_dense"].mean for s in study.summarize(fake)] == [0.0, -10.0]

    page = (DOCS / "results.md").read_text()
    header = "| configuration | seeds | top-1 (mean ± std) | " + report.DELTA_VS_DENSE
    assert header in page and report.DELTA_VS_DENSE.endswith("(config − dense)")
    ours = {row[0]: float(row[3].split()[0]) if row[3] else 0.0 for row in markdown_table(page, header)}
    beside = {row[0]: float(row[4]) for row in markdown_table(page, "| configuration | paper setting")}
    assert len(ours) > 2 and beside.keys() == ours.keys()
    rows = read_csv_rows(ROOT / "benchmarks" / "results" / "study" / "study.csv")
    for config, delta in ours.items():
        assert delta == beside[config], config  # the same number, with the same sign, in both tables
        paired = paired_gap(by_seed(rows, config), by_seed(rows, "dense")).mean  # configuration − dense, per seed
        assert abs(delta - paired) <= 0.005, config
