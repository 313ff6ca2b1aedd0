"""``python -m accel gpucheck``: the dry run this machine can do (no GPU), the runner that keeps each part in
its own process and budget, and what the GPU machine needs (imports without its missing packages, the
selection of GPU tests)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import procs
import pytest

from accel import cli
from accel.gpucheck import PARTS
from accel.gpucheck.record import environment, gpu_slug
from accel.gpucheck.runner import KILL_GRACE_S, run_part
from accel.gpucheck.table import markdown_table, seconds_text, speed_text

TESTS = Path(__file__).resolve().parent
# On the GPU machine (FACTS.md, "The GPU machine"): accel must import without these.
MISSING_ON_GPU_MACHINE = ("tensorly", "tltorch", "tednet", "mnist1d", "mpich")


# -- parts used by the runner tests: run in a child process that imports this module ------------------------
def part_records_then_fails(context):
    context.record.set("measured", 1.5)
    raise ValueError("broken on purpose")


def part_dies_without_a_word(context):
    context.record.set("measured", 2.5)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def part_hangs_with_a_grandchild(context):
    sleeper = subprocess.Popen(["sleep", "600"])
    context.record.set("grandchild", sleeper.pid)
    time.sleep(600)


def part_succeeds(context):
    context.record.row(value=context.scratch.is_dir() and context.device.type)


@pytest.fixture
def parts_here(monkeypatch):
    """Make this module importable in the part processes."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))


def _run(tmp_path, name, budget, log):
    return run_part(name, f"test_gpucheck:{name}", tmp_path / f"{name}.json", tmp_path / "scratch", budget, True,
                    log, environment(True))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie left to a PID 1 that does not reap is dead too


