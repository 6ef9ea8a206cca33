"""Unit tests of perfusion_cli.edit against independent closed forms (PERFUSION.md §2, §3, §8).

Every reference value is computed here, in float64, directly from the formulas of PERFUSION.md:
C⁻¹ with torch.linalg.inv, E = i*ᵀC⁻¹i*, s(e) = eᵀC⁻¹i*/E, σ = torch.sigmoid, and for the exact
multi-concept edit the C⁻¹-orthogonal projection onto span{i*_c} in its Gram-matrix form
    e⊥ = e − I*ᵀ (I* C⁻¹ I*ᵀ)⁻¹ I* C⁻¹ e        (I* = the (n, d) matrix of concept inputs),
which needs no Cholesky/QR basis. The module under test is only used to produce the value that is
checked (delta, u, V, C⁻¹), never to build the reference. The C⁻¹ given to the module is the test's
own float64 inverse, so an error in inverse_covariance cannot hide an error elsewhere (it is tested
on its own).
"""

from __future__ import annotations

import math

import pytest
import torch

from perfusion_cli import edit

# ----------------------------------------------------------------------------------------------
# Random fixtures and float64 reference formulas
# ----------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_spd(d: int, seed: int, eps: float = 0.05) -> torch.Tensor:
    """C = X Xᵀ/N + eps·I (float64), N = 4d: a well-conditioned uncentered covariance."""
    g = _gen(seed)
    n = 4 * d
    X = torch.randn(d, n, generator=g, dtype=torch.float64)
    return X @ X.T / n + eps * torch.eye(d, dtype=torch.float64)


def random_problem(d: int, m: int, n: int, tokens: int = 7, seed: int = 0) -> dict:
    """C (f64), C⁻¹ (f64, torch.linalg.inv), W (m,d), I* (n,d), O* (n,m), E tokens (T,d) in f32."""
    g = _gen(seed + 1000)
    C = random_spd(d, seed)
    return dict(
        C=C,
        Cinv=torch.linalg.inv(C),
        W=torch.randn(m, d, generator=g) / math.sqrt(d),
        I=torch.randn(n, d, generator=g),
        O=torch.randn(n, m, generator=g),
        E=torch.randn(tokens, d, generator=g),
    )


def ref_sim(e: torch.Tensor, i_star: torch.Tensor, Cinv: torch.Tensor) -> torch.Tensor:
    """s(e) = eᵀ C⁻¹ i* / E, in float64. e: (..., d), i_star: (d,) -> (...)."""
    e, i_star = e.double(), i_star.double()
    E = i_star @ Cinv @ i_star
    return (e @ Cinv @ i_star) / E


