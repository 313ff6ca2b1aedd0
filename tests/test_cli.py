"""`python -m accel info | check | demo`, in this process (launchers are tested in test_launch_*.py)."""
import os
import sys

import procs
import pytest
import torch.distributed as dist
from dist_helpers import SRUN_TWO_NODES_TASK_3, clean_env_fixture  # noqa: F401  (the clean_env fixture)

from accel import cli, distributed


def test_info_reports_versions_devices_launchers_and_detection(clean_env, capsys):
    assert cli.main(["info"]) == 0
    output = capsys.readouterr().out
    for expected in ("torch ", "accel ", "devices:", "gloo yes", "srun ", "mpiexec ", "torchrun ",
                     "launcher single: rank 0 of 1"):
        assert expected in output
    for name, value in SRUN_TWO_NODES_TASK_3.items():
        clean_env.setenv(name, value)
    assert cli.main(["info"]) == 0
    output = capsys.readouterr().out
    assert "launcher slurm: rank 3 of 4, local rank 1 of 2" in output
    assert f"rendezvous at gpu07:{distributed.slurm_port(123456, 2)}" in output
    clean_env.setenv("SLURM_STEP_NODELIST", "gpu[07-")
    assert cli.main(["info"]) == 0
    assert "init() would fail: SLURM_STEP_NODELIST='gpu[07-'" in capsys.readouterr().out


def test_check_single_process(clean_env, capsys):
    assert cli.main(["check"]) == 0
    output = capsys.readouterr().out
    assert "rank 0/1 local 0/1" in output and "launcher single, backend gloo" in output
    assert "replicas identical: yes" in output and "check passed on 1 process(es)" in output
    assert not dist.is_initialized() and not distributed.is_initialized()  # check cleans up


def test_version_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["--version"])
    assert exit_status.value.code == 0 and capsys.readouterr().out.startswith("accel ")
    # `python -m accel` reaches the same parser
    result = procs.run([sys.executable, "-m", "accel", "no-such-command"], timeout=60)
    assert result.returncode == 2 and "invalid choice: 'no-such-command'" in result.stdout


def test_an_mpi_launch_without_mpi4py_is_one_line_naming_the_extra(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "mpi4py.py").write_text("raise ImportError('not installed (test)', name='mpi4py')\n")
    env = procs.child_env(PMI_RANK="0", PMI_SIZE="2")
    env["PYTHONPATH"] = os.pathsep.join([str(blocked), env["PYTHONPATH"]])
    result = procs.run([sys.executable, "-m", "accel", "check"], timeout=120, env=env)
    assert result.returncode == 2, result.stdout
    assert result.stdout.strip().splitlines() == [result.stdout.strip()] and "Traceback" not in result.stdout
    assert result.stdout.startswith("accel check: an MPI launch (PMI_RANK=0 PMI_SIZE=2")
    assert "needs mpi4py, which is not installed: pip install 'accel-train[mpi]'" in result.stdout
