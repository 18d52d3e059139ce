"""A one-layer multi-head attention autoencoder on digits, trained with flip augmentation: which heads flip with the
image, which swap places (the ``S_h`` part of the attention layer's hidden symmetry group), and how well.

Images are cut into a 4x4 grid of 2x2 patches (16 tokens of 4 pixels, :func:`image_tokens`); a left-right flip
permutes the tokens and mirrors every patch (:func:`layerwise.testing.patch_generators`). The model is
``Linear(4, embed) -> PositionalEncoding -> SelfAttention -> Linear(embed, hidden) -> tanh -> Linear(hidden, 4)``,
reconstructing every patch; the tanh decoder makes the heads' value outputs identifiable (a linear map to 4 pixels
alone would see only a 4-dimensional shadow of them).

Per head, :func:`layerwise.head_metrics` measures the head permutation ``pi`` that the weights give against the
weights (score and value residuals) and against the attention maps of test images (``A_h(g x)`` against head
``pi(h)`` on ``x``, mirrored, relative to the map's distance from uniform attention).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import extract, head_metrics
from ..hidden._monomial import permutation_cycles
from ..nn import PositionalEncoding, SelfAttention
from ..testing import patch_generators, planted_attention
from .digits import DigitsData

GRID = 4  # 4x4 tokens of 2x2 patches of an 8x8 image


def image_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(N, 64)`` flattened 8x8 images to ``(N, 16, 4)`` tokens: 2x2 patches in row-major grid order, corners
    row-major (the layout of :func:`layerwise.testing.patch_generators` with one channel)."""
    n = x.shape[0]
    return x.reshape(n, GRID, 2, GRID, 2).permute(0, 1, 3, 2, 4).reshape(n, GRID * GRID, 4)


def build_attention_autoencoder(heads: int = 4, embed: int = 16, hidden: int = 32, seed: int = 0,
                                dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The autoencoder described in the module docstring, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, embed, dtype=dtype),
        PositionalEncoding(GRID * GRID, embed, dtype=dtype),
        SelfAttention(embed, heads, dtype=dtype),
        nn.Linear(embed, hidden, dtype=dtype),
        nn.Tanh(),
        nn.Linear(hidden, 4, dtype=dtype),
    )


def train_autoencoder(model: nn.Sequential, tokens: torch.Tensor, *, epochs: int, augment: dict | None,
                      lr: float = 3e-3, weight_decay: float = 1e-2, batch_size: int = 128,
                      seed: int = 0) -> list[float]:
    """AdamW on the reconstruction error; with ``augment`` (generators), half of every batch is transformed (inputs
    and targets alike). Returns the loss per epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    acts = [a for a, _ in augment.values()] if augment else []
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(tokens.shape[0], generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            x = tokens[order[i:i + batch_size]]
            if acts:
                flip = torch.rand(x.shape[0], generator=gen) < 0.5
                act = acts[int(torch.randint(len(acts), (1,), generator=gen))]
                x = torch.where(flip[:, None, None], act.apply(x), x)
            loss = ((model(x) - x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * x.shape[0]
        losses.append(total / tokens.shape[0])
    model.eval()
    return losses


def head_maps(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``(N, h, T, T)`` attention maps of the model's attention layer."""
    idx = next(i for i, m in enumerate(model) if isinstance(m, SelfAttention))
    with torch.no_grad():
        return model[idx].attention_maps(model[:idx](x))


def head_report(model: nn.Sequential, generators: dict, tokens: torch.Tensor) -> dict:
    """Head permutation and per-head residuals (:func:`layerwise.head_metrics`) of the first attention layer for the
    (single) generator, as lists indexed by head."""
    rows = head_metrics(model, generators, tokens)
    first = min(r.layer for r in rows)
    rows = sorted((r for r in rows if r.layer == first), key=lambda r: r.head)
    perm = [r.partner for r in rows]
    cycle_type = sorted(len(c) for c in permutation_cycles(perm))
    return {"perm": perm, "cycle_type": cycle_type, "score_residual": [r.score for r in rows],
            "value_residual": [r.value for r in rows], "map_residual": [r.map for r in rows]}


def run_attention(out: Path, data: DigitsData, *, quick: bool = False, seed: int = 0,
                  log: Callable[[str], None] = print) -> dict:
    """Train the autoencoder with flip augmentation, report its heads under the flip and the controls, and draw
    ``attention_heads.png``."""
    from ..plots import plot_attention_heads
    from .demo import format_table

    start = time.perf_counter()
    planted, known = planted_attention("z2", grid=GRID, seed=seed)
    exact = extract(planted, known.generators)
    log(f"\n5. Attention. Planted first (4 heads: 2 fixed, 1 swapped pair, hidden by a head permutation and random "
        f"GL(d_head) maps): {'certified' if exact.equivariant else 'NOT certified'}, residual {exact.residual:.2g}, "
        f"recovered {exact.latent[0]['hflip'].summary()}")
    epochs = 15 if quick else 120
    train, test = image_tokens(data.x_train), image_tokens(data.x_test)
    lr_flip = patch_generators("z2", GRID, 1)
    ud_flip = patch_generators("z2v", GRID, 1)
    model = build_attention_autoencoder(seed=seed)
    init = build_attention_autoencoder(seed=seed)
    losses = train_autoencoder(model, train, epochs=epochs, augment=lr_flip, seed=seed)
    with torch.no_grad():
        rec = float(((model(test) - test) ** 2).mean() / (test**2).mean())
    reports = {
        "trained, left-right": head_report(model, lr_flip, test),
        "trained, up-down (control)": head_report(model, ud_flip, test),
        "untrained, left-right": head_report(init, lr_flip, test),
    }
    rows = []
    for label, r in reports.items():
        for h in range(len(r["perm"])):
            kind = "fixed" if r["perm"][h] == h else f"swaps with {r['perm'][h]}"
            rows.append([label, h, kind, r["score_residual"][h], r["value_residual"][h], r["map_residual"][h]])
    log(format_table(["model, flip", "head", "head permutation", "score resid.", "value resid.", "map resid."], rows,
                     title=f"\nOne-layer attention autoencoder (4 heads, 16 patch tokens, {epochs} epochs, flip "
                           f"augmentation; test reconstruction error {rec:.3f} relative):"))
    main = reports["trained, left-right"]
    img = data.x_test[0]
    flip = lr_flip["hflip"][0]
    path = plot_attention_heads(
        img.reshape(8, 8), head_maps(model, test[:1])[0], head_maps(model, flip.apply(test[:1]))[0],
        torch.tensor(main["perm"]), torch.as_tensor(flip.tokens), main["map_residual"], out / "attention_heads.png",
        title="Attention maps of each head on a digit and on its mirror image (rows: queries, columns: keys, "
              "tokens = 2x2 patches in grid order)")
    return {"planted": {"certified": exact.equivariant, "residual": exact.residual,
                        "cycle_type": exact.latent[0]["hflip"].cycle_type()},
            "epochs": epochs, "final_loss": losses[-1], "test_relative_error": rec, "heads": reports,
            "figure": str(path), "seconds": time.perf_counter() - start}
