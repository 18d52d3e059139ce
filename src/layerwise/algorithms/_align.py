"""Group-consistent alignment of units (THEORY section 5): latent actions that are homomorphisms of the whole group.

Per-generator assignment does not give a group action (a flip's matching need not be an involution). Here a
layer's units get a G-set structure (with signs where the activation allows them), scored against similarity
matrices ``S_h[j, i]`` = how well unit ``j`` of the transformed network matches unit ``i`` of the original under
the group element ``h`` (correlations of activations, or cosines of weight rows):

- an involution (``|G| = 2``): a maximum-weight perfect matching on units plus one dummy per unit (pairs are
  swapped, units matched to their dummy are fixed; a pair or fixed unit is negated when that scores higher and the
  activation allows it). Optimal.
- any finite group: orbits are built greedily. For a base unit ``u`` every (stabilizer ``H``, sign character of
  ``H`` with kernel ``K``) is tried: coset ``r H`` gets the free unit ``j`` maximizing
  ``sum_{eta in H} chi(eta) S_{r eta}[j, u]`` (in absolute value where signs are allowed: the unit may be the
  negative of the canonical one, a sign gauge); the orbit with the best mean similarity per group element wins.
  Every relation holds by construction (the action is induced from a character of the stabilizer); what it costs
  against unconstrained per-generator assignment is reported as ``quality`` vs ``unconstrained``.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .._numeric import at_least_tiny
from ..group import FiniteGroup
from ..hidden import ActivationFamily, LatentAction


def signed_latent(family: ActivationFamily) -> bool:
    """Whether a unit's latent action may carry a sign (tanh, sigmoid's affine flip, odd powers)."""
    return family.scales in ("sign", "nonzero") and family.power % 2 == 1


def activation_similarity(z: torch.Tensor, zg: torch.Tensor) -> np.ndarray:
    """``S[j, i]`` = correlation over samples of ``zg[:, j]`` with ``z[:, i]`` (0 for constant units)."""
    z = z.double() - z.double().mean(0)
    zg = zg.double() - zg.double().mean(0)
    nz = z.norm(dim=0).clamp_min(1e-12)
    ng = zg.norm(dim=0).clamp_min(1e-12)
    return ((zg.T @ z) / (ng[:, None] * nz[None, :])).cpu().numpy()


def weight_similarity(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """``S[j, i]`` = cosine of row ``j`` of ``b`` (transformed weights) with row ``i`` of ``a``, in the weights'
    dtype (float32 cosines decide an assignment as well as float64 ones, at twice the speed)."""
    inv_a = 1.0 / at_least_tiny(torch.linalg.vector_norm(a, dim=1))
    inv_b = 1.0 / at_least_tiny(torch.linalg.vector_norm(b, dim=1))
    sim = b @ a.T
    sim *= inv_b[:, None]  # scaling the n x n product in place: no normalized copies of the n x d rows
    sim *= inv_a[None, :]
    return sim.cpu().numpy()


@dataclass
class LayerAlignment:
    """A group-consistent action on one layer's units.

    Attributes:
        pre: per generator, the action on pre-activations (permutation and signs, no offset).
        latent: per generator, the action on the layer's outputs (``family.latent`` of the signs).
        quality: mean over generators and units of the similarity the consistent action achieves.
        unconstrained: the same for an unconstrained assignment per generator (an upper bound).
    """

    pre: dict[str, LatentAction]
    latent: dict[str, LatentAction]
    quality: float
    unconstrained: float

    @property
    def cost(self) -> float:
        """Similarity lost to group consistency (``unconstrained - quality``)."""
        return self.unconstrained - self.quality


def best_assignment(sim: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Unconstrained per-generator alignment: ``perm[j]``, ``sign[j]`` maximizing ``sum sign S[j, perm[j]]``."""
    score = np.abs(sim) if signed else sim
    n = score.shape[0]
    best = score.argmax(1) if n else np.zeros(0, dtype=np.int64)
    if n and np.unique(best).size == n:
        # every row's best column is different: the sum of row maxima bounds every assignment and is reached,
        # so this is optimal (the usual case for a nearly equivariant network) and needs no O(n^3) solver
        rows, cols = np.arange(n), best
    else:
        rows, cols = linear_sum_assignment(-score)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    sign = np.sign(sim[np.arange(len(perm)), perm]) if signed else np.ones(len(perm))
    sign[sign == 0] = 1
    return perm, sign, float(score[rows, cols].mean()) if len(rows) else 1.0


