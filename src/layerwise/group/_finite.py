"""Finite groups given by generators acting on inputs and outputs (numpy only).

A symmetry is a dict of named generators, each a pair (input action, output action). The group ``G`` is the
closure of the generators; its elements are enumerated breadth-first, each with a word in the generators, and the
Cayley table ``table[h, s] = index of s.h`` records every relation the latent actions must satisfy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import LayerwiseError
from ._actions import action_matrix

#: Default bound on the order of a generated group (``max_group_order``); larger groups are refused.
MAX_GROUP_ORDER = 1024


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    scale = max(1.0, float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    return bool(np.abs(a - b).max(initial=0.0) <= rtol * scale)


def _order(mat: np.ndarray, max_order: int, rtol: float) -> int | None:
    eye = np.eye(mat.shape[0])
    power = mat.copy()
    for k in range(1, max_order + 1):
        if _close(power, eye, rtol):
            return k
        power = mat @ power
        if not np.all(np.isfinite(power)) or np.abs(power).max(initial=0.0) > 1e12:
            return None
    return None


def generator_pairs(generators: Any) -> list[tuple[str, Any, Any]]:
    """Validate the shape of a generators dict and return ``[(name, input_action, output_action)]``."""
    if not isinstance(generators, Mapping):
        raise LayerwiseError(
            f"generators: expected a dict {{name: (input_action, output_action)}}, got {type(generators).__name__}"
        )
    if len(generators) == 0:
        raise LayerwiseError("generators: the dict is empty; give at least one (input_action, output_action) pair")
    out = []
    for name, pair in generators.items():
        if not isinstance(name, str):
            raise LayerwiseError(f"generators: names must be strings, got {name!r}")
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise LayerwiseError(
                f"generators[{name!r}]: expected an (input_action, output_action) pair, got {type(pair).__name__}"
            )
        out.append((name, pair[0], pair[1]))
    return out


class _Lookup:
    """Find a matrix (flattened) among stored ones by a random-projection fingerprint, then verify."""

    def __init__(self, size: int, rtol: float, seed: int) -> None:
        self.r = np.random.default_rng(seed).standard_normal(size)
        self.rtol = rtol
        self.keys: list[float] = []
        self.items: list[np.ndarray] = []

    def find(self, flat: np.ndarray) -> int | None:
        if not self.items:
            return None
        key = float(flat @ self.r)
        keys = np.asarray(self.keys)
        window = self.rtol * max(1.0, float(np.abs(flat).max(initial=0.0))) * np.abs(self.r).sum() * 4
        for idx in np.flatnonzero(np.abs(keys - key) <= window):
            if _close(self.items[idx], flat, self.rtol):
                return int(idx)
        return None

    def add(self, flat: np.ndarray) -> None:
        self.keys.append(float(flat @ self.r))
        self.items.append(flat)


@dataclass(frozen=True)
class FiniteGroup:
    """A finite group acting on inputs (``rho_in``) and outputs (``rho_out``).

    Attributes:
        names: generator names, in the order given.
        words: for each element, a word in the generators; ``words[0] == ()`` is the identity and
            element ``words[h]`` acts as ``rho(w[0]) @ rho(w[1]) @ ...``.
        rho_in, rho_out: arrays ``(order, d, d)`` of the input and output matrices.
        table: ``table[h, s]`` is the index of the element ``generator s`` composed after element ``h``.
    """

    names: tuple[str, ...]
    words: tuple[tuple[str, ...], ...]
    rho_in: np.ndarray = field(repr=False)
    rho_out: np.ndarray = field(repr=False)
    table: np.ndarray = field(repr=False)

    @property
    def order(self) -> int:
        return len(self.words)

    def generator_index(self, name: str) -> int:
        """Index of the element that is generator ``name``."""
        return int(self.table[0, self.names.index(name)])

    def multiplication_table(self) -> np.ndarray:
        """``mul[a, b]`` is the index of ``a b`` (apply ``b`` first), from the Cayley table and the words."""
        cached = self.__dict__.get("_mul")
        if cached is not None:
            return cached
        index = {name: s for s, name in enumerate(self.names)}
        mul = np.empty((self.order, self.order), dtype=np.int64)
        for a, word in enumerate(self.words):
            x = np.arange(self.order)
            for name in reversed(word):
                x = self.table[x, index[name]]
            mul[a] = x
        object.__setattr__(self, "_mul", mul)
        return mul

    def inverse_index(self, h: int) -> int:
        """Index of the inverse of element ``h``."""
        return int(np.flatnonzero(self.multiplication_table()[h] == 0)[0])

    def subgroups(self) -> list[frozenset[int]]:
        """All subgroups, as sets of element indices, smallest first (joins of cyclic subgroups)."""
        mul = self.multiplication_table()

        def closure(elements: set[int]) -> frozenset[int]:
            out = set(elements) | {0}
            frontier = list(out)
            while frontier:
                a = frontier.pop()
                for b in list(out):
                    for c in (int(mul[a, b]), int(mul[b, a])):
                        if c not in out:
                            out.add(c)
                            frontier.append(c)
            return frozenset(out)

        found = {closure({h}) for h in range(self.order)}
        grew = True
        while grew:
            grew = False
            for a in list(found):
                for b in list(found):
                    c = closure(set(a) | set(b))
                    if c not in found:
                        found.add(c)
                        grew = True
        return sorted(found, key=lambda s: (len(s), sorted(s)))

    def describe(self) -> str:
        gens = ", ".join(self.names)
        return f"group of order {self.order} generated by {gens}"

    @classmethod
    def from_generators(
        cls,
        generators: Mapping[str, Sequence[Any]],
        in_dim: int,
        out_dim: int,
        *,
        max_order: int = MAX_GROUP_ORDER,
        rtol: float = 1e-6,
    ) -> FiniteGroup:
        """Enumerate the group generated by ``generators`` and check that outputs follow inputs.

        Args:
            generators: ``{name: (input_action, output_action)}``; actions as in :func:`action_matrix`.
            in_dim, out_dim: sizes of the input and output feature axes.
            max_order: refuse groups larger than this (default :data:`MAX_GROUP_ORDER`).
            rtol: relative tolerance for deciding that two group elements are equal.

        Raises:
            LayerwiseError: malformed generators, non-invertible or infinite-order actions, a group larger than
                ``max_order``, or output actions that are not a function of the input actions (no homomorphism).
        """
        names: list[str] = []
        gin: list[np.ndarray] = []
        gout: list[np.ndarray] = []
        for name, act_in, act_out in generator_pairs(generators):
            m_in = action_matrix(act_in, in_dim, f"generators[{name!r}][0] (input action)")
            m_out = action_matrix(act_out, out_dim, f"generators[{name!r}][1] (output action)")
            for mat, side in ((m_in, "input"), (m_out, "output")):
                if _order(mat, max_order, rtol) is None:
                    raise LayerwiseError(
                        f"generators[{name!r}]: the {side} action has no finite order <= max_order={max_order}"
                    )
            names.append(name)
            gin.append(m_in)
            gout.append(m_out)

        full = _Lookup(in_dim * in_dim + out_dim * out_dim, rtol, seed=0)
        inputs = _Lookup(in_dim * in_dim, rtol, seed=1)
        els_in = [np.eye(in_dim)]
        els_out = [np.eye(out_dim)]
        words: list[tuple[str, ...]] = [()]
        full.add(np.concatenate([els_in[0].ravel(), els_out[0].ravel()]))
        inputs.add(els_in[0].ravel())
        table_rows: list[list[int]] = []
        h = 0
        while h < len(words):
            row = []
            for s, name in enumerate(names):
                new_in = gin[s] @ els_in[h]
                new_out = gout[s] @ els_out[h]
                flat = np.concatenate([new_in.ravel(), new_out.ravel()])
                idx = full.find(flat)
                if idx is None:
                    same_input = inputs.find(new_in.ravel())
                    if same_input is not None:
                        word = "*".join((name,) + words[h]) or "identity"
                        other = "*".join(words[same_input]) or "identity"
                        raise LayerwiseError(
                            "generators: the output actions do not define a homomorphism of the input group: "
                            f"{word} and {other} act identically on inputs but differently on outputs "
                            f"(max difference {np.abs(new_out - els_out[same_input]).max():.3g})"
                        )
                    if len(words) >= max_order:
                        raise LayerwiseError(
                            f"generators: the generated group has more than max_order={max_order} elements"
                        )
                    idx = len(words)
                    words.append((name,) + words[h])
                    els_in.append(new_in)
                    els_out.append(new_out)
                    full.add(flat)
                    inputs.add(new_in.ravel())
                row.append(idx)
            table_rows.append(row)
            h += 1
        return cls(
            names=tuple(names),
            words=tuple(words),
            rho_in=np.stack(els_in),
            rho_out=np.stack(els_out),
            table=np.asarray(table_rows, dtype=np.int64).reshape(len(words), len(names)),
        )
