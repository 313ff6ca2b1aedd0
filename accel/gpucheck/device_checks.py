"""Part a: correctness of every GPU path, checked against a CPU reference with nothing but the installed package.

Each check builds small inputs from a fixed seed, runs the path on the device and compares with the CPU (or a
float64 reference). On a dry run the same checks run with the CPU standing in for the GPU where that means
something (the engine with CPU workers, the recurrence's fused path against its loop, ISGD's foreach path
against its for-loop), and the checks that only a GPU can answer are listed as such, not run.
"""
from __future__ import annotations

import traceback
from typing import Callable, NamedTuple

import torch
from torch import nn

SEED = 20261207


class Check(NamedTuple):
    name: str
    run: Callable[["Setting"], str]  # returns what was compared; raises AssertionError on a wrong result
    gpu_only: str  # non-empty: why the check means nothing without a GPU (then a dry run lists it, unrun)


class Setting(NamedTuple):
    device: torch.device  # cuda, or cpu on a dry run
    gemm_device_sets: list[list[str]]


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300))


GEMM_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def check_gemm_dtypes_and_devices(setting: Setting) -> str:
    """accel.gemm on host operands, every dtype and transpose, tiled (block 64 over odd sizes), on each device set."""
    import accel

    generator = _generator()
    m, k, n = 150, 97, 130
    compared = 0
    for devices in setting.gemm_device_sets:
        for dtype, tolerance in GEMM_TOLERANCE.items():
            for trans_a, trans_b in ((False, False), (True, False), (False, True), (True, True)):
                a = torch.randn(*((k, m) if trans_a else (m, k)), generator=generator, dtype=torch.float64)
                b = torch.randn(*((n, k) if trans_b else (k, n)), generator=generator, dtype=torch.float64)
                a, b = a.to(dtype), b.to(dtype)
                expected = (a.double().T if trans_a else a.double()) @ (b.double().T if trans_b else b.double())
                actual = accel.gemm(a, b, trans_a=trans_a, trans_b=trans_b, devices=devices, block=64)
                error = _relative_error(actual, expected)
                assert actual.device.type == "cpu" and actual.shape == (m, n), (devices, dtype, actual.shape)
                assert error <= tolerance, f"gemm {dtype} trans=({trans_a}, {trans_b}) on {devices}: error {error:.2e}"
                compared += 1
    return f"{compared} products against float64, devices {setting.gemm_device_sets}"


def check_gemm_fp32_exact_and_tf32_on_request(setting: Setting) -> str:
    import accel

    generator = _generator()
    a = torch.randn(512, 512, generator=generator)
    b = torch.randn(512, 512, generator=generator)
    expected = a.double() @ b.double()
    devices = [str(setting.device)]
    exact = _relative_error(accel.gemm(a, b, devices=devices), expected)
    tf32 = _relative_error(accel.gemm(a, b, devices=devices, compute_dtype="tf32"), expected)
    assert exact <= 1e-5, f"fp32 by default must not use TF32: error {exact:.2e}"
    assert tf32 <= 5e-3, f"TF32 on request: error {tf32:.2e}"
    return f"fp32 error {exact:.1e}, tf32 error {tf32:.1e}"


def check_gemm_refuses_device_operands(setting: Setting) -> str:
    import accel

    a = torch.ones(8, 8, device=setting.device)
    try:
        accel.gemm(a, a.cpu(), devices=[str(setting.device)])
    except (TypeError, ValueError) as error:
        return f"refused: {error}"[:200]
    raise AssertionError("accel.gemm accepted an operand already on the GPU")


def check_out_of_core_linear(setting: Setting) -> str:
    from accel.nn import OutOfCoreLinear

    torch.manual_seed(SEED)
    devices = setting.gemm_device_sets[0]
    layer = OutOfCoreLinear(97, 65, devices=devices)
    reference = nn.Linear(97, 65).double()
    with torch.no_grad():
        reference.weight.copy_(layer.weight)
        reference.bias.copy_(layer.bias)
    x = torch.randn(33, 97, generator=_generator(), requires_grad=True)
    x_reference = x.detach().double().requires_grad_()
    layer(x).square().sum().backward()
    reference(x_reference).square().sum().backward()
    pairs = {"input grad": (x.grad, x_reference.grad), "weight grad": (layer.weight.grad, reference.weight.grad),
             "bias grad": (layer.bias.grad, reference.bias.grad)}
    for what, (actual, expected) in pairs.items():
        error = _relative_error(actual, expected)
        assert error <= 1e-5, f"OutOfCoreLinear {what} on {devices}: error {error:.2e}"
    return f"forward and backward against nn.Linear (float64), devices {devices}"


