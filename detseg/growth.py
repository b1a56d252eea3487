"""Growing a trained classifier without forgetting: Net2Net's function-preserving transforms.

Chen, Goodfellow & Shlens (2016), "Net2Net: Accelerating Learning via Knowledge Transfer": a network can be made
wider or deeper so that the bigger network computes *exactly* the same function as the smaller one. Training then
continues from where it was instead of from scratch - which is what HyperQuest's "grow" button does mid-trial.

* :func:`widen` (Net2WiderNet) - block ``layer`` gets more units. Each new unit is a copy of an existing one (same
  incoming weights, same batch-norm parameters and running statistics), so it produces the same activation. The
  next layer then sees that activation several times; dividing the outgoing weights of a unit by the number of its
  copies makes their contributions sum to the old one.
* :func:`deepen` (Net2DeeperNet) - a new block is inserted after a block that ends in a ReLU. Its conv / linear
  layer starts as the identity and its batch norm undoes its own normalisation; since the input is non-negative
  (it came out of a ReLU), the new block's ReLU passes it through unchanged.

Both return a *new* model and leave the input untouched. The grown model still is an
:class:`~detseg.models.classification.MLP` / :class:`~detseg.models.classification.ConvNet` whose ``blocks``,
``pools`` and ``classifier`` describe it; :func:`architecture` records its now non-uniform shape and :func:`rebuild`
makes an empty model of that shape, so a checkpoint of a grown model (state_dict + architecture) can be loaded.

The parameters are new tensors, so the optimiser must be rebuilt after growing: with a
:class:`~detseg.engine.trainer.Trainer`, ``trainer.model = grown; trainer.rebuild_optimizer()``. The optimiser's
moments start from zero - the growth is a fresh start for the optimiser, not for the function.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .errors import ConfigError
from .models.classification import MLP, ConvNet, conv_block, dense_block

GrowableModel = MLP | ConvNet


class GrowthError(ConfigError, ValueError):
    """A growth request that cannot be done (bad layer index, factor, model or architecture).

    Both a :class:`~detseg.errors.ConfigError` (the CLI prints one line) and a ``ValueError`` (HyperQuest answers 422).
    """


# ---- reading the model -----------------------------------------------------------------------------------------
def _check_model(model: nn.Module) -> None:
    if not isinstance(model, (MLP, ConvNet)):
        raise GrowthError(f"only cls/mlp and cls/convnet models can grow, not {type(model).__name__}")


def _check_block_index(model: GrowableModel, index: int, name: str) -> None:
    depth = len(model.blocks)
    if depth == 0:
        raise GrowthError(f"{name}: the model has no hidden layer to grow from")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < depth:
        raise GrowthError(f"{name} must be a layer index in 0..{depth - 1}, got {index!r}")


def _uses_batchnorm(block: nn.Sequential) -> bool:
    return isinstance(block[1], nn.modules.batchnorm._BatchNorm)


def _width(block: nn.Sequential) -> int:
    layer = block[0]
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _block_maker(model: GrowableModel):
    return dense_block if isinstance(model, MLP) else conv_block


# ---- Net2WiderNet ----------------------------------------------------------------------------------------------
def _target_width(old_width: int, factor: float | None, new_width: int | None) -> int:
    if (factor is None) == (new_width is None):
        raise GrowthError("give exactly one of factor and new_width")
    if new_width is None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                or factor <= 1:
            raise GrowthError(f"factor must be a number > 1, got {factor!r}")
        new_width = round(old_width * factor)
        if new_width <= old_width:
            raise GrowthError(f"factor {factor} adds no unit to a layer of width {old_width}")
    elif isinstance(new_width, bool) or not isinstance(new_width, int) or new_width <= old_width:
        raise GrowthError(f"new_width must be an integer > the current width {old_width}, got {new_width!r}")
    return new_width


def replication_map(old_width: int, new_width: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(new_width,)`` index of the old unit each new unit copies: the old units first, then the extra copies.

    The paper draws the copied units at random with replacement; we spread the copies evenly instead (every unit
    gets ``extra // old`` copies and a random subset of units one more), so no unit is copied far more often than
    the others and the division of its outgoing weights stays mild.
    """
    full_rounds, remainder = divmod(new_width - old_width, old_width)
    chosen = torch.randperm(old_width, generator=generator)[:remainder].sort().values
    return torch.cat([torch.arange(old_width).repeat(full_rounds + 1), chosen])


