"""The CPU LSTM step kernel (accel/nn/recurrence/_csrc/lstm_step.cpp): its results against the torch-op twin, how
it is built, cached, verified and loaded, its argument checks, and how a fallback is reported."""
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from accel.nn import BTLSTM
from accel.nn.recurrence import _fused as fused_recurrence
from accel.nn.recurrence import _kernel as recurrence_kernel
from accel.nn.recurrence import kernel_status

ROOT = Path(__file__).resolve().parents[1]
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="no C++ compiler here to build the kernel")
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="giving a file to another user (os.chown) needs root")
OTHER_UID = 65534  # nobody

# Runs in a fresh process (a library once loaded stays loaded under its name, so loading what is on disk needs
# one): the kernel's status, then an LSTM recurrence forward and backward with the kernel and with the torch-op
# twin; prints the status and the largest difference between the two.
PROBE = r"""
import json, sys, warnings
import torch
from accel.nn.recurrence import _fused, _kernel, kernel_status
warnings.simplefilter("ignore")
status = kernel_status()
torch.manual_seed(int(sys.argv[1]))
steps, batch, hidden = 5, 3, 4
kw = {"dtype": torch.float64}
x_proj = torch.randn(steps, batch, 4 * hidden, **kw)
weight, bias = torch.randn(4 * hidden, hidden, **kw), torch.randn(4 * hidden, **kw)
h0, c0 = torch.randn(batch, hidden, **kw), torch.randn(batch, hidden, **kw)
grad_out, grad_c_n = torch.randn(steps, batch, hidden, **kw), torch.randn(batch, hidden, **kw)
results = []
for use_kernel in (True, False):
    _fused.use_kernel = use_kernel
    out, extra = _fused.forward("LSTM", x_proj, h0, c0, weight, bias, [batch] * steps, False)
    grads = _fused.backward("LSTM", grad_out, grad_c_n, h0, c0, weight, out, extra[1:], [batch] * steps, False)
    results.append([out, extra[0], *grads])
difference = max((a - b).abs().max().item() for a, b in zip(*results) if a is not None)
print(json.dumps({"in_use": status.in_use, "reason": status.reason, "status": _kernel.status,
                  "difference": difference}))
"""


def _child_env(folder: Path, **extra) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "ACCEL_KERNEL_DIR": str(folder), **extra}


def _probe(folder: Path, seed: int, timeout: float = 300) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE, str(seed)], env=_child_env(folder), capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, f"the probe died (rc {run.returncode}): {run.stderr[-2000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def _library(folder: Path) -> Path:
    (library,) = folder.glob("lstm_step-*.so")
    return library


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _assert_rebuilt(folder: Path, result: dict, replaced_digest: str):
    """The probe used the kernel, matched the twin, and the library on disk is a fresh build with its record."""
    assert result["in_use"], result["status"]
    assert result["difference"] < 1e-10
    library = _library(folder)
    assert result["reason"] == str(library)
    digest = _sha256(library)
    assert digest != replaced_digest
    assert Path(f"{library}.sha256").read_text().strip() == digest
    assert library.stat().st_uid == os.getuid()
    assert not list(folder.glob("*.tmp"))


def _compile_stand_in(source: str, output: Path):
    """A shared library from ``source`` (C), standing in for a planted or foreign file."""
    code = output.with_suffix(".c")
    code.write_text(source)
    subprocess.run([os.environ.get("CXX", "g++"), "-x", "c", "-shared", "-fPIC", "-o", str(output), str(code)],
                   check=True, capture_output=True, timeout=120)
    code.unlink()


# entry points with the kernel's names that do nothing: a library that loads and runs, with wrong results
DO_NOTHING = "\n".join(f"void lstm_{kind}_step_{suffix}(void) {{}}"
                       for kind in ("forward", "backward") for suffix in ("f32", "f64"))