def test_failed_and_crashed_parts_are_reported_and_the_next_part_runs(tmp_path, parts_here):
    with open(tmp_path / "log", "w") as log:
        failed = _run(tmp_path, "part_records_then_fails", 60, log)
        died = _run(tmp_path, "part_dies_without_a_word", 60, log)
        succeeded = _run(tmp_path, "part_succeeds", 60, log)
    assert failed.status == "failed" and failed.record["error"] == "ValueError: broken on purpose"
    assert failed.record["results"] == {"measured": 1.5}  # what it measured before failing is kept
    assert died.status == "failed" and f"exit code {-signal.SIGKILL}" in died.record["error"]
    assert died.record["results"] == {"measured": 2.5}
    assert succeeded.status == "ok" and succeeded.record["rows"] == [{"value": "cpu"}]
    on_disk = json.loads((tmp_path / "part_records_then_fails.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["environment"]["dry_run"] is True
    assert "Traceback" in (tmp_path / "log").read_text()  # the part's output reaches the log


def test_part_over_budget_is_stopped_with_its_partial_results(tmp_path, parts_here):
    budget = 15.0  # time to start Python and torch on a busy machine, and record the first result
    with open(tmp_path / "log", "w") as log:
        start = time.monotonic()
        hung = _run(tmp_path, "part_hangs_with_a_grandchild", budget, log)
        waited = time.monotonic() - start
    assert hung.status == "timed out" and "budget of 15 s" in hung.record["error"]
    # stopped rather than left to hang: it returned at all (pytest-timeout ends a hang), with the status, and no
    # earlier than its budget
    assert budget <= hung.elapsed_s <= waited
    grandchild = hung.record["results"]["grandchild"]
    assert not _alive(grandchild), "the part's own children must be stopped with it"


def test_arguments_are_checked():
    parser = cli.build_parser()
    args = parser.parse_args(["gpucheck", "--out", "x", "--parts", "gemm,bt", "--budget", "gemm=30"])
    assert args.parts == ["gemm", "bt"] and args.budget == [("gemm", 30.0)]
    assert parser.parse_args(["gpucheck", "--out", "x"]).parts == list(PARTS)
    for bad in (["--parts", "gemm,tpu"], ["--budget", "gemm=-1"], ["--budget", "gemm"], ["--budget", "tpu=3"],
                ["--total-budget", "0"], []):
        with pytest.raises(SystemExit):
            parser.parse_args(["gpucheck", *(["--out", "x"] if bad else []), *bad])


def test_parts_beyond_the_total_budget_are_not_run_and_fail_the_run(tmp_path):
    result = procs.run([sys.executable, "-m", "accel", "gpucheck", "--out", str(tmp_path), "--parts", "isgd,bt",
                        "--total-budget", "1", "--dry-run"], timeout=120)
    assert result.returncode == 1, result.stdout
    table = (tmp_path / "gpucheck_dryrun.md").read_text()
    assert "| isgd | NOT RUN |" in table and "| bt | NOT RUN |" in table
    assert "isgd not started" in result.stdout and not (tmp_path / "isgd_dryrun.json").exists()


@pytest.mark.parametrize("name,slug", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
                                       (None, "dryrun")])
def test_gpu_slug(name, slug):
    assert gpu_slug(name) == slug


def test_table_states_failures_and_dry_runs():
    from accel.gpucheck.runner import Outcome

    record = {"status": "timed out", "error": "stopped at its budget of 9 s", "results": {},
              "rows": [{"model": "small", "width": 8, "batch": 4, "isgd_step_ms": 2.0, "sgd_step_ms": 1.0,
                        "overhead": 1.0}]}
    table = markdown_table(environment(True), [Outcome("isgd", "timed out", 9.2, record, Path("x"))],
                           (True, "self-check passed"), 12.0, ["demo"])
    lines = table.splitlines()
    assert lines[0].startswith("**DRY RUN: no GPU was measured.**")
    assert "| runner self-check | ok | self-check passed |" in table
    assert "| isgd | TIMED OUT | timed out after 9 s: stopped at its budget of 9 s |" in table
    assert ("| isgd | TIMED OUT | ISGD step, nothing chased, small MLP (width 8, batch 4) | 2 ms | SGD 1 ms "
            "| +100.0%") in table
    assert "| demo | NOT RUN |" in table
    assert speed_text(2.5) == "2.50x faster" and speed_text(0.5) == "2.00x slower"
    assert seconds_text(1.234) == "1.23 s" and seconds_text(0.0123) == "12.3 ms"


def test_gemm_rows_of_a_gpu_record():
    """The rows only a GPU run produces (pinned bandwidth, cuBLAS-XT), from a record shaped like one."""
    from accel.gpucheck import ooc_bench

    accel_row = dict(kind="accel.gemm", n=16384, precision="fp32", setup="one", seconds=0.5, tflops=17.6,
                     traffic_ratio=1.4, correct=True, in_core_seconds=0.2, ratio_vs_in_core=0.4)
    xt_row = dict(kind="cublasxt", n=16384, precision="fp32", block_dim=8192, seconds=1.0, correct=True)
    record = {"results": {"bandwidth": {"bytes": 1 << 30, "host_to_device_gb_s": 51.2, "device_to_host_gb_s": 49.0,
                                        "pinned": True}, "cublasxt_best_16384": xt_row},
              "rows": [accel_row, {**accel_row, "setup": "gpu_cpu", "correct": False}, xt_row]}
    rows = ooc_bench.table_rows(record)
    assert rows[0] == ("pinned copy of 1024 MiB, host->device / device->host", "51.2 / 49.0 GB/s", "", "")
    assert rows[1][1:] == ("500 ms, 17.6 TFLOP/s, traffic 1.40x 2mnk/sqrt(M)", "in-core torch.matmul 200 ms",
                           "0.40 of in-core speed")
    assert "GPU + CPU workers" in rows[2][0] and rows[2][1].endswith("WRONG RESULT")
    assert rows[3] == ("accel.gemm vs cuBLAS-XT N=16384 fp32 (XT block 8192), 1 GPU", "500 ms", "cuBLAS-XT 1.00 s",
                       "2.00x faster")
    module = ooc_bench.load_cublasxt()  # accel.gpucheck.cublasxt, shipped with the package
    assert callable(module.load_libcublas) and hasattr(module, "CublasXt")


def test_float32_precision_switches_and_restores():
    """TF32 set through the switch the engine uses (torch >= 2.9: fp32_precision; mixing in the legacy
    allow_tf32 then raises), and put back as found, also after an error."""
    import torch

    from accel.gpucheck.record import float32_precision

    switch = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(switch, "fp32_precision") else "allow_tf32"
    on, off = ("tf32", "ieee") if name == "fp32_precision" else (True, False)
    before = getattr(switch, name)
    with pytest.raises(KeyError):
        with float32_precision(True, cudnn=True):
            assert getattr(switch, name) == on
            with float32_precision(False):
                assert getattr(switch, name) == off
            assert getattr(switch, name) == on
            raise KeyError("inside")
    assert getattr(switch, name) == before


def test_gpu_tests_are_selected(tmp_path):
    """``-m cuda`` with gpucheck's plugin picks every test skipped without a GPU, and nothing else."""
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "cuda",
               "-p", "accel.gpucheck.pytest_gpu_tests", "tests/test_gemm_cuda.py", "tests/test_isgd.py"]
    output = procs.check(procs.run(command, timeout=120))
    selected = [line for line in output.splitlines() if "::" in line]
    assert any("test_cuda_foreach_default_matches_cpu_for_loop" in line for line in selected)  # marked cuda
    assert any("test_each_dtype_cuda" in line for line in selected)  # only skipped without a GPU
    assert not any("emulated" in line or "test_inconsistent_around_plain_sgd" in line for line in selected)


def test_imports_without_the_packages_the_gpu_machine_lacks():
    blocker = (
        "import importlib, sys\n"
        "class Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {MISSING_ON_GPU_MACHINE!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (absent on the GPU machine)')\n"
        "sys.meta_path.insert(0, Missing())\n"
        "import accel.cli, accel.demo, accel.nn.recurrence.modules, accel.nn.bt.decompose, accel.nn.ooc_linear, accel.ooc.workers.cuda\n"
        "from accel.gpucheck import PARTS\n"
        "for part in PARTS.values():\n"
        "    importlib.import_module(part.target.partition(':')[0])\n"
        "import accel.gpucheck.child, accel.gpucheck.pytest_gpu_tests\n"
        "print('imported')\n")
    assert "imported" in procs.check(procs.run([sys.executable, "-c", blocker], timeout=120))


