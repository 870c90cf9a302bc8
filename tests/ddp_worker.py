"""torchrun worker: runs main.main with the given flags, then saves this rank's final weights for comparison."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main as entry  # noqa: E402
from training import process  # noqa: E402

runs = []
out = Path(sys.argv[1])
args = entry.get_args_parser().parse_args(sys.argv[2:])
try:
    entry.main(args, on_run=runs.append)
    torch.save(runs[0].model.state_dict(), out / f"weights_rank{os.environ['RANK']}.pt")
finally:
    # As main.py's own entry point does (training/cli.py): a process group left alive at exit can abort the
    # process ("terminate called without an active exception") while gloo's threads are torn down.
    process.shutdown()
