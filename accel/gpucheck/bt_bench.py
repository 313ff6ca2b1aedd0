"""Part c: BTLinear and BTLSTM on the GPU at the UCF11 setting (input 57600 = 8x20x20x18, hidden 256 = 4x4x4x4,
R = 4, N = 2), every contraction path, forward + backward, against ``nn.Linear`` / ``nn.LSTM`` (cuDNN) timed
interleaved in the same run. Every path is also checked: BTLinear's output and weight gradients against its
low-rank path (plain ops), BTLSTM's output against the ``nn.LSTM`` holding the same (rebuilt) weights.
A dry run uses a small stand-in setting on the CPU."""
from __future__ import annotations

import copy

import torch
from torch import nn

from accel.gpucheck.record import float32_precision, interleaved_seconds
from accel.gpucheck.table import seconds_text, speed_text
from accel.nn import BTLSTM, BTLinear

PATHS = ("auto", "gemm", "dense", "lowrank")
UCF11 = dict(in_shape=(8, 20, 20, 18), hidden_shape=(4, 4, 4, 4), ranks=4, num_blocks=2)
STAND_IN = dict(in_shape=(4, 5, 5, 6), hidden_shape=(2, 2, 2, 2), ranks=2, num_blocks=2)
LINEAR_BATCHES, DRY_LINEAR_BATCHES = (16 * 6, 1024), (12,)
LSTM_STEPS, LSTM_BATCH = 6, 16
TOLERANCE = 1e-3  # largest error relative to the largest reference entry, fp32 with TF32 off


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def _gates_shape(hidden_shape) -> tuple[int, ...]:
    return (4 * hidden_shape[0], *hidden_shape[1:])  # the four LSTM gates share one BT layer


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """One forward + backward with a fixed output gradient; the input needs no gradient (an input layer)."""
    def run():
        module.zero_grad(set_to_none=True)
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)
    return run


def _weight_grads(layer: BTLinear) -> list[torch.Tensor]:
    return [layer.core.grad, *(factor.grad for factor in layer.factors)]


def linear(context, setting: dict, batch: int, failures: list) -> None:
    device, repeats = context.device, 3 if context.dry_run else 20
    in_features = int(torch.tensor(setting["in_shape"]).prod())
    out_shape = _gates_shape(setting["hidden_shape"])
    out_features = int(torch.tensor(out_shape).prod())
    base = BTLinear(in_features, out_features, in_shape=setting["in_shape"], out_shape=out_shape,
                    ranks=setting["ranks"], num_blocks=setting["num_blocks"], contraction="lowrank", device=device)
    layers = {}
    for path in PATHS:
        layer = copy.deepcopy(base)
        layer.contraction = path
        layers[path] = layer
    dense = nn.Linear(in_features, out_features, device=device)
    x = torch.randn(batch, in_features, device=device)
    grad = torch.randn(batch, out_features, device=device)
    reference = layers["lowrank"]  # the plainest ops: the reference the others are checked against
    _step(reference, x, grad)()
    reference_out, reference_grads = reference(x).detach(), [g.clone() for g in _weight_grads(reference)]
    errors_against_einsum = {}
    for path in PATHS:
        layer = layers[path]
        _step(layer, x, grad)()
        errors = [_relative_error(layer(x).detach(), reference_out)]
        errors += [_relative_error(g, r) for g, r in zip(_weight_grads(layer), reference_grads)]
        if max(errors) > TOLERANCE:
            failures.append(f"BTLinear path {path} batch {batch}: error {max(errors):.1e} against the low-rank path")
        errors_against_einsum[path] = max(errors)
    if context.left() < 10:
        context.record.note(f"BTLinear batch {batch} not timed: {context.left():.0f} s left")
        return
    steps = {"nn.Linear": _step(dense, x, grad), **{path: _step(layers[path], x, grad) for path in PATHS}}
    times = interleaved_seconds(steps, repeats, device)
    for path in PATHS:
        row = context.record.row(kind="BTLinear", path=path, batch=batch, in_features=in_features,
                                 out_features=out_features, seconds=times[path], dense_seconds=times["nn.Linear"],
                                 speedup=times["nn.Linear"] / times[path], uses_dense=layers[path].uses_dense(batch),
                                 error_against_einsum=errors_against_einsum[path],
                                 parameters=layers[path].num_weight_parameters,
                                 dense_parameters=in_features * out_features)
        print(f"  BTLinear batch {batch} {path}: {1e3 * row['seconds']:.3f} ms vs nn.Linear "
              f"{1e3 * row['dense_seconds']:.3f} ms ({row['speedup']:.2f}x), error {row['error_against_einsum']:.1e}",
              flush=True)