#: Above this many units, the blossom algorithm runs only on the units that the unconstrained assignment leaves
#: inconsistent (networkx's blossom is pure Python: 80 s on 2048 units at 50% noise, a second on the repair).
EXACT_MATCHING_LIMIT = 256


def involution_matching(sim: np.ndarray, signed: bool, candidates: int = 8,
                        unconstrained: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best involution: maximum-weight perfect matching on units and their dummies (fixed points).

    Only the ``candidates`` best partners of each unit enter the graph (plus its dummy), which keeps the blossom
    algorithm fast; a perfect matching always exists (every unit fixed). Above :data:`EXACT_MATCHING_LIMIT` units
    the pairs and fixed points on which the unconstrained assignment is already a consistent involution are kept,
    and the matching is solved on the remaining units only (a local repair, no longer guaranteed optimal).
    """
    n = sim.shape[0]
    # Fast path: the best unconstrained assignment (scipy, in C) maximizes sum_j |S[j, perm[j]]| over all
    # permutations; when it is already an involution whose swapped pairs carry one sign, no involution can score
    # more, so it is the answer (the usual case at low noise), and the blossom algorithm is not needed.
    perm, sign, _ = unconstrained if unconstrained is not None else best_assignment(sim, signed)
    if np.array_equal(perm[perm], np.arange(n)) and np.array_equal(sign[perm], sign):
        return perm, sign
    ok = (perm[perm] == np.arange(n)) & (sign[perm] == sign)
    if n > EXACT_MATCHING_LIMIT and ok.any():  # (the sub-problem is strictly smaller: the recursion ends)
        bad = np.flatnonzero(~ok)
        sub_perm, sub_sign = involution_matching(sim[np.ix_(bad, bad)], signed, candidates)
        perm, sign = perm.copy(), sign.copy()
        perm[bad] = bad[sub_perm]
        sign[bad] = sub_sign
        return perm, sign
    pair = sim + sim.T  # swapping i and j scores S[i, j] + S[j, i]
    pair_score = np.abs(pair) if signed else pair
    fixed = np.abs(np.diag(sim)) if signed else np.diag(sim).copy()
    graph = nx.Graph()
    offset = 4.0  # every perfect matching has n edges, so a constant shift keeps the optimum and weights positive
    for i in range(n):
        graph.add_edge(("u", i), ("d", i), weight=fixed[i] + offset)
    k = min(candidates, n - 1)
    if k > 0:
        masked = pair_score.copy()
        np.fill_diagonal(masked, -np.inf)
        best = np.argpartition(-masked, k - 1, axis=1)[:, :k]
        for i in range(n):
            for j in best[i]:
                j = int(j)
                if i != j:
                    graph.add_edge(("u", i), ("u", j), weight=pair_score[i, j] / 2 + offset)
                    graph.add_edge(("d", i), ("d", j), weight=pair_score[i, j] / 2 + offset)
    matching = nx.max_weight_matching(graph, maxcardinality=True)
    perm = np.arange(n)
    sign = np.ones(n)
    for a, b in matching:
        if a[0] == "u" and b[0] == "u":
            i, j = a[1], b[1]
            perm[i], perm[j] = j, i
            if signed and pair[i, j] < 0:
                sign[i] = sign[j] = -1.0
        elif a[0] != b[0]:
            i = a[1]
            if signed and sim[i, i] < 0:
                sign[i] = -1.0
    return perm, sign


def _cosets(group: FiniteGroup, sub: frozenset[int]) -> tuple[list[int], np.ndarray]:
    """Left coset representatives of ``sub`` and the coset index of every element."""
    mul = group.multiplication_table()
    reps: list[int] = []
    index = np.full(group.order, -1, dtype=np.int64)
    for g in range(group.order):
        if index[g] < 0:
            reps.append(g)
            for h in sub:
                index[mul[g, h]] = len(reps) - 1
    return reps, index


def coset_greedy(sims: np.ndarray, group: FiniteGroup, signed: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A G-set with signs on the units from per-element similarities ``sims[h]`` (shape ``(order, n, n)``).

    Returns, per generator, ``(perm, sign)`` with ``perm[s.j] = j`` and ``sign[s.j]`` the character value.
    """
    order, n, _ = sims.shape
    mul = group.multiplication_table()
    subgroups = group.subgroups()
    pairs = []  # (H, K, reps, coset index): a character of H with kernel K
    for h_set in subgroups:
        reps, index = _cosets(group, h_set)
        for k_set in subgroups:
            if k_set <= h_set and (len(k_set) == len(h_set) or (signed and 2 * len(k_set) == len(h_set))):
                pairs.append((h_set, k_set, reps, index))
    # per (H, K): the group elements r_c eta (coset c, eta in H) and the character values chi(eta), as arrays
    prepared = []
    for h_set, k_set, reps, index in pairs:
        h_list = sorted(h_set)
        elems = mul[np.ix_(reps, h_list)]  # (cosets, |H|)
        chi = np.array([1.0 if h in k_set else -1.0 for h in h_list])
        prepared.append((elems, chi, k_set, reps, index))
    free = np.ones(n, dtype=bool)
    n_free = n
    orbits = []
    for u in range(n):  # one iteration per orbit: units taken by an earlier orbit are skipped
        if not free[u]:
            continue
        column = np.ascontiguousarray(sims[:, :, u])  # (order, n): every S_h[j, u]
        best = None
        for elems, chi, k_set, reps, index in prepared:
            n_cos = len(reps)
            if n_cos > n_free:
                continue
            # scores of every coset at once: sum_eta chi(eta) S_{r_c eta}[:, u]
            score = np.einsum("e,cej->cj", chi, column[elems])
            units, gauge = [u], [1.0]
            total = float(score[0, u])
            avail = free.copy()
            avail[u] = False
            # with signs, the unit at coset c may be the negative of the canonical one (a sign gauge t_c)
            value = np.abs(score) if signed else score
            for c in range(1, n_cos):
                j = int(np.argmax(np.where(avail, value[c], -np.inf)))
                units.append(j)
                gauge.append(-1.0 if (signed and score[c, j] < 0) else 1.0)
                avail[j] = False
                total += float(value[c, j])
            mean = total / order
            if best is None or mean > best[0] + 1e-12:
                best = (mean, units, gauge, k_set, reps, index)
        _, units, gauge, k_set, reps, index = best
        free[units] = False
        n_free -= len(units)
        orbits.append((units, gauge, k_set, reps, index))
    out = {}
    inv = [group.inverse_index(h) for h in range(order)]
    for name in group.names:
        g = group.generator_index(name)
        perm = np.arange(n)
        sign = np.ones(n)
        for units, gauge, k_set, reps, coset_index in orbits:
            for c, j in enumerate(units):
                gr = mul[g, reps[c]]  # g r_c = r_c' eta
                c2 = int(coset_index[gr])
                eta = mul[inv[reps[c2]], gr]
                target = units[c2]
                perm[target] = j
                sign[target] = gauge[c2] * (1.0 if eta in k_set else -1.0) * gauge[c]
        out[name] = (perm, sign)
    return out


def consistent_actions(
    sims: np.ndarray, group: FiniteGroup, family: ActivationFamily, dtype: torch.dtype = torch.float64,
) -> LayerAlignment:
    """Group-consistent latent actions on one layer from per-element similarity matrices ``(order, n, n)``."""
    signed = signed_latent(family)
    n = sims.shape[1]
    best = {}  # unconstrained assignment per generator element, computed once
    if group.order == 2:
        h = group.generator_index(group.names[0])
        best[h] = best_assignment(sims[h], signed) if n else None
        perm, sign = involution_matching(sims[h], signed, unconstrained=best[h])
        raw = {group.names[0]: (perm, sign)}
    else:
        raw = coset_greedy(sims, group, signed)
    pre, latent = {}, {}
    quality, unconstrained = [], []
    for name, (perm, sign) in raw.items():
        h = group.generator_index(name)
        s_t = torch.as_tensor(sign, dtype=torch.float64)
        pre[name] = LatentAction(torch.as_tensor(perm), s_t, dtype=dtype)
        mult, off = family.latent(s_t)
        latent[name] = LatentAction(torch.as_tensor(perm), mult, off, dtype=dtype)
        quality.append(float((sims[h][np.arange(n), perm] * sign).mean()) if n else 1.0)
        if n and h not in best:
            best[h] = best_assignment(sims[h], signed)
        unconstrained.append(best[h][2] if n else 1.0)
    return LayerAlignment(pre, latent, float(np.mean(quality)), float(np.mean(unconstrained)))