def check_btlstm(setting: Setting) -> str:
    """A BTLSTM step on the device against the same module on the CPU (dry run: the fused path against the loop)."""
    from accel.nn import BTLSTM

    torch.manual_seed(SEED)
    reference = BTLSTM(64, 32, ranks=2, num_blocks=2, recurrence="loop")
    candidate = BTLSTM(64, 32, ranks=2, num_blocks=2).to(setting.device)
    candidate.load_state_dict(reference.state_dict())
    x = torch.randn(9, 4, 64, generator=_generator())
    outputs = []
    for module, device in ((reference, torch.device("cpu")), (candidate, setting.device)):
        output, (h, c) = module(x.to(device))
        (output.square().sum() + h.sum() + c.sum()).backward()
        outputs.append((output.cpu(), {name: p.grad.cpu() for name, p in module.named_parameters()}))
    (expected, expected_grads), (actual, actual_grads) = outputs
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    return f"outputs and {len(expected_grads)} gradients, {candidate.recurrence} on {setting.device} vs loop on cpu"


def check_isgd_foreach(setting: Setting) -> str:
    """ISGD with torch's default implementation on the device (foreach) against the CPU for-loop, chases included."""
    from accel.optim import ISGD

    generator = _generator()
    xs = torch.randn(20, 16, 5, generator=generator)
    ys = xs @ torch.randn(5, 1, generator=generator)
    ys[7] += 5.0 * torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(16)]).unsqueeze(1)  # unfittable
    batches = [(xs[i], ys[i]) for _ in range(4) for i in range(20)]
    runs = []
    for device, foreach in ((torch.device("cpu"), False), (setting.device, None if setting.device.type == "cuda"
                                                           else True)):
        torch.manual_seed(SEED)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(device)
        optimizer = ISGD(model.parameters(), lr=0.05, momentum=0.5, window=20, max_chase=3, foreach=foreach)
        for x, y in batches:
            x, y = x.to(device), y.to(device)

            def closure(x=x, y=y, model=model, optimizer=optimizer):
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss
            optimizer.step(closure)
        runs.append((optimizer.stats, [p.detach().cpu() for p in model.parameters()]))
    (cpu_stats, cpu_params), (stats, params) = runs
    assert cpu_stats["chased_batches"] > 0, "the hard batch was never chased: nothing compared"
    assert stats["chased_batches"] == cpu_stats["chased_batches"], (stats, cpu_stats)
    for actual, expected in zip(params, cpu_params):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    return f"{stats['chased_batches']} chased batches and the weights agree"


CHECKS = [
    Check("gemm: dtypes, transposes, device sets", check_gemm_dtypes_and_devices, ""),
    Check("gemm: fp32 exact by default, tf32 on request", check_gemm_fp32_exact_and_tf32_on_request,
          "TF32 exists only on a GPU"),
    Check("gemm: operands on the GPU refused", check_gemm_refuses_device_operands, "needs a GPU tensor"),
    Check("OutOfCoreLinear: forward and backward", check_out_of_core_linear, ""),
    Check("BTLSTM: device against CPU", check_btlstm, ""),
    Check("ISGD: foreach on the device against the for-loop", check_isgd_foreach, ""),
]


def run(context) -> None:
    if context.dry_run:
        setting = Setting(torch.device("cpu"), [["cpu"], ["cpu", "cpu"]])
    else:
        setting = Setting(torch.device("cuda"), [["cuda:0"], ["cuda:0", "cuda:0"], ["cuda:0", "cpu"]])
    results = []
    for check in CHECKS:
        if context.dry_run and check.gpu_only:
            results.append({"check": check.name, "outcome": "needs a GPU", "message": check.gpu_only})
            print(f"  {check.name}: needs a GPU ({check.gpu_only}), not run", flush=True)
            continue
        try:
            message = check.run(setting)
            outcome = "passed"
        except Exception as error:  # noqa: BLE001 - every check is reported, then the part fails
            traceback.print_exc()
            message, outcome = f"{type(error).__name__}: {error}"[:500], "failed"
        results.append({"check": check.name, "outcome": outcome, "message": message})
        print(f"  {check.name}: {outcome}: {message}", flush=True)
        context.record.set("checks", results)
    context.record.set("checks", results)
    counts = {name: sum(result["outcome"] == name for result in results)
              for name in ("passed", "failed", "needs a GPU")}
    context.record.set("counts", counts)
    failed = [result["check"] for result in results if result["outcome"] == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} device checks failed: {', '.join(failed)}")


def table_rows(record: dict):
    counts = record["results"].get("counts")
    if not counts:
        return []
    text = ", ".join(f"{value} {name}" for name, value in counts.items() if value)
    rows = [(f"device checks against CPU references ({sum(counts.values())})", text, "", "")]
    for result in record["results"].get("checks", []):
        if result["outcome"] != "passed":
            rows.append((result["check"], f"{result['outcome']}: {result['message']}", "", ""))
    return rows