def lstm(context, setting: dict, failures: list) -> None:
    device, repeats = context.device, 3 if context.dry_run else 10
    input_size = int(torch.tensor(setting["in_shape"]).prod())
    hidden_size = int(torch.tensor(setting["hidden_shape"]).prod())
    model = BTLSTM(input_size, hidden_size, in_shape=setting["in_shape"], hidden_shape=setting["hidden_shape"],
                   ranks=setting["ranks"], num_blocks=setting["num_blocks"], device=device)
    dense = model.to_dense_module().to(device)  # nn.LSTM with the same weights: cuDNN on the GPU
    steps, batch = (3, 4) if context.dry_run else (LSTM_STEPS, LSTM_BATCH)
    x = torch.randn(steps, batch, input_size, device=device)
    grad = torch.randn(steps, batch, hidden_size, device=device)
    with torch.no_grad():
        reference = dense(x)[0]
    errors = {}
    for path in PATHS:
        model.input_projection.contraction = path
        with torch.no_grad():
            errors[path] = _relative_error(model(x)[0], reference)
        if errors[path] > TOLERANCE:
            failures.append(f"BTLSTM path {path}: error {errors[path]:.1e} against nn.LSTM with the same weights")
    if context.left() < 10:
        context.record.note(f"BTLSTM not timed: {context.left():.0f} s left")
        return
    for path in PATHS:  # each path timed interleaved with nn.LSTM
        model.input_projection.contraction = path
        times = interleaved_seconds({path: _step(model, x, grad), "nn.LSTM": _step(dense, x, grad)}, repeats, device)
        row = context.record.row(kind="BTLSTM", path=path, steps=steps, batch=batch, input_size=input_size,
                                 hidden_size=hidden_size, seconds=times[path], dense_seconds=times["nn.LSTM"],
                                 speedup=times["nn.LSTM"] / times[path], error_against_lstm=errors[path])
        print(f"  BTLSTM T={steps} batch {batch} {path}: {1e3 * row['seconds']:.2f} ms vs nn.LSTM "
              f"{1e3 * row['dense_seconds']:.2f} ms ({row['speedup']:.2f}x), error {errors[path]:.1e}", flush=True)


def run(context) -> None:
    setting = STAND_IN if context.dry_run else UCF11
    context.record.set("setting", {**setting, "gates_out_shape": _gates_shape(setting["hidden_shape"])})
    failures: list[str] = []
    with float32_precision(tf32=False, cudnn=True):  # the layers are compared and timed in true fp32
        for batch in DRY_LINEAR_BATCHES if context.dry_run else LINEAR_BATCHES:
            linear(context, setting, batch, failures)
        lstm(context, setting, failures)
    if failures:
        raise RuntimeError("; ".join(failures))


def table_rows(record: dict):
    rows = []
    setting = record["results"].get("setting", {})
    shape = " -> ".join("x".join(map(str, setting.get(key, ()))) for key in ("in_shape", "hidden_shape"))
    for row in record["rows"]:
        if row["kind"] == "BTLinear":
            what = f"BTLinear {shape} (x4 gates), batch {row['batch']}, fwd+bwd, path {row['path']}"
            baseline = f"nn.Linear {seconds_text(row['dense_seconds'])}"
        else:
            what = f"BTLSTM {shape}, T={row['steps']} batch {row['batch']}, fwd+bwd, path {row['path']}"
            baseline = f"nn.LSTM {seconds_text(row['dense_seconds'])}"
        rows.append((what, seconds_text(row["seconds"]), baseline, speed_text(row["speedup"])))
    return rows
