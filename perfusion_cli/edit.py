"""The core editing module: Perfusion's gated rank-1 edit of one linear projection.

Pure torch. No diffusers, no files, nothing else of this project. Section numbers (§) refer to
PERFUSION.md in the project's docs; equation numbers to the paper (arXiv 2305.01644).

Notation (one edited projection W: R^d -> R^m, d = text-encoder width, m = layer width):
    e     (..., d)  a text-encoder output vector (one token's encoding)
    C     (d, d)    uncentered covariance of such encodings, E[e eᵀ]          (§3)
    i*    (d,)      the concept's input: EMA of the concept token's encoding   (§5)
    o*    (m,)      the concept's target output in this layer                  (§4, §5)
    E   = i*ᵀ C⁻¹ i*                                                          energy
    s(e)= eᵀ C⁻¹ i* / E                                                       similarity, s(i*) = 1
    h(e)= W e − s(e)·W i* + σ((s(e) − β)/τ)·o*                               the gated edit (§2, eq. 4-5)

Several concepts (§8):
    approximate  h = W e − Σ_c s_c(e)·W i*_c + Σ_c σ((s_c − β_c)/τ_c)·o*_c
    exact        h = W e⊥ + Σ_c σ((s_c − β_c)/τ_c)·o*_c,
                 e⊥ = e − Σ_k v_k (v_kᵀ C⁻¹ e),  {v_k} a C⁻¹-orthonormal basis of span{i*_c}.

Both are one formula once written as
    h = W e − Σ_k (e·a_k) b_k + Σ_c σ((e·u_c − β_c)/τ_c) o*_c
with  approximate: a_c = u_c = C⁻¹ i*_c / E_c,  b_c = W i*_c
      exact:       a_k = C⁻¹ v_k,                b_k = W v_k.
a, u depend only on the concepts and C, so they are shared by every layer; b is one matvec per layer.
A call then costs O(tokens × (d + m) × n) on top of W e (the "cheap form" of §2).

Plain ROME (an ablation, §2): a concept whose `linear` flag is set has its gate σ((s − β)/τ) replaced by
s(e) itself, which turns its edit into ROME's closed form W' = W + (o* − W i*)(C⁻¹ i*)ᵀ / E.

Token scope (not in the paper; PERFUSION.md §11c): the paper's h depends on e alone, so the gate may open on any
token whose encoding resembles i*, and a causal text encoder carries the concept into every later token. A scope
m (..., n) in [0, 1] per token and concept confines each concept's edit to where m is 1 (its own word's tokens):
    h = W e − Σ_k m̄_k (e·a_k) b_k + Σ_c m_c σ((e·u_c − β_c)/τ_c) o*_c,
m̄_k = m_c for the approximate edit (k = c), max_c m_c for the exact one (its basis mixes the concepts).
m ≡ 1 is the paper's edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "ConceptTensors",
    "LayerEdit",
    "ConceptInputs",
    "inverse_covariance",
    "energy",
    "similarity_direction",
    "gate",
    "scoped_delta",
    "c_orthonormal_basis",
    "concept_inputs",
    "layer_edit",
]


@dataclass
class ConceptTensors:
    """What one trained concept is, as tensors (the file format adds names and provenance).

    The per-layer dicts are keyed by the module path of the edited projection's attention block
    (diffusers: '...transformer_blocks.0.attn2'); their values have that layer's output width m.
    """

    i_star: Tensor                     # (d,)  concept input, EMA of its encodings (§5)
    key_targets: dict[str, Tensor]     # layer -> (m,)  o*_K = W_K i_super, locked (§4)
    value_targets: dict[str, Tensor]   # layer -> (m,)  o*_V, trained (§5)
    beta: float = 0.7                  # gate bias β: lower = more concept, higher = more prompt (§7)
    tau: float = 0.15                  # gate temperature τ (§7)


def inverse_covariance(C: Tensor, ridge: float = 1e-4) -> Tensor:
    """C⁻¹ in float64, with a relative ridge for numerically singular estimates (§3).

    ridge·trace(C)/d is added to the diagonal. It bounds how much a near-null direction of C (a
    small LayerNorm'd text encoder can have one) is amplified, to ~1/ridge of the mean variance.
    For the bundled SD 1.x matrix (eigenvalues 1.13 … 4434, mean ≈ 20) it adds ~2e-3, about
    0.2% of the smallest eigenvalue.
    """
    C = C.double()
    C = 0.5 * (C + C.T)
    d = C.shape[0]
    lam = ridge * torch.trace(C) / d
    eye = torch.eye(d, dtype=C.dtype, device=C.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(C + lam * eye))


def energy(i_star: Tensor, C_inv: Tensor) -> Tensor:
    """E = i*ᵀ C⁻¹ i*  (§2). i_star: (..., d) -> (...)."""
    return torch.einsum("...d,de,...e->...", i_star, C_inv, i_star)


def similarity_direction(i_star: Tensor, C_inv: Tensor) -> Tensor:
    """u = C⁻¹ i* / E, so that s(e) = e·u and s(i*) = 1  (§2, "cheap form"). (..., d) -> (..., d)."""
    Ci = i_star @ C_inv  # C⁻¹ is symmetric
    return Ci / energy(i_star, C_inv).unsqueeze(-1)


def gate(s: Tensor, beta: Tensor | float, tau: Tensor | float, linear: Tensor | None = None) -> Tensor:
    """σ((s − β)/τ): how much of o* replaces the removed component (§2, paper eq. 5).

    linear: (n,) bool, per concept (the last axis of s): use s itself instead, which makes the edit plain
    ROME (§2; the quality benchmark's ablation of the gate). None: every concept gated."""
    g = torch.sigmoid((s - beta) / tau)
    return g if linear is None else torch.where(linear, s, g)


def c_orthonormal_basis(i_stars: Tensor, C_inv: Tensor) -> Tensor:
    """A basis V (n, d) of span{i*_c} that is orthonormal in the C⁻¹ metric: V C⁻¹ Vᵀ = I  (§8).

    Cholesky C⁻¹ = L Lᵀ maps the metric to the Euclidean one (x -> Lᵀ x); QR there; map back with L⁻ᵀ.
    """
    L = torch.linalg.cholesky(C_inv)                        # (d, d) lower
    Q, _ = torch.linalg.qr(L.T @ i_stars.T)                 # (d, n) Euclidean-orthonormal
    return torch.linalg.solve_triangular(L.T, Q, upper=True).T  # (n, d) = (L⁻ᵀ Q)ᵀ


@dataclass
class ConceptInputs:
    """The layer-independent half of an edit: everything that depends only on the i*'s and C."""

    U: Tensor      # (n, d)  u_c = C⁻¹ i*_c / E_c: similarity directions, s_c = e·u_c
    A: Tensor      # (k, d)  projection coefficients: the removed part is Σ_k (e·a_k) b_k
    P: Tensor      # (k, d)  directions whose image W p_k gives b_k (i*_c, or v_k when exact)
    beta: Tensor   # (n,)
    tau: Tensor    # (n,)
    linear: Tensor | None = None  # (n,) bool: concept c's gate is s_c(e) itself (plain ROME); None: all gated
    mixed: bool = False           # A's rows mix the concepts (the exact edit's basis, n > 1): see scoped_delta


def concept_inputs(
    i_stars: Tensor, C_inv: Tensor, betas, taus, exact: bool = True, linear=None
) -> ConceptInputs:
    """Precompute the parts of a (multi-)concept edit shared by all layers (§2 cheap form, §8).

    i_stars: (n, d). With one concept, exact and approximate are the same edit.
    linear: per-concept booleans (or None): those concepts get ROME's s(e) instead of the gate (see gate).
    Computed in float64, returned in float32 (similarities of a 768-wide encoding against a
    C⁻¹ of condition ~4e3 lose too much in fp16).
    """
    i_stars = i_stars.double()
    C_inv = C_inv.double().to(i_stars.device)
    U = similarity_direction(i_stars, C_inv)                 # (n, d)
    if exact and i_stars.shape[0] > 1:
        V = c_orthonormal_basis(i_stars, C_inv)              # (n, d)
        A, P = V @ C_inv, V                                  # a_k = C⁻¹ v_k, b_k = W v_k
    else:
        A, P = U, i_stars                                    # a_c = u_c,     b_c = W i*_c
    f = lambda x: torch.as_tensor(x, dtype=torch.float32, device=i_stars.device).reshape(-1)
    flags = None
    if linear is not None and any(bool(x) for x in torch.as_tensor(linear).reshape(-1)):
        flags = torch.as_tensor(linear, dtype=torch.bool, device=i_stars.device).reshape(-1)
    mixed = bool(exact and i_stars.shape[0] > 1)
    return ConceptInputs(U.float(), A.float(), P.float(), f(betas), f(taus), flags, mixed)


def scoped_delta(x: Tensor, A: Tensor, B: Tensor, U: Tensor, O: Tensor, beta: Tensor, tau: Tensor,
                 linear: Tensor | None = None, scope: Tensor | None = None, mixed: bool = False) -> Tensor:
    """h(e) − W e for encodings x (..., d): Σ_c m_c σ((x·u_c − β_c)/τ_c) o*_c − Σ_k m̄_k (x·a_k) b_k  (module
    docstring). scope (..., n) or None (m ≡ 1, the paper's edit); mixed: m̄ = max_c m_c. (..., d) -> (..., M)."""
    coeff = x @ A.T                                          # (..., k)  e·a_k
    gates = gate(x @ U.T, beta, tau, linear)                 # (..., n)
    if scope is not None:
        m = scope.to(x.dtype)
        gates = gates * m
        coeff = coeff * (m.amax(-1, keepdim=True) if mixed else m)
    return gates @ O - coeff @ B


@dataclass
class LayerEdit:
    """The precomputed edit of one projection: delta(e) = h(e) − W e  (shapes in the class body)."""

    A: Tensor      # (k, d)
    B: Tensor      # (k, m)  b_k = W p_k
    U: Tensor      # (n, d)
    O: Tensor      # (n, m)  o*_c for this layer
    beta: Tensor   # (n,)
    tau: Tensor    # (n,)
    extra: dict = field(default_factory=dict)
    linear: Tensor | None = None  # (n,) bool: plain-ROME concepts (see gate)
    mixed: bool = False           # ConceptInputs.mixed

    def delta(self, e: Tensor, scope: Tensor | None = None) -> Tensor:
        """(..., d) -> (..., m), computed in float32 and returned in e's dtype. scope: (..., n), see scoped_delta."""
        x = e.to(self.A.dtype)
        return scoped_delta(x, self.A, self.B, self.U, self.O, self.beta, self.tau, self.linear, scope,
                            self.mixed).to(e.dtype)

    def gates(self, e: Tensor) -> Tensor:
        """σ((s_c(e) − β_c)/τ_c) for each concept (s_c(e) for a plain-ROME one): (..., d) -> (..., n)."""
        return gate(e.to(self.U.dtype) @ self.U.T, self.beta, self.tau, self.linear)


@dataclass
class StackedEdit:
    """Many projections' edits that share one ConceptInputs, computed as one (the training loop's form).

    A, U, β, τ do not depend on the layer (§2 cheap form): only b_k = W p_k and o* do. Concatenating
    every projection's B and O along the output axis gives one delta for all of them,
        delta_all(e) = gates(e) @ O − (e @ Aᵀ) @ B          (..., d) -> (..., M),
    of which projection j's delta is the slice `slices[j]`: the same numbers as its LayerEdit.delta
    (tests/test_edit.py), in a dozen tensor operations instead of a dozen per projection. On a GPU,
    where a training step of SD 1.5 is bound by kernel launches, that is the difference (bench speed).
    """

    A: Tensor      # (k, d)
    B: Tensor      # (k, M)  [W_1 p_k | W_2 p_k | ...]
    U: Tensor      # (n, d)
    O: Tensor      # (n, M)  [o*_1 | o*_2 | ...]
    beta: Tensor   # (n,)
    tau: Tensor    # (n,)
    slices: dict = field(default_factory=dict)  # projection key -> (start, stop) in M
    linear: Tensor | None = None                # (n,) bool: plain-ROME concepts (see gate)
    mixed: bool = False                         # ConceptInputs.mixed

    def delta_all(self, e: Tensor, scope: Tensor | None = None) -> Tensor:
        x = e.to(self.A.dtype)
        return scoped_delta(x, self.A, self.B, self.U, self.O, self.beta, self.tau, self.linear, scope,
                            self.mixed).to(e.dtype)


def stacked_edit(weights: Tensor, inputs: ConceptInputs, targets: Tensor, slices: dict) -> StackedEdit:
    """weights: the projections' W stacked along the output axis (M, d); targets: their o* likewise (n, M).
    Differentiable in `targets`."""
    return StackedEdit(A=inputs.A, B=inputs.P @ weights.detach().to(inputs.P.dtype).T, U=inputs.U,
                       O=targets.to(inputs.P.dtype), beta=inputs.beta, tau=inputs.tau, slices=slices,
                       linear=inputs.linear, mixed=inputs.mixed)


def layer_edit(weight: Tensor, inputs: ConceptInputs, targets: Tensor) -> LayerEdit:
    """Bind the shared concept inputs to one projection W (m, d) and its targets o* (n, m).

    Differentiable in `targets` (training trains o*_V through this).
    """
    W = weight.detach().to(inputs.P.dtype)
    return LayerEdit(
        A=inputs.A,
        B=inputs.P @ W.T,                                    # (k, m)
        U=inputs.U,
        O=targets.to(inputs.P.dtype),
        beta=inputs.beta,
        tau=inputs.tau,
        linear=inputs.linear,
        mixed=inputs.mixed,
    )
