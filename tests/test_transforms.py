"""Whole-model transforms: ``accel.nn.offload_`` / ``unoffload_`` and ``accel.nn.compress_``, on real models."""
import copy
import io

import pytest
import torch
from torch import nn

import accel.nn
from accel.nn import (
    BTLSTM,
    BTLinear,
    CannotCompressError,
    OutOfCoreLinear,
    TargetError,
    TiedWeightError,
    compress_,
    offload_,
    unoffload_,
)
from accel.nn.transforms import HostEmbedding
from accel.ooc import Engine

DOUBLE = torch.float64


# -- builders ---------------------------------------------------------------------------------------------------
def tiny_gpt2(seed):
    transformers = pytest.importorskip("transformers", reason="transformers (optional) builds the GPT-2 model")
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).to(DOUBLE)


def gpt2_tokens(seed, batch=4, length=12):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed + 1))


def train_losses(model, tokens, steps=4, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


class Mixed(nn.Module):
    """LSTM encoder -> Linear -> GRU -> Linear head: the layer kinds compress_ takes, in one model."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(48, 16, batch_first=True)
        self.mid = nn.Linear(16, 36)
        self.gru = nn.GRU(36, 8, batch_first=True)
        self.rnn = nn.RNN(8, 4, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(4, 7)  # 7 is prime: no block-term form

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(torch.tanh(self.mid(y)))
        y, _ = self.rnn(y)
        return self.head(y[:, -1])


def mixed(seed):
    torch.manual_seed(seed)
    return Mixed().to(DOUBLE)


def mixed_input(seed):
    return torch.randn(5, 6, 48, dtype=DOUBLE, generator=torch.Generator().manual_seed(seed + 2))


def block_term_weight(seed, out_features=24, in_features=36, ranks=2, num_blocks=2):
    """An (out, in) weight that is exactly block-term at ``ranks`` x ``num_blocks``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return BTLinear(in_features, out_features, ranks=ranks, num_blocks=num_blocks, dtype=DOUBLE).to_dense()


# -- offload_ on GPT-2 ------------------------------------------------------------------------------------------
def gpt2_filter(module, name):
    return name == "lm_head" or ".mlp." in name


def test_offload_gpt2_trains_to_the_same_losses_and_keeps_the_tie(seed):
    model = tiny_gpt2(seed)
    original = copy.deepcopy(model)
    tokens = gpt2_tokens(seed)
    conv_weight = model.transformer.h[0].mlp.c_fc.weight
    summary = offload_(model, gpt2_filter, engine=Engine(["cpu"], memory_limit=1 << 20))

    assert summary.names == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc",
                             "transformer.h.1.mlp.c_proj", "lm_head"]
    assert isinstance(model.lm_head, OutOfCoreLinear) and type(model.lm_head) is OutOfCoreLinear
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D's own (nx, nf) weight, in OutOfCoreLinear's transposed layout
    assert type(conv) is OutOfCoreLinear and conv.transposed_weight and conv.weight is conv_weight
    assert model.lm_head.weight is model.transformer.wte.weight  # one host weight serves both
    assert type(model.transformer.wte) is HostEmbedding and summary.host_embeddings == ["transformer.wte"]
    assert summary["lm_head"].tied_with == ("transformer.wte",) and not summary["lm_head"].kind == "Conv1D"
    assert not summary.parameters_replaced  # every Parameter kept, Conv1D's too: an optimizer made before works
    engines = {id(m.engine) for m in model.modules() if isinstance(m, OutOfCoreLinear)}
    assert engines == {id(summary.engine)}
    assert summary.device_budget == {"cpu": 1 << 20}
    expected_bytes = sum(p.numel() * 8 for m in model.modules() if isinstance(m, OutOfCoreLinear)
                         for p in m.parameters())
    assert summary.host_bytes == expected_bytes
    text = str(summary)
    assert "5 layer(s)" in text and "tied with transformer.wte" in text and "cpu 1.0 MiB" in text
    assert "transformer.wte: embedding tied to an offloaded weight" in text

    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, original(tokens).logits, rtol=0, atol=1e-12)
    losses, reference = train_losses(model, tokens), train_losses(original, tokens)
    assert losses == pytest.approx(reference, rel=1e-10, abs=1e-12)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.allclose(model.transformer.wte.weight, original.transformer.wte.weight, rtol=0, atol=1e-10)
    fc = model.transformer.h[1].mlp.c_fc
    assert torch.allclose(fc.weight, original.transformer.h[1].mlp.c_fc.weight, rtol=0, atol=1e-10)


