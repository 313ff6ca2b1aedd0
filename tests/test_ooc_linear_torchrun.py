"""A collective writing into OutOfCoreLinear's parameters (torchrun, 2 gloo ranks): no stale tile."""
import json

import procs
import pytest

pytestmark = pytest.mark.multiprocess
SCRIPT = procs.REPO_ROOT / "tests" / "scripts" / "ooc_broadcast.py"


def test_broadcast_into_the_weight_is_seen_on_every_rank(seed, tmp_path):
    output = procs.check(procs.torchrun(SCRIPT, nproc=2, timeout=120,
                                        env=procs.child_env(OOC_SEED=str(seed), OOC_REPORT_DIR=str(tmp_path))))
    reports = {}
    for path in tmp_path.glob("rank*.json"):
        report = json.loads(path.read_text())
        reports[report["rank"]] = report
    assert sorted(reports) == [0, 1], output
    for report in reports.values():
        assert report["backend"] == "gloo"
        assert max(report["forward_errors"]) < 1e-12  # rank 1's forward uses the broadcast weight
        assert max(report["twin_errors"]) < 1e-10  # and training matches nn.Linear's
        assert report["ranks_differ"] == 0.0
