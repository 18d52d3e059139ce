"""Time of layerwise.extract on planted ReLU MLPs against one forward pass of a batch of 256.

    python benchmarks/extract_speed.py            # widths 256 .. 4096, three hidden layers
    python benchmarks/extract_speed.py --widths 256,512 --activation tanh

Prints one row per width: parameters, forward time (batch 256, float32), extract time, their ratio, and the
certificate; then the growth exponent of extract time against the parameter count (least squares on log-log).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import layerwise
from layerwise.testing import planted_mlp


def _best_of(fn, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="256,512,1024,2048,4096")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--depth", type=int, default=3, help="number of hidden layers")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; planted {args.activation} MLPs, "
          f"{args.depth} hidden layers, Z2 (left-right flip of 8x8 inputs), float32")
    print(f"{'width':>6} {'params':>11} {'forward(256)':>13} {'extract':>10} {'ratio':>8}  certificate")
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        model, planted = planted_mlp(args.activation, group="z2", image=8, widths=(width,) * args.depth, seed=0)
        x = torch.randn(256, 64)
        with torch.no_grad():
            fwd = _best_of(lambda m=model, x=x: m(x), max(3, args.repeat))
        ext = _best_of(lambda m=model, g=planted.generators: layerwise.extract(m, g), args.repeat)
        res = layerwise.extract(model, planted.generators)
        params = sum(p.numel() for p in model.parameters())
        rows.append((params, ext))
        print(f"{width:>6} {params:>11,} {fwd * 1e3:>10.1f} ms {ext:>8.3f} s {ext / fwd:>8.1f}  "
              f"{'certified' if res.equivariant else 'FAILED'} (residual {res.residual:.1e})")
    if len(rows) >= 2:
        lx = [math.log(p) for p, _ in rows]
        ly = [math.log(t) for _, t in rows]
        mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
        slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
        print(f"growth exponent of extract time against parameter count: {slope:.2f} (1.0 = linear)")


if __name__ == "__main__":
    main()