def ref_gate(s: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    return torch.sigmoid((s - beta) / tau)


def ref_exact_perp(e: torch.Tensor, I: torch.Tensor, Cinv: torch.Tensor) -> torch.Tensor:
    """e⊥ = e − I*ᵀ (I* C⁻¹ I*ᵀ)⁻¹ I* C⁻¹ e: remove the C⁻¹-orthogonal projection onto span{i*}."""
    e, I = e.double(), I.double()
    G = I @ Cinv @ I.T                                   # (n, n) Gram matrix in the C⁻¹ metric
    coef = torch.linalg.solve(G, (e @ Cinv @ I.T).T).T   # (..., n)
    return e - coef @ I


def h_module(p: dict, exact: bool, betas, taus, e: torch.Tensor) -> torch.Tensor:
    """The module's h(e) = W e + delta(e), with the test's own C⁻¹."""
    inputs = edit.concept_inputs(p["I"], p["Cinv"], betas, taus, exact=exact)
    le = edit.layer_edit(p["W"], inputs, p["O"])
    return (e @ p["W"].T + le.delta(e)).double()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """float32-appropriate check: atol = rel × the reference's scale."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=rel * scale, rtol=rel)


SIZES = [(16, 8), (32, 24), (48, 12)]  # (d, m)


# ----------------------------------------------------------------------------------------------
# One concept (§2)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,m", SIZES)
def test_similarity_direction_unit_at_i_star_and_linear(d, m):
    """§2: u = C⁻¹i*/E gives s(e) = e·u with s(i*) = 1, and s is linear in e."""
    p = random_problem(d, m, n=1, seed=d)
    i_star = p["I"][0].double()
    u = edit.similarity_direction(i_star, p["Cinv"])
    assert u.dtype == torch.float64
    # u itself against the closed form C⁻¹ i* / (i*ᵀ C⁻¹ i*)
    assert_close(u, p["Cinv"] @ i_star / (i_star @ p["Cinv"] @ i_star), rel=1e-10)
    assert abs((i_star @ u).item() - 1.0) < 1e-10
    e1, e2 = p["E"][0].double(), p["E"][1].double()
    a, b = 2.5, -0.75
    assert abs(((a * e1 + b * e2) @ u - (a * (e1 @ u) + b * (e2 @ u))).item()) < 1e-10
    assert abs((e1 @ u - ref_sim(e1, i_star, p["Cinv"])).item()) < 1e-10
    # a non-trivial check: a random e does not have s = 1
    assert abs((e1 @ u).item() - 1.0) > 1e-3


@pytest.mark.parametrize("d,m", SIZES)
@pytest.mark.parametrize("beta,tau", [(0.7, 0.15), (0.4, 0.05), (0.9, 0.3)])
def test_h_at_i_star_is_gated_target(d, m, beta, tau):
    """§2: h(i*) = W i* − 1·W i* + σ((1−β)/τ)·o* = σ((1−β)/τ)·o*."""
    p = random_problem(d, m, n=1, seed=d + 1)
    h = h_module(p, True, beta, tau, p["I"])  # e = i*, shape (1, d)
    expected = ref_gate(torch.tensor(1.0, dtype=torch.float64), beta, tau) * p["O"].double()
    assert_close(h, expected)


@pytest.mark.parametrize("d,m", SIZES)
def test_h_on_c_inv_orthogonal_complement(d, m):
    """§2: e = x − i*(i*ᵀC⁻¹x)/E has s(e) = 0, so h(e) = W e + σ(−β/τ)·o*."""
    beta, tau = 0.3, 0.2  # σ(−1.5) ≈ 0.18: the o* term is clearly visible
    p = random_problem(d, m, n=1, seed=d + 2)
    Cinv, i_star = p["Cinv"], p["I"][0].double()
    x = p["E"].double()
    E = i_star @ Cinv @ i_star
    e = x - torch.outer(x @ Cinv @ i_star, i_star) / E
    assert ref_sim(e, i_star, Cinv).abs().max() < 1e-10
    h = h_module(p, True, beta, tau, e.float())
    expected = e @ p["W"].double().T + ref_gate(torch.tensor(0.0).double(), beta, tau) * p["O"].double()
    assert_close(h, expected)


@pytest.mark.parametrize("d,m", SIZES)
def test_rome_limit_and_removal_term(d, m):
    """§2: with the gate replaced by s(e), h is ROME's W' = W + (o* − W i*)(C⁻¹i*)ᵀ/E.

    Independent: s, E, C⁻¹i* and W' are built here in float64 from the formula. The module
    contributes only delta(e); we subtract the gate term σ((s−β)/τ)·o* (σ computed here) and add
    s(e)·o*, which equals W'e − We iff the module's removal term is exactly s(e)·W i*.
    """
    beta, tau = 0.7, 0.15
    p = random_problem(d, m, n=1, seed=d + 3)
    Cinv, i_star = p["Cinv"], p["I"][0].double()
    W, o_star, e = p["W"].double(), p["O"][0].double(), p["E"].double()
    E = i_star @ Cinv @ i_star
    s = ref_sim(e, i_star, Cinv)                                   # (T,)
    W_rome = W + torch.outer(o_star - W @ i_star, Cinv @ i_star) / E
    # (a) the algebraic identity of §2
    lhs = e @ W.T - s[:, None] * (W @ i_star) + s[:, None] * o_star
    assert_close(lhs, e @ W_rome.T, rel=1e-10)
    # (b) the module's delta with its gate swapped for s(e)
    inputs = edit.concept_inputs(p["I"], Cinv, beta, tau)
    delta = edit.layer_edit(p["W"], inputs, p["O"]).delta(p["E"]).double()
    g = ref_gate(s, beta, tau)
    assert_close(delta - g[:, None] * o_star + s[:, None] * o_star, e @ W_rome.T - e @ W.T)


@pytest.mark.parametrize("d,m", SIZES)
def test_exact_equals_approximate_for_one_concept(d, m):
    """§8 with n = 1: exact and approximate are the same edit, both equal to §2's h(e)."""
    beta, tau = 0.6, 0.1
    p = random_problem(d, m, n=1, seed=d + 4)
    deltas = {}
    for exact in (True, False):
        inputs = edit.concept_inputs(p["I"], p["Cinv"], beta, tau, exact=exact)
        deltas[exact] = edit.layer_edit(p["W"], inputs, p["O"]).delta(p["E"])
    torch.testing.assert_close(deltas[True], deltas[False], atol=1e-6, rtol=1e-6)
    Cinv, i_star = p["Cinv"], p["I"][0].double()
    W, e = p["W"].double(), p["E"].double()
    s = ref_sim(e, i_star, Cinv)
    expected = -s[:, None] * (W @ i_star) + ref_gate(s, beta, tau)[:, None] * p["O"][0].double()
    assert_close(deltas[True], expected)


# ----------------------------------------------------------------------------------------------
# Several concepts (§8)
# ----------------------------------------------------------------------------------------------

MULTI = [(2, 16, 8), (2, 32, 24), (3, 48, 12), (3, 24, 16)]  # (n, d, m)
BETAS, TAUS = [0.7, 0.3, 0.55], [0.1, 0.25, 0.15]


@pytest.mark.parametrize("n,d,m", MULTI)
def test_exact_multi_concept_basis_projection_and_output(n, d, m):
    """§8 exact: V C⁻¹ Vᵀ = I, span V = span i*, e⊥ ⊥_{C⁻¹} i*_c, h = W e⊥ + Σ σ((s_c−β_c)/τ_c) o*_c."""
    p = random_problem(d, m, n=n, seed=10 * n + d)
    Cinv, I = p["Cinv"], p["I"].double()
    V = edit.c_orthonormal_basis(I, Cinv)
    assert V.shape == (n, d)
    assert_close(V @ Cinv @ V.T, torch.eye(n, dtype=torch.float64), rel=1e-10)
    # same span: each i* is reproduced by a (Euclidean least-squares) combination of the rows of V
    coef = torch.linalg.lstsq(V.T, I.T).solution               # (n, n)
    assert (V.T @ coef - I.T).abs().max() < 1e-8 * I.abs().max()
    assert torch.linalg.matrix_rank(V) == n
    # projection with V: C⁻¹-orthogonal to every i*, and equal to the Gram-form projection
    e = p["E"].double()
    e_perp_V = e - (e @ Cinv @ V.T) @ V
    assert (e_perp_V @ Cinv @ I.T).abs().max() < 1e-8 * e.abs().max()
    e_perp = ref_exact_perp(e, I, Cinv)
    assert_close(e_perp_V, e_perp, rel=1e-8)
    # the module's exact h against the closed form, each concept with its own β, τ
    betas, taus = BETAS[:n], TAUS[:n]
    h = h_module(p, True, betas, taus, p["E"])
    expected = e_perp @ p["W"].double().T
    for c in range(n):
        s_c = ref_sim(e, I[c], Cinv)
        expected = expected + ref_gate(s_c, betas[c], taus[c])[:, None] * p["O"][c].double()
    assert_close(h, expected)
    # exact really differs from approximate here (the i*'s are not C⁻¹-orthogonal)
    h_approx = h_module(p, False, betas, taus, p["E"])
    assert (h - h_approx).abs().max() > 1e-2


@pytest.mark.parametrize("n,d,m", MULTI)
def test_approximate_multi_concept_output(n, d, m):
    """§8 approximate: h = W e − Σ_c s_c W i*_c + Σ_c σ((s_c − β_c)/τ_c) o*_c."""
    p = random_problem(d, m, n=n, seed=20 * n + d)
    Cinv, I, W, e = p["Cinv"], p["I"].double(), p["W"].double(), p["E"].double()
    betas, taus = BETAS[:n], TAUS[:n]
    h = h_module(p, False, betas, taus, p["E"])
    expected = e @ W.T
    for c in range(n):
        s_c = ref_sim(e, I[c], Cinv)[:, None]
        expected = expected - s_c * (W @ I[c]) + ref_gate(s_c, betas[c], taus[c]) * p["O"][c].double()
    assert_close(h, expected)


@pytest.mark.parametrize("d,m", [(16, 8), (32, 24), (48, 12)])
def test_exact_two_concepts_at_first_concept_input(d, m):
    """§8 exact at e = i*_1: e⊥ = 0, h = σ((1−β_1)/τ_1) o*_1 + σ((s_2(i*_1)−β_2)/τ_2) o*_2."""
    beta, tau = [0.7, 0.2], [0.1, 0.3]
    p = random_problem(d, m, n=2, seed=30 + d)
    Cinv = p["Cinv"]
    # make i*_2 correlated with i*_1 so that s_2(i*_1) is clearly non-zero
    p["I"] = torch.stack([p["I"][0], (0.6 * p["I"][0] + 0.8 * p["I"][1])])
    I = p["I"].double()
    e = I[:1]
    assert ref_exact_perp(e, I, Cinv).abs().max() < 1e-10 * I.abs().max()  # W e⊥ = 0
    s2 = ref_sim(e, I[1], Cinv)
    assert s2.abs().item() > 0.1
    g1 = ref_gate(torch.tensor(1.0, dtype=torch.float64), beta[0], tau[0])
    g2 = ref_gate(s2, beta[1], tau[1])
    expected = g1 * p["O"][0].double() + g2[:, None] * p["O"][1].double()
    h = h_module(p, True, beta, tau, p["I"][:1])
    assert_close(h, expected)
    # the module's per-concept gates, and the closed form with β, τ swapped is clearly different
    le = edit.layer_edit(p["W"], edit.concept_inputs(p["I"], Cinv, beta, tau), p["O"])
    assert_close(le.gates(p["I"][:1]), torch.stack([g1, g2[0]])[None], rel=1e-5)
    swapped = (ref_gate(torch.tensor(1.0).double(), beta[1], tau[1]) * p["O"][0].double()
               + ref_gate(s2, beta[0], tau[0])[:, None] * p["O"][1].double())
    assert (swapped - expected).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------
# C⁻¹, dtypes and shapes, gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [16, 32, 48])
def test_inverse_covariance(d):
    """§3: inverse_covariance(C) is float64 and C⁻¹ C ≈ I for a well-conditioned C."""
    C = random_spd(d, seed=d + 5)
    for Cin in (C, C.float()):
        Cinv = edit.inverse_covariance(Cin, ridge=1e-10)
        assert Cinv.dtype == torch.float64
        assert Cinv.shape == (d, d)
        tol = 1e-8 if Cin.dtype == torch.float64 else 1e-5
        assert_close(Cinv @ C, torch.eye(d, dtype=torch.float64), rel=tol)
    # the default ridge is relative to trace(C)/d: scaling C scales C⁻¹ by the inverse
    assert_close(edit.inverse_covariance(100.0 * C) * 100.0, edit.inverse_covariance(C), rel=1e-8)


def test_delta_batched_and_dtype():
    """§2 cheap form: delta maps (B, L, d) -> (B, L, m) per token and returns the input dtype."""
    n, d, m, B, L = 2, 32, 16, 3, 5
    p = random_problem(d, m, n=n, seed=77)
    e = torch.randn(B, L, d, generator=_gen(78))
    le = edit.layer_edit(p["W"], edit.concept_inputs(p["I"], p["Cinv"], BETAS[:n], TAUS[:n]), p["O"])
    out32 = le.delta(e)
    assert out32.shape == (B, L, m) and out32.dtype == torch.float32
    # per-token: the batched result equals the flat (B·L, d) one and the closed form
    assert_close(out32.reshape(B * L, m), le.delta(e.reshape(B * L, d)), rel=1e-6)
    ef = e.reshape(B * L, d).double()
    expected = (ref_exact_perp(ef, p["I"], p["Cinv"]) - ef) @ p["W"].double().T
    for c in range(n):
        s_c = ref_sim(ef, p["I"][c], p["Cinv"])[:, None]
        expected = expected + ref_gate(s_c, BETAS[c], TAUS[c]) * p["O"][c].double()
    assert_close(out32.reshape(B * L, m), expected)
    out16 = le.delta(e.half())
    assert out16.shape == (B, L, m) and out16.dtype == torch.float16
    torch.testing.assert_close(out16.float(), out32, atol=2e-2, rtol=2e-2)


def test_layer_edit_gradient_wrt_targets():
    """§5: d Σ delta(e) / d o*_c[j] = Σ_tokens σ((s_c(e) − β_c)/τ_c), for every output j."""
    n, d, m = 3, 24, 10
    p = random_problem(d, m, n=n, tokens=11, seed=99)
    targets = p["O"].clone().requires_grad_(True)
    le = edit.layer_edit(p["W"], edit.concept_inputs(p["I"], p["Cinv"], BETAS, TAUS), targets)
    le.delta(p["E"]).sum().backward()
    assert targets.grad is not None and targets.grad.shape == (n, m)
    gate_sums = torch.stack([
        ref_gate(ref_sim(p["E"], p["I"][c], p["Cinv"]), BETAS[c], TAUS[c]).sum() for c in range(n)
    ])
    assert_close(targets.grad, gate_sums[:, None].expand(n, m), rel=1e-5)
    # W is not trained (§5): layer_edit detaches it
    W = p["W"].clone().requires_grad_(True)
    le = edit.layer_edit(W, edit.concept_inputs(p["I"], p["Cinv"], BETAS, TAUS), p["O"])
    assert not le.delta(p["E"]).requires_grad


# ----------------------------------------------------------------------------------------------
# Plain ROME: the gate replaced by s(e) (§2; an ablation of the quality benchmark)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,m", SIZES)
def test_linear_gate_is_romes_closed_form(d, m):
    """§2: with `linear` set, W e + delta(e) = W' e for ROME's W' = W + (o* − W i*)(C⁻¹i*)ᵀ/E, built here
    explicitly in float64; β, τ no longer matter; without it the same inputs give the gated edit."""
    p = random_problem(d, m, n=1, seed=d + 40)
    Cinv, i_star = p["Cinv"], p["I"][0].double()
    W, o_star, e = p["W"].double(), p["O"][0].double(), p["E"].double()
    W_rome = W + torch.outer(o_star - W @ i_star, Cinv @ i_star) / (i_star @ Cinv @ i_star)
    for beta, tau in ((0.7, 0.15), (0.2, 0.6)):
        inputs = edit.concept_inputs(p["I"], Cinv, beta, tau, linear=[True])
        le = edit.layer_edit(p["W"], inputs, p["O"])
        assert_close(e @ W.T + le.delta(p["E"]).double(), e @ W_rome.T)
        assert_close(le.gates(p["E"]).double()[:, 0], ref_sim(e, i_star, Cinv), rel=1e-5)
    assert_close(W_rome @ i_star, o_star, rel=1e-10)        # ROME's constraint W' i* = o* ...
    assert_close((p["I"] @ p["W"].T + le.delta(p["I"])).double()[0], o_star)   # ... which the module meets
    gated = edit.layer_edit(p["W"], edit.concept_inputs(p["I"], Cinv, 0.7, 0.15, linear=[False]), p["O"])
    assert (e @ W.T + gated.delta(p["E"]).double() - e @ W_rome.T).abs().max() > 1e-2


def test_linear_gate_per_concept_and_stacked():
    """Two concepts, only the first plain ROME: its gate is s_1(e), the second's σ((s_2 − β_2)/τ_2); the
    StackedEdit of the training loop carries the flag too (same numbers as the LayerEdit)."""
    n, d, m = 2, 32, 12
    p = random_problem(d, m, n=n, seed=41)
    inputs = edit.concept_inputs(p["I"], p["Cinv"], BETAS[:n], TAUS[:n], exact=False, linear=[True, False])
    le = edit.layer_edit(p["W"], inputs, p["O"])
    e = p["E"].double()
    expected = e @ p["W"].double().T
    for c, gate_of in enumerate((lambda s: s, lambda s: ref_gate(s, BETAS[1], TAUS[1]))):
        s_c = ref_sim(e, p["I"][c], p["Cinv"])[:, None]
        expected = expected - s_c * (p["W"].double() @ p["I"][c].double()) + gate_of(s_c) * p["O"][c].double()
    assert_close(e @ p["W"].double().T + le.delta(p["E"]).double(), expected)
    st = edit.stacked_edit(p["W"], inputs, p["O"], {("x", "v"): (0, m)})
    torch.testing.assert_close(st.delta_all(p["E"]), le.delta(p["E"]), atol=1e-6, rtol=1e-6)
    # all flags off is exactly the gated edit (no flag tensor at all)
    assert edit.concept_inputs(p["I"], p["Cinv"], BETAS[:n], TAUS[:n], linear=[False, False]).linear is None


# ----------------------------------------------------------------------------------------------
# Token scope (PERFUSION.md §11c): each concept's edit confined to where its scope is 1
# ----------------------------------------------------------------------------------------------


def ref_h_approx_scoped(p: dict, e: torch.Tensor, scope: torch.Tensor, betas, taus) -> torch.Tensor:
    """h(e_t) = W e_t + Σ_c m_tc [σ((s_c − β_c)/τ_c) o*_c − s_c W i*_c], float64 (the approximate edit, §8)."""
    e, W = e.double(), p["W"].double()
    h = e @ W.T
    for c in range(p["I"].shape[0]):
        s_c = ref_sim(e, p["I"][c], p["Cinv"])[:, None]
        m_c = scope[:, c:c + 1].double()
        h = h + m_c * (ref_gate(s_c, betas[c], taus[c]) * p["O"][c].double() - s_c * (W @ p["I"][c].double()))
    return h


def ref_h_exact_scoped(p: dict, e: torch.Tensor, scope: torch.Tensor, betas, taus) -> torch.Tensor:
    """At a token where some concept is in scope: W e⊥ + Σ_c m_tc σ((s_c − β_c)/τ_c) o*_c (Gram form of e⊥);
    elsewhere W e."""
    e, W = e.double(), p["W"].double()
    any_c = scope.double().amax(-1, keepdim=True)
    h = e @ W.T + any_c * ((ref_exact_perp(e, p["I"], p["Cinv"]) - e) @ W.T)
    for c in range(p["I"].shape[0]):
        s_c = ref_sim(e, p["I"][c], p["Cinv"])[:, None]
        h = h + scope[:, c:c + 1].double() * ref_gate(s_c, betas[c], taus[c]) * p["O"][c].double()
    return h


@pytest.mark.parametrize("exact", [False, True])
def test_scoped_delta_closed_forms(exact):
    """Two concepts on 7 tokens with a scope that puts concept 0 on tokens 1-2, concept 1 on token 4, both on
    token 5 and neither elsewhere: the module's h matches the closed form token by token, tokens out of every
    scope keep W e exactly, and a scope of ones is the paper's (unscoped) edit."""
    n, d, m = 2, 24, 10
    p = random_problem(d, m, n=n, seed=57)
    scope = torch.zeros(7, n)
    scope[1:3, 0] = 1
    scope[4, 1] = 1
    scope[5, :] = 1
    inputs = edit.concept_inputs(p["I"], p["Cinv"], BETAS[:n], TAUS[:n], exact=exact)
    assert inputs.mixed is exact
    le = edit.layer_edit(p["W"], inputs, p["O"])
    e = p["E"]
    h = (e.double() @ p["W"].double().T + le.delta(e, scope).double())
    ref = (ref_h_exact_scoped if exact else ref_h_approx_scoped)(p, e, scope, BETAS[:n], TAUS[:n])
    assert_close(h, ref)
    untouched = scope.sum(-1) == 0
    assert torch.equal(le.delta(e, scope)[untouched], torch.zeros(int(untouched.sum()), m))
    # the scope matters: token 1 (concept 0 only) differs from the unscoped edit there
    assert (le.delta(e, scope)[1] - le.delta(e)[1]).abs().max() > 1e-3
    assert_close(le.delta(e, torch.ones(7, n)), le.delta(e), rel=1e-6)
    # the training loop's stacked form agrees, batched
    st = edit.stacked_edit(p["W"], inputs, p["O"], {("x", "v"): (0, m)})
    eb, sb = e.reshape(1, 7, d).expand(3, 7, d), scope.expand(3, 7, n)
    torch.testing.assert_close(st.delta_all(eb, sb), le.delta(eb, sb), atol=1e-6, rtol=1e-6)


def test_scoped_delta_gradient_only_from_scoped_tokens():
    """Training with a word scope: o*'s gradient comes only from the tokens in scope."""
    d, m = 16, 6
    p = random_problem(d, m, n=1, seed=58)
    inputs = edit.concept_inputs(p["I"], p["Cinv"], 0.75, 0.1)
    O = p["O"].clone().requires_grad_(True)
    scope = torch.zeros(7, 1)
    scope[3] = 1
    edit.layer_edit(p["W"], inputs, O).delta(p["E"], scope).sum().backward()
    g = torch.sigmoid((ref_sim(p["E"][3], p["I"][0], p["Cinv"]) - 0.75) / 0.1)
    assert_close(O.grad[0].double(), g.expand(m), rel=1e-5)      # d/do* Σ_j (gate_3 o*_j) = gate_3