def test_offload_gpt2_state_dict_round_trips(seed):
    trained = tiny_gpt2(seed)
    tokens = gpt2_tokens(seed)
    train_losses(trained, tokens, steps=2)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)

    fresh = tiny_gpt2(seed + 1)  # other weights
    offload_(fresh, gpt2_filter)
    state = fresh.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in trained.state_dict().items()}
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))  # a dense checkpoint loads into the offloaded model
    with torch.no_grad():
        assert torch.allclose(fresh(tokens).logits, trained(tokens).logits, rtol=0, atol=1e-12)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight

    back = tiny_gpt2(seed + 2)  # and the offloaded model's checkpoint loads into a dense one
    back.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        assert torch.allclose(back(tokens).logits, trained(tokens).logits, rtol=0, atol=1e-12)


def test_unoffload_gpt2_restores_conv1d_and_linear(seed):
    model = tiny_gpt2(seed)
    from transformers.pytorch_utils import Conv1D

    tokens = gpt2_tokens(seed)
    offload_(model, gpt2_filter)
    train_losses(model, tokens, steps=2)
    with torch.no_grad():
        before = model(tokens).logits
    restored = unoffload_(model)
    assert restored == ["transformer.wte", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                        "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj", "lm_head"]
    assert type(model.transformer.wte) is nn.Embedding
    assert not any(isinstance(m, OutOfCoreLinear) for m in model.modules())
    assert type(model.lm_head) is nn.Linear and type(model.transformer.h[0].mlp.c_fc) is Conv1D
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, before, rtol=0, atol=1e-12)


def test_default_selection_is_by_weight_size(seed):
    model = tiny_gpt2(seed)
    sizes = {name: m.weight.numel() * 8 for name, m in model.named_modules()
             if type(m) is nn.Linear or type(m).__name__ == "Conv1D"}
    threshold = sorted(set(sizes.values()))[-1]  # only the largest weights
    summary = offload_(model, min_weight_bytes=threshold)
    assert set(summary.names) == {name for name, size in sizes.items() if size >= threshold}
    assert offload_(tiny_gpt2(seed)).layers == []  # the default threshold (16 MiB) takes none of this tiny model


# -- ties that cannot be kept, and wrappers -----------------------------------------------------------------------
class TiedPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight
        self.twin = nn.Linear(4, 10, bias=False)
        self.twin.weight = self.embed.weight


def test_tie_stays_in_host_memory_through_model_to(seed):
    model = tiny_gpt2(seed)
    offload_(model, gpt2_filter)
    tokens = gpt2_tokens(seed)
    copied = copy.deepcopy(model)  # copies keep the tie, the layouts and one engine for all layers
    assert copied.lm_head.weight is copied.transformer.wte.weight
    assert len({id(m.engine) for m in copied.modules() if isinstance(m, OutOfCoreLinear)}) == 1
    with torch.no_grad():
        assert torch.equal(copied(tokens).logits, model(tokens).logits)
    model.to(torch.float32)  # dtype conversions apply to the shared weight, which stays shared
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.dtype == torch.float32
    model.to("meta")  # a device move: every other parameter goes, the offloaded and tied weights stay on the host
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.device.type == "cpu"
    assert model.transformer.h[0].mlp.c_fc.weight.device.type == "cpu"
    assert model.transformer.wpe.weight.device.type == "meta"


def test_tie_to_a_layer_left_on_the_device_is_refused_naming_both_modules():
    model = TiedPair()
    with pytest.raises(TiedWeightError, match=r"out\.weight is tied to embed\.weight, twin\.weight.*twin is a Linear"):
        offload_(model, lambda m, name: name == "out")
    assert type(model.out) is nn.Linear and type(model.embed) is nn.Embedding  # nothing changed
    summary = offload_(model, lambda m, name: name in ("out", "twin"))  # both offloaded: one host weight
    assert model.out.weight is model.twin.weight is model.embed.weight and summary.host_embeddings == ["embed"]
    assert summary.host_bytes == 10 * 4 * 4


