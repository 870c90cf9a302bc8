"""Density reports: a plain-dict record per event, a readable table, and a bar plot.

Records hold only numbers, strings, lists and dicts, so they can go straight into a JSON log line.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple


def density_record(
    event: str,
    step: int,
    death_rate: float,
    shapes: Mapping[str, Sequence[int]],
    active: Mapping[str, int],
    explored: int,
    total_parameters: int,
) -> dict[str, Any]:
    """One report of the current topology.

    Args:
        event: what triggered it, e.g. ``init``, ``update``, ``resume``.
        step: optimizer steps done so far.
        death_rate: death fraction of the schedule at ``step``.
        shapes: masked parameter name -> shape.
        active: masked parameter name -> number of active weights.
        explored: weights of the masked tensors that have ever been active (ITOP "fired" count).
        total_parameters: all parameters of the model, masked or not.

    Returns:
        A dict with ``layers`` (name -> shape, nonzero, numel, density), ``density`` (over the masked tensors),
        ``density_all`` (over all parameters; unmasked tensors count as fully dense), ``explored_rate`` (fraction of
        masked weights ever active), ``nonzero_parameters`` (parameters not removed by a mask) and the counts.
    """
    layers = {}
    for name, shape in shapes.items():
        numel = 1
        for dim in shape:
            numel *= int(dim)
        layers[name] = {"shape": [int(d) for d in shape], "nonzero": active[name], "numel": numel,
                        "density": active[name] / numel}
    masked = sum(layer["numel"] for layer in layers.values())
    nonzero_masked = sum(active.values())
    nonzero = total_parameters - masked + nonzero_masked
    return {
        "event": event,
        "step": step,
        "death_rate": death_rate,
        "layers": layers,
        "density": nonzero_masked / masked,
        "density_all": nonzero / total_parameters,
        "explored_rate": explored / masked,
        "nonzero_parameters": nonzero,
        "masked_parameters": masked,
        "total_parameters": total_parameters,
    }



class UnitCount(NamedTuple):
    """One group of heads or neurons in a ``unit_record``: its units, parameters per unit, active and ever active."""

    name: str
    kind: str
    num_units: int
    unit_size: int
    active: int
    explored: int


def unit_record(event: str, step: int, death_rate: float, groups: Sequence[UnitCount], total_parameters: int,
                swapped: Mapping[str, int]) -> dict[str, Any]:
    """One report of a structured topology, as plain values that ``format_table`` prints and JSON stores.

    ``layers`` has one row per block and kind (``blocks.3.attn.heads``: shape [H], nonzero = heads kept).
    ``density`` and ``explored_rate`` are weighted by parameters over all unit slices (masked or not).
    ``nonzero_parameters`` is the parameter count of the compacted model. ``explored_heads`` and ``explored_neurons``
    are the fractions of units ever active. ``swapped_*`` counts the units that joined in the last update
    (``swapped`` by kind).
    """
    layers: dict[str, dict[str, Any]] = {}
    kept: dict[str, list[int]] = {"head": [], "neuron": []}
    units = {"head": [0, 0], "neuron": [0, 0]}  # total, explored
    unit_params = active_params = explored_params = 0
    for g in groups:
        unit_params += g.unit_size * g.num_units
        active_params += g.unit_size * g.active
        explored_params += g.unit_size * g.explored
        kept[g.kind].append(g.active)
        units[g.kind][0] += g.num_units
        units[g.kind][1] += g.explored
        label = f"{g.name}.{'heads' if g.kind == 'head' else 'neurons'}"
        layers[label] = {"shape": [g.num_units], "nonzero": g.active, "numel": g.num_units,
                         "density": g.active / g.num_units}
    nonzero = total_parameters - unit_params + active_params
    return {
        "event": event,
        "step": step,
        "death_rate": death_rate,
        "pruning_type": "structure",
        "layers": layers,
        "density": active_params / unit_params,
        "density_all": nonzero / total_parameters,
        "explored_rate": explored_params / unit_params,
        "nonzero_parameters": nonzero,
        "unit_parameters": unit_params,
        "total_parameters": total_parameters,
        "heads_kept": kept["head"],
        "neurons_kept": kept["neuron"],
        "explored_heads": units["head"][1] / max(units["head"][0], 1),
        "explored_neurons": units["neuron"][1] / max(units["neuron"][0], 1),
        "swapped_heads": swapped["head"],
        "swapped_neurons": swapped["neuron"],
    }

def format_table(record: Mapping[str, Any]) -> str:
    """A fixed-width per-layer table of a ``density_record``, with the global numbers in the last line."""
    layers = record["layers"]
    width = max([len("layer")] + [len(name) for name in layers])
    lines = [
        f"sparsity {record['event']} at step {record['step']} (death rate {record['death_rate']:.4f})",
        f"{'layer':<{width}}  {'shape':>16}  {'density':>7}  {'nonzero':>11}  {'numel':>11}",
    ]
    for name, layer in layers.items():
        shape = "x".join(str(d) for d in layer["shape"])
        lines.append(
            f"{name:<{width}}  {shape:>16}  {layer['density']:>7.4f}  {layer['nonzero']:>11,}  {layer['numel']:>11,}"
        )
    lines.append(
        f"masked density {record['density']:.4f} | density of all parameters {record['density_all']:.4f} "
        f"({record['nonzero_parameters']:,} of {record['total_parameters']:,}) | explored {record['explored_rate']:.4f}"
    )
    if "other_density_kept" in record:  # a StructuredDST record: the densities its whole units come to
        multiples = sorted(set(record["neuron_multiples"]))
        lines.append(
            f"heads kept {record['atten_density_kept']:.4f} (asked {record['atten_density']}) | MLP neurons kept "
            f"{record['other_density_kept']:.4f} (asked {record['other_density']}, in multiples of "
            f"{'/'.join(map(str, multiples))})"
        )
    return "\n".join(lines)


def plot_densities(record: Mapping[str, Any], path: str | Path) -> Path:
    """Write a horizontal bar plot of the per-layer densities of ``record`` to ``path`` (PNG) and return the path.

    matplotlib is imported here so that importing the library stays light. The figure is drawn on an Agg canvas
    directly rather than through pyplot, so the caller's global backend and figure registry are untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(record["layers"])
    densities = [record["layers"][name]["density"] for name in names]
    fig = Figure(figsize=(8, 1.0 + 0.22 * len(names)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.barh(range(len(names)), densities, color="tab:blue")
    ax.axvline(record["density"], color="tab:red", linestyle="--", label=f"overall {record['density']:.3f}")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("density")
    ax.set_title(f"per-layer density, {record['event']} at step {record['step']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path
