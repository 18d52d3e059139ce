"""Adapter: small CNNs (Conv2d, BatchNorm2d in eval mode, pointwise activations, AvgPool2d(2), MaxPool2d(2),
AdaptiveAvgPool2d(1), Flatten, Linear) as the equivalent dense network on flattened feature maps.

A stride-1 convolution with zero padding ``k // 2`` is a linear map on the flattened ``(C, H, W)`` feature map
(channel-major, as ``Flatten`` orders it); average pooling is linear too and is folded into the next layer;
BatchNorm in eval mode is a per-channel affine map folded into the convolution before it. Every hidden unit of the
dense view is a (channel, position) pair, so a latent action found on it can be read back as a channel action
combined with a spatial transform. Max pooling is not linear: it stays a map between two dense blocks
(``DenseNet.post``) and carries an action through only when its channel factors are positive. The unrolled matrices
have ``(C H W)^2`` entries: this adapter is for small
images (digits, CIFAR-sized maps with few channels).
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import LayerwiseError
from ..hidden import LatentAction, family_of
from ._dense import PASSTHROUGH, DenseBlock, DenseNet, _flatten

#: Spatial transforms of the last two axes, by name (square maps for rotations).
SPATIAL = {
    "hflip": lambda a: a.flip(-1),
    "vflip": lambda a: a.flip(-2),
    "rot90": lambda a: torch.rot90(a, 1, dims=(-2, -1)),
}
CONV_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)


def is_cnn(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and any(isinstance(m, CONV_MODULES) for _, m in _flatten(model, ""))


def spatial_permutation(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The permutation ``p`` of a flattened ``shape = (C, H, W)`` tensor with ``x.flatten()[p] = T(x).flatten()``."""
    if name not in SPATIAL:
        raise LayerwiseError(f"spatial action: expected one of {sorted(SPATIAL)}, got {name!r}")
    if name == "rot90" and shape[-1] != shape[-2]:
        raise LayerwiseError(f"spatial action: rot90 needs square maps, got {shape[-2]}x{shape[-1]}")
    idx = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    return SPATIAL[name](idx).reshape(-1)


def factor_action(act: LatentAction, shape: tuple[int, int, int], spatial: str | None) -> LatentAction | None:
    """The channel action of a unit action on ``(C, H, W)`` maps, if it is one combined with ``spatial``:
    ``perm[c, q] = (pi(c), T(q))`` with one factor and offset per channel; ``None`` otherwise."""
    c, h, w = shape
    hw = h * w
    sp = spatial_permutation(spatial, (1, h, w)) if spatial else torch.arange(hw)
    perm = act.perm.reshape(c, hw)
    ch = perm // hw
    if not torch.equal(ch, ch[:, :1].expand(-1, hw)) or not torch.equal(perm % hw, sp[None, :].expand(c, -1)):
        return None
    scale = act.scale.reshape(c, hw)
    off = act.offset64.reshape(c, hw)
    if not (torch.allclose(scale, scale[:, :1]) and torch.allclose(off, off[:, :1])):
        return None
    return LatentAction(ch[:, 0].clone(), scale[:, 0].clone(), off[:, 0].clone(), act.dtype)


def expand_action(channel: LatentAction, shape: tuple[int, int, int], spatial: str | None) -> LatentAction:
    """The unit action on ``(C, H, W)`` maps of a channel action combined with ``spatial``."""
    c, h, w = shape
    hw = h * w
    sp = spatial_permutation(spatial, (1, h, w)) if spatial else torch.arange(hw)
    perm = (channel.perm[:, None] * hw + sp[None, :]).reshape(-1)
    return LatentAction(perm, channel.scale.repeat_interleave(hw), channel.offset64.repeat_interleave(hw),
                        channel.dtype)


