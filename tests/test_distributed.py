"""accel.distributed without launching anything: detection, SLURM syntaxes, init/shutdown in-process."""
from __future__ import annotations

import dataclasses
import sys
from datetime import timedelta

import procs
import pytest
import torch
import torch.distributed as dist
from dist_helpers import SRUN_TWO_NODES_TASK_3, clean_env_fixture  # noqa: F401  (the clean_env fixture)
from hypothesis import given, settings
from hypothesis import strategies as st

from accel import distributed
from accel.distributed import LaunchError, detect, expand_hostlist, expand_tasks_per_node, launchers, slurm_port

# The environment of task 1 of `srun -n2` on the local test cluster, as captured there.
SRUN_TASK_1 = {
    "SLURM_JOB_ID": "41", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "vm",
    "SLURM_JOB_NODELIST": "vm", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2",
    "SLURMD_NODENAME": "vm",
}
TORCHRUN_RANK_1 = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
OPEN_MPI_RANK_2 = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                   "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
MPICH_RANK_1 = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
                "PMI_FD": "9"}


# ------------------------------------------------------------------------------------ hostlists

@pytest.mark.parametrize("hostlist, hosts", [
    ("vm", ["vm"]),
    ("node[01-03,7],gpu-a[1-2]", ["node01", "node02", "node03", "node7", "gpu-a1", "gpu-a2"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("gpu[5]", ["gpu5"]),
    ("host.example.org,n[1-2].example.org", ["host.example.org", "n1.example.org", "n2.example.org"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist, complaint", [
    ("", "empty host name"),
    ("a,,b", "empty host name"),
    ("n[1-2", "unclosed"),
    ("n1-2]", "unmatched"),
    ("n[[1-2]]", "nested"),
    ("n[a-b]", "bad range"),
    ("n[1-]", "bad range"),
    ("n[]", "bad range"),
    ("n[3-1]", "descending"),
])
def test_expand_hostlist_rejects(hostlist, complaint):
    with pytest.raises(LaunchError, match=complaint) as caught:
        expand_hostlist(hostlist)
    assert repr(hostlist) in str(caught.value)


_prefixes = st.from_regex(r"[a-z][a-z0-9\-]{0,6}[a-z]", fullmatch=True)
_ranges = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 5), st.integers(1, 4)), min_size=1, max_size=4)


@settings(deadline=None)  # a shared, loaded CI machine must not turn slowness into failure
@given(groups=st.lists(st.tuples(_prefixes, _ranges), min_size=1, max_size=4))
def test_expand_hostlist_matches_a_plain_enumeration(groups):
    """Build random hostlists and the host names they stand for independently, then compare."""
    parts, expected = [], []
    for prefix, ranges in groups:
        items = []
        for low, length, width in ranges:
            high = low + length
            low_text = str(low).zfill(width)
            items.append(low_text if length == 0 else f"{low_text}-{high}")
            expected += [prefix + str(number).zfill(width) for number in range(low, high + 1)]
        parts.append(f"{prefix}[{','.join(items)}]")
    assert expand_hostlist(",".join(parts)) == expected


@pytest.mark.parametrize("spec, counts", [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("3,1", [3, 1]),
                                          ("1(x2),8(x1)", [1, 1, 8])])
def test_expand_tasks_per_node(spec, counts):
    assert expand_tasks_per_node(spec) == counts


@pytest.mark.parametrize("spec", ["", "x", "2(x)", "2(x", "2(x3", "2(3)", "-1", "2,,1"])
def test_expand_tasks_per_node_rejects(spec):
    with pytest.raises(LaunchError, match="tasks-per-node"):
        expand_tasks_per_node(spec)


def test_slurm_port_is_in_range_and_separates_jobs_and_steps():
    ports = {slurm_port(job, step) for job in range(1000, 1100) for step in range(3)}
    assert len(ports) == 300 and all(20000 <= port < 30000 for port in ports)
    assert slurm_port(10**7 + 1) == slurm_port(10**7 + 1)


# ------------------------------------------------------------------------------------ detection

def test_detect_single_process():
    launch = detect({"HOME": "/root", "PATH": "/bin"})
    assert (launch.launcher, launch.rank, launch.world_size, launch.master_addr) == ("single", 0, 1, None)


def test_detect_torchrun():
    launch = detect(TORCHRUN_RANK_1)
    assert (launch.launcher, launch.rank, launch.world_size) == ("torchrun", 1, 4)
    assert (launch.local_rank, launch.local_world_size) == (1, 2)
    assert (launch.master_addr, launch.master_port) == ("10.0.0.1", 29500)
    assert dict(launch.variables)["RANK"] == "1"


def test_detect_variables_set_by_hand_assume_one_node():
    launch = detect({"RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (launch.local_rank, launch.local_world_size) == (1, 3)
    assert detect({"RANK": "0", "WORLD_SIZE": "1"}).master_addr is None  # one process needs no master


def test_detect_torchrun_wins_inside_srun():
    # srun starts one torchrun per node; its workers see both sets of variables.
    launch = detect({**SRUN_TWO_NODES_TASK_3, **TORCHRUN_RANK_1})
    assert (launch.launcher, launch.rank, launch.world_size) == ("torchrun", 1, 4)


def test_detect_slurm_step():
    launch = detect(SRUN_TASK_1)
    assert (launch.launcher, launch.rank, launch.world_size) == ("slurm", 1, 2)
    assert (launch.local_rank, launch.local_world_size) == (1, 2)
    assert (launch.master_addr, launch.master_port) == ("vm", slurm_port(41, 0))


def test_detect_slurm_two_nodes():
    launch = detect(SRUN_TWO_NODES_TASK_3)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (3, 4, 1, 2)
    assert (launch.master_addr, launch.master_port) == ("gpu07", slurm_port(123456, 2))


def test_detect_slurm_uneven_tasks_per_node():
    env = {**SRUN_TWO_NODES_TASK_3, "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "3,1",
           "SLURM_PROCID": "3", "SLURM_LOCALID": "0"}
    assert detect(env).local_world_size == 1
    assert detect({**env, "SLURMD_NODENAME": "gpu07", "SLURM_PROCID": "0"}).local_world_size == 3


def test_detect_slurm_master_overrides():
    launch = detect({**SRUN_TWO_NODES_TASK_3, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456"})
    assert (launch.master_addr, launch.master_port) == ("10.1.2.3", 23456)


def test_detect_slurm_batch_script_is_one_process():
    batch = {k: v for k, v in SRUN_TWO_NODES_TASK_3.items() if not k.startswith("SLURM_STEP")}
    with pytest.warns(UserWarning, match="outside srun"):
        assert detect({**batch, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}).launcher == "single"


def test_detect_open_mpi_and_mpich():
    launch = detect(OPEN_MPI_RANK_2)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == \
        ("mpi", 2, 4, 0, 2)
    assert launch.master_addr is None and launch.master_port is None  # init() broadcasts them
    launch = detect({**MPICH_RANK_1, "MASTER_ADDR": "h0", "MASTER_PORT": "4321"})
    assert (launch.launcher, launch.rank, launch.local_rank, launch.master_addr, launch.master_port) == \
        ("mpi", 1, 1, "h0", 4321)


def test_detect_srun_with_pmi_is_slurm_and_mpirun_in_a_step_is_mpi():
    pmi = {"PMI_RANK": SRUN_TASK_1["SLURM_PROCID"], "PMI_SIZE": "2"}  # srun --mpi=pmi2 sets these too
    assert detect({**SRUN_TASK_1, **pmi}).launcher == "slurm"
    # mpirun's ranks inside a one-task step: MPI numbers differ from SLURM's, and MPI is right.
    step = {**SRUN_TASK_1, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "1",
            "SLURM_STEP_TASKS_PER_NODE": "1"}
    assert detect({**step, **OPEN_MPI_RANK_2}).launcher == "mpi"


@pytest.mark.parametrize("env, names", [
    ({"RANK": "1"}, ["RANK='1'", "WORLD_SIZE"]),
    ({"WORLD_SIZE": "2"}, ["WORLD_SIZE='2'", "RANK"]),
    ({**TORCHRUN_RANK_1, "RANK": "4"}, ["RANK=4", "WORLD_SIZE=4"]),
    ({**TORCHRUN_RANK_1, "RANK": "one"}, ["RANK='one'", "not an integer"]),
    ({**TORCHRUN_RANK_1, "RANK": "-1"}, ["RANK='-1'", ">= 0"]),
    ({**TORCHRUN_RANK_1, "WORLD_SIZE": "0", "RANK": "0"}, ["WORLD_SIZE='0'"]),
    ({**TORCHRUN_RANK_1, "LOCAL_RANK": "2"}, ["LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"]),
    ({**TORCHRUN_RANK_1, "LOCAL_WORLD_SIZE": "8"}, ["LOCAL_WORLD_SIZE=8", "WORLD_SIZE=4"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, ["MASTER_ADDR"]),
    ({**TORCHRUN_RANK_1, "MASTER_PORT": "70000"}, ["MASTER_PORT='70000'", "TCP port"]),
    ({**SRUN_TASK_1, "SLURM_STEP_NODELIST": "vm[1-2"}, ["SLURM_STEP_NODELIST='vm[1-2'", "unclosed"]),
    ({**SRUN_TASK_1, "SLURM_PROCID": "2"}, ["SLURM_PROCID=2", "SLURM_STEP_NUM_TASKS=2"]),
    ({**SRUN_TASK_1, "SLURM_LOCALID": "x"}, ["SLURM_LOCALID='x'"]),
    ({k: v for k, v in SRUN_TASK_1.items() if k != "SLURM_LOCALID"}, ["SLURM_LOCALID"]),
    ({**SRUN_TASK_1, "SLURM_JOB_ID": "abc"}, ["SLURM_JOB_ID='abc'"]),
    ({**SRUN_TASK_1, "SLURM_STEP_TASKS_PER_NODE": "2(x"}, ["SLURM_STEP_TASKS_PER_NODE='2(x'"]),
    ({"OMPI_COMM_WORLD_RANK": "0"}, ["OMPI_COMM_WORLD_RANK='0'", "OMPI_COMM_WORLD_SIZE"]),
    ({**MPICH_RANK_1, "PMI_RANK": "2"}, ["PMI_RANK=2", "PMI_SIZE=2"]),
    ({**MPICH_RANK_1, "MPI_LOCALRANKID": "5"}, ["MPI_LOCALRANKID=5", "MPI_LOCALNRANKS=2"]),
])
def test_detect_names_the_bad_variable(env, names):
    with pytest.raises(LaunchError) as caught:
        detect(env)
    for name in names:
        assert name in str(caught.value)


# ------------------------------------------------------------------------- backend and device

def test_choose_backend():
    assert distributed.choose_backend(None, cuda=False) == "gloo"
    assert distributed.choose_backend("GLOO", cuda=False) == "gloo"
    assert distributed.choose_backend("cpu:gloo", cuda=False) == "cpu:gloo"
    with pytest.raises(ValueError, match="'nccl'.*CUDA|not available"):
        distributed.choose_backend("nccl", cuda=False)
    with pytest.raises(ValueError, match="'carrier-pigeon' is not available"):
        distributed.choose_backend("carrier-pigeon", cuda=False)
    with pytest.raises(TypeError, match="int"):
        distributed.choose_backend(3, cuda=False)


def test_cuda_device_index(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert distributed.cuda_device_index(detect(TORCHRUN_RANK_1), device_count=2) == 1
    with pytest.raises(LaunchError, match=r"LOCAL_RANK=1 but only 1 CUDA device"):
        distributed.cuda_device_index(detect(TORCHRUN_RANK_1), device_count=1)
    with pytest.raises(LaunchError, match=r"SLURM_LOCALID=1 but only 1 CUDA device"):
        distributed.cuda_device_index(detect(SRUN_TWO_NODES_TASK_3), device_count=1)
    # srun --gpus-per-task=1: each task sees exactly its own GPU as device 0.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert distributed.cuda_device_index(detect(SRUN_TWO_NODES_TASK_3), device_count=1) == 0


# ------------------------------------------------------------------------ init in this process

def test_init_single_process_is_idempotent_and_a_context_manager(clean_env):
    with distributed.init() as info:
        assert (info.launcher, info.rank, info.world_size, info.backend) == ("single", 0, 1, None)
        assert info.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
        assert info.is_main and distributed.is_initialized() and not dist.is_initialized()
        assert distributed.init() is info and distributed.get_info() is info
        with pytest.raises(dataclasses.FrozenInstanceError):
            info.rank = 1
    assert not distributed.is_initialized() and distributed.get_info() is None
    distributed.shutdown()  # again: harmless


def test_init_adopts_an_existing_group_and_shutdown_destroys_it(clean_env):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    info = distributed.init()
    assert info.backend == "gloo" and dist.is_initialized()
    assert distributed.init(backend="gloo") is info
    with pytest.raises(ValueError, match="already initialised with backend 'gloo'"):
        distributed.init(backend="cpu:gloo")
    distributed.shutdown()
    assert not dist.is_initialized() and not distributed.is_initialized()


def test_init_refuses_a_group_that_disagrees_with_the_environment(clean_env):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    for name, value in TORCHRUN_RANK_1.items():
        clean_env.setenv(name, value)
    with pytest.raises(LaunchError, match="rank 0 of 1.*rank 1 of 4"):
        distributed.init()


def test_init_fails_fast_on_a_master_that_does_not_resolve(clean_env):
    env = {**SRUN_TWO_NODES_TASK_3, "SLURM_STEP_NODELIST": "accel-no-such-host[1-2]",
           "SLURMD_NODENAME": "accel-no-such-host2"}
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(LaunchError, match="'accel-no-such-host1'.*does not resolve.*MASTER_ADDR"):
        distributed.init(timeout=timedelta(seconds=5))
    assert not dist.is_initialized()


def test_init_validates_timeout(clean_env):
    with pytest.raises(TypeError, match="timedelta"):
        distributed.init(timeout=30)
    with pytest.raises(ValueError, match="positive"):
        distributed.init(timeout=timedelta(0))


@pytest.mark.multiprocess
def test_init_under_mpi_variables_but_no_mpi_launcher_fails_clearly():
    # PMI_* set by hand: mpi4py starts as a singleton and init() must say so rather than wait.
    code = "import accel.distributed as d\ntry:\n    d.init()\nexcept d.LaunchError as e:\n    print('LaunchError:', e)"
    result = procs.run([sys.executable, "-c", code], timeout=60,
                       env=procs.child_env(PMI_RANK="0", PMI_SIZE="2"))
    output = procs.check(result)
    assert "LaunchError: mpi4py sees rank 0 of 1" in output and "PMI_SIZE=2" in output


@pytest.mark.parametrize("hostlist", ["node[1-99999999999]", "r[1-300]n[1-300]", "a,n[1-65536]",
                                      "n[1-" + "9" * 5000 + "]"])
def test_expand_hostlist_refuses_absurd_ranges_before_expanding(hostlist, monkeypatch):
    def must_not_expand(*args):
        raise AssertionError("a range was expanded before the host count was checked")

    with monkeypatch.context() as patched:
        patched.setattr(launchers, "_expand_ranges", must_not_expand)  # counted from the bounds, nothing built
        with pytest.raises(LaunchError, match="more than 65,536 hosts|more than 64 digits"):
            expand_hostlist(hostlist)
    assert len(expand_hostlist("n[1-65536]")) == 65536  # the limit itself is accepted


def test_init_under_torchrun_variables_fails_fast_on_a_master_that_does_not_resolve(clean_env):
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29555"}
    for name, value in env.items():
        clean_env.setenv(name, value)

    def must_not_connect(*args, **kwargs):
        raise AssertionError("a store was contacted: init() would have waited for the rendezvous")

    clean_env.setattr(dist, "TCPStore", must_not_connect)
    with pytest.raises(LaunchError, match="'no-such-host.invalid' \\(MASTER_ADDR\\) does not resolve"):
        distributed.init(timeout=timedelta(minutes=5))
    assert not dist.is_initialized()


def test_init_device_and_backend_from_arguments_or_environment(clean_env):
    with distributed.init(device="cpu") as info:
        assert info.device == torch.device("cpu")
    clean_env.setenv("ACCEL_DEVICE", "gpu")
    with pytest.raises(ValueError, match="ACCEL_DEVICE='gpu': expected 'cpu' or 'cuda'"):
        distributed.init()
    clean_env.setenv("ACCEL_DEVICE", "cpu")
    clean_env.setenv("ACCEL_BACKEND", "carrier-pigeon")
    with pytest.raises(ValueError, match="ACCEL_BACKEND='carrier-pigeon'.*not available"):
        distributed.init()
    clean_env.setenv("ACCEL_BACKEND", "gloo")
    with distributed.init() as info:
        assert info.device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' but torch.cuda.is_available\\(\\) is False"):
            distributed.init(device="cuda")


@pytest.mark.multiprocess
def test_torchrun_store_separates_restart_attempts(clean_env):
    """After an elastic restart the agent's store still holds the last attempt's keys: each attempt gets a prefix."""
    port = procs.free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=timedelta(seconds=10))
    launch = detect({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    clean_env.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    clean_env.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    distributed._torchrun_store(launch, timedelta(seconds=10)).set("rank_0", "dead address")
    clean_env.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = distributed._torchrun_store(launch, timedelta(seconds=10))
    assert second.check(["rank_0"]) is False and server.check(["accel/attempt_0/rank_0"])
