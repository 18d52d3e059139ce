"""Time and peak memory of layerwise.extract on planted MLPs against one forward pass of a batch of 256.

    python benchmarks/extract_speed.py                                   # ReLU, widths 256 .. 4096
    python benchmarks/extract_speed.py --activation tanh --widths 256,1024,4096,8192

Every width runs in a fresh subprocess; the peak memory is the growth of the resident set while extract runs
(sampled every 2 ms after freed memory is returned to the system), next to the size of the model's weights.
Prints one row per width: parameters, forward time (batch 256, float32), extract time, their ratio, peak memory of
extract, and the certificate; then the growth exponent of extract time against the parameter count (least squares
on log-log).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time


def _best_of(fn, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_during(fn) -> float:
    """Peak growth of the resident set while ``fn`` runs (sampled every 2 ms), after returning freed memory."""
    import ctypes
    import gc
    import threading

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _rss_mb()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss_mb()) - base


def _one(width: int, activation: str, depth: int, repeat: int) -> dict:
    import torch

    import layerwise
    from layerwise.testing import planted_mlp

    model, planted = planted_mlp(activation, group="z2", image=8, widths=(width,) * depth, seed=0)
    x = torch.randn(256, 64)
    with torch.no_grad():
        fwd = _best_of(lambda: model(x), max(3, repeat))
    box = {}
    peak = _peak_during(lambda: box.setdefault("res", layerwise.extract(model, planted.generators)))
    res = box["res"]
    ext = _best_of(lambda: layerwise.extract(model, planted.generators), repeat)
    return {"width": width, "params": sum(p.numel() for p in model.parameters()), "forward": fwd, "extract": ext,
            "peak_mb": peak, "model_mb": sum(p.numel() for p in model.parameters()) * 4 / 2**20,
            "certified": res.equivariant, "residual": res.residual}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="256,512,1024,2048,4096")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--depth", type=int, default=3, help="number of hidden layers")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one width, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.activation, args.depth, args.repeat)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; planted {args.activation} MLPs, "
          f"{args.depth} hidden layers, Z2 (left-right flip of 8x8 inputs), float32")
    print(f"{'width':>6} {'params':>11} {'forward(256)':>13} {'extract':>9} {'ratio':>7} {'peak MB':>9} "
          f"{'model MB':>9}  certificate")
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(width), "--activation", args.activation,
                              "--depth", str(args.depth), "--repeat", str(args.repeat)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((r["params"], r["extract"]))
        print(f"{width:>6} {r['params']:>11,} {r['forward'] * 1e3:>10.1f} ms {r['extract']:>7.3f} s "
              f"{r['extract'] / r['forward']:>7.1f} {r['peak_mb']:>9.0f} {r['model_mb']:>9.0f}  "
              f"{'certified' if r['certified'] else 'FAILED'} (residual {r['residual']:.1e})")
    if len(rows) >= 2:
        lx = [math.log(p) for p, _ in rows]
        ly = [math.log(t) for _, t in rows]
        mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
        slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
        print(f"growth exponent of extract time against parameter count: {slope:.2f} (1.0 = linear)")


if __name__ == "__main__":
    main()