def test_tied_conv1d_weight_stays_tied_when_both_are_offloaded_else_is_refused(seed):
    pytest.importorskip("transformers", reason="transformers (optional) provides Conv1D")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    model = nn.Sequential(Conv1D(8, 8), Conv1D(8, 8))
    model[1].weight = model[0].weight
    with pytest.raises(TiedWeightError, match=r"0\.weight is tied to 1\.weight.*1 is a Conv1D"):
        offload_(model, lambda m, name: name == "0")
    assert type(model[0]) is Conv1D  # nothing changed
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(x)
    weight = model[0].weight
    summary = offload_(model, min_weight_bytes=0)  # both: the layers share the Conv1D's own Parameter
    assert model[0].weight is model[1].weight is weight and not summary.parameters_replaced
    assert summary.host_bytes == (8 * 8 + 2 * 8) * 4
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_shared_module_is_replaced_under_every_name():
    layer = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": layer, "b": layer})
    summary = offload_(model, min_weight_bytes=0)
    assert isinstance(model["a"], OutOfCoreLinear) and model["a"] is model["b"]
    assert summary.names == ["a"] and summary["a"].tied_with == ()  # one layer under two names, not a tie


def test_subclasses_of_linear_are_left_alone():
    attention = nn.MultiheadAttention(8, 2)  # reads out_proj.weight itself: its Linear subclass must stay
    summary = offload_(attention, min_weight_bytes=0)
    assert summary.layers == [] and type(attention.out_proj) is not OutOfCoreLinear


def test_offload_then_ddp_trains_like_the_plain_model_and_wrapped_models_are_refused(seed, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(seed)
        plain = nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 3)).to(DOUBLE)
        model = copy.deepcopy(plain)
        with pytest.raises(ValueError, match="DistributedDataParallel.*first, then wrap"):
            offload_(DistributedDataParallel(copy.deepcopy(plain)), min_weight_bytes=0)
        offload_(model, min_weight_bytes=0)
        wrapped = DistributedDataParallel(model)
        x = torch.randn(16, 12, dtype=DOUBLE, generator=torch.Generator().manual_seed(seed))
        for module in (wrapped, plain):
            optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
            for _ in range(3):
                optimizer.zero_grad()
                module(x).square().mean().backward()
                optimizer.step()
        for p, q in zip(model.parameters(), plain.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="DistributedDataParallel"):
            unoffload_(wrapped)
        from torch.distributed.fsdp import fully_shard

        sharded = fully_shard(nn.Sequential(nn.Linear(4, 4)))
        with pytest.raises(ValueError, match="FSDP is out of scope"):
            offload_(sharded, min_weight_bytes=0)
        with pytest.raises(ValueError, match="FSDP is out of scope"):
            compress_(sharded)
    finally:
        dist.destroy_process_group()


# -- a weight larger than the device budget -----------------------------------------------------------------------
def test_layer_larger_than_the_engine_budget_trains_like_nn_linear(seed):
    torch.manual_seed(seed)
    reference = nn.Sequential(nn.Linear(16, 384), nn.Tanh(), nn.Linear(384, 256), nn.Tanh(),
                              nn.Linear(256, 4)).to(DOUBLE)
    model = copy.deepcopy(reference)
    budget = 96 << 10
    engine = Engine(["cpu"], memory_limit=budget)
    summary = offload_(model, engine=engine, min_weight_bytes=256 << 10)
    assert summary.names == ["2"]
    assert summary.layers[0].weight_bytes == 384 * 256 * 8 > budget == summary.device_budget["cpu"]
    assert summary.layers[0].same_parameters and not summary.parameters_replaced
    x = torch.randn(32, 16, dtype=DOUBLE, generator=torch.Generator().manual_seed(seed))
    target = torch.randn(32, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(seed + 1))
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, reference)]  # built before: same Params
    for _ in range(4):
        for module, optimizer in zip((model, reference), optimizers):
            optimizer.zero_grad()
            (module(x) - target).square().mean().backward()
            optimizer.step()
    assert engine.totals.calls > 0
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-10), name


