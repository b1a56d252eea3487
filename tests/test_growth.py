"""Net2Net growth: the grown network computes the old function (eval mode, 1e-5), leaves the input alone, adds the
expected parameters, keeps training, round-trips through architecture()/rebuild() and refuses bad requests."""
from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from torch import nn

from detseg.errors import ConfigError
from detseg.growth import GrowthError, architecture, deepen, describe, rebuild, widen
from detseg.models.classification import MLP, ConvNet

TOLERANCE = 1e-5
NUM_CLASSES = 3


def _toy_batch(kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A separable toy problem: the class is the input channel / feature with the largest mean."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.randn(n, 8, generator=generator)
        return x, x[:, :NUM_CLASSES].argmax(1)
    x = torch.randn(n, 3, 8, 8, generator=generator)
    return x, x.mean(dim=(2, 3)).argmax(1)


def _train(model: nn.Module, kind: str, steps: int, seed: int = 0, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    x, y = _toy_batch(kind, 64, seed)
    model.train()
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _trained_model(kind: str, batchnorm: bool = True) -> nn.Module:
    """Width 6 / 4, depth 3, dropout 0.5, trained a few steps so weights and BN running stats are non-trivial.

    The ConvNet on 8 px pools after its first two blocks only, so an Identity pool is among them too."""
    torch.manual_seed(0)
    if kind == "mlp":
        model = MLP((8,), NUM_CLASSES, width=6, depth=3, dropout=0.5, batchnorm=batchnorm)
    else:
        model = ConvNet((3, 8, 8), NUM_CLASSES, width=4, depth=3, dropout=0.5, batchnorm=batchnorm,
                        convs_per_stage=1)
    _train(model, kind, steps=15)
    return model.eval()


def _max_diff(old: nn.Module, new: nn.Module, kind: str) -> float:
    x, _ = _toy_batch(kind, 32, seed=123)
    x = x * 2.0 + 0.5  # not the training distribution: the equality must not depend on it
    old.eval(), new.eval()
    with torch.no_grad():
        return (old(x) - new(x)).abs().max().item()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _consumer(model: nn.Module, layer: int) -> nn.Module:
    return model.blocks[layer + 1][0] if layer + 1 < len(model.blocks) else model.classifier


@pytest.fixture(scope="module", params=["mlp", "convnet"])
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def trained(kind) -> nn.Module:
    return _trained_model(kind)


# ---- Net2WiderNet ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [1.5, 2.0, 3.0])
def test_widen_every_layer_preserves_function(kind, trained, factor):
    before = _state(trained)
    for layer in range(len(trained.blocks)):
        block = trained.blocks[layer]
        width = block[0].weight.shape[0]
        # Every new unit brings its incoming weights + 2 BN parameters and one input slice of the consumer.
        per_unit = block[0].weight[0].numel() + 2 + _consumer(trained, layer).weight[:, 0].numel()
        grown = widen(trained, layer, factor, generator=torch.Generator().manual_seed(layer))
        new_width = round(width * factor)
        assert grown.blocks[layer][0].weight.shape[0] == new_width
        assert grown.blocks[layer][1].running_mean.shape == (new_width,)
        assert _param_count(grown) - _param_count(trained) == (new_width - width) * per_unit
        assert _max_diff(trained, grown, kind) < TOLERANCE
        assert isinstance(grown, type(trained))
    _assert_unchanged(trained, before)


def test_widen_copies_batchnorm_statistics_per_channel(trained):
    grown = widen(trained, 0, new_width=trained.blocks[0][0].weight.shape[0] + 3,
                  generator=torch.Generator().manual_seed(1))
    old_norm, new_norm = trained.blocks[0][1], grown.blocks[0][1]
    old_weight = trained.blocks[0][0].weight
    new_weight = grown.blocks[0][0].weight
    for unit in range(new_weight.shape[0]):
        # find the old unit this one copies by its incoming weights, then check all four BN quantities
        source = [j for j in range(old_weight.shape[0]) if torch.equal(new_weight[unit], old_weight[j])]
        assert len(source) == 1
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert getattr(new_norm, name)[unit] == getattr(old_norm, name)[source[0]]
    assert new_norm.num_batches_tracked == old_norm.num_batches_tracked > 0


def test_widen_without_batchnorm(kind):
    model = _trained_model(kind, batchnorm=False)
    for layer in range(len(model.blocks)):
        grown = widen(model, layer, 2.0)
        assert grown.blocks[layer][0].bias.shape == (2 * model.blocks[layer][0].weight.shape[0],)
        assert _max_diff(model, grown, kind) < TOLERANCE


def test_widen_noise_breaks_symmetry_and_still_preserves_function(kind, trained):
    layer = 0
    generator = torch.Generator().manual_seed(5)
    width = trained.blocks[layer][0].weight.shape[0]
    exact = widen(trained, layer, 2.0, generator=torch.Generator().manual_seed(5))
    noisy = widen(trained, layer, 2.0, generator=generator, noise=0.1)
    assert _max_diff(trained, noisy, kind) < TOLERANCE
    # Unit j and its copy width + j: equal halves without noise, unequal shares with it, always summing to the old.
    columns = lambda model: _consumer(model, layer).weight  # noqa: E731
    old = columns(trained)
    assert torch.allclose(columns(exact)[:, :width], old[:, :width] / 2)
    assert not torch.allclose(columns(noisy)[:, :width], columns(noisy)[:, width:])
    assert torch.allclose(columns(noisy)[:, :width] + columns(noisy)[:, width:], old, atol=1e-6)
    # and so the copies drift apart under training; without noise they would stay identical forever
    _train(noisy, "mlp" if isinstance(trained, MLP) else "convnet", steps=5, seed=3)
    incoming = noisy.blocks[layer][0].weight
    assert not torch.allclose(incoming[:width], incoming[width:])


# ---- Net2DeeperNet ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("measured", [False, True], ids=["estimated-stats", "measured-stats"])
def test_deepen_after_every_layer_preserves_function(kind, trained, measured):
    before = _state(trained)
    inputs = _toy_batch(kind, 64, seed=0)[0] if measured else None
    for layer in range(len(trained.blocks)):
        width = trained.blocks[layer][0].weight.shape[0]
        kernel = trained.blocks[layer][0].weight[0, 0].numel()    # 1 for Linear, 9 for a 3x3 conv
        grown = deepen(trained, layer, inputs=inputs)
        assert len(grown.blocks) == len(trained.blocks) + 1
        assert _param_count(grown) - _param_count(trained) == width * width * kernel + 2 * width
        if kind == "convnet":
            assert isinstance(grown.pools[layer + 1], nn.Identity) and len(grown.pools) == len(grown.blocks)
        assert _max_diff(trained, grown, kind) < TOLERANCE
    _assert_unchanged(trained, before)


def test_deepen_with_measured_stats_preserves_train_mode_on_that_batch(kind, trained):
    """The new BN's (m, v) are the batch statistics, so even with batch statistics the block is the identity."""
    x, _ = _toy_batch(kind, 64, seed=0)
    grown = deepen(trained, 0, inputs=x)
    old, new = copy.deepcopy(trained).train(), copy.deepcopy(grown).train()
    torch.manual_seed(9)
    old_out = old(x)
    torch.manual_seed(9)   # the same dropout mask
    new_out = new(x)
    assert (old_out - new_out).abs().max().item() < 1e-4


def test_deepen_without_batchnorm(kind):
    model = _trained_model(kind, batchnorm=False)
    grown = deepen(model, 1)
    assert len(grown.blocks[2]) == 2                             # Linear|Conv (with bias), ReLU
    assert _max_diff(model, grown, kind) < TOLERANCE


# ---- combinations, training afterwards -------------------------------------------------------------------------
def test_widen_deepen_widen_the_new_layer(kind, trained):
    generator = torch.Generator().manual_seed(7)
    grown = widen(trained, 1, 1.5, generator=generator)
    grown = deepen(grown, 1)                       # new block 2, width of the widened block
    grown = widen(grown, 2, 2.0, generator=generator, noise=0.05)
    grown = widen(grown, 1, 2.0, generator=generator)   # the consumer is now the inserted identity layer
    grown = deepen(grown, len(grown.blocks) - 1)   # right before the classifier
    assert len(grown.blocks) == len(trained.blocks) + 2
    assert _max_diff(trained, grown, kind) < TOLERANCE


def test_training_continues_after_growth(kind, trained):
    grown = deepen(widen(trained, 0, 2.0, generator=torch.Generator().manual_seed(0), noise=0.1), 1)
    start = {name: p.detach().clone() for name, p in grown.named_parameters()}
    # A fresh optimiser over the new parameters - what Trainer.rebuild_optimizer() does after trainer.model = grown.
    losses = _train(grown, kind, steps=30, seed=11, lr=3e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    moved = [name for name, p in grown.named_parameters() if not torch.equal(p, start[name])]
    assert len(moved) == len(start)                # every new parameter is trained


# ---- describe, architecture, rebuild ---------------------------------------------------------------------------
def test_describe_lists_blocks_and_classifier(trained):
    grown = widen(trained, 0, 2.0)
    rows = describe(grown)
    assert [row["index"] for row in rows] == list(range(len(grown.blocks) + 1))
    assert rows[0]["width"] == 2 * trained.blocks[0][0].weight.shape[0] and rows[0]["growable"]
    assert rows[-1]["kind"] == "classifier" and rows[-1]["width"] == NUM_CLASSES and not rows[-1]["growable"]
    assert sum(row["params"] for row in rows) == _param_count(grown)


def test_grown_model_checkpoint_round_trip(kind, trained):
    grown = deepen(widen(trained, 2, 1.5), 0)
    arch = json.loads(json.dumps(architecture(grown)))           # must survive JSON (config / HyperQuest DB)
    buffer = io.BytesIO()
    torch.save({"model": grown.state_dict(), "architecture": arch}, buffer)
    buffer.seek(0)
    payload = torch.load(buffer, weights_only=True)
    loaded = rebuild(payload["architecture"])
    loaded.load_state_dict(payload["model"])                     # strict: same keys and shapes
    assert type(loaded) is type(grown) and architecture(loaded) == arch
    assert _max_diff(grown, loaded, kind) < 1e-7
    assert loaded.dropout.p == 0.5


def test_rebuild_rejects_bad_architecture(trained):
    arch = architecture(trained)
    with pytest.raises(GrowthError, match="'widths'"):
        rebuild({**arch, "widths": [4, 0]})
    with pytest.raises(GrowthError, match="'dropout'"):
        rebuild({**arch, "dropout": 1.5})
    with pytest.raises(GrowthError, match="'kind'"):
        rebuild({**arch, "kind": "resnet"})
    if arch["kind"] == "convnet":
        with pytest.raises(GrowthError, match="'pools'"):
            rebuild({**arch, "pools": [True]})


# ---- bad requests ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda m: widen(m, 3, 2.0), "layer must be a layer index in 0..2, got 3"),
    (lambda m: widen(m, -1, 2.0), "got -1"),
    (lambda m: widen(m, 1.0, 2.0), "got 1.0"),
    (lambda m: widen(m, 0, 1.0), "factor must be a number > 1, got 1.0"),
    (lambda m: widen(m, 0, 0.5), "factor must be a number > 1"),
    (lambda m: widen(m, 0, float("nan")), "factor must be a number > 1"),
    (lambda m: widen(m, 0, 1.05), "adds no unit"),
    (lambda m: widen(m, 0), "exactly one of factor and new_width"),
    (lambda m: widen(m, 0, 2.0, new_width=20), "exactly one of factor and new_width"),
    (lambda m: widen(m, 0, new_width=2), "new_width must be an integer > the current width"),
    (lambda m: widen(m, 0, 2.0, noise=-0.1), "noise must be a number >= 0"),
    (lambda m: deepen(m, 3), "after_layer must be a layer index in 0..2, got 3"),
    (lambda m: deepen(MLP((4,), 2, depth=0), 0), "no hidden layer"),
    (lambda m: widen(nn.Linear(3, 3), 0, 2.0), "only cls/mlp and cls/convnet"),
])
def test_bad_requests_raise_value_error(trained, call, message):
    with pytest.raises(ValueError, match=message) as caught:
        call(trained)
    assert isinstance(caught.value, ConfigError)                 # the CLI's one-line error too
    assert isinstance(caught.value, GrowthError)
