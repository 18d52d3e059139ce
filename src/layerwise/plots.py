"""Figures for the experiments (matplotlib, Agg backend; outside the maths core)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .hidden import LatentAction  # noqa: E402

#: Colours of the unit types of a first layer under an involution.
TYPE_COLOURS = {
    "self-symmetric": "#2b8cbe",
    "anti-symmetric": "#e34a33",
    "mirrored pair": "#31a354",
    "negated pair": "#c51b8a",
}


def unit_types(action: LatentAction) -> list[tuple[str, list[int]]]:
    """Orbits of an involution's action on units, with their type: fixed (sign +1 / -1) or swapped pairs."""
    out = []
    for cyc in action.cycles():
        neg = bool(action.scale[cyc[0]] < 0)
        if len(cyc) == 1:
            out.append(("anti-symmetric" if neg else "self-symmetric", cyc))
        else:
            out.append(("negated pair" if neg else "mirrored pair", cyc))
    order = list(TYPE_COLOURS)
    return sorted(out, key=lambda t: (order.index(t[0]) if t[0] in order else 9, t[1][0]))


def plot_first_layer_orbits(
    weight: torch.Tensor, action: LatentAction, path: Path, *, title: str, side: int = 8, rows_per_type: int = 2
) -> Path:
    """First-layer filters drawn as ``side x side`` images, grouped by latent orbit and framed by type.

    One section per type (self-symmetric, anti-symmetric, mirrored pairs, negated pairs); partners of a pair sit
    side by side. At most ``rows_per_type`` rows of 16 cells per type; the legend gives the full counts.
    """
    groups = unit_types(action)
    cols = 16
    grid: list[list[tuple[str, int] | None]] = []
    labels: dict[int, str] = {}
    for kind in TYPE_COLOURS:
        orbits = [units for k, units in groups if k == kind]
        if not orbits:
            continue
        slots: list[tuple[str, int] | None] = []
        for units in orbits:
            if len(units) == 1:
                slots.append((kind, units[0]))
            else:
                if len(slots) % 3:
                    slots.extend([None] * (3 - len(slots) % 3))
                slots.extend([(kind, u) for u in units[:2]] + [None])
        per_row = cols if len(orbits[0]) == 1 else 15
        rows = [slots[i : i + per_row] for i in range(0, len(slots), per_row)][:rows_per_type]
        labels[len(grid)] = f"{kind} ({sum(len(u) for u in orbits)} units)"
        grid.extend(rows)
    n_rows = max(1, len(grid))
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 0.7, n_rows * 0.85 + 0.7), squeeze=False)
    w = weight.detach().double().cpu().numpy()
    for ax in axes.ravel():
        ax.axis("off")
    for r, row in enumerate(grid):
        for c, slot in enumerate(row):
            if slot is None:
                continue
            kind, unit = slot
            ax = axes[r, c]
            img = w[unit].reshape(side, side)
            lim = np.abs(img).max() or 1.0
            ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(TYPE_COLOURS[kind])
                spine.set_linewidth(2.5)
        if r in labels:
            axes[r, 0].set_title(labels[r], loc="left", fontsize=8, color=TYPE_COLOURS[labels[r].split(" (")[0]],
                                 pad=3, x=0.0, ha="left")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.55 / fig.get_figheight(), wspace=0.08,
                        hspace=0.45)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_metric_bars(rows: list[dict], path: Path, *, metric: str = "linear", title: str = "") -> Path:
    """Grouped bars: per (task, activation, layer), the trained network under the taught flip, the control flip,
    and the untrained initialization. ``rows`` have keys task, activation, layer, transform, network, and metric."""
    keys = sorted({(r["task"], r["activation"], r["layer"]) for r in rows})
    series = [("trained", "left-right", "#2b8cbe"), ("trained", "up-down (control)", "#fdae6b"),
              ("init", "left-right", "#bdbdbd")]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys)), 3.6))
    xs = np.arange(len(keys))
    width = 0.8 / len(series)
    for s, (network, transform, colour) in enumerate(series):
        vals = []
        for key in keys:
            match = [r[metric] for r in rows if (r["task"], r["activation"], r["layer"]) == key
                     and r["network"] == network and r["transform"] == transform]
            vals.append(match[0] if match else np.nan)
        ax.bar(xs + (s - 1) * width, vals, width, label=f"{network}, {transform}", color=colour)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{t[:4]}.\n{a}\nf{ly}" for t, a, ly in keys], fontsize=8)
    ax.set_ylabel(f"median relative error ({metric.replace('_', ' ')})", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_emergence(history: list[dict], path: Path, *, title: str, switch_epoch: int | None = None) -> Path:
    """Layerwise-equivariance errors after every epoch. ``history`` rows hold ``epoch`` and keys
    ``linear_f<i>``, ``constrained_f<i>`` and ``control_*``: colour by layer, line style by kind."""
    fig, ax = plt.subplots(figsize=(6.6, 3.7))
    epochs = [h["epoch"] for h in history]
    colours = ["#2b8cbe", "#31a354", "#756bb1", "#e6550d"]
    for k in (k for k in history[0] if k != "epoch"):
        layer = int(k.split("_f")[1][0]) if "_f" in k else 1
        if k.startswith("control"):
            style, colour = ":", "#636363"
        else:
            style, colour = ("-" if k.startswith("linear") else "--"), colours[(layer - 1) % len(colours)]
        label = k.replace("_f", " f").replace("constrained", "hidden-symmetry (K_i)").replace("linear", "affine")
        label = label.replace("control_", "control: ")
        ax.plot(epochs, [h[k] for h in history], style, color=colour, label=label, lw=1.8)
    if switch_epoch is not None:
        ax.axvline(switch_epoch - 0.5, color="grey", lw=0.8)
        ax.annotate("equivariance loss on", (switch_epoch - 0.3, 0.98), xycoords=("data", "axes fraction"),
                    fontsize=7, va="top")
    ax.set_xlabel("epoch (-1 = initialization)")
    ax.set_ylabel("median relative error (held-out)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_attention_heads(image: torch.Tensor, maps: torch.Tensor, maps_mirror: torch.Tensor, perm: torch.Tensor,
                         tokens: torch.Tensor, map_residual: list[float], path: Path, *, title: str) -> Path:
    """Per head (rows): the attention map on an image, on its mirror image, and the prediction of the head action
    (head ``perm[h]`` on the image, with tokens mirrored). The first column shows the image and its mirror.

    ``maps``, ``maps_mirror``: ``(h, T, T)``; ``perm``: the head permutation of the flip; ``tokens``: its token
    permutation.
    """
    h = maps.shape[0]
    p = tokens
    predicted = maps[perm][:, p][:, :, p]
    fig, axes = plt.subplots(h, 4, figsize=(8.4, 2.05 * h + 0.4), squeeze=False)
    img = image.detach().double().cpu().numpy()
    panels = [(0, img, "digit"), (1, img[:, ::-1], "mirror image")]
    for ax in axes[:, 0]:
        ax.axis("off")
    for row, arr, label in panels:
        if row < h:
            axes[row, 0].imshow(arr, cmap="gray_r")
            axes[row, 0].set_title(label, fontsize=8)
            axes[row, 0].axis("on")
            axes[row, 0].set_xticks([])
            axes[row, 0].set_yticks([])
    vmax = float(torch.cat([maps, maps_mirror]).max())
    for j in range(h):
        src = int(perm[j])
        kind = "assigned: fixed" if src == j else f"assigned: swap with {src}"
        cols = [(maps[j], f"head {j} on digit"), (maps_mirror[j], f"head {j} on mirror"),
                (predicted[j], f"head {src} on digit, mirrored")]
        for c, (m, label) in enumerate(cols, start=1):
            ax = axes[j, c]
            ax.imshow(m.detach().double().cpu().numpy(), cmap="viridis", vmin=0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=8)
        axes[j, 3].set_ylabel(f"map residual\n{map_residual[j]:.2f}", fontsize=8, rotation=0, labelpad=32,
                              va="center")
        axes[j, 3].yaxis.set_label_position("right")
        axes[j, 1].set_ylabel(f"head {j}\n{kind}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
