"""ISGD against its twins: torch.optim.SGD (chart silent) for every argument SGD takes, and the plain ReferenceISGD."""
import itertools

import pytest
import torch
from isgd_helpers import N_BATCHES, mlp, regression_batches, train

from accel.optim import ISGD, ReferenceISGD

IMPLEMENTATIONS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
SGD_ARGUMENTS = [dict(impl=impl, tensor_lr=tensor_lr, momentum=momentum, nesterov=nesterov, maximize=maximize)
                 for impl, tensor_lr, (momentum, nesterov), maximize
                 in itertools.product(IMPLEMENTATIONS, (False, True), ((0.0, False), (0.9, True)), (False, True))]


def lr_of(value, tensor_lr):
    return torch.tensor(value) if tensor_lr else value


@pytest.mark.parametrize("case", SGD_ARGUMENTS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_silent_chart_is_bit_identical_to_sgd(seed, case):
    """Tensor lr, fused, foreach, momentum/nesterov, maximize, weight decay, two groups: exactly torch.optim.SGD."""
    batches = regression_batches(seed, epochs=1)
    sign = -1.0 if case["maximize"] else 1.0
    kwargs = dict(lr=lr_of(0.05, case["tensor_lr"]), momentum=case["momentum"], nesterov=case["nesterov"],
                  weight_decay=1e-2, maximize=case["maximize"], **IMPLEMENTATIONS[case["impl"]])
    models = [mlp(seed), mlp(seed)]
    groups = [[{"params": m[0].parameters(), "lr": lr_of(0.03, case["tensor_lr"])}, {"params": m[2].parameters()}]
              for m in models]
    sgd = torch.optim.SGD(groups[0], **kwargs)
    isgd = ISGD(groups[1], sigma=1e30, window=4, **kwargs)
    train(sgd, models[0], batches, sign=sign)
    train(isgd, models[1], batches, sign=sign)
    assert isgd.stats["warm"] and isgd.stats["chased_batches"] == 0
    for p_sgd, p_isgd in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p_sgd, p_isgd)
        if case["momentum"]:
            assert torch.equal(sgd.state[p_sgd]["momentum_buffer"], isgd.state[p_isgd]["momentum_buffer"])


def test_differentiable_step_matches_sgd(seed):
    """differentiable=True: the updated weights and their gradient w.r.t. the weights before the step are SGD's."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(6, generator=generator)
    x, target = torch.randn(8, 6, generator=generator), torch.randn(8, generator=generator)
    results = []
    for make in (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, differentiable=True),
                 lambda ps: ISGD(ps, lr=0.1, momentum=0.9, differentiable=True, sigma=1e30, window=2)):
        leaf = start.clone().requires_grad_()
        weight = leaf.clone()  # non-leaf: differentiable optimizers update it in place inside the graph
        optimizer = make([weight])

        def closure(weight=weight):
            loss = ((x @ weight - target) ** 2).mean()
            (weight.grad,) = torch.autograd.grad(loss, weight, create_graph=True)
            return loss
        optimizer.step(closure)
        (grad_wrt_start,) = torch.autograd.grad((weight ** 3).sum(), leaf)
        results.append((weight.detach().clone(), grad_wrt_start))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_tensor_lr_is_validated():
    with pytest.raises(ValueError, match="1-element"):
        ISGD(mlp(0).parameters(), lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(RuntimeError, match="fused"):
        ISGD(mlp(0).parameters(), lr=0.1, fused=True, differentiable=True)


@pytest.mark.parametrize("chart, chase_step, impl, tensor_lr", [
    ("shewhart", "gradient", "for-loop", False), ("shewhart", "gradient", "foreach", True),
    ("shewhart", "polyak", "fused", False), ("residual", "gradient", "fused", True),
    ("residual", "gradient", "for-loop", False), ("residual", "polyak", "foreach", False)])
def test_fast_isgd_matches_reference(seed, chart, chase_step, impl, tensor_lr):
    """Same chased batches, same weights (to rounding) as the plain re-statement, chases included."""
    batches = regression_batches(seed)
    settings = dict(momentum=0.5, weight_decay=1e-3, sigma=3.0, window=N_BATCHES, max_chase=3, epsilon=0.1,
                    chart=chart, chase_step=chase_step)
    expected_model, model = mlp(seed), mlp(seed)
    reference = ReferenceISGD(expected_model.parameters(), lr=0.05, **settings)
    fast = ISGD(model.parameters(), lr=lr_of(0.05, tensor_lr), history=True, **settings, **IMPLEMENTATIONS[impl])
    train(reference, expected_model, batches)
    train(fast, model, batches)
    assert reference.chased_steps, "the constructed problem must make the reference chase"
    assert [h["step"] for h in fast.history if h["chased"]] == reference.chased_steps
    assert fast.stats["extra_passes"] == reference.extra_passes
    for expected, actual in zip(expected_model.parameters(), model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
