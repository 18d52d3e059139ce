"""Throughput of the activation statistics behind alignment by data, against a plain forward pass.

    python benchmarks/activation_stats.py [--width 1024] [--samples 20000] [--group d4]

Accumulates, for every hidden layer and group element, the correlation matrix between the units of f(h x) and of
f(x) (what layerwise.align(model, generators, data) uses: for an involution only the generator), batch by batch
(products of float32 activations in float32, sums in float64); prints samples per second for that and for one plain
forward pass over the same data, and their ratio. The statistics need |G| forward passes plus one width x width
product per layer and element used, so the ratio is at least |G|.
"""

from __future__ import annotations

import argparse
import time

import torch

from layerwise.algorithms._symmetrize import activation_statistics
from layerwise.group import FiniteGroup
from layerwise.layers import parse_dense
from layerwise.testing import planted_mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--group", default="z2")
    args = parser.parse_args()
    model, planted = planted_mlp("tanh", group=args.group, image=8, widths=(args.width,) * 3, seed=0)
    net = parse_dense(model)
    group = FiniteGroup.from_generators(planted.generators, 64, 3)
    x = torch.randn(args.samples, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x[:256])
        start = time.perf_counter()
        for batch in x.split(4096):
            model(batch)
        fwd = time.perf_counter() - start
    start = time.perf_counter()
    # what align uses: an involution's matching reads only the generator's correlations
    needed = [group.generator_index(group.names[0])] if group.order == 2 else list(range(group.order))
    activation_statistics(net, group, x, elements=needed)
    stats = time.perf_counter() - start
    print(f"tanh MLP, 3 hidden layers of width {args.width}, group of order {group.order}, {args.samples} samples, "
          f"{torch.get_num_threads()} threads")
    print(f"forward pass:           {args.samples / fwd:>10,.0f} samples/s")
    print(f"activation statistics:  {args.samples / stats:>10,.0f} samples/s  ({stats / fwd:.1f} x the forward time; "
          f"|G| = {group.order})")


if __name__ == "__main__":
    main()
