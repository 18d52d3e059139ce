"""Recovery of planted latent actions by group-consistent alignment under growing weight noise.

    python benchmarks/alignment_noise.py
    python benchmarks/alignment_noise.py --activation relu --group d4 --seeds 5

A planted equivariant MLP (hidden by a random hidden symmetry) is perturbed by Gaussian noise of a given fraction of
the mean absolute weight; layerwise.align recovers the latent actions from activations (on 4000 noise inputs) or
from weights. Prints, per noise level, the fraction of units whose recovered (permutation, sign) equals the planted
one, the fraction of layers recovered exactly, and the time per alignment.
"""

from __future__ import annotations

import argparse
import time

import torch

import layerwise
from layerwise.testing import perturb, planted_mlp


def _agree(a, b) -> tuple[float, bool]:
    """Units whose recovered (permutation, sign) equals the exact one; magnitudes (ReLU) are not compared."""
    same = (a.perm == b.perm) & (torch.sign(a.scale) == torch.sign(b.scale))
    return float(same.double().mean()), bool(same.all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--group", default="z2")
    parser.add_argument("--widths", default="64,48")
    parser.add_argument("--noise", default="0,0.01,0.02,0.05,0.1,0.2,0.5")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    print(f"planted {args.activation} MLP, widths {widths}, group {args.group}; {args.seeds} seeds per level")
    print(f"{'noise':>6} | {'activations: units':>18} {'layers':>7} {'time':>8} | {'weights: units':>14} "
          f"{'layers':>7} {'time':>8}")
    for noise in (float(v) for v in args.noise.split(",")):
        stats = {"activations": [0.0, 0.0, 0.0], "weights": [0.0, 0.0, 0.0]}
        count = 0
        for seed in range(args.seeds):
            model, planted = planted_mlp(args.activation, group=args.group, widths=widths, seed=seed,
                                         dtype=torch.float64, dead=0, constant=0, duplicates=0)
            x = torch.randn(4000, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            # the exact actions in the model's own parameterization (no extras: the reduction keeps every unit)
            exact = layerwise.extract(model, planted.generators, canonical=False)
            truth = [type("T", (), {"latent": acts}) for acts in exact.latent]
            noisy = perturb(model, noise, seed=seed + 100)
            for source in stats:
                start = time.perf_counter()
                got = layerwise.align(noisy, planted.generators, x if source == "activations" else None)
                stats[source][2] += time.perf_counter() - start
                for t_layer, g_layer in zip(truth, got):
                    for name in t_layer.latent:
                        frac, exact = _agree(g_layer.latent[name], t_layer.latent[name])
                        stats[source][0] += frac
                        stats[source][1] += exact
            count += len(truth) * len(planted.generators)
        a, w = stats["activations"], stats["weights"]
        print(f"{noise:>6.2f} | {a[0] / count:>18.3f} {a[1] / count:>7.2f} {a[2] / args.seeds * 1e3:>6.0f}ms | "
              f"{w[0] / count:>14.3f} {w[1] / count:>7.2f} {w[2] / args.seeds * 1e3:>6.0f}ms")


if __name__ == "__main__":
    main()