class MaxPoolMap:
    """``MaxPool2d(2)`` after an activation, in the dense view. A channel action combined with a flip or rotation
    passes through it when every channel factor is positive and there is no offset (``max(s z) = s max(z)`` only
    for ``s > 0``); otherwise :meth:`carry` returns ``None`` and the certificate fails."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self.pooled = (shape[0], shape[1] // 2, shape[2] // 2)
        self.spatial: dict[str, str | None] = {}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(z.reshape(z.shape[0], *self.shape), 2).reshape(z.shape[0], -1)

    def carry(self, name: str, act: LatentAction) -> LatentAction | None:
        spatial = self.spatial.get(name)
        ch = factor_action(act, self.shape, spatial)
        if ch is None or torch.any(ch.scale <= 0) or torch.any(ch.offset64 != 0):
            return None
        return expand_action(ch, self.pooled, spatial)

    def fallback(self, act: LatentAction) -> LatentAction:
        return LatentAction.identity(int(torch.tensor(self.pooled).prod()), act.dtype)


@dataclass
class CNNLayout:
    """Shapes of the hidden layers of the dense view: ``(C, H, W)`` for convolutional ones, ``(F,)`` for dense."""

    input_shape: tuple[int, ...]
    hidden_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shape: tuple[int, ...] = ()


def _check_conv(mod: nn.Conv2d, where: str) -> int:
    k = mod.kernel_size
    if k[0] != k[1] or k[0] % 2 == 0:
        raise LayerwiseError(f"{where}: Conv2d needs an odd square kernel, got {k}")
    problems = []
    if mod.stride != (1, 1):
        problems.append(f"stride={mod.stride}")
    if mod.dilation != (1, 1):
        problems.append(f"dilation={mod.dilation}")
    if mod.groups != 1:
        problems.append(f"groups={mod.groups}")
    if mod.padding != (k[0] // 2, k[0] // 2):
        problems.append(f"padding={mod.padding} (need {k[0] // 2})")
    if mod.padding_mode != "zeros":
        problems.append(f"padding_mode={mod.padding_mode!r}")
    if problems:
        raise LayerwiseError(f"{where}: unsupported Conv2d setting {', '.join(problems)}; supported: stride 1, "
                             "odd square kernel, zero padding k//2, no groups or dilation")
    return k[0] // 2


def _linear_map(fn, shape: tuple[int, ...]) -> torch.Tensor:
    """Matrix ``M`` (out x in) of a linear map on flattened tensors of ``shape``."""
    n = int(torch.tensor(shape).prod())
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        out = fn(basis)
    return out.reshape(n, -1).T.contiguous()


def fold_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """A copy with every eval-mode ``BatchNorm2d`` folded into the ``Conv2d`` before it (replaced by Identity)."""
    mods = [copy.deepcopy(m) for _, m in _flatten(model, "")]
    for i, mod in enumerate(mods):
        if not isinstance(mod, nn.BatchNorm2d):
            continue
        where = f"model[{i}]"
        if mod.training:
            raise LayerwiseError(f"{where}: BatchNorm2d in training mode; call model.eval() first")
        j = i - 1
        while j >= 0 and isinstance(mods[j], PASSTHROUGH):
            j -= 1
        conv = mods[j] if j >= 0 else None
        if not isinstance(conv, nn.Conv2d):
            raise LayerwiseError(f"{where}: BatchNorm2d must follow a Conv2d to be folded")
        with torch.no_grad():
            var = mod.running_var if mod.running_var is not None else torch.ones(mod.num_features)
            mean = mod.running_mean if mod.running_mean is not None else torch.zeros(mod.num_features)
            gamma = mod.weight if mod.weight is not None else torch.ones_like(var)
            beta = mod.bias if mod.bias is not None else torch.zeros_like(var)
            scale = gamma / torch.sqrt(var + mod.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(var)
            new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                            bias=True, dtype=conv.weight.dtype)
            new.weight.copy_(conv.weight * scale[:, None, None, None].to(conv.weight.dtype))
            new.bias.copy_(((bias - mean) * scale + beta).to(conv.weight.dtype))
        mods[j] = new
        mods[i] = nn.Identity()
    return nn.Sequential(*mods)


def parse_cnn(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[DenseNet, CNNLayout, nn.Sequential]:
    """The dense view of a small CNN, its layout, and the BatchNorm-folded model."""
    if not (isinstance(input_shape, (tuple, list)) and len(input_shape) == 3
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in input_shape)):
        raise LayerwiseError(f"input_shape: a CNN needs (C, H, W) of positive ints, got {input_shape!r}")
    input_shape = tuple(int(v) for v in input_shape)
    folded = fold_batchnorm(model)
    shape: tuple[int, ...] = tuple(input_shape)
    layout = CNNLayout(input_shape=shape)
    pending = None  # linear map (matrix) from the last block's output space to the current space
    post: dict[int, MaxPoolMap] = {}
    blocks: list[DenseBlock] = []
    dtype = None
    last_kind = None
    for i, mod in enumerate(folded):
        where = f"model[{i}]"
        if isinstance(mod, PASSTHROUGH) and not isinstance(mod, nn.Flatten):
            continue
        if isinstance(mod, nn.Flatten):
            shape = (int(torch.tensor(shape).prod()),)
            continue
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w = mod.weight.detach()
            if w.dtype not in (torch.float32, torch.float64):
                raise LayerwiseError(f"{where}: weights of dtype {w.dtype}; only float32 and float64 are supported")
            dtype = dtype or w.dtype
            if not torch.isfinite(w).all() or (mod.bias is not None and not torch.isfinite(mod.bias).all()):
                raise LayerwiseError(f"{where}: NaN or infinite weights")
            if last_kind == "affine":
                raise LayerwiseError(f"{where}: two affine layers in a row; compose them first")
            if isinstance(mod, nn.Conv2d):
                if len(shape) != 3 or shape[0] != mod.in_channels:
                    raise LayerwiseError(f"{where}: Conv2d expects {mod.in_channels} channels, gets shape {shape}")
                pad = _check_conv(mod, where)
                conv_w = w.double()
                mat = _linear_map(lambda b, cw=conv_w, p=pad: F.conv2d(b, cw, padding=p), shape)
                shape = (mod.out_channels, shape[1], shape[2])
                bias = (mod.bias.detach().double() if mod.bias is not None
                        else torch.zeros(mod.out_channels, dtype=torch.float64)).repeat_interleave(shape[1] * shape[2])
            else:
                if len(shape) != 1 or shape[0] != mod.in_features:
                    raise LayerwiseError(f"{where}: Linear expects {mod.in_features} features, gets shape {shape}")
                mat = w.double()
                shape = (mod.out_features,)
                bias = mod.bias.detach().double() if mod.bias is not None else torch.zeros(mod.out_features,
                                                                                          dtype=torch.float64)
            if pending is not None:
                mat = mat @ pending
                pending = None
            aug = torch.cat([mat, bias[:, None]], 1).to(dtype)
            blocks.append(DenseBlock(aug=aug, has_bias=True, act=None, family=None, index=i))
            last_kind = "affine"
            continue
        if isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d)):
            if len(shape) != 3:
                raise LayerwiseError(f"{where}: pooling needs (C, H, W) feature maps, gets shape {shape}")
            if isinstance(mod, (nn.AvgPool2d, nn.MaxPool2d)):
                ok = mod.kernel_size in (2, (2, 2)) and mod.stride in (2, (2, 2)) and mod.padding in (0, (0, 0))
                if isinstance(mod, nn.MaxPool2d):
                    ok = ok and mod.dilation in (1, (1, 1)) and not mod.ceil_mode
                if not ok or shape[1] % 2 or shape[2] % 2:
                    raise LayerwiseError(f"{where}: only {type(mod).__name__}(2) on even sizes is supported, got "
                                         f"{mod} on {shape[1]}x{shape[2]}")
            if isinstance(mod, nn.MaxPool2d):
                if last_kind != "act" or pending is not None or len(blocks) - 1 in post:
                    raise LayerwiseError(f"{where}: MaxPool2d must follow an activation directly")
                post[len(blocks) - 1] = MaxPoolMap(shape)
                shape = (shape[0], shape[1] // 2, shape[2] // 2)
                continue
            if isinstance(mod, nn.AvgPool2d):
                fn, new_shape = (lambda b: F.avg_pool2d(b, 2)), (shape[0], shape[1] // 2, shape[2] // 2)
            else:
                if mod.output_size not in (1, (1, 1)):
                    raise LayerwiseError(f"{where}: only AdaptiveAvgPool2d(1) is supported, got {mod.output_size}")
                fn, new_shape = (lambda b: b.mean(dim=(-2, -1), keepdim=True)), (shape[0], 1, 1)
            pool = _linear_map(fn, shape)
            pending = pool if pending is None else pool @ pending
            shape = new_shape
            continue
        family = family_of(mod, where)
        if last_kind != "affine":
            raise LayerwiseError(f"{where}: activation {type(mod).__name__} must follow a Conv2d or Linear")
        blocks[-1].act = mod
        blocks[-1].family = family
        blocks[-1].act_index = i
        layout.hidden_shapes.append(shape)
        last_kind = "act"
    if not blocks:
        raise LayerwiseError("model: contains no Conv2d or Linear layer")
    if pending is not None:
        raise LayerwiseError("model: pooling after the last layer is not supported")
    if blocks[-1].act is not None:
        layout.hidden_shapes.pop()
        blocks[-1].act = None
        raise LayerwiseError("model: an activation after the last layer is not supported for CNNs")
    layout.output_shape = shape
    return DenseNet(blocks, [m for m in folded], dtype or torch.float32, post), layout, folded
