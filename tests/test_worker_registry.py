"""The worker registry: a worker type from one file (tests/toy_worker.py) runs the BLAS grid; device
knowledge (default devices, name checks, out-of-memory reading, compute modes) comes from the classes."""
import gemm_helpers
import pytest
import torch
from gemm_helpers import SHAPES, check_blas_grid_case

import accel
from accel.ooc import CPUWorker, Engine, check_device, worker_class
from accel.ooc.workers import default_devices, register_worker, unregister_worker

seeded_global_rng = gemm_helpers.seeded_global_rng  # autouse fixture: torch's global generator seeded per test


@pytest.fixture
def toy():
    import toy_worker

    register_worker(toy_worker.ToyWorker)  # (again: another test may have unregistered it)
    yield toy_worker
    unregister_worker("privateuseone")


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_blas_grid_on_a_toy_worker_type(toy, m, n, k, seed):
    engine = Engine(["privateuseone:0", "privateuseone:1"], memory_limit=16_000)
    assert [type(worker) for worker in engine.workers] == [toy.ToyWorker] * 2
    for trans_a, trans_b in [(False, False), (False, True), (True, False), (True, True)]:
        check_blas_grid_case(engine, m, n, k, trans_a, trans_b, torch.float32, seed)
        assert max(engine.stats.peak_bytes_per_worker.values()) <= 16_000


def test_device_knowledge_comes_from_the_worker_class(toy):
    assert worker_class("privateuseone") is toy.ToyWorker and worker_class("cpu") is CPUWorker
    assert check_device("privateuseone") == torch.device("privateuseone", 0)
    with pytest.raises(ValueError, match="'privateuseone:5' does not exist: 2 toy devices"):
        Engine(["privateuseone:5"])
    engine = Engine(["privateuseone:1"])
    assert engine.is_out_of_memory(RuntimeError("TOY_OOM on the toy device"))
    assert not Engine(["cpu"]).is_out_of_memory(RuntimeError("TOY_OOM on the toy device"))
    toy.compute_modes_entered.clear()
    A, B = torch.randn(20, 30), torch.randn(30, 10)
    accel.gemm(A, B, devices=["privateuseone:0"], compute_dtype="tf32")
    assert toy.compute_modes_entered == [True]  # once per call, with the call's problem
    assert default_devices() == (["cuda:0"] if torch.cuda.is_available() else ["cpu"]) or torch.cuda.device_count() > 1


def test_no_import_cycles_in_accel_ooc():
    """Every import between accel.ooc modules (top level or inside functions) points one way; the worker
    modules never import the registry (``accel.ooc.workers``), which names them only by module path."""
    import ast
    from pathlib import Path

    import accel.ooc

    folder = Path(accel.ooc.__file__).parent
    graph = {}
    for path in folder.rglob("*.py"):
        parts = path.relative_to(folder).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name:  # accel/ooc/__init__.py: the public face, imports everything
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("accel.ooc."):
                imported.add(node.module[len("accel.ooc."):])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("accel.ooc."):
                imported.add(node.value.split(":")[0][len("accel.ooc."):])  # the registry's lazy module paths
        graph[name] = imported - {name}
    assert {"workers", "workers.base", "workers.cpu", "workers.cuda", "engine", "_call", "queue"} <= set(graph)

    def reaches(start, goal, seen=()):
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, (*seen, nxt))) for nxt in graph.get(start, ()))

    for module in graph:
        assert not reaches(module, module), f"{module} imports itself through {graph[module]}"
    workers = [module for module in graph if module.startswith("workers.")]
    assert not any(reaches(module, "workers") for module in workers), "a worker module imports the registry"
    assert [module for module in graph if "workers.cuda" in graph[module]] == ["workers"]  # only by name


def test_unknown_device_types_are_named():
    with pytest.raises(ValueError, match="unsupported device type 'xla'.*'cpu', 'cuda'"):
        Engine(["xla"])
    with pytest.raises(TypeError, match="a Worker subclass"):
        register_worker(int)


@pytest.fixture
def matmul_precision():
    """Puts torch's fp32 matmul precision back as it was after the test."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    yield matmul
    matmul.fp32_precision = before


@pytest.mark.parametrize("user_setting", ["tf32", "ieee", "none"])
def test_cuda_compute_mode_uses_the_new_api_and_restores_it_exactly(matmul_precision, user_setting):
    from types import SimpleNamespace

    from accel.ooc.workers.cuda import CUDAWorker

    matmul_precision.fp32_precision = user_setting
    for allow_tf32, inside in [(True, "tf32"), (False, "ieee")]:
        with CUDAWorker.compute_mode(SimpleNamespace(allow_tf32=allow_tf32)):
            assert matmul_precision.fp32_precision == inside
        assert matmul_precision.fp32_precision == user_setting
    with pytest.raises(KeyError):  # put back on failure too
        with CUDAWorker.compute_mode(SimpleNamespace(allow_tf32=True)):
            raise KeyError("inside the call")
    assert matmul_precision.fp32_precision == user_setting


def test_legacy_precision_setting_survives_a_cuda_call(matmul_precision):
    from types import SimpleNamespace

    from accel.ooc.workers.cuda import CUDAWorker

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with CUDAWorker.compute_mode(SimpleNamespace(allow_tf32=False)):
            pass
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_cpu_calls_never_touch_the_cuda_precision_switch(matmul_precision, seed):
    matmul_precision.fp32_precision = "tf32"  # the new API: reading allow_tf32 beside it would raise
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(30, 20, generator=generator), torch.randn(20, 10, generator=generator)
    torch.testing.assert_close(accel.gemm(A, B, devices=["cpu"], compute_dtype="tf32"), A @ B)
    assert matmul_precision.fp32_precision == "tf32"
