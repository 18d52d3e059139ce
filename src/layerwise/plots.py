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
    weight: torch.Tensor, action: LatentAction, path: Path, *, title: str, side: int = 8, max_units: int = 64
) -> Path:
    """First-layer filters drawn as ``side x side`` images, grouped by latent orbit and framed by type."""
    groups = unit_types(action)
    cells: list[tuple[str, int | None]] = []
    for kind, units in groups:
        for u in units:
            cells.append((kind, u))
        if len(units) > 1:
            cells.append(("gap", None))
        if len([c for c in cells if c[1] is not None]) >= max_units:
            break
    cols = 16
    rows = max(1, (len(cells) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.75, rows * 0.8 + 0.9), squeeze=False)
    w = weight.detach().double().cpu().numpy()
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (kind, unit) in zip(axes.ravel(), cells):
        if unit is None:
            continue
        img = w[unit].reshape(side, side)
        lim = np.abs(img).max() or 1.0
        ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(TYPE_COLOURS[kind])
            spine.set_linewidth(2.5)
    counts = {}
    for kind, units in groups:
        counts[kind] = counts.get(kind, 0) + len(units)
    handles = [plt.Line2D([], [], color=c, lw=4, label=f"{k} ({counts.get(k, 0)} units)")
               for k, c in TYPE_COLOURS.items()]
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(title, y=1.0 + 0.25 / rows, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
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
    """Layerwise-equivariance errors after every epoch (``history`` rows: epoch, then ``<metric>_f<layer>`` keys)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    epochs = [h["epoch"] for h in history]
    keys = [k for k in history[0] if k != "epoch"]
    styles = {"linear": "-", "constrained": "--", "control": ":"}
    for k in keys:
        style = next((v for s, v in styles.items() if k.startswith(s)), "-")
        ax.plot(epochs, [h[k] for h in history], style, label=k.replace("_", " "), lw=1.6)
    if switch_epoch is not None:
        ax.axvline(switch_epoch - 0.5, color="grey", lw=0.8)
        ax.text(switch_epoch - 0.3, ax.get_ylim()[1] * 0.95, "equivariance loss on", fontsize=7, va="top")
    ax.set_xlabel("epoch (-1 = initialization)")
    ax.set_ylabel("median relative error")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