def test_unoffload_linear_keeps_the_parameters_and_handles_hand_built_layers(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), OutOfCoreLinear(10, 3, devices=["cpu"]))
    weight = model[0].weight
    offload_(model, min_weight_bytes=0)
    assert model[0].weight is weight
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = model(x)
    assert unoffload_(model) == ["0", "2"]
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear and model[0].weight is weight
    assert (model[0].in_features, model[2].out_features) == (6, 3)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_unoffload_restores_a_hand_built_transposed_layer_as_conv1d(seed):
    pytest.importorskip("transformers", reason="transformers (optional) provides Conv1D")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    layer = OutOfCoreLinear(6, 5, dtype=DOUBLE, devices=["cpu"], transposed_weight=True)
    model = nn.Sequential(layer, nn.Tanh())
    x = torch.randn(4, 6, dtype=DOUBLE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = model(x)
    assert unoffload_(model) == ["0"]
    assert type(model[0]) is Conv1D and model[0].weight is layer.weight and model[0].bias is layer.bias
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=0, atol=1e-12)
    no_bias = nn.Sequential(OutOfCoreLinear(6, 5, bias=False, devices=["cpu"], transposed_weight=True))
    with pytest.raises(ValueError, match="0 has transposed_weight=True.*no bias"):
        unoffload_(no_bias)
    assert type(no_bias[0]) is OutOfCoreLinear  # nothing changed


def test_host_embedding_made_on_meta_materialises_on_the_host():
    with torch.device("meta"):
        model = nn.Sequential(HostEmbedding(10, 4, padding_idx=0), nn.Linear(4, 3))
    model.to_empty(device="meta")  # stays meta: nothing allocated
    assert model[0].weight.is_meta
    model.to_empty(device="cpu")
    assert model[0].weight.device.type == "cpu" and isinstance(model[0].weight, nn.Parameter)
    model.to(torch.float64)
    assert model[0].weight.dtype == torch.float64 and model[0].weight.device.type == "cpu"


def test_offload_argument_errors():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="not with engine="):
        offload_(model, engine=Engine(["cpu"]), memory_limit=1 << 20)
    with pytest.raises(TypeError, match="filter_fn must be callable"):
        offload_(model, "lm_head")
    with pytest.raises(ValueError, match="min_weight_bytes"):
        offload_(model, min_weight_bytes=-1)
    with pytest.raises(TypeError, match="nn.Module"):
        offload_(torch.zeros(3))


# -- compress_ ----------------------------------------------------------------------------------------------------
def test_compress_full_ranks_computes_the_same_function(seed):
    model = mixed(seed)
    x = mixed_input(seed)
    with torch.no_grad():
        reference = model(x)
    summary = compress_(model, ranks="full")
    assert [layer.name for layer in summary.layers] == ["lstm", "mid", "gru", "rnn"]
    assert summary.skipped[0][0] == "head" and "prime" in summary.skipped[0][1]
    assert type(model.lstm) is BTLSTM and type(model.mid) is BTLinear and type(model.head) is nn.Linear
    assert all(layer.relative_error < 1e-12 and layer.num_blocks == 1 for layer in summary.layers)
    with torch.no_grad():
        assert torch.allclose(model(x), reference, rtol=0, atol=1e-12)


def test_compress_reports_parameters_and_error_per_layer(seed):
    model = mixed(seed)
    dense = {name: sum(p.numel() for p in model.get_submodule(name).parameters()) for name in ("lstm", "mid")}
    summary = compress_(model, lambda m, name: name in ("lstm", "mid"), ranks=2)
    for layer in summary.layers:
        assert layer.parameters_before == dense[layer.name]
        assert layer.parameters_after == sum(p.numel() for p in model.get_submodule(layer.name).parameters())
        assert layer.parameters_after < layer.parameters_before
        assert 0 < layer.relative_error < 1
    assert model.lstm.input_projection.reconstruction_error == summary["lstm"].relative_error
    assert "lstm" in str(summary) and "rel. error" in str(summary)
    x = mixed_input(seed)
    model(x).square().mean().backward()  # trains as it is
    assert model.lstm.input_projection.core.grad is not None


def test_compress_fraction_fits_the_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    summary = compress_(model, ranks=0.1, num_blocks=2)
    layer = model[0]
    assert layer.num_weight_parameters <= 0.1 * 64 * 48
    bigger = BTLinear(64, 48, in_shape=layer.in_shape, out_shape=layer.out_shape,
                      ranks=[min(r + 1, i * j) for r, i, j in zip(layer.ranks, layer.in_shape, layer.out_shape)])
    assert bigger.num_weight_parameters > 0.1 * 64 * 48  # the largest rank that fits
    assert summary.layers[0].ranks == layer.ranks