@pytest.mark.slow
def test_dry_run(tmp_path):
    """The whole command without a GPU: every part's stand-in, its files and table, exit 0. (``--dry-run``
    changes nothing here; on a GPU machine it keeps this test a dry run.)"""
    out, results = tmp_path / "out", tmp_path / "results"
    result = procs.run([sys.executable, "-m", "accel", "gpucheck", "--out", str(out), "--results", str(results),
                        "--dry-run"], timeout=280)
    output = procs.check(result)
    assert "DRY RUN, no GPU measured" in output.splitlines()[0]
    assert "DRY RUN: no GPU was measured" in output
    names = sorted(path.name for path in out.rglob("*"))
    assert names == sorted([f"{part}_dryrun.json" for part in PARTS] + ["gpucheck_dryrun.md", "gpucheck_dryrun.log"])
    assert len(names) <= 8 and all(path.is_file() for path in out.iterdir())  # what the device tool sends back
    assert not results.exists()  # a dry run's figures are not results
    records = {part: json.loads((out / f"{part}_dryrun.json").read_text()) for part in PARTS}
    for part, record in records.items():
        assert record["status"] == "ok", (part, record["error"])
        env = record["environment"]
        assert env["dry_run"] is True and env["gpu_name"] is None and env["torch"] and "cuda" in env
        assert 0 < record["elapsed_s"] <= record["budget_s"] + KILL_GRACE_S
    counts = records["device_checks"]["results"]["counts"]
    assert counts["failed"] == 0 and counts["passed"] >= 4 and counts["needs a GPU"] >= 1
    assert "needs a GPU" in output
    gemm_rows = records["gemm"]["rows"]
    assert {(row["setup"], row["precision"]) for row in gemm_rows} >= {
        ("one", "fp32"), ("one", "tf32"), ("one", "bf16"), ("two_on_one_gpu", "bf16"), ("gpu_cpu", "fp32")}
    assert all(row["correct"] and row["traffic_ratio"] >= 1 for row in gemm_rows)
    assert {row["path"] for row in records["bt"]["rows"]} == {"auto", "gemm", "dense", "lowrank"}
    assert {row["kind"] for row in records["bt"]["rows"]} == {"BTLinear", "BTLSTM"}
    assert records["isgd"]["rows"] and records["demo"]["results"]["report"]["device"] == "cpu"
    table = (out / "gpucheck_dryrun.md").read_text()
    assert output.rstrip().endswith(table.rstrip())  # the table is printed last
    assert "| runner self-check | ok |" in table
    for part in PARTS:
        assert f"| {part} | ok |" in table


def test_gpucheck_needs_only_the_installed_package(tmp_path):
    """From another folder, with the repository's tests/ and experiments/ out of reach (only the accel package on
    the path, as after a pip install), the dry run of the device checks and the gemm part passes, and no record is
    copied anywhere."""
    package_only = tmp_path / "site"
    package_only.mkdir()
    (package_only / "accel").symlink_to(TESTS.parent / "accel", target_is_directory=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(package_only)}
    probe = procs.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('experiments'), "
                       "u.find_spec('helpers'), u.find_spec('conftest'))"], timeout=60, cwd=elsewhere, env=env)
    assert procs.check(probe).split() == ["None", "None", "None"]
    result = procs.run([sys.executable, "-m", "accel", "gpucheck", "--out", str(tmp_path / "out"), "--dry-run",
                        "--parts", "device_checks,gemm"], timeout=280, cwd=elsewhere, env=env)
    output = procs.check(result)
    assert "| device_checks | ok |" in output and "| gemm | ok |" in output
    assert "needs a GPU" in output
    assert not (elsewhere / "experiments").exists()


def test_device_check_failure_fails_the_part(monkeypatch, tmp_path):
    """A wrong result in one check is reported by name and fails the part; the other checks still run."""
    from accel.gpucheck import device_checks
    from accel.gpucheck.child import Context
    from accel.gpucheck.record import Recorder

    def wrong(setting):
        raise AssertionError("planted wrong result")

    ran = []
    checks = [device_checks.Check("planted", wrong, ""),
              device_checks.Check("after", lambda setting: ran.append(setting.device.type) or "fine", ""),
              device_checks.Check("gpu only", wrong, "needs a GPU tensor")]
    monkeypatch.setattr(device_checks, "CHECKS", checks)
    record = Recorder(tmp_path / "r.json", "device_checks", environment(True), 10.0)
    context = Context("device_checks", True, __import__("torch").device("cpu"), tmp_path, record, time.monotonic() + 60)
    with pytest.raises(RuntimeError, match="1 of 3 device checks failed: planted"):
        device_checks.run(context)
    assert ran == ["cpu"]
    assert [c["outcome"] for c in record.data["results"]["checks"]] == ["failed", "passed", "needs a GPU"]
