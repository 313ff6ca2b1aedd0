import copy
import io
import itertools
import math

import pytest
import torch
from isgd_helpers import N_BATCHES, make_closure, mlp, regression_batches, train
from torch import nn

import accel
from accel.optim import ISGD, Inconsistent, accumulating_closure, micro_batch_size, plot_control_chart

SGD_COMBOS = [dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx, foreach=fe)
              for m, d, wd, n, mx, fe in itertools.product((0.0, 0.9), (0.0, 0.3), (0.0, 1e-2), (False, True),
                                                            (False, True), (False, True))
              if not (n and (m == 0 or d != 0))]


@pytest.mark.parametrize("kwargs", SGD_COMBOS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_silent_chart_gives_exactly_sgd(seed, kwargs):
    """The reference twin of the regular step: with the chart never firing, ISGD is torch.optim.SGD."""
    batches = regression_batches(seed, epochs=1)
    sign = -1.0 if kwargs["maximize"] else 1.0
    models = [mlp(seed), mlp(seed)]
    groups = [lambda m: [{"params": m[0].parameters(), "lr": 0.03}, {"params": m[2].parameters()}]] * 2
    sgd = torch.optim.SGD(groups[0](models[0]), lr=0.05, **kwargs)
    isgd = ISGD(groups[1](models[1]), lr=0.05, sigma=1e30, window=4, **kwargs)
    train(sgd, models[0], batches, sign=sign)
    train(isgd, models[1], batches, sign=sign)
    for expected, actual in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert isgd.stats["warm"] and isgd.stats["chased_batches"] == 0 and isgd.stats["batches"] == len(batches)
    if kwargs["momentum"]:
        for p_sgd, p_isgd in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(isgd.state[p_isgd]["momentum_buffer"], sgd.state[p_sgd]["momentum_buffer"],
                                       rtol=0, atol=0)


def test_detects_exactly_the_hard_batch_and_its_loss_falls(seed):
    hard_index = 7
    batches = regression_batches(seed, epochs=5, hard_index=hard_index)
    model = mlp(seed)
    opt = ISGD(model.parameters(), lr=0.05, momentum=0.5, window=N_BATCHES, max_chase=4, history=True)
    train(opt, model, batches)
    chased = [h for h in opt.history if h["chased"]]
    assert chased, opt.stats
    assert {h["step"] % N_BATCHES for h in chased} == {hard_index}
    for record in chased:
        assert record["loss"] > record["limit"] and record["final_loss"] < record["loss"]
        assert 1 <= record["extra_passes"] <= 4
    stats = opt.stats
    assert stats["chased_batches"] == len(chased)
    assert stats["extra_passes"] == sum(h["extra_passes"] for h in opt.history)
    assert stats["extra_pass_fraction"] == pytest.approx(stats["extra_passes"] / len(batches))


def test_larger_epsilon_moves_w_less(seed):
    """A hard batch with a linear loss ``c + v.w`` (|v| = 1) makes the chase exactly solvable: along v,
    ``x_{k+1} = rho x_k - lr r_0`` with ``rho = 1 - lr (1 + epsilon / n_w)``, so after K passes
    ``|w - w_anchor| = lr r_0 sum_{j<K} rho^j``, below the subproblem's own minimiser ``r_0 / (1 + epsilon / n_w)``
    and smaller for larger epsilon."""
    generator = torch.Generator().manual_seed(seed)
    n_weights, lr, passes = 4, 0.5, 4
    direction = torch.randn(n_weights, generator=generator)
    direction /= direction.norm()
    start = torch.randn(n_weights, generator=generator)
    easy_losses = 1.0 + 0.01 * torch.randn(24, generator=generator)
    distances = []
    for epsilon in (0.0, 1.0, 3.0):
        w = nn.Parameter(start.clone())
        opt = ISGD([w], lr=lr, window=20, max_chase=passes, epsilon=epsilon, history=True)
        for easy in easy_losses:  # zero gradient: w stays put while the chart warms up
            def flat(value=easy, opt=opt, w=w):
                opt.zero_grad()
                loss = value + 0.0 * w.sum()
                loss.backward()
                return loss
            opt.step(flat)
        assert torch.equal(w.detach(), start)

        def hard(opt=opt, w=w):
            opt.zero_grad()
            loss = 100.0 + direction @ w
            loss.backward()
            return loss
        opt.step(hard)
        record = opt.history[-1]
        assert record["chased"] and record["extra_passes"] == passes
        anchor = start - lr * direction  # after the regular update
        excess = float(100.0 + direction @ anchor) - record["limit"]
        rho = 1.0 - lr * (1.0 + epsilon / n_weights)
        expected = lr * excess * sum(rho ** j for j in range(passes))
        distance = float((w.detach() - anchor).norm())
        assert distance == pytest.approx(expected, rel=1e-4)
        assert distance <= excess / (1.0 + epsilon / n_weights)
        distances.append(distance)
    assert distances[0] > distances[1] > distances[2] > 0


def test_outlier_under_squared_loss_stays_stable(seed):
    """The chase factor (loss - limit) is unbounded; the capped step keeps weights finite and the loss falling."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    w_true = torch.randn(4, 1)
    opt = ISGD(model.parameters(), lr=0.02, window=30, max_chase=8, history=True)
    for step in range(40):
        x = torch.randn(32, 4)
        y = x @ w_true if step != 35 else torch.full((32, 1), 100.0) + 5 * torch.randn(32, 1)
        opt.step(make_closure(opt, model, x, y))
    outlier = opt.history[35]
    assert outlier["chased"] and outlier["loss"] > 100 * outlier["limit"]
    assert outlier["final_loss"] < 0.5 * outlier["loss"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_round_trip_is_bit_identical(seed):
    batches = regression_batches(seed, epochs=4)
    half = len(batches) // 2 + 3
    settings = dict(lr=0.05, momentum=0.9, nesterov=True, window=N_BATCHES, max_chase=3, history=True)
    model = mlp(seed)
    opt = ISGD(model.parameters(), **settings)
    train(opt, model, batches)
    assert opt.stats["chased_batches"] > 0

    first = mlp(seed)
    first_opt = ISGD(first.parameters(), **settings)
    train(first_opt, first, batches[:half])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = mlp(seed + 1)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = ISGD(resumed.parameters(), lr=1.0, window=2)  # everything comes from the checkpoint
    resumed_opt.load_state_dict(checkpoint["opt"])
    train(resumed_opt, resumed, batches[half:])
    for expected, actual in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(expected, actual)
    assert repr(resumed_opt.stats) == repr(opt.stats)  # repr: NaN-safe, exact floats
    assert repr(resumed_opt.history) == repr(opt.history)


def test_lr_scheduler_counts_steps_not_chase_passes(seed):
    batches = regression_batches(seed, epochs=4)
    model = mlp(seed)
    opt = ISGD(model.parameters(), lr=0.05, window=N_BATCHES, max_chase=3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + 0.01 * epoch))
    train(opt, model, batches, scheduler=scheduler)
    assert opt.stats["extra_passes"] > 0
    assert scheduler.last_epoch == len(batches)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / (1 + 0.01 * len(batches)))


def test_step_without_closure_and_bad_closure():
    opt = ISGD(nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="needs the closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="returned None"):
        opt.step(lambda: None)


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": -0.1}, "-0.1"),
    ({"sigma": 0.0}, "sigma .* got 0.0"),
    ({"sigma": -2.0}, "got -2.0"),
    ({"window": 1}, "window .* got 1"),
    ({"max_chase": -1}, "max_chase .* got -1"),
    ({"epsilon": -0.5}, "epsilon .* got -0.5"),
    ({"momentum": -0.9}, "-0.9"),
    ({"nonfinite": "ignore"}, "ignore"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ISGD(nn.Linear(2, 1).parameters(), **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize("policy", ["skip", "step", "raise"])
def test_nonfinite_loss_never_enters_the_chart(seed, policy):
    batches = regression_batches(seed, epochs=2)
    model = mlp(seed)
    opt = ISGD(model.parameters(), lr=0.05, window=N_BATCHES, nonfinite=policy, history=True)
    train(opt, model, batches[:N_BATCHES + 2])
    chart_before = opt.chart.state_dict()
    params_before = [p.detach().clone() for p in model.parameters()]
    x, y = batches[N_BATCHES + 2]
    poisoned = make_closure(opt, model, x, y, loss_fn=lambda out, target: nn.functional.mse_loss(out, target) * math.nan)
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step(poisoned)
    else:
        opt.step(poisoned)
    assert opt.chart.state_dict() == chart_before
    assert opt.stats["nonfinite"] == 1 and opt.stats["chased_batches"] == 0
    unchanged = all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
    assert unchanged == (policy != "step")  # "step" updates as SGD would (with NaN grads: NaN weights)


def test_param_groups_without_grads_and_add_param_group(seed):
    torch.manual_seed(seed)
    model, unused, late = nn.Linear(5, 1), nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    opt = ISGD([{"params": model.parameters()}, {"params": [unused], "lr": 0.5}], lr=0.05, window=N_BATCHES)
    before = unused.detach().clone()
    batches = regression_batches(seed, epochs=3)
    train(opt, model, batches[:N_BATCHES * 2])
    opt.add_param_group({"params": [late], "lr": 0.01, "momentum": 0.9})
    assert opt.param_groups[-1]["momentum"] == 0.9 and opt.param_groups[-1]["nesterov"] is False
    train(opt, model, batches[N_BATCHES * 2:])
    assert torch.equal(unused, before) and unused.grad is None
    assert opt.stats["batches"] == len(batches)
    with pytest.raises(ValueError, match="-1"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "lr": -1.0})


def test_maximize_mirrors_minimize_including_chases(seed):
    batches = regression_batches(seed)
    minimizing, maximizing = mlp(seed), mlp(seed)
    settings = dict(lr=0.05, window=N_BATCHES, max_chase=3)
    opt_min = ISGD(minimizing.parameters(), **settings)
    opt_max = ISGD(maximizing.parameters(), maximize=True, **settings)
    train(opt_min, minimizing, batches)
    train(opt_max, maximizing, batches, sign=-1.0)
    assert opt_min.stats["chased_batches"] > 0
    assert opt_max.stats["chased_batches"] == opt_min.stats["chased_batches"]
    for a, b in zip(minimizing.parameters(), maximizing.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_autocast(seed):
    batches = regression_batches(seed, epochs=3)
    model = mlp(seed)
    opt = ISGD(model.parameters(), lr=0.05, window=N_BATCHES, max_chase=3)
    for x, y in batches:
        def closure(x=x, y=y):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert torch.isfinite(loss)
    assert opt.stats["nonfinite"] == 0 and opt.stats["chased_batches"] > 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_inconsistent_adamw(seed):
    batches = regression_batches(seed, hard_noise=10.0)
    # silent chart: exactly AdamW
    plain, wrapped = mlp(seed), mlp(seed)
    adamw = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    silent = Inconsistent(torch.optim.AdamW(wrapped.parameters(), lr=1e-2), sigma=1e30, window=4)
    train(adamw, plain, batches)
    train(silent, wrapped, batches)
    for a, b in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(a, b)
    # chasing: the base optimizer's own step consumes the subproblem gradient
    model = mlp(seed)
    opt = Inconsistent(torch.optim.AdamW(model.parameters(), lr=3e-2), window=N_BATCHES, max_chase=3, history=True)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    train(opt, model, batches, scheduler=scheduler)
    stats = opt.stats
    assert stats["chased_batches"] > 0
    chase_updates = sum(h["extra_passes"] - (h["final_loss"] <= h["limit"]) for h in opt.history if h["chased"])
    adam_steps = float(opt.optimizer.state[next(model.parameters())]["step"])
    assert adam_steps == len(batches) + chase_updates
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-2 * 0.5 ** (len(batches) // 10))
    state = opt.state_dict()
    clone = Inconsistent(torch.optim.AdamW(mlp(seed).parameters(), lr=1.0))
    clone.load_state_dict(state)
    assert clone.stats == stats and clone.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    with pytest.raises(TypeError, match="Optimizer"):
        Inconsistent(model)
    with pytest.raises(RuntimeError, match="needs the closure"):
        opt.step()


def test_public_names_and_plot(tmp_path, seed):
    assert accel.ISGD is ISGD and accel.Inconsistent is Inconsistent
    pytest.importorskip("matplotlib")
    batches = regression_batches(seed)
    model = mlp(seed)
    opt = ISGD(model.parameters(), lr=0.05, window=N_BATCHES, max_chase=3, history=True)
    train(opt, model, batches)
    path = tmp_path / "chart.png"
    plot_control_chart(opt.history, path)
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="history=True"):
        plot_control_chart([], path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_foreach_default_matches_cpu_for_loop(seed):
    """On CUDA foreach is the default (as in torch.optim.SGD); it must agree with the CPU for-loop path, chases included."""
    batches = regression_batches(seed)
    settings = dict(lr=0.05, momentum=0.9, window=N_BATCHES, max_chase=3, history=True)
    cpu_model, cuda_model = mlp(seed), mlp(seed).cuda()
    cpu_opt = ISGD(cpu_model.parameters(), foreach=False, **settings)
    cuda_opt = ISGD(cuda_model.parameters(), **settings)
    train(cpu_opt, cpu_model, batches)
    train(cuda_opt, cuda_model, [(x.cuda(), y.cuda()) for x, y in batches])
    assert cuda_opt.stats["chased_batches"] == cpu_opt.stats["chased_batches"] > 0
    for a, b in zip(cpu_model.parameters(), cuda_model.parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


def test_inconsistent_around_plain_sgd_is_isgd(seed):
    """With momentum-free SGD as the base, the wrapper's chase (SGD.step on the subproblem gradient) is ISGD's."""
    batches = regression_batches(seed)
    settings = dict(window=N_BATCHES, max_chase=3, epsilon=0.1)
    isgd_model, wrapped_model = mlp(seed), mlp(seed)
    isgd = ISGD(isgd_model.parameters(), lr=0.05, **settings)
    wrapped = Inconsistent(torch.optim.SGD(wrapped_model.parameters(), lr=0.05), **settings)
    train(isgd, isgd_model, batches)
    train(wrapped, wrapped_model, batches)
    assert isgd.stats["chased_batches"] > 0 and repr(wrapped.stats) == repr(isgd.stats)
    for a, b in zip(isgd_model.parameters(), wrapped_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # pickling (deepcopy, torch.save of the optimizer object) keeps the chart
    clone = copy.deepcopy(isgd)
    assert repr(clone.stats) == repr(isgd.stats) and clone.chart.values == isgd.chart.values
    assert copy.deepcopy(wrapped).chart.values == wrapped.chart.values


def test_loss_all_reduce_runs_on_the_group_device(monkeypatch):
    """nccl reduces CUDA tensors only: a closure's Python float becomes a tensor on the current CUDA device there,
    and stays on the CPU (or the loss tensor's own device) for gloo and mixed backends."""
    from accel.optim._chase import reduction_device
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert reduction_device("nccl", 0.5) == torch.device("cuda", 3)
    assert reduction_device("nccl", torch.tensor(0.5)) == torch.device("cuda", 3)
    assert reduction_device("gloo", 0.5) == torch.device("cpu")
    assert reduction_device("gloo", torch.tensor(0.5)) == torch.device("cpu")
    assert reduction_device("cpu:gloo,cuda:nccl", 0.5) == torch.device("cpu")
    assert reduction_device("gloo", torch.tensor(0.5, device="meta")) == torch.device("meta")


def test_accumulating_closure_weights_unequal_micro_batches_by_size(seed):
    """48 + 16 samples give, after one step, the parameters of one batch of 64 (each loss weighted by its size)."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 5, generator=generator), torch.randn(64, 1, generator=generator)
    whole_model, split_model = mlp(seed), mlp(seed)
    whole = torch.optim.SGD(whole_model.parameters(), lr=0.5)
    split = torch.optim.SGD(split_model.parameters(), lr=0.5)
    whole_loss = whole.step(make_closure(whole, whole_model, x, y))
    closure = accumulating_closure(split, [(x[:48], y[:48]), (x[48:], y[48:])],
                                   lambda b: nn.functional.mse_loss(split_model(b[0]), b[1]))
    split_loss = split.step(closure)
    torch.testing.assert_close(split_loss, whole_loss.detach(), rtol=1e-6, atol=1e-7)
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(whole_model.parameters(), mlp(seed).parameters()))
    assert moved > 1e-3  # the step did something to compare
    for a, b in zip(whole_model.parameters(), split_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_accumulating_closure_sizes_from_containers_or_size_argument(seed):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(10, 5, generator=generator), torch.randn(10, 1, generator=generator)
    assert micro_batch_size(x) == 10 and micro_batch_size((x, y)) == 10
    assert micro_batch_size({"input": x, "target": y, "meta": "text"}) == 10
    assert micro_batch_size([{"input": x}, (y,)]) == 10
    for unknown, reason in [((x, y[:3]), "differ"), ("text", "holding no tensor"), (torch.tensor(1.0), "0-dim")]:
        with pytest.raises(ValueError, match=reason):
            micro_batch_size(unknown)
    model = mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="pass size=callable"):
        accumulating_closure(opt, ["a", "b"], lambda b: torch.zeros(()))
    with pytest.raises(ValueError, match="positive ints"):
        accumulating_closure(opt, [(x, y)], lambda b: torch.zeros(()), size=lambda b: 0)
    # size= overrides: weights 3:1 on two copies of the same batch make the same loss as the batch itself
    sizes = [3, 1]
    closure = accumulating_closure(opt, [(x, y), (x, y)], lambda b: nn.functional.mse_loss(model(b[0]), b[1]),
                                   size=lambda b: sizes.pop(0))
    torch.testing.assert_close(closure(), nn.functional.mse_loss(model(x), y).detach())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_isgd_loads_a_plain_sgd_state_dict(seed, momentum):
    """Switching from torch.optim.SGD to ISGD mid-run: momentum buffers carried over, the chart starts empty, and
    with the chart still warming up the next steps are exactly SGD's."""
    batches = regression_batches(seed, epochs=2)
    sgd_model = mlp(seed)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.05, momentum=momentum)
    train(sgd, sgd_model, batches[:N_BATCHES])
    isgd_model = copy.deepcopy(sgd_model)
    isgd = ISGD(isgd_model.parameters(), lr=0.05, momentum=momentum, window=N_BATCHES, history=True)
    train(isgd, isgd_model, batches[:3])  # a chart with values, to see it emptied by the load
    isgd_model.load_state_dict(sgd_model.state_dict())
    isgd.load_state_dict(copy.deepcopy(sgd.state_dict()))  # as from a checkpoint: no tensor shared
    assert len(isgd.chart) == 0 and isgd.stats["batches"] == 0 and isgd.history == []
    for p_sgd, p_isgd in zip(sgd_model.parameters(), isgd_model.parameters()):
        if momentum:
            assert torch.equal(isgd.state[p_isgd]["momentum_buffer"], sgd.state[p_sgd]["momentum_buffer"])
        else:
            assert isgd.state[p_isgd].get("momentum_buffer") is None
    train(sgd, sgd_model, batches[N_BATCHES:N_BATCHES + 10])
    train(isgd, isgd_model, batches[N_BATCHES:N_BATCHES + 10])
    assert not isgd.chart.warm and isgd.stats["batches"] == 10
    for a, b in zip(sgd_model.parameters(), isgd_model.parameters()):
        assert torch.equal(a, b)


def test_inconsistent_loads_its_base_optimizers_state_dict(seed):
    batches = regression_batches(seed, epochs=1)
    base_model = mlp(seed)
    base = torch.optim.AdamW(base_model.parameters(), lr=3e-2)
    train(base, base_model, batches[:10])
    wrapped_model = copy.deepcopy(base_model)
    wrapped = Inconsistent(torch.optim.AdamW(wrapped_model.parameters(), lr=3e-2), window=N_BATCHES, history=True)
    train(wrapped, wrapped_model, batches[:2])
    wrapped_model.load_state_dict(base_model.state_dict())
    wrapped.load_state_dict(copy.deepcopy(base.state_dict()))
    assert len(wrapped.chart) == 0 and wrapped.stats["batches"] == 0 and wrapped.history == []
    assert wrapped.state is wrapped.optimizer.state and wrapped.param_groups is wrapped.optimizer.param_groups
    train(base, base_model, batches[10:])
    train(wrapped, wrapped_model, batches[10:])
    for a, b in zip(base_model.parameters(), wrapped_model.parameters()):
        assert torch.equal(a, b)


def test_regular_update_is_sgd_step_and_step_hooks_run_once(seed):
    """The regular update runs torch.optim.SGD.step; hooks registered on the ISGD instance run once per step."""
    batches = regression_batches(seed, epochs=1)
    model = mlp(seed)
    opt = ISGD(model.parameters(), lr=0.05, window=N_BATCHES)
    calls = []
    opt.register_step_pre_hook(lambda *args: calls.append("pre"))
    opt.register_step_post_hook(lambda *args: calls.append("post"))
    sgd_steps = []
    original = torch.optim.SGD.step

    def counting(self, *args, **kwargs):
        sgd_steps.append(type(self).__name__)
        return original(self, *args, **kwargs)
    torch.optim.SGD.step = counting
    try:
        train(opt, model, batches[:3])
    finally:
        torch.optim.SGD.step = original
    assert calls == ["pre", "post"] * 3 and sgd_steps == ["SGD"] * 3