def test_compress_target_error_finds_a_block_term_weight(seed):
    model = nn.Sequential(nn.Linear(36, 24, dtype=DOUBLE))
    with torch.no_grad():
        model[0].weight.copy_(block_term_weight(seed))
    summary = compress_(model, ranks=TargetError(1e-6), num_blocks=2)
    layer = summary.layers[0]
    assert layer.relative_error <= 1e-6 and max(layer.ranks) <= 2
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        TargetError(0.0)


def test_compress_per_layer_mapping_selects_and_sets_ranks(seed):
    model = mixed(seed)
    summary = compress_(model, ranks={"mid": 2, "lstm": "full"}, num_blocks={"mid": 3, "lstm": 2})
    assert summary.ranks == {"lstm": summary["lstm"].ranks, "mid": (2, 2, 2, 2)}
    assert summary.num_blocks == {"lstm": 1, "mid": 3}
    assert type(model.gru) is nn.GRU  # not named: left alone
    with pytest.raises(KeyError, match="not Linear/Conv1D/LSTM/GRU/RNN layers"):
        compress_(mixed(seed), ranks={"nope": 2})


def test_compress_state_dict_round_trip(seed):
    model = mixed(seed)
    summary = compress_(model, lambda m, name: name in ("lstm", "mid", "gru"), ranks=0.3)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = mixed(seed + 1)
    rebuilt = compress_(fresh, ranks=summary.ranks, num_blocks=summary.num_blocks, decompose=False)
    assert [layer.relative_error for layer in rebuilt.layers] == [None] * 3
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    x = mixed_input(seed)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_compress_clear_errors(seed):
    with pytest.raises(CannotCompressError, match=r"head \(Linear, 4 -> 7 features\).*prime"):
        compress_(mixed(seed), lambda m, name: name == "head")
    with pytest.raises(CannotCompressError, match="proj_size=4"):
        compress_(nn.Sequential(nn.LSTM(16, 8, proj_size=4)), lambda m, name: name == "0", ranks=2)
    with pytest.raises(CannotCompressError, match="rank 1"):
        compress_(nn.Sequential(nn.Linear(16, 16)), lambda m, name: True, ranks=0.01)
    small = nn.Sequential(nn.Linear(1024, 64), nn.Linear(64, 10))  # default selection: the head is too small
    summary = compress_(small, ranks=0.05)
    assert [layer.name for layer in summary.layers] == ["0"] and summary.skipped[0][0] == "1"
    assert "rank 1" in summary.skipped[0][1] and type(small[1]) is nn.Linear
    with pytest.raises(ValueError, match="only string is 'full'"):
        compress_(mixed(seed), ranks="half")
    with pytest.raises(ValueError, match="fraction"):
        compress_(mixed(seed), ranks=1.5)
    with pytest.raises(TypeError, match="shapes="):
        compress_(mixed(seed), in_shape=(4, 12))
    with pytest.raises(ValueError, match="needs the trained weights"):
        compress_(mixed(seed), ranks=TargetError(0.1), decompose=False)
    shaped = mixed(seed)
    summary = compress_(shaped, ranks={"mid": 2}, shapes={"mid": ((4, 4), (6, 6))})
    assert (summary["mid"].in_shape, summary["mid"].out_shape) == ((4, 4), (6, 6))
    with pytest.raises(CannotCompressError, match=r"mid \(Linear\): shapes="):
        compress_(mixed(seed), ranks={"mid": 2}, shapes={"mid": ((4, 5), (6, 6))})


def test_compress_refuses_to_untie_gpt2_lm_head(seed):
    model = tiny_gpt2(seed)
    with pytest.raises(TiedWeightError, match=r"lm_head\.weight is tied to transformer\.wte\.weight"):
        compress_(model, lambda m, name: name == "lm_head")
    summary = compress_(model, lambda m, name: name.endswith("mlp.c_fc"), ranks=4)  # Conv1D layers
    assert [layer.kind for layer in summary.layers] == ["Conv1D", "Conv1D"]
    tokens = gpt2_tokens(seed)
    assert torch.isfinite(model(tokens, labels=tokens).loss)


def test_exports():
    for name in ("offload_", "unoffload_", "compress_", "TargetError", "TiedWeightError"):
        assert name in accel.nn.__all__ and getattr(accel.nn, name) is not None
