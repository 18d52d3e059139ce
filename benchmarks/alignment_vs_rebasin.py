"""Latent-action recovery under noise: layerwise's group-consistent alignment against rebasin's weight matching.

    pip install rebasin            # optional benchmark dependency (Git Re-Basin weight matching for PyTorch)
    python benchmarks/alignment_vs_rebasin.py [--widths 256,1024] [--activation tanh]

The task: a planted equivariant MLP (hidden by a random hidden symmetry: permutations, plus sign flips for tanh and
positive rescalings for ReLU) with Gaussian noise of a fraction of the mean absolute weight. Recover the latent
action of the left-right flip on every hidden layer, i.e. align the network theta with its transformed copy
theta^g (first layer W rho(g)); the truth is the exact action of the noiseless network in its own
parameterization. rebasin's PermutationCoordinateDescent aligns theta^g to theta by permutations only; layerwise
aligns with the layer's hidden symmetry group and group-consistently. Printed: fraction of units whose permutation
is recovered (for rebasin; layerwise must also get the sign right) and the time per alignment (best of --repeat
runs, for both tools, their runs alternating), then the speed-up of layerwise's weight path over rebasin.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import layerwise
from layerwise.testing import perturb, planted_mlp


def _theta_g(model, perm):
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[0].weight.copy_(model[0].weight[:, perm.argsort()])  # W rho(g): x[..., p] @ W.T = x @ (W[:, p^-1]).T
    return out


def _recovered(before, after, n_layers):
    """Permutations rebasin applied: row j of a layer after = row sigma[j] before (inputs permuted already)."""
    sigmas, prev = [], None
    for k in range(n_layers):
        wb = before[2 * k].weight.detach()
        wa = after[2 * k].weight.detach()
        if prev is not None:
            wb = wb[:, prev]
        d = torch.cdist(wa.double(), wb.double())
        sigma = d.argmin(1)
        sigmas.append(sigma)
        prev = sigma
    return sigmas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="256,1024")
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--noise", default="0,0.05,0.2,0.5")
    parser.add_argument("--repeat", type=int, default=5, help="times are the best of this many runs")
    args = parser.parse_args()
    try:
        from rebasin import PermutationCoordinateDescent
    except ImportError:
        raise SystemExit("this benchmark compares with rebasin: pip install rebasin") from None
    print(f"{args.activation} MLPs, two hidden layers, Z2 left-right flip of 8x8 inputs, float32")
    print(f"{'width':>6} {'noise':>6} | {'layerwise (weights)':>20} {'time':>8} | "
          f"{'layerwise (data)':>17} {'time':>8} | "
          f"{'rebasin':>8} {'time':>8} | speed-up (weights vs rebasin)")
    for width in (int(w) for w in args.widths.split(",")):
        model, planted = planted_mlp(args.activation, group="z2", image=8, widths=(width, width), seed=0, dead=0,
                                     constant=0, duplicates=0)
        perm = planted.generators["hflip"][0]
        exact = layerwise.extract(model, planted.generators, canonical=False)
        truth = [acts["hflip"] for acts in exact.latent]
        x = torch.randn(4000, 64, generator=torch.Generator().manual_seed(1))
        for noise in (float(v) for v in args.noise.split(",")):
            noisy = perturb(model, noise, seed=2)
            row = [f"{width:>6} {noise:>6.2f} |"]
            # the tools' runs alternate, so that a slow phase of the machine does not fall on one tool only
            times = {"weights": float("inf"), "data": float("inf"), "rebasin": float("inf")}
            for _ in range(args.repeat):
                for key, data in (("weights", None), ("data", x)):
                    start = time.perf_counter()
                    al = layerwise.align(noisy, planted.generators, data)
                    times[key] = min(times[key], time.perf_counter() - start)
                    hits = [((a.latent["hflip"].perm == t.perm) & (a.latent["hflip"].scale.sign() == t.scale.sign()))
                            for a, t in zip(al, truth)]
                    rate = float(torch.cat(hits).double().mean())
                    if key == "weights":
                        weight_rate = rate
                    else:
                        data_rate = rate
                a_model, b_model = noisy, _theta_g(noisy, perm)  # rebasin permutes b_model in place: a fresh copy
                before = copy.deepcopy(b_model)
                start = time.perf_counter()
                PermutationCoordinateDescent(a_model, b_model, x[:8], logging_level="error").rebasin()
                times["rebasin"] = min(times["rebasin"], time.perf_counter() - start)
            sigmas = _recovered(before, b_model, len(truth))
            rate = float(torch.cat([s.argsort() == t.perm for s, t in zip(sigmas, truth)]).double().mean())
            row.append(f"{weight_rate:>20.3f} {times['weights']:>7.3f}s |")
            row.append(f"{data_rate:>17.3f} {times['data']:>7.2f}s |")
            row.append(f"{rate:>8.3f} {times['rebasin']:>7.2f}s | {times['rebasin'] / times['weights']:>6.1f}x")
            print(" ".join(row))


if __name__ == "__main__":
    main()
