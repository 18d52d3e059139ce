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


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import layerwise_metrics
    from .experiments.demo import _emergence_hook, format_table
    from .experiments.digits import TrainConfig, evaluate, load_digits_split, train
    from .io import save_state_dict
    from .plots import plot_emergence
    from .testing import hflip_permutation

    cfg = TrainConfig(task=args.task, first_activation=args.activation, widths=args.widths, symmetry=args.symmetry,
                      epochs=args.epochs, weight_decay=args.weight_decay, seed=args.seed)
    data = load_digits_split(seed=args.seed)
    images = torch.cat([data.x_train, data.x_test])
    hook = _emergence_hook(images, args.task) if args.log_metrics else None
    res = train(cfg, data, on_epoch=hook, progress=not args.no_progress)
    perm = hflip_permutation(8)
    gens = {"hflip": (perm, perm if args.task == "autoencoder" else None)}
    rows = layerwise_metrics(res.model, gens, images, kinds=("linear", "constrained_activations"))
    print(f"trained {cfg} in {res.seconds:.1f} s: test {evaluate(res.model, data, args.task)}")
    print(format_table(["layer", "width", "affine fit error", "hidden-symmetry fit error"],
                       [[f"f{r.layer}", r.width, r.linear, r.constrained_activations] for r in rows],
                       "Left-right layerwise equivariance on the digits images:"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_state_dict(res.model.state_dict(), out / "model.pt", overwrite=True)
        arch = "mlp:auto:" + ",".join([args.activation] + ["gelu"] * (len(args.widths) - 1))
        print(f"wrote {out / 'model.pt'} (load with --arch {arch})")
        if res.history:
            plot_emergence(res.history, out / "emergence.png", switch_epoch=args.epochs // 2
                           if args.symmetry == "loss" else None, title=f"{args.task}, {args.activation}, "
                           f"{args.symmetry}")
            print(f"wrote {out / 'emergence.png'}")
    return 0


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


def _load(args: argparse.Namespace):
    import math
    from pathlib import Path

    from ._oracle import _model_dtype
    from .io import load_model, parse_symmetry
    from .layers import parse_dense

    if args.tol is not None and not (math.isfinite(args.tol) and args.tol > 0):
        raise LayerwiseError(f"--tol: expected a positive number, got {args.tol}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise LayerwiseError(f"--out: {args.out} exists and is not a folder")
    model = load_model(args.checkpoint, args.arch, trust=args.trust_checkpoint)
    net = parse_dense(model)
    gens = parse_symmetry(args.symmetry, net.in_features, net.out_features, args.output_action)
    data = None
    if getattr(args, "data", None):
        from .io import load_tensor

        data = load_tensor(args.data).to(_model_dtype(model))
    return model, net, gens, data


def _emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    import json
    from pathlib import Path

    payload = _json_safe(payload)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.command}.json").write_text(json.dumps(payload, indent=2, allow_nan=False))
    if args.json:
        print(json.dumps(payload, indent=2, allow_nan=False))
    else:
        print(text)


def _json_safe(obj):
    """Strict JSON: non-finite floats become the strings 'inf', '-inf', 'nan'."""
    import math

    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _first_layer_figure(args, model, latent_action, in_features: int) -> str | None:
    import math
    from pathlib import Path

    side = int(math.isqrt(in_features))
    if not args.out or side * side != in_features or latent_action is None:
        return None
    if not all(len(c) <= 2 for c in latent_action.cycles()):
        return None
    from .plots import plot_first_layer_orbits

    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "first_layer.png"
    plot_first_layer_orbits(first.weight, latent_action, path, side=side,
                            title=f"First-layer filters of {Path(args.checkpoint).name}, grouped by latent orbit")
    return str(path)


def _cmd_check(args: argparse.Namespace) -> int:
    from . import DEFAULT_TOL, equivariance_error, layerwise_metrics
    from ._oracle import _model_dtype

    if args.samples < 4:
        raise LayerwiseError(f"--samples: need at least 4 inputs, got {args.samples}")
    model, net, gens, data = _load(args)
    dtype = _model_dtype(model)
    if data is None:
        gen = torch.Generator().manual_seed(args.seed)
        data = torch.randn(args.samples, net.in_features, generator=gen, dtype=dtype)
    tol = args.tol if args.tol is not None else DEFAULT_TOL[dtype]
    err = equivariance_error(model, gens, data)
    rows = layerwise_metrics(model, gens, data, kinds=("linear", "constrained_activations")) if len(data) >= 4 else []
    ok = err <= tol
    payload = {"command": "check", "checkpoint": str(args.checkpoint), "equivariance_error": err, "tolerance": tol,
               "equivariant": ok, "samples": len(data), "layers": [r.as_dict() for r in rows]}
    lines = [f"{'EQUIVARIANT' if ok else 'NOT equivariant'}: end-to-end relative error {err:.3g} "
             f"(tolerance {tol:g}) on {len(data)} {'data' if args.data else 'Gaussian'} inputs"]
    for r in rows:
        lines.append(f"  hidden layer {r.layer} ({r.width} units), {r.generator}: affine fit error {r.linear:.3g}, "
                     f"hidden-symmetry fit error {r.constrained_activations:.3g}")
    _emit(args, payload, "\n".join(lines))
    return 0 if ok else 1


def _latent_json(res) -> list:
    return [{name: {"summary": a.summary(), "perm": a.perm.tolist(), "scale": a.scale.tolist(),
                    "offset": a.offset64.tolist()} for name, a in acts.items()} for acts in res.latent]


def _cmd_extract(args: argparse.Namespace) -> int:
    from . import extract

    model, net, gens, _ = _load(args)
    res = extract(model, gens, tol=args.tol)
    first = res.latent[0][next(iter(gens))] if res.latent else None
    figure = _first_layer_figure(args, res.model, first, net.in_features) if res.equivariant else None
    payload = {"command": "extract", "checkpoint": str(args.checkpoint), "equivariant": res.equivariant,
               "residual": res.residual, "tolerance": res.tol, "first_failure": res.first_failure,
               "reduction": [r.summary() for r in res.reduction], "families": res.families,
               "latent": _latent_json(res), "figure": figure}
    _emit(args, payload, res.summary())
    return 0 if res.equivariant else 1


def _cmd_symmetrize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import equivariance_error, extract, symmetrize
    from .io import save_state_dict

    src = Path(args.checkpoint)
    dest = Path(args.save) if args.save else src.with_name(f"{src.stem}.symmetrized{src.suffix or '.pt'}")
    if dest.resolve() == src.resolve() and not args.overwrite:
        raise LayerwiseError(f"--save: {dest} is the input checkpoint; pass --overwrite to replace it")
    if dest.exists() and not args.overwrite:
        raise LayerwiseError(f"--save: {dest} exists; pass --overwrite to replace it")
    model, net, gens, data = _load(args)
    sym = symmetrize(model, gens, data)
    res = extract(sym, gens)
    save_state_dict(sym.state_dict(), dest, overwrite=args.overwrite)
    x = data if data is not None else torch.randn(256, net.in_features, dtype=next(sym.parameters()).dtype)
    sizes = [m.in_features for m in sym if isinstance(m, torch.nn.Linear)] + [net.out_features]
    payload = {"command": "symmetrize", "checkpoint": str(src), "written": str(dest),
               "equivariance_error": equivariance_error(sym, gens, x), "certified": res.equivariant,
               "residual": res.residual, "widths": sizes}
    text = (f"wrote {dest} (hidden widths {sizes[1:-1]}; the reduction may remove dead or duplicated units)\n"
            f"end-to-end error {payload['equivariance_error']:.3g}; " + res.summary())
    _emit(args, payload, text)
    return 0 if res.equivariant else 1


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="state_dict saved with torch.save, or a .safetensors file")
    p.add_argument("--arch", help="mlp:64-128-10:tanh, mlp:64-128-64-10:tanh,gelu, mlp:auto:tanh, or module:function")
    p.add_argument("--symmetry", required=True, help="hflip:8x8, vflip:8x8, rot90:8x8, d4:8x8, or a .json file")
    p.add_argument("--output-action", choices=["invariant", "equivariant"], default="invariant",
                   help="how presets act on outputs (default: invariant, as for a classifier)")
    p.add_argument("--tol", type=float, default=None, help="tolerance (default by dtype: 1e-4 float32, 1e-8 float64)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--out", help="folder for a JSON report and figures")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a pickled full model (executes code from the file; only for files you trust)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerwise",
        description="Find the latent group actions of equivariant networks (layerwise equivariance).",
    )
    parser.add_argument("--version", action="version", version=f"layerwise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="train MLPs on digits, measure layerwise equivariance, symmetrize, certify (under a minute on "
                     "2 cores)")
    demo.add_argument("--quick", action="store_true", help="a smoke run in well under a minute")
    demo.add_argument("--out", default="layerwise-demo", help="folder for figures and report.json")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)
    tr = sub.add_parser("train", help="train one MLP on digits and measure its layerwise equivariance")
    tr.add_argument("--task", choices=["classifier", "autoencoder"], default="classifier")
    tr.add_argument("--activation", choices=["tanh", "gelu", "relu"], default="tanh", help="first-layer activation")
    tr.add_argument("--symmetry", choices=["augment", "loss", "none"], default="loss",
                    help="flip augmentation, the soft equivariance loss in the second half, or none")
    tr.add_argument("--widths", type=_widths, default=(128, 128, 64))
    tr.add_argument("--epochs", type=int, default=50)
    tr.add_argument("--weight-decay", type=float, default=1e-2)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--log-metrics", action="store_true", help="measure the metrics after every epoch")
    tr.add_argument("--out", help="folder for model.pt and, with --log-metrics, emergence.png")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_cmd_train)
    planted = sub.add_parser("planted", help="recover a planted latent representation hidden by a random hidden "
                                             "symmetry (exact extraction, seconds)")
    planted.add_argument("--activation", choices=ACTIVATION_CHOICES, default="tanh")
    planted.add_argument("--group", choices=["z2", "d4"], default="d4", help="left-right flip, or rotations and flips")
    planted.add_argument("--image", type=int, default=8, help="image side (inputs are image x image pixels)")
    planted.add_argument("--widths", type=_widths, default=(96, 64), help="hidden widths, e.g. 96,64")
    planted.add_argument("--seed", type=int, default=0)
    planted.add_argument("--float64", action="store_true", help="build the network in float64 (default float32)")
    planted.set_defaults(func=_cmd_planted)
    check = sub.add_parser("check", help="end-to-end and per-layer equivariance of a checkpoint (exit 0: within "
                                         "tolerance, 1: not, 2: bad input)")
    _checkpoint_args(check)
    check.add_argument("--data", help="a .pt file holding one tensor of inputs (default: Gaussian noise)")
    check.add_argument("--samples", type=int, default=1024, help="number of Gaussian inputs (default 1024)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=_cmd_check)
    ext = sub.add_parser("extract", help="exact latent actions with a certificate (exit 0: certified, 1: not)")
    _checkpoint_args(ext)
    ext.set_defaults(func=_cmd_extract)
    sym = sub.add_parser("symmetrize", help="write an exactly equivariant checkpoint (exit 0: certified)")
    _checkpoint_args(sym)
    sym.add_argument("--data", help="a .pt file holding one tensor of inputs to align by activations "
                                    "(default: align by weights)")
    sym.add_argument("--save", help="where to write (default: CHECKPOINT.symmetrized.<same suffix> beside the input)")
    sym.add_argument("--overwrite", action="store_true", help="allow replacing an existing file")
    sym.set_defaults(func=_cmd_symmetrize)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LayerwiseError as exc:
        print(f"layerwise: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unreadable or unwritable path: bad usage, not "not equivariant"
        print(f"layerwise: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
