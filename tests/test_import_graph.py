"""The package layering, read from the source: ``sparselearning`` (lowest, installable alone) < ``models`` (networks,
no file format) < ``interop`` (checkpoint formats). An arrow the wrong way fails here, lazy imports included."""
from __future__ import annotations

import ast

from conftest import ROOT

# What a module that knows no file format must not import: the interop package and the serialisers it uses.
FORMAT_MODULES = {"interop", "safetensors", "pickle", "zipfile", "json"}
ABOVE_SPARSELEARNING = {"models", "interop", "training", "benchmarks", "main", "engine", "datasets"}


def imported_modules(source: str) -> set[str]:
    """Every absolute module an AST imports (``import a.b`` and ``from a.b import c`` give ``a.b``), at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def torch_io_calls(source: str) -> set[str]:
    """``torch.save``/``torch.load`` calls: writing or reading a checkpoint without importing a format module."""
    return {f"torch.{node.func.attr}" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("save", "load") and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"}


def package_imports(package: str) -> dict[str, set[str]]:
    """Module path -> the top-level names of what it imports, for every module of ``package``."""
    return {str(path.relative_to(ROOT)): {name.split(".")[0] for name in imported_modules(path.read_text())}
            for path in sorted((ROOT / package).rglob("*.py"))}


def test_the_checkers_see_lazy_and_dotted_imports_and_torch_io() -> None:
    source = "import json\ndef f():\n    from interop.export import load_export\n    return torch.load(p)\n"
    assert imported_modules(source) == {"json", "interop.export"}
    assert torch_io_calls(source) == {"torch.load"}
    assert "models" in package_imports("models")["models/vit.py"]  # models.vit imports models.token_selection


def test_models_knows_no_file_format_and_sparselearning_imports_nothing_above_it() -> None:
    models = package_imports("models")
    assert len(models) >= 6 and "timm" in models["models/vit.py"]  # the walk found the package and reads it
    assert {path: names & FORMAT_MODULES for path, names in models.items() if names & FORMAT_MODULES} == {}
    io_calls = {str(p.relative_to(ROOT)): torch_io_calls(p.read_text()) for p in (ROOT / "models").rglob("*.py")}
    assert {path: calls for path, calls in io_calls.items() if calls} == {}
    lowest = package_imports("sparselearning")
    assert len(lowest) >= 5
    assert {path: names & ABOVE_SPARSELEARNING for path, names in lowest.items() if names & ABOVE_SPARSELEARNING} == {}