@pytest.fixture(scope="module")
def built_folder(tmp_path_factory):
    """A cache folder holding a genuine build (made once by a fresh process), copied by the tests that need one."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler here to build the kernel")
    folder = tmp_path_factory.mktemp("built") / "kernels"
    result = _probe(folder, 0)
    assert result["in_use"], result["status"]
    return folder


@pytest.fixture
def cache_copy(built_folder, tmp_path):
    folder = tmp_path / "kernels"
    shutil.copytree(built_folder, folder)
    return folder


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """The kernel module as before its first use, building into a folder of this test."""
    monkeypatch.setattr(recurrence_kernel, "_library", None)
    monkeypatch.setattr(recurrence_kernel, "status", "not built yet")
    monkeypatch.setattr(recurrence_kernel, "_steps", {})
    monkeypatch.setattr(recurrence_kernel, "_told", False)
    monkeypatch.setattr(recurrence_kernel, "path", None)
    monkeypatch.setattr(recurrence_kernel, "parallel", recurrence_kernel.parallel)
    monkeypatch.setenv("ACCEL_KERNEL_DIR", str(tmp_path / "kernels"))
    return recurrence_kernel


def _small_lstm():
    return BTLSTM(24, 6, in_shape=(4, 6), hidden_shape=(3, 2), ranks=2, num_blocks=2, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- results

@pytest.mark.parametrize("dtype,reverse,lengths,scale", list(itertools.product(
    [torch.float32, torch.float64], [False, True], ["equal", "unequal"], [1.0, 200.0])))
def test_lstm_step_kernel_matches_torch_ops(seed, monkeypatch, dtype, reverse, lengths, scale):
    """accel/nn/recurrence/_csrc/lstm_step.cpp against its twin, the torch-op LSTM step, forward and backward;
    scale 200 saturates the gates (exp overflows) and must still give finite, equal results."""
    if recurrence_kernel.lstm_step(dtype) is None:
        pytest.skip(f"the kernel did not build here: {recurrence_kernel.status}")
    torch.manual_seed(seed)
    steps, batch, hidden = 6, 4, 5
    active = [4] * 6 if lengths == "equal" else [4, 4, 3, 2, 2, 1]
    kw = {"dtype": dtype}
    x_proj = torch.randn(steps, batch, 4 * hidden, **kw) * scale
    weight, bias = torch.randn(4 * hidden, hidden, **kw), None
    h0, c0 = torch.randn(batch, hidden, **kw), torch.randn(batch, hidden, **kw)
    grad_out, grad_c_n = torch.randn(steps, batch, hidden, **kw), torch.randn(batch, hidden, **kw)
    results = {}
    for use_kernel in (True, False):
        monkeypatch.setattr(fused_recurrence, "use_kernel", use_kernel)
        out, extra = fused_recurrence.forward("LSTM", x_proj, h0, c0, weight, bias, active, reverse)
        grads = fused_recurrence.backward("LSTM", grad_out, grad_c_n, h0, c0, weight, out, extra[1:], active, reverse)
        results[use_kernel] = [out, extra[0], *grads]
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for a, b in zip(results[True], results[False]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tolerance)


def test_loading_the_kernel_keeps_denormals():
    """The kernel is built without -ffast-math, whose crtfastmath.o would set flush-to-zero process-wide."""
    recurrence_kernel.lstm_step(torch.float32)
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.5).item() > 0


# ---------------------------------------------------------------------------------------------------- fallback

def test_kernel_build_failure_falls_back_with_a_reason(seed, monkeypatch, fresh_kernel, caplog):
    """No compiler: the torch-op twin runs, and the user is told once (a warning and a log record) why and what
    it costs."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING, logger="accel.nn.recurrence"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert recurrence_kernel.lstm_step(torch.float32) is None
        assert recurrence_kernel.lstm_step(torch.float64) is None
        assert kernel_status() == (False, recurrence_kernel.status)
        torch.manual_seed(seed)
        bt = _small_lstm()
        x = torch.randn(4, 2, 24, dtype=torch.float64)
        fallback = bt(x)[0]
    assert "no C++ compiler (/nonexistent/c++) found" in recurrence_kernel.status
    told = [w for w in seen if "CPU LSTM step kernel is not in use" in str(w.message)]
    assert len(told) == 1 and told[0].category is RuntimeWarning
    assert "/nonexistent/c++" in str(told[0].message) and "slower" in str(told[0].message)
    records = [r for r in caplog.records if r.name == "accel.nn.recurrence"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert records[0].getMessage() == str(told[0].message)
    monkeypatch.setattr(fused_recurrence, "use_kernel", False)
    torch.testing.assert_close(fallback, bt(x)[0], rtol=0, atol=0)


def test_disabled_kernel_is_not_a_warning(monkeypatch, fresh_kernel, caplog):
    monkeypatch.setenv("ACCEL_KERNELS", "0")
    with caplog.at_level(logging.WARNING, logger="accel.nn.recurrence"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert kernel_status() == (False, "disabled by ACCEL_KERNELS=0")
    assert not seen and not caplog.records


@needs_compiler
def test_library_without_entry_points_falls_back_with_a_reason(monkeypatch, fresh_kernel, tmp_path):
    """A build that lacks the kernel's symbols is refused with a message, never an AttributeError later."""
    source = tmp_path / "lstm_step.cpp"
    source.write_text('extern "C" void unrelated() {}\n')
    monkeypatch.setattr(recurrence_kernel, "SOURCE", source)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert recurrence_kernel.lstm_step(torch.float64) is None
    assert "lacks the kernel's entry points lstm_forward_step_f32" in recurrence_kernel.status
    assert len([w for w in seen if "not in use" in str(w.message)]) == 1
    bt = _small_lstm()
    bt(torch.randn(3, 2, 24, dtype=torch.float64))[0].sum().backward()  # the twin runs


# ---------------------------------------------------------------------------------------------------- the folder

def test_cache_folder_is_created_for_this_user_only(tmp_path):
    folder = tmp_path / "a" / "kernels"
    previous = os.umask(0)
    try:
        assert recurrence_kernel._unsafe_folder(folder) is None
    finally:
        os.umask(previous)
    info = folder.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_cache_folder_writable_by_others_is_refused(fresh_kernel, tmp_path, mode):
    folder = tmp_path / "kernels"
    folder.mkdir()
    os.chmod(folder, mode)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert recurrence_kernel.lstm_step(torch.float64) is None
    assert f"writable by group or others (mode {mode:o})" in recurrence_kernel.status
    assert kernel_status().in_use is False
    assert not list(folder.iterdir())  # nothing built there, nothing loaded from there
    assert len([w for w in seen if "not in use" in str(w.message)]) == 1


@needs_root
def test_cache_folder_of_another_user_is_refused(fresh_kernel, tmp_path):
    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o700)
    os.chown(folder, OTHER_UID, OTHER_UID)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert recurrence_kernel.lstm_step(torch.float64) is None
    assert f"owned by uid {OTHER_UID}, not by this user" in recurrence_kernel.status
    assert not list(folder.iterdir())


# ---------------------------------------------------------------------------------------------------- the cache

def test_tampered_library_is_rebuilt(seed, cache_copy):
    """A library under the expected name that is not the one built (a loadable one, with the kernel's entry
    points, doing nothing) is not loaded: the result equals the twin's and the file is rebuilt."""
    library = _library(cache_copy)
    _compile_stand_in(DO_NOTHING, library)
    planted = _sha256(library)
    _assert_rebuilt(cache_copy, _probe(cache_copy, seed), planted)


def test_truncated_library_is_rebuilt(seed, cache_copy):
    """Loading a truncated library would end the process (SIGBUS): its digest is checked before loading."""
    library = _library(cache_copy)
    data = library.read_bytes()
    library.write_bytes(data[:len(data) // 2])
    truncated = _sha256(library)
    _assert_rebuilt(cache_copy, _probe(cache_copy, seed), truncated)


def test_missing_record_rebuilds(seed, cache_copy):
    library = _library(cache_copy)
    Path(f"{library}.sha256").unlink()
    _compile_stand_in(DO_NOTHING, library)
    planted = _sha256(library)
    _assert_rebuilt(cache_copy, _probe(cache_copy, seed), planted)


def test_library_without_entry_points_is_rebuilt(seed, cache_copy):
    """A library whose digest matches its record but which lacks the kernel's symbols is rebuilt."""
    library = _library(cache_copy)
    _compile_stand_in("void unrelated(void) {}\n", library)
    digest = _sha256(library)
    Path(f"{library}.sha256").write_text(digest + "\n")
    _assert_rebuilt(cache_copy, _probe(cache_copy, seed), digest)


@needs_root
def test_library_of_another_user_is_rebuilt(seed, cache_copy):
    """A library and a matching record that another user put into the folder (when it was open to them) are not
    loaded."""
    library = _library(cache_copy)
    record = Path(f"{library}.sha256")
    _compile_stand_in(DO_NOTHING, library)
    digest = _sha256(library)
    record.write_text(digest + "\n")
    for file in (library, record):
        os.chown(file, OTHER_UID, OTHER_UID)
    _assert_rebuilt(cache_copy, _probe(cache_copy, seed), digest)


CONCURRENT = r"""
import json, sys, time, warnings
from pathlib import Path
from accel.nn.recurrence import _kernel, kernel_status
warnings.simplefilter("ignore")
barrier = Path(sys.argv[1])
(barrier / f"ready-{sys.argv[2]}").touch()
deadline = time.monotonic() + 120
while not (barrier / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.005)
status = kernel_status()
print(json.dumps({"in_use": status.in_use, "status": _kernel.status}))
"""


@needs_compiler
def test_concurrent_first_use_from_two_processes(seed, tmp_path):
    """Two processes building into an empty folder at once: both use a complete kernel, one library and its
    record are left, no temporary file; a later process loads it without building."""
    folder, barrier = tmp_path / "kernels", tmp_path / "barrier"
    barrier.mkdir()
    children = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(barrier), str(i)], env=_child_env(folder),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        while len(list(barrier.glob("ready-*"))) < 2 and time.monotonic() < deadline:
            assert all(child.poll() is None for child in children), "a child ended before the start"
            time.sleep(0.01)
        (barrier / "go").touch()
        outputs = [child.communicate(timeout=300) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for child, (out, err) in zip(children, outputs):
        assert child.returncode == 0, err[-2000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["in_use"], result["status"]
    library = _library(folder)
    assert sorted(p.name for p in folder.iterdir()) == [library.name, f"{library.name}.sha256"]
    assert Path(f"{library}.sha256").read_text().strip() == _sha256(library)
    before = library.stat().st_mtime_ns
    result = _probe(folder, seed)
    assert result["in_use"] and result["difference"] < 1e-10
    assert library.stat().st_mtime_ns == before  # loaded, not built again


# ---------------------------------------------------------------------------------------------------- arguments

def _forward_arguments(dtype, rows=3, H=4):
    batch = rows + 1
    return [rows, H, 1, torch.randn(batch, 4 * H, dtype=dtype), torch.randn(batch, 4 * H, dtype=dtype),
            torch.randn(4 * H, dtype=dtype), torch.full((batch, 4 * H), float("nan"), dtype=dtype),
            torch.randn(batch, H, dtype=dtype), torch.full((batch, H), float("nan"), dtype=dtype),
            torch.full((batch, H), float("nan"), dtype=dtype)]


def _backward_arguments(dtype, rows=3, H=4, blocks=2):
    batch = rows + 1
    return [rows, H, blocks, torch.randn(batch, H, dtype=dtype), torch.randn(batch, H, dtype=dtype),
            torch.rand(batch, 4 * H, dtype=dtype), torch.randn(batch, H, dtype=dtype),
            torch.randn(batch, H, dtype=dtype), torch.full((batch, 4 * H), float("nan"), dtype=dtype),
            torch.full((blocks, 4 * H), float("nan"), dtype=dtype)]


FORWARD_NAMES = ["rows", "H", "blocks", "inputs", "hidden", "bias", "gates", "c_prev", "c_out", "h_out"]
BACKWARD_NAMES = ["rows", "H", "blocks", "dh", "dc", "gates", "cell", "c_prev", "grad_gates", "grad_bias"]


def _bad(arguments, name, names, change):
    index = names.index(name)
    arguments[index] = change(arguments[index])
    return arguments


# (which step, argument, how it is spoiled, what the message says)
BAD_ARGUMENTS = [
    ("forward", "hidden", lambda t: t.to(torch.float64), "has dtype torch.float64; every tensor"),
    ("forward", "gates", lambda t: t.t().contiguous().t(), "is not contiguous"),
    ("forward", "c_prev", lambda t: torch.randn(t.shape[0], t.shape[1] + 1), "has shape (4, 5), expected"),
    ("forward", "h_out", lambda t: t[:2], "has shape (2, 4), expected (at least rows=3, H=4)"),
    ("forward", "bias", lambda t: t.to("meta"), "is on meta; the kernel runs on CPU tensors only"),
    ("forward", "bias", lambda t: t[None], "has shape (1, 16), expected (4*H=16,)"),
    ("forward", "inputs", lambda t: t.tolist(), "must be a torch.Tensor, got list"),
    ("forward", "c_out", lambda t: t[..., None], "has shape (4, 4, 1)"),
    ("forward", "rows", lambda r: -1, "'rows' must be an int >= 0, got -1"),
    ("forward", "rows", lambda r: True, "'rows' must be an int >= 0, got True"),
    ("forward", "H", lambda h: 4.0, "'H' must be an int >= 0, got 4.0"),
    ("forward", "blocks", lambda b: 0, "'blocks' must be an int >= 1, got 0"),
    ("backward", "grad_bias", lambda t: t[:1], "has shape (1, 16), expected (at least blocks=2, 4*H=16)"),
    ("backward", "dc", lambda t: t[:, ::2].contiguous(), "has shape (4, 2), expected (at least rows=3, H=4)"),
    ("backward", "cell", lambda t: t.to(torch.float64), "has dtype torch.float64"),
    ("backward", "grad_gates", lambda t: t[:, :-1], "is not contiguous"),
]


@pytest.mark.parametrize("step,name,spoil,message", BAD_ARGUMENTS,
                         ids=[f"{step}-{name}-{i}" for i, (step, name, _, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_kernel_argument_raises_naming_it(step, name, spoil, message):
    steps = recurrence_kernel.lstm_step(torch.float32)
    if steps is None:
        pytest.skip(f"the kernel did not build here: {recurrence_kernel.status}")
    names = FORWARD_NAMES if step == "forward" else BACKWARD_NAMES
    arguments = (_forward_arguments if step == "forward" else _backward_arguments)(torch.float32)
    outputs = [t for t in arguments if isinstance(t, torch.Tensor) and t.isnan().all()]
    arguments = _bad(arguments, name, names, spoil)
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        steps[0 if step == "forward" else 1](*arguments)
    assert isinstance(raised.value, recurrence_kernel.KernelArgumentError)
    if name not in ("rows", "H", "blocks"):
        assert f"argument {name!r}" in str(raised.value)
    assert all(t.isnan().all() for t in outputs)  # refused before the kernel wrote anything


def test_kernel_arguments_count_is_checked():
    steps = recurrence_kernel.lstm_step(torch.float64)
    if steps is None:
        pytest.skip(f"the kernel did not build here: {recurrence_kernel.status}")
    with pytest.raises(ValueError, match="takes rows, H, blocks and 7 tensors"):
        steps[0](*_forward_arguments(torch.float64)[:-1])


def test_good_kernel_arguments_run():
    steps = recurrence_kernel.lstm_step(torch.float64)
    if steps is None:
        pytest.skip(f"the kernel did not build here: {recurrence_kernel.status}")
    forward = _forward_arguments(torch.float64)
    steps[0](*forward)
    assert torch.isfinite(forward[-1][:3]).all() and forward[-1][3:].isnan().all()  # only the running rows
    backward = _backward_arguments(torch.float64)
    steps[1](*backward)
    assert torch.isfinite(backward[-1]).all()


# ---------------------------------------------------------------------------------------------------- status

@needs_compiler
def test_kernel_status_names_the_verified_library(fresh_kernel):
    status = kernel_status()
    assert status.in_use, recurrence_kernel.status
    library = Path(status.reason)
    assert library.parent == Path(os.environ["ACCEL_KERNEL_DIR"]) and library.exists()
    assert Path(f"{library}.sha256").read_text().strip() == _sha256(library)
    assert stat.S_IMODE(library.parent.stat().st_mode) == 0o700


def test_accel_info_reports_the_kernel(cache_copy):
    run = subprocess.run([sys.executable, "-m", "accel", "info"], env=_child_env(cache_copy), capture_output=True,
                         text=True, timeout=300, cwd=cache_copy.parent)
    assert run.returncode == 0, run.stderr
    lines = [line.strip() for line in run.stdout.splitlines() if "cpu lstm kernel" in line.lower()]
    assert lines == [f"cpu lstm kernel: in use ({_library(cache_copy)})"]
    run = subprocess.run([sys.executable, "-m", "accel", "info"], env=_child_env(cache_copy, ACCEL_KERNELS="0"),
                         capture_output=True, text=True, timeout=300, cwd=cache_copy.parent)
    assert run.returncode == 0, run.stderr
    assert "cpu lstm kernel: not in use: disabled by ACCEL_KERNELS=0" in run.stdout
