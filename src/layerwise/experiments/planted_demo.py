"""The planted demo: hide a known latent representation with a random hidden symmetry, then recover it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import equivariance_error, extract
from ..algorithms import ExtractionResult
from ..testing import Planted, planted_mlp


@dataclass
class PlantedDemo:
    model: torch.nn.Sequential
    planted: Planted
    result: ExtractionResult
    seconds: float
    e2e_error: float
    function_change: float
    characters_match: bool


def run_planted_demo(
    activation: str = "tanh", group: str = "d4", image: int = 8, widths=(96, 64), seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PlantedDemo:
    """Build a planted equivariant MLP on ``image x image`` inputs, hide it, and extract its latent actions."""
    model, planted = planted_mlp(activation, group=group, image=image, widths=tuple(widths), seed=seed, dtype=dtype)
    x = torch.randn(512, image * image, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    start = time.perf_counter()
    result = extract(model, planted.generators)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        change = float((result.model(x) - model(x)).norm() / model(x).norm())
    return PlantedDemo(
        model=model,
        planted=planted,
        result=result,
        seconds=seconds,
        e2e_error=equivariance_error(model, planted.generators, x),
        function_change=change,
        characters_match=planted.characters_match(result),
    )
