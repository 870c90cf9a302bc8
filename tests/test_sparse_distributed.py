"""Masks agree across DDP ranks by construction: a real 2-process torchrun (gloo, CPU) run."""
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_masking_worker.py")


def test_ddp_ranks_agree_on_masks_and_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for run in ("gradient/none", "random/magnitude"):
        a, b = ranks[0][run], ranks[1][run]
        assert a["updates"] == b["updates"] == [3, 6, 9], run
        assert list(a["masks"]) == ["0.weight", "2.weight", "4.weight"], "FQNs without the DDP 'module.' prefix"
        for name in a["masks"]:
            assert torch.equal(a["masks"][name], b["masks"][name]), f"{run}: mask {name} differs across ranks"
        for name in a["weights"]:
            assert torch.equal(a["weights"][name], b["weights"][name]), f"{run}: weight {name} differs across ranks"
        masked = sum(int(m.sum()) for m in a["masks"].values())
        assert 0 < masked < sum(m.numel() for m in a["masks"].values())

    count_and_index_sum_before, after = ranks[1]["corruption"]
    assert count_and_index_sum_before == after, "the corruption keeps what the old count + index-sum checksum saw"
    for rank in ranks:
        assert "masks differ across ranks" in rank["mismatch_error"], "a corrupted mask must be detected on every rank"
        assert "['0.weight']" in rank["mismatch_error"], "the error names exactly the corrupted layer"
