"""ISGD under DistributedDataParallel: two gloo ranks launched by torchrun (one launch, two phases)."""
import json
from pathlib import Path

import pytest
import torch.distributed
from helpers import chosen_seed
from procs import check, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "isgd_ddp.py"

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")]


@pytest.fixture(scope="module")
def result():
    seed = chosen_seed()
    output = check(torchrun(SCRIPT, str(seed), "gloo", nproc=2, timeout=180))  # explicit: nccl would be the
    # default pick on a GPU machine, and these tests are about the CPU path
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_ranks_agree_and_match_a_single_process_run(result):
    stats = result["stats"]
    assert stats[0]["chased_batches"] > 0, "the data must make ISGD chase"
    assert result["ranks_identical"]
    assert stats[0] == stats[1]  # same batches, chases and extra forward/backward passes on both ranks
    assert result["chased"][0] == result["chased"][1] == result["reference_chased"]
    for key in ("batches", "chased_batches", "extra_passes"):
        assert stats[0][key] == result["reference_stats"][key]
    assert result["max_diff_to_single_process"] < 1e-4
    assert result["backend"] == "gloo"


def test_a_closure_returning_a_python_float_agrees_on_every_rank(result):
    """The float is made a tensor on the group's device for the all-reduce: same decisions, same weights."""
    assert result["float_equals_tensor"]
    assert repr(result["float_stats"]) == repr(result["stats"][0])


def test_a_nan_on_one_rank_is_nonfinite_everywhere(result):
    nan_stats = result["nan_stats"]
    assert result["nan_ranks_identical"] and result["nan_finite"]
    assert nan_stats[0]["nonfinite"] == nan_stats[1]["nonfinite"] == 2  # one regular pass, one chase pass
    assert nan_stats[0]["extra_passes"] == nan_stats[1]["extra_passes"]
    assert nan_stats[0]["batches"] == nan_stats[1]["batches"]
