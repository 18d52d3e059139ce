"""Adapter: an ``nn.Sequential`` of Linear layers and pointwise activations as a list of dense blocks.

A block is one ``nn.Linear`` with the activation that follows it (if any). All blocks but the last are hidden
layers; the last is the output layer. Weights are copied for analysis in the model's own dtype (float32 arithmetic
is accurate to far below the float32 certificate tolerance, and halves the memory traffic of wide layers);
:meth:`DenseNet.to_module` writes them back into a copy of the original ``nn.Sequential``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .._errors import LayerwiseError
from .._memory import empty
from ..hidden import ActivationFamily, family_of
from ..nn import PositionalEncoding, SelfAttention

#: Modules that do nothing to a batch of feature vectors in eval mode.
PASSTHROUGH = (nn.Identity, nn.Flatten, nn.Dropout, nn.AlphaDropout)


@dataclass
class DenseBlock:
    """``z -> act(weight @ z + bias)``; ``aug = [weight | bias]`` is a copy of the module's parameters,
    stored once so that the row algorithms never concatenate; ``weight`` and ``bias`` are views of it."""

    aug: torch.Tensor
    has_bias: bool
    act: nn.Module | None
    family: ActivationFamily | None
    index: int  # position of the Linear in the flattened Sequential
    act_index: int | None = None  # position of its activation

    @property
    def weight(self) -> torch.Tensor:
        return self.aug[:, :-1]

    @property
    def bias(self) -> torch.Tensor:
        return self.aug[:, -1]

    @property
    def width(self) -> int:
        return int(self.aug.shape[0])

    def activate(self, u: torch.Tensor) -> torch.Tensor:
        return u if self.act is None else self.act(u)


@dataclass
class DenseNet:
    """A dense network as blocks; ``modules`` is the flattened original Sequential (never modified)."""

    blocks: list[DenseBlock]
    modules: list[nn.Module] = field(repr=False)
    dtype: torch.dtype
    #: nonlinear maps after a hidden layer's activation (CNN max pooling), by hidden layer index; each has
    #: ``forward(z)``, ``carry(generator, action) -> action | None`` and ``fallback(action) -> action``
    post: dict = field(default_factory=dict, repr=False)

    @property
    def hidden(self) -> list[DenseBlock]:
        return self.blocks[:-1]

    @property
    def in_features(self) -> int:
        return int(self.blocks[0].weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.blocks[-1].weight.shape[0])

    def copy(self) -> DenseNet:
        blocks = [replace(b, aug=b.aug.clone()) for b in self.blocks]
        return DenseNet(blocks, self.modules, self.dtype, self.post)

    def transport(self, i: int, factor: torch.Tensor) -> None:
        """Apply a hidden symmetry to hidden layer ``i``: scale its incoming rows by ``factor`` (elements of the
        family's scale group) and compensate in layer ``i + 1``, keeping the function. Unit ``j``'s output becomes
        ``mult_j z_j + offset_j``, so the next layer reads ``(z' - offset) / mult``."""
        blk, nxt = self.blocks[i], self.blocks[i + 1]
        factor = factor.to(blk.aug.dtype)
        mult, off = blk.family.latent(factor)
        blk.aug *= factor[:, None]
        nxt.weight.div_(mult[None, :])
        if torch.any(off != 0):
            nxt.aug[:, -1] -= nxt.weight @ off
            nxt.has_bias = True

    def to(self, dtype: torch.dtype) -> DenseNet:
        """A copy computing in ``dtype`` (the module dtype written by :meth:`to_module` is unchanged)."""
        blocks = [replace(b, aug=b.aug.to(dtype).clone()) for b in self.blocks]
        return DenseNet(blocks, self.modules, self.dtype, self.post)

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Forward pass of the first ``upto`` blocks (all by default) on flattened inputs."""
        z = x.reshape(x.shape[0], -1).to(self.blocks[0].aug.dtype)
        for i, block in enumerate(self.blocks[:upto]):
            z = block.activate(z @ block.weight.T + block.bias)
            if i in self.post:
                z = self.post[i].forward(z)
        return z

    def to_module(self) -> nn.Sequential:
        """A new ``nn.Sequential`` with the same module types as the original and these weights, in its dtype."""
        out: list[nn.Module] = []
        by_index = {b.index: b for b in self.blocks}
        for i, mod in enumerate(self.modules):
            if i in by_index:
                b = by_index[i]
                lin = nn.utils.skip_init(nn.Linear, b.weight.shape[1], b.weight.shape[0], bias=b.has_bias,
                                         dtype=self.dtype, device=b.weight.device)  # every value is copied in
                with torch.no_grad():
                    # untouched memory costs nothing; the weight is replaced by one allocated like the wide arrays
                    lin.weight = nn.Parameter(empty(tuple(b.weight.shape), self.dtype, b.weight.device)
                                              .copy_(b.weight))
                    if b.has_bias:
                        lin.bias.copy_(b.bias.to(self.dtype))
                lin.train(mod.training)
                out.append(lin)
            else:
                out.append(copy.deepcopy(mod))
        return nn.Sequential(*out)


def _flatten(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        items = []
        for name, child in module.named_children():
            items.extend(_flatten(child, f"{prefix}[{name}]" if prefix else f"model[{name}]"))
        return items
    return [(prefix, module)]


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` that can hold a tensor here; LayerwiseError otherwise."""
    try:
        dev = torch.device(device)
        if dev.type == "meta":
            raise ValueError("the meta device holds no values")
        torch.empty(1, device=dev)
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LayerwiseError(f"device: cannot compute on {device!r} ({first})") from None
    return dev


def parse_dense(model: nn.Module, *, device: torch.device | str | None = None) -> DenseNet:
    """Read an ``nn.Sequential`` of Linear layers and pointwise activations; never modifies it.

    Raises:
        LayerwiseError: not a Sequential, empty, an unsupported module (named), two Linear layers or two
            activations in a row, an activation before the first Linear, a dtype other than float32/float64,
            or NaN / infinite weights.
    """
    if not isinstance(model, nn.Sequential):
        raise LayerwiseError(f"model: expected an nn.Sequential, got {type(model).__name__}")
    if device is not None:
        device = check_device(device)
    named = _flatten(model, "")
    if not named:
        raise LayerwiseError("model: the nn.Sequential is empty")
    conv = [w for w, m in named if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.MaxPool2d,
                                                 nn.AdaptiveAvgPool2d))]
    if conv:
        raise LayerwiseError(f"{conv[0]}: CNNs are supported by extract (with input_shape=...), symmetrize, "
                             "naive_average, align and layerwise_metrics; this function takes dense nn.Sequential "
                             "models only so far")
    tokens = [w for w, m in named if isinstance(m, (SelfAttention, PositionalEncoding, nn.MultiheadAttention))]
    if tokens:
        raise LayerwiseError(
            f"{tokens[0]}: attention models are supported by extract and equivariance_error only. symmetrize, "
            "naive_average, align and layerwise_metrics do not apply: the group average of a head's score form "
            "Q_h K_h^T has rank up to |G| d_head, which no head of the same size holds, and averaging Q_h and K_h "
            "separately would need their GL(d_head) alignment, which no function determines. For a trained "
            "attention model, layerwise.head_metrics measures how far each head is from the head-permutation "
            "action, on the weights and on the attention maps of data"
        )
    blocks: list[DenseBlock] = []
    dtype: torch.dtype | None = None
    last_kind = None  # "linear" | "act"
    for i, (where, mod) in enumerate(named):
        if isinstance(mod, PASSTHROUGH):
            continue
        if isinstance(mod, nn.Linear):
            if last_kind == "linear":
                raise LayerwiseError(
                    f"{where}: two nn.Linear layers in a row; compose them into one first (a purely linear hidden "
                    "layer has hidden symmetry group GL(n) and is not identifiable)"
                )
            w = mod.weight.detach()
            if w.device.type == "meta":
                raise LayerwiseError(f"{where}: weights on the meta device have no values; load them first")
            if w.dtype not in (torch.float32, torch.float64):
                raise LayerwiseError(f"{where}: weights of dtype {w.dtype}; only float32 and float64 are supported")
            if dtype is None:
                dtype = w.dtype
            elif w.dtype != dtype:
                raise LayerwiseError(f"{where}: dtype {w.dtype} differs from the first Linear's {dtype}")
            b = mod.bias.detach() if mod.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            bad = 0
            if not (torch.isfinite(w.sum()) and torch.isfinite(b.sum())):  # one reduction; count only if needed
                bad = int((~torch.isfinite(w)).sum()) + int((~torch.isfinite(b)).sum())
            if bad:
                raise LayerwiseError(f"{where}: {bad} NaN or infinite weights in nn.Linear({w.shape[1]}, {w.shape[0]})")
            if blocks and blocks[-1].weight.shape[0] != w.shape[1]:
                raise LayerwiseError(
                    f"{where}: in_features={w.shape[1]} does not match the previous layer's "
                    f"out_features={blocks[-1].weight.shape[0]}"
                )
            aug = empty((w.shape[0], w.shape[1] + 1), w.dtype, w.device if device is None else device)
            aug[:, :-1] = w
            aug[:, -1] = b
            blocks.append(DenseBlock(
                aug=aug,
                has_bias=mod.bias is not None, act=None, family=None, index=i,
            ))
            last_kind = "linear"
            continue
        family = family_of(mod, where)
        if not blocks:
            raise LayerwiseError(
                f"{where}: activation {type(mod).__name__} before the first nn.Linear is not supported"
            )
        if last_kind == "act":
            raise LayerwiseError(f"{where}: two activations in a row ({type(mod).__name__}) are not supported")
        blocks[-1].act = mod
        blocks[-1].act_index = i
        blocks[-1].family = family
        last_kind = "act"
    if not blocks:
        raise LayerwiseError("model: contains no nn.Linear layer")
    for b in blocks:
        if b.weight.shape[0] == 0 or b.weight.shape[1] == 0:
            raise LayerwiseError(f"model[{b.index}]: nn.Linear with a zero-width side {tuple(b.weight.shape)}")
    return DenseNet(blocks, [m for _, m in named], dtype or torch.float32)
