"""The torch internals accel relies on where torch offers no public way (docs/design/private-mechanisms.md).

Each test states the exact behaviour accel assumes, so a torch release that changes it fails here, loudly and by
name, instead of accel going silently wrong. The CUDA fused cells' schemas are checked in test_bt_recurrence.py.
"""
import torch
from torch.amp.grad_scaler import OptState


def test_grad_scaler_keeps_the_per_optimizer_inf_record_accel_reads():
    """accel.optim.amp.unscale_and_check reads GradScaler's per-optimizer inf/NaN record (no public accessor)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    assert scaler._scale is None  # nothing scaled yet: accel's "the closure never scaled its loss" check
    scaler.scale((weight * float("inf")).sum()).backward()
    assert scaler._scale is not None
    state = scaler._per_optimizer_states[id(optimizer)]
    assert state["stage"] is OptState.READY
    scaler.unscale_(optimizer)
    state = scaler._per_optimizer_states[id(optimizer)]
    assert state["stage"] is OptState.UNSCALED
    assert any(bool(flag.item()) for flag in state["found_inf_per_device"].values())


def test_version_counter_bumps_on_in_place_writes_and_inference_tensors_have_none():
    """The out-of-core tile cache keys a persistent tile on ``tensor._version`` (torch has no public counter)."""
    x = torch.zeros(4)
    before = x._version
    x.add_(1)
    assert x._version == before + 1
    with torch.inference_mode():
        y = torch.zeros(4)
    assert y.is_inference()
    try:
        version = y._version
    except RuntimeError as error:
        assert "version counter" in str(error)
    else:  # pragma: no cover - torch changed: inference tensors now track versions; accel's special case is moot
        raise AssertionError(f"inference tensors now have a version counter ({version}): revisit accel/ooc/cache.py")
