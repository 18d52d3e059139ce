"""The ``layerwise`` command line."""

from __future__ import annotations

import argparse
import sys

import torch

from . import __version__
from ._errors import LayerwiseError

ACTIVATION_CHOICES = ["relu", "leaky_relu", "tanh", "sigmoid", "power2", "power3", "gelu", "silu", "softplus"]


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 96,64, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .experiments.demo import run_demo

    report = run_demo(Path(args.out), quick=args.quick, seed=args.seed, progress=not args.no_progress)
    return 0 if report["symmetrized"]["certified"] else 1


def _cmd_planted(args: argparse.Namespace) -> int:
    from .experiments.planted_demo import run_planted_demo

    dtype = torch.float64 if args.float64 else torch.float32
    print(
        f"layerwise planted: a {args.activation} MLP on {args.image}x{args.image} images, hidden widths {args.widths}, "
        f"whose layers are equivariant under a planted action of {args.group.upper()}; every hidden layer is then "
        "hidden by a random element of its hidden symmetry group (unit permutations and rescalings/sign flips), "
        "and dead, constant and duplicated units are added.\n"
    )
    demo = run_planted_demo(args.activation, args.group, args.image, args.widths, args.seed, dtype)
    res = demo.result
    print(f"end-to-end equivariance error of the input model: {demo.e2e_error:.2e}")
    print(f"extract() took {demo.seconds:.3f} s\n")
    print(res.summary())
    print()
    for i, (blocks, chars) in enumerate(zip(demo.planted.blocks, demo.planted.characters())):
        n_reg, n_triv, n_sign = blocks
        print(
            f"planted layer {i + 1}: {n_reg} regular blocks, {n_triv} trivial units, {n_sign} sign units; "
            f"character {chars.astype(int).tolist()}"
        )
    for i, acts in enumerate(res.group_latent):
        print(f"recovered layer {i + 1}: character {[round(a.character()) for a in acts]}")
    print(f"\nrecovered characters equal the planted ones: {demo.characters_match}")
    print(f"relative change of the function after reduction and reparameterization: {demo.function_change:.2e}")
    return 0 if (res.equivariant and demo.characters_match) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerwise",
        description="Find the latent group actions of equivariant networks (layerwise equivariance).",
    )
    parser.add_argument("--version", action="version", version=f"layerwise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="train MLPs on digits, measure layerwise equivariance, symmetrize, certify (about 3 minutes)")
    demo.add_argument("--quick", action="store_true", help="a smoke run in well under a minute")
    demo.add_argument("--out", default="layerwise-demo", help="folder for figures and report.json")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)
    planted = sub.add_parser("planted", help="recover a planted latent representation hidden by a random hidden "
                                             "symmetry (exact extraction, seconds)")
    planted.add_argument("--activation", choices=ACTIVATION_CHOICES, default="tanh")
    planted.add_argument("--group", choices=["z2", "d4"], default="d4", help="left-right flip, or rotations and flips")
    planted.add_argument("--image", type=int, default=8, help="image side (inputs are image x image pixels)")
    planted.add_argument("--widths", type=_widths, default=(96, 64), help="hidden widths, e.g. 96,64")
    planted.add_argument("--seed", type=int, default=0)
    planted.add_argument("--float64", action="store_true", help="build the network in float64 (default float32)")
    planted.set_defaults(func=_cmd_planted)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LayerwiseError as exc:
        print(f"layerwise: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