def outgoing_shares(mapping: torch.Tensor, old_width: int, noise: float = 0.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """``(new_width,)`` fraction of its original's outgoing weights each new unit gets; the copies of a unit sum to 1.

    ``noise = 0`` is Net2Net's equal split, ``1 / copies``. Identical copies with identical outgoing weights get
    identical gradients and would stay copies forever; ``noise > 0`` splits unequally, ``(1 + e) / copies`` with the
    jitter ``e ~ noise * N(0, 1)`` centred within each group of copies. Because the copies compute the same
    activation, *any* split that sums to one preserves the function, so unlike the paper's noise on the weights this
    breaks the symmetry without changing a single output.
    """
    counts = torch.bincount(mapping, minlength=old_width).double()
    shares = 1.0 / counts[mapping]
    if noise > 0:
        jitter = noise * torch.randn(len(mapping), generator=generator, dtype=torch.float64)
        group_mean = torch.zeros(old_width, dtype=torch.float64).index_add_(0, mapping, jitter) / counts
        shares = shares * (1.0 + jitter - group_mean[mapping])
    return shares


def _layer_like(layer: nn.Linear | nn.Conv2d, in_units: int, out_units: int) -> nn.Linear | nn.Conv2d:
    """An uninitialised layer of the same kind, size ``in_units -> out_units``, on the same device and dtype."""
    factory = {"bias": layer.bias is not None, "device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        return nn.Linear(in_units, out_units, **factory)
    return nn.Conv2d(in_units, out_units, layer.kernel_size, stride=layer.stride, padding=layer.padding, **factory)


def _copy_units(layer: nn.Linear | nn.Conv2d, mapping: torch.Tensor) -> nn.Linear | nn.Conv2d:
    """The producing layer: output unit ``j`` gets the incoming weights (and bias) of old unit ``mapping[j]``."""
    wider = _layer_like(layer, layer.weight.shape[1], len(mapping))
    with torch.no_grad():
        wider.weight.copy_(layer.weight[mapping])              # (out, in[, k, k]) -> (new_out, in[, k, k])
        if layer.bias is not None:
            wider.bias.copy_(layer.bias[mapping])
    return wider


def _copy_batchnorm(norm: nn.modules.batchnorm._BatchNorm, mapping: torch.Tensor) -> nn.Module:
    """Per-channel copies of the affine parameters *and* the running statistics, so eval mode matches exactly."""
    wider = type(norm)(len(mapping), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                       track_running_stats=norm.track_running_stats, device=norm.running_mean.device,
                       dtype=norm.running_mean.dtype)
    state = {name: (value[mapping] if value.dim() == 1 else value.clone()) for name, value in norm.state_dict().items()}
    wider.load_state_dict(state)                               # num_batches_tracked (a scalar) is kept as is
    return wider


def _split_inputs(layer: nn.Linear | nn.Conv2d, mapping: torch.Tensor, shares: torch.Tensor) -> nn.Module:
    """The consuming layer: input unit ``j`` reads old input ``mapping[j]`` with weight scaled by ``shares[j]``."""
    wider = _layer_like(layer, len(mapping), layer.weight.shape[0])
    scale = shares.to(layer.weight.dtype).to(layer.weight.device)
    scale = scale.view(1, -1, *([1] * (layer.weight.dim() - 2)))  # broadcast over (out, in[, k, k])
    with torch.no_grad():
        wider.weight.copy_(layer.weight[:, mapping] * scale)
        if layer.bias is not None:
            wider.bias.copy_(layer.bias)
    return wider


def widen(model: nn.Module, layer: int, factor: float | None = None, generator: torch.Generator | None = None,
          noise: float = 0.0, *, new_width: int | None = None) -> nn.Module:
    """Net2WiderNet: a copy of ``model`` whose block ``layer`` has ``round(width * factor)`` (or ``new_width``) units.

    The units to copy are drawn with ``generator``; ``noise`` splits the outgoing weights of copies unequally
    (see :func:`outgoing_shares`) - the function is preserved for any ``noise``, and ``noise > 0`` lets the copies
    drift apart in training. The next block's first layer, or the classifier after the last block, is the consumer
    (through global average pooling for the ConvNet, which is linear per channel and so commutes with the split).
    """
    _check_model(model)
    _check_block_index(model, layer, "layer")
    if not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise GrowthError(f"noise must be a number >= 0, got {noise!r}")
    old_width = _width(model.blocks[layer])
    mapping = replication_map(old_width, _target_width(old_width, factor, new_width), generator)
    shares = outgoing_shares(mapping, old_width, noise, generator)

    grown = copy.deepcopy(model)
    block = grown.blocks[layer]
    block[0] = _copy_units(block[0], mapping)
    if _uses_batchnorm(block):
        block[1] = _copy_batchnorm(block[1], mapping)
    if layer + 1 < len(grown.blocks):
        next_block = grown.blocks[layer + 1]
        next_block[0] = _split_inputs(next_block[0], mapping, shares)
    else:
        grown.classifier = _split_inputs(grown.classifier, mapping, shares)
    return grown


# ---- Net2DeeperNet ---------------------------------------------------------------------------------------------
def _features_after(model: GrowableModel, block_index: int, inputs: torch.Tensor) -> torch.Tensor:
    """What block ``block_index`` (and its pool) hands on in train mode, on a throw-away copy of the blocks.

    A copy because a train-mode forward updates the running statistics, which must stay those of the model.
    """
    blocks = copy.deepcopy(model.blocks[: block_index + 1]).train()
    pools = model.pools[: block_index + 1] if isinstance(model, ConvNet) else [nn.Identity()] * len(blocks)
    x = inputs.flatten(1) if isinstance(model, MLP) else inputs  # (N, *input_shape) -> (N, D) for the MLP
    with torch.no_grad():
        for block, pool in zip(blocks, pools):
            x = pool(block(x))
    return x


def _rectified_gaussian_moments(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``relu(y)`` for ``y ~ N(mean, std^2)``, per channel."""
    std = std.clamp_min(1e-12)
    z = mean / std
    cdf = torch.special.ndtr(z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    first = mean * cdf + std * pdf
    second = (mean * mean + std * std) * cdf + mean * std * pdf
    return first, (second - first * first).clamp_min(0.0)


def _input_statistics(model: GrowableModel, after_layer: int, inputs: torch.Tensor | None):
    """Per-channel mean and (biased) variance of the new block's input.

    Measured on ``inputs`` when given; otherwise estimated from the previous batch norm: in training its output is
    ~ N(bias, weight^2) per channel, and the ReLU makes that a rectified Gaussian (max-pooling, where present, is
    ignored - it is an estimate).
    """
    if inputs is not None:
        x = _features_after(model, after_layer, inputs)
        dims = [0] if x.dim() == 2 else [0, 2, 3]                  # (N, C) or (N, C, H, W) -> (C,)
        return x.mean(dims), x.var(dims, unbiased=False)
    norm = model.blocks[after_layer][1]
    with torch.no_grad():
        return _rectified_gaussian_moments(norm.bias.detach().double(), norm.weight.detach().double().abs())


def _identity_(layer: nn.Linear | nn.Conv2d) -> None:
    """Initialise a square layer to the identity: an eye matrix, or a kernel that is 1 at the centre of channel c->c."""
    with torch.no_grad():
        layer.weight.zero_()
        channels = torch.arange(layer.weight.shape[0])
        centre = tuple(size // 2 for size in layer.weight.shape[2:])   # () for Linear
        layer.weight[(channels, channels, *centre)] = 1.0
        if layer.bias is not None:
            layer.bias.zero_()


def _undo_normalisation_(norm: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Batch norm computing the identity: ``(x - m) / sqrt(v + eps) * sqrt(v + eps) + m``.

    With ``running_mean = m`` and ``running_var = v`` that is exact in eval mode for any (m, v). Taking (m, v) as the
    statistics of the actual input makes it (nearly) the identity in train mode too, where batch statistics replace
    the running ones - so training continues smoothly instead of suddenly seeing standardised activations.
    """
    with torch.no_grad():
        mean, var = mean.to(norm.running_mean), var.to(norm.running_var)
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.weight.copy_(torch.sqrt(var + norm.eps))
        norm.bias.copy_(mean)


def deepen(model: nn.Module, after_layer: int, inputs: torch.Tensor | None = None) -> nn.Module:
    """Net2DeeperNet: a copy of ``model`` with a new identity block right after block ``after_layer``.

    The new block has the model's block structure (``Linear|Conv -> [BatchNorm] -> ReLU``) and width of the block
    before it; in a ConvNet it gets no pooling, so the spatial size is unchanged. It goes after a ReLU because only
    there is its own ReLU an identity: ``relu(x) = x`` needs ``x >= 0``. ``inputs`` (a batch of model inputs) lets the
    new batch norm use measured statistics; the eval function is preserved exactly either way.
    """
    _check_model(model)
    _check_block_index(model, after_layer, "after_layer")
    previous = model.blocks[after_layer]
    width, batchnorm = _width(previous), _uses_batchnorm(previous)
    new_block = _block_maker(model)(width, width, batchnorm)
    new_block.to(device=previous[0].weight.device, dtype=previous[0].weight.dtype)
    _identity_(new_block[0])
    if batchnorm:
        _undo_normalisation_(new_block[1], *_input_statistics(model, after_layer, inputs))

    grown = copy.deepcopy(model)
    grown.blocks.insert(after_layer + 1, new_block)
    if isinstance(grown, ConvNet):
        grown.pools.insert(after_layer + 1, nn.Identity())
    return grown


# ---- describing, saving and loading a grown model --------------------------------------------------------------
def describe(model: nn.Module) -> list[dict]:
    """One dict per layer for the UI: ``index``, ``kind`` (dense | conv | classifier), ``width``, ``params``,
    ``growable``, plus ``batchnorm`` and (ConvNet) ``pool`` for hidden blocks."""
    _check_model(model)
    rows = []
    for index, block in enumerate(model.blocks):
        row = {"index": index, "kind": "dense" if isinstance(model, MLP) else "conv", "width": _width(block),
               "params": sum(p.numel() for p in block.parameters()), "growable": True,
               "batchnorm": _uses_batchnorm(block)}
        if isinstance(model, ConvNet):
            row["pool"] = isinstance(model.pools[index], nn.MaxPool2d)
        rows.append(row)
    rows.append({"index": len(model.blocks), "kind": "classifier", "width": model.classifier.out_features,
                 "params": sum(p.numel() for p in model.classifier.parameters()), "growable": False})
    return rows


def architecture(model: nn.Module) -> dict:
    """Everything :func:`rebuild` needs to make an empty model of this (possibly grown) shape; plain JSON types.

    ``input_shape`` is recorded when the model carries it (``model.input_shape``), else ``None``; ``in_units`` (input
    features of the MLP, input channels of the ConvNet) is what the layers actually need.
    """
    _check_model(model)
    first = model.blocks[0][0] if len(model.blocks) else model.classifier
    in_units = first.in_features if isinstance(first, nn.Linear) else first.in_channels
    shape = getattr(model, "input_shape", None)
    arch = {"kind": "mlp" if isinstance(model, MLP) else "convnet",
            "input_shape": list(shape) if shape is not None else None, "in_units": int(in_units),
            "widths": [_width(block) for block in model.blocks], "num_classes": model.classifier.out_features,
            "batchnorm": bool(len(model.blocks) == 0 or _uses_batchnorm(model.blocks[0])),
            "dropout": float(model.dropout.p)}
    if isinstance(model, ConvNet):
        arch["pools"] = [isinstance(pool, nn.MaxPool2d) for pool in model.pools]
    return arch


def _check_architecture(arch: dict) -> None:
    if not isinstance(arch, dict) or arch.get("kind") not in ("mlp", "convnet"):
        raise GrowthError(f"architecture: field 'kind' must be 'mlp' or 'convnet', got {arch!r:.80}")
    for key in ("in_units", "num_classes"):
        if isinstance(arch.get(key), bool) or not isinstance(arch.get(key), int) or arch[key] < 1:
            raise GrowthError(f"architecture: field '{key}' must be a positive integer, got {arch.get(key)!r}")
    widths = arch.get("widths")
    if not isinstance(widths, list) or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1
                                               for w in widths):
        raise GrowthError(f"architecture: field 'widths' must be a list of positive integers, got {widths!r:.80}")
    if not isinstance(arch.get("batchnorm"), bool):
        raise GrowthError(f"architecture: field 'batchnorm' must be true or false, got {arch.get('batchnorm')!r}")
    dropout = arch.get("dropout")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise GrowthError(f"architecture: field 'dropout' must be a probability in [0, 1), got {dropout!r}")
    if arch["kind"] == "convnet" and (not isinstance(arch.get("pools"), list) or len(arch["pools"]) != len(widths)):
        raise GrowthError(f"architecture: field 'pools' must be a list of {len(widths)} flags, "
                          f"got {arch.get('pools')!r:.80}")


def rebuild(arch: dict) -> nn.Module:
    """An untrained model of the shape :func:`architecture` recorded; ``load_state_dict`` then restores a checkpoint."""
    _check_architecture(arch)
    is_mlp = arch["kind"] == "mlp"
    shape = arch.get("input_shape") or ((arch["in_units"],) if is_mlp else (arch["in_units"], 1, 1))
    # Start from the depth-0 model (just the classifier) and add the blocks one by one with their own widths.
    model = (MLP if is_mlp else ConvNet)(tuple(shape), arch["num_classes"], depth=0, dropout=arch["dropout"],
                                         batchnorm=arch["batchnorm"])
    make_block = _block_maker(model)
    in_units = arch["in_units"]
    for index, width in enumerate(arch["widths"]):
        model.blocks.append(make_block(in_units, width, arch["batchnorm"]))
        if not is_mlp:
            model.pools.append(nn.MaxPool2d(2) if arch["pools"][index] else nn.Identity())
        in_units = width
    model.classifier = nn.Linear(in_units, arch["num_classes"])
    return model
