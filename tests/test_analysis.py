"""Tests for jlora.analysis: subspace similarity (Hu et al. 2021, Eq. 4), the Table 7 projections and
amplification factor, and intruder dimensions (Shuttleworth et al. 2024).

Every expected value comes from a hand-built case or from a short, independent NumPy
re-implementation written in the *paper's* layout (PyTorch (out, in) weights, A ∈ R^{r×k},
B ∈ R^{d×r}), so the layout translation in jlora.analysis is checked rather than assumed.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jlora.analysis import (
    IntruderDimensions,
    amplification_factor,
    intruder_dimensions,
    projection_norms,
    random_subspace_baseline,
    subspace_similarity,
    subspace_similarity_grid,
)

# ---------------------------------------------------------------------------------------------
# Independent reference implementations, in the paper's layout
# ---------------------------------------------------------------------------------------------


def paper_phi_A(a_paper1, a_paper2, i, j):
    """Eq. 4 on the paper's A (r × k): right-singular unitary matrices, top-i / top-j columns."""
    v1 = np.linalg.svd(a_paper1, full_matrices=False)[2].T
    v2 = np.linalg.svd(a_paper2, full_matrices=False)[2].T
    m = v1[:, :i].T @ v2[:, :j]
    return np.linalg.norm(m, "fro") ** 2 / min(i, j)


def paper_phi_B(b_paper1, b_paper2, i, j):
    """Footnote 8: the same on the paper's B (d × r) with left-singular matrices, via principal angles."""
    u1 = np.linalg.svd(b_paper1, full_matrices=False)[0][:, :i]
    u2 = np.linalg.svd(b_paper2, full_matrices=False)[0][:, :j]
    cosines = np.linalg.svd(u1.T @ u2, compute_uv=False)
    return float(np.sum(cosines**2) / min(i, j))


def paper_intruder_max_cos(w_base_paper, w_tuned_paper, k):
    """Official definition: top-k *left* singular vectors of the (out, in) tuned weight vs all base ones."""
    u_base = np.linalg.svd(w_base_paper, full_matrices=False)[0]
    u_tuned = np.linalg.svd(w_tuned_paper, full_matrices=False)[0]
    dots = np.abs(np.einsum("ji,jk->ik", u_tuned, u_base))
    return dots.max(axis=1)[:k]


def orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


# ---------------------------------------------------------------------------------------------
# Subspace similarity
# ---------------------------------------------------------------------------------------------


def test_phi_of_subspace_with_itself_is_one():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 6))
    for i in range(1, 7):
        assert subspace_similarity(a, a, i, i) == pytest.approx(1.0, abs=1e-12)
    # Nested subspaces: top-2 of a is contained in top-5 of a, so φ(2, 5) = 1 as well.
    assert subspace_similarity(a, a, 2, 5) == pytest.approx(1.0, abs=1e-12)
    # …but top-5 vs a *different* top-2 only overlaps partly: φ(a, a, 3, 3) = 1 is not vacuous.
    b = rng.standard_normal((16, 6))
    assert subspace_similarity(a, b, 3, 3) < 0.9


def test_phi_of_orthogonal_subspaces_is_zero():
    rng = np.random.default_rng(1)
    q = orthonormal(rng, 10, 10)
    # Mix within disjoint blocks of an orthonormal basis: the column spaces are orthogonal.
    a1 = q[:, :3] @ rng.standard_normal((3, 3))
    a2 = q[:, 3:7] @ rng.standard_normal((4, 4))
    grid = subspace_similarity_grid(a1, a2)
    assert grid.shape == (3, 4)
    np.testing.assert_allclose(grid, 0.0, atol=1e-12)


def test_hand_built_principal_angles_in_R4():
    # a1: e1 (σ=3) then e2 (σ=1). a2: w = 0.6 e2 + 0.8 e3 (σ=3) then e1 (σ=1).
    # Principal angles between span{e1,e2} and span{w,e1}: cos = 1 and cos = 0.6.
    e = np.eye(4)
    w = 0.6 * e[:, 1] + 0.8 * e[:, 2]
    a1 = np.stack([3 * e[:, 0], 1 * e[:, 1]], axis=1)  # lora_a layout (d_in=4, r=2)
    a2 = np.stack([3 * w, 1 * e[:, 0]], axis=1)
    expected = np.array(
        [
            [0.0, 1.0],  # φ(1,1) = (e1·w)² = 0 ; φ(1,2) = |e1ᵀ[w, e1]|² / 1 = 1
            [0.36, (1.0 + 0.36) / 2],  # φ(2,1) = |[e1,e2]ᵀ w|² = 0.36 ; φ(2,2) = mean cos² = 0.68
        ]
    )
    for i in (1, 2):
        for j in (1, 2):
            assert subspace_similarity(a1, a2, i, j) == pytest.approx(expected[i - 1, j - 1], abs=1e-12)
    np.testing.assert_allclose(subspace_similarity_grid(a1, a2), expected, atol=1e-12)
    # The same subspaces given as lora_b factors (r, d_out) on the output side.
    np.testing.assert_allclose(subspace_similarity_grid(a1.T, a2.T, side="out"), expected, atol=1e-12)


def test_phi_invariances():
    rng = np.random.default_rng(2)
    a1 = rng.standard_normal((20, 5))
    a2 = rng.standard_normal((20, 8))
    base = subspace_similarity_grid(a1, a2)

    # Scaling (any sign) leaves singular vectors' spans and their order unchanged: whole grid.
    np.testing.assert_allclose(subspace_similarity_grid(-3.0 * a1, 0.01 * a2), base, atol=1e-10)
    # Orthogonal mixing of the rank axis (A @ Q) keeps the left singular vectors and values: whole grid.
    q1, q2 = orthonormal(rng, 5, 5), orthonormal(rng, 8, 8)
    np.testing.assert_allclose(subspace_similarity_grid(a1 @ q1, a2 @ q2), base, atol=1e-10)
    # A common rotation of the input space (Q_d @ A) preserves all inner products: whole grid.
    qd = orthonormal(rng, 20, 20)
    np.testing.assert_allclose(subspace_similarity_grid(qd @ a1, qd @ a2), base, atol=1e-10)
    # A general invertible R changes the singular-vector *order* but not the full column space, so
    # only φ(r1, r2) is invariant.
    r1, r2 = rng.standard_normal((5, 5)) + 3 * np.eye(5), rng.standard_normal((8, 8)) + 3 * np.eye(8)
    assert subspace_similarity(a1 @ r1, a2 @ r2, 5, 8) == pytest.approx(base[4, 7], abs=1e-10)
    assert subspace_similarity(a1 @ r1, a1, 5, 5) == pytest.approx(1.0, abs=1e-10)


def test_side_in_matches_paper_A_and_side_out_matches_paper_B():
    rng = np.random.default_rng(3)
    a8, a64 = rng.standard_normal((96, 8)), rng.standard_normal((96, 64))  # lora_a: (d_in, r)
    b8, b64 = rng.standard_normal((8, 80)), rng.standard_normal((64, 80))  # lora_b: (r, d_out)
    # Make the pair correlated so the values are not all near the baseline.
    a64[:, :3] += 2 * a8[:, :3]
    b64[:3] += 2 * b8[:3]
    grid_a = subspace_similarity_grid(a8, a64, side="in")
    grid_b = subspace_similarity_grid(b8, b64, side="out")
    assert grid_a.shape == grid_b.shape == (8, 64)
    for i, j in [(1, 1), (1, 64), (3, 5), (8, 8), (8, 64), (5, 2)]:
        assert grid_a[i - 1, j - 1] == pytest.approx(paper_phi_A(a8.T, a64.T, i, j), abs=1e-10)
        assert grid_b[i - 1, j - 1] == pytest.approx(paper_phi_B(b8.T, b64.T, i, j), abs=1e-10)
    # The correlation is visible: a64's top-3 directions lie mostly inside span(a8), so φ(8, 3) is far
    # above the random baseline max(8, 3)/96 ≈ 0.08 (likewise for B, baseline 8/80).
    assert grid_a[7, 2] > 0.5 and grid_b[7, 2] > 0.5


def test_wrong_side_for_factors_is_rejected():
    rng = np.random.default_rng(4)
    a8, a16 = rng.standard_normal((32, 8)), rng.standard_normal((32, 16))
    # side="out" on lora_a factors would compare R^8 with R^16 rank spaces: a usage error.
    with pytest.raises(ValueError, match="dimension"):
        subspace_similarity(a8, a16, 1, 1, side="out")
    with pytest.raises(ValueError, match="side"):
        subspace_similarity(a8, a16, 1, 1, side="left")
    with pytest.raises(ValueError, match="i="):
        subspace_similarity(a8, a16, 9, 1)
    with pytest.raises(ValueError, match="j="):
        subspace_similarity(a8, a16, 1, 0)


def test_grid_matches_single_values():
    rng = np.random.default_rng(5)
    a1, a2 = rng.standard_normal((12, 4)), rng.standard_normal((12, 7))
    a2[:, 0] += a1[:, 0]
    grid = subspace_similarity_grid(a1, a2)
    assert grid.shape == (4, 7)
    for i in range(1, 5):
        for j in range(1, 8):
            assert grid[i - 1, j - 1] == pytest.approx(subspace_similarity(a1, a2, i, j), abs=1e-12)
    sub = subspace_similarity_grid(a1, a2, max_i=2, max_j=3)
    np.testing.assert_allclose(sub, grid[:2, :3], atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    d=st.integers(2, 12),
    r1=st.integers(1, 6),
    r2=st.integers(1, 6),
    data=st.data(),
)
def test_phi_in_unit_interval_and_symmetric(seed, d, r1, r2, data):
    r1, r2 = min(r1, d), min(r2, d)
    rng = np.random.default_rng(seed)
    a1 = rng.standard_normal((d, r1))
    a2 = rng.standard_normal((d, r2))
    # Sometimes share a direction, to exercise values near 1 as well as near the baseline.
    if data.draw(st.booleans()):
        a2[:, 0] = a1[:, 0]
    i = data.draw(st.integers(1, r1))
    j = data.draw(st.integers(1, r2))
    phi = subspace_similarity(a1, a2, i, j)
    assert 0.0 <= phi <= 1.0
    assert phi == pytest.approx(subspace_similarity(a2, a1, j, i), abs=1e-10)
    k = min(i, j)
    assert subspace_similarity(a1, a2, k, k) == pytest.approx(subspace_similarity(a2, a1, k, k), abs=1e-10)
    assert phi == pytest.approx(paper_phi_A(a1.T, a2.T, i, j), abs=1e-10)


def test_random_baseline_formula():
    assert random_subspace_baseline(1, 64, 128) == pytest.approx(0.5)
    assert random_subspace_baseline(8, 64, 128) == pytest.approx(0.5)
    assert random_subspace_baseline(3, 2, 12) == pytest.approx(0.25)
    grid = random_subspace_baseline(np.arange(1, 4)[:, None], np.arange(1, 6)[None, :], 10)
    assert grid.shape == (3, 5)
    np.testing.assert_allclose(grid, np.maximum(np.arange(1, 4)[:, None], np.arange(1, 6)) / 10)
    with pytest.raises(ValueError):
        random_subspace_baseline(0, 1, 4)
    with pytest.raises(ValueError):
        random_subspace_baseline(5, 1, 4)


def test_random_gaussian_phi_matches_baseline_monte_carlo():
    # Two independent Gaussian "A" matrices: their singular subspaces are Haar-random, so the mean
    # φ grid should match max(i, j)/d. 300 trials; per-entry standard error here is ≲ 0.01.
    rng = np.random.default_rng(6)
    d, r1, r2, trials = 24, 4, 10, 300
    acc = np.zeros((r1, r2))
    for _ in range(trials):
        acc += subspace_similarity_grid(rng.standard_normal((d, r1)), rng.standard_normal((d, r2)))
    mean = acc / trials
    expected = random_subspace_baseline(np.arange(1, r1 + 1)[:, None], np.arange(1, r2 + 1)[None, :], d)
    np.testing.assert_allclose(mean, expected, atol=0.03)
    # And it is *not* the naive min(i, j)/d or i*j/d: e.g. at (1, 10), 10/24 vs 1/24.
    assert mean[0, 9] > 0.3


def test_multi_axis_lora_a_and_lora_b():
    rng = np.random.default_rng(7)
    # lora_a with in_shape (8, 2), r = 4 and r = 3; default n_in = ndim - 1 flattens (8, 2).
    a1, a2 = rng.standard_normal((8, 2, 4)), rng.standard_normal((8, 2, 3))
    np.testing.assert_allclose(
        subspace_similarity_grid(a1, a2), subspace_similarity_grid(a1.reshape(16, 4), a2.reshape(16, 3)), atol=1e-12
    )
    # lora_b with out_shape (3, 5); default n_in = 1 for side="out".
    b1, b2 = rng.standard_normal((4, 3, 5)), rng.standard_normal((6, 3, 5))
    got = subspace_similarity_grid(b1, b2, side="out")
    np.testing.assert_allclose(got, subspace_similarity_grid(b1.reshape(4, 15), b2.reshape(6, 15), side="out"), atol=1e-12)
    assert got.shape == (4, 6)
    assert subspace_similarity(b1, b2, 2, 3, side="out") == pytest.approx(
        paper_phi_B(b1.reshape(4, 15).T, b2.reshape(6, 15).T, 2, 3), abs=1e-12
    )


def test_merged_kernels_with_n_in():
    rng = np.random.default_rng(8)
    # Two rank-3 merged ΔW kernels of shape in_shape (8, 2) + out_shape (3, 5), sharing one input direction.
    a1, a2 = rng.standard_normal((8, 2, 3)), rng.standard_normal((8, 2, 3))
    a2[..., 0] = a1[..., 0]
    b1, b2 = rng.standard_normal((3, 3, 5)), rng.standard_normal((3, 3, 5))
    dw1, dw2 = np.tensordot(a1, b1, axes=1), np.tensordot(a2, b2, axes=1)
    assert dw1.shape == (8, 2, 3, 5)
    m1, m2 = dw1.reshape(16, 15), dw2.reshape(16, 15)
    for side in ("in", "out"):
        got = subspace_similarity_grid(dw1, dw2, side=side, n_in=2, max_i=3, max_j=3)
        np.testing.assert_allclose(got, subspace_similarity_grid(m1, m2, side=side, max_i=3, max_j=3), atol=1e-12)
    # ΔW's input-side span equals lora_a's span: φ(ΔW, A, 3, 3) = 1 (Figure-8-style W vs ΔW comparison
    # uses the same call with a pretrained kernel in place of ΔW).
    assert subspace_similarity(dw1, a1, 3, 3, n_in=(2, 2)) == pytest.approx(1.0, abs=1e-10)
    # Different n_in per array: merged kernel (n_in=2) vs lora_b factor (n_in=1) on the output side.
    assert subspace_similarity(dw1, b1, 3, 3, side="out", n_in=(2, 1)) == pytest.approx(1.0, abs=1e-10)
    # The default n_in (ndim - 1 = 3 for side="in") would split the kernel wrongly: dimension mismatch.
    with pytest.raises(ValueError):
        subspace_similarity(dw1, a1, 3, 3)


# ---------------------------------------------------------------------------------------------
# Amplification factor and Table 7 projections
# ---------------------------------------------------------------------------------------------


def test_amplification_factor_planted_rank2_matches_direct_formula():
    rng = np.random.default_rng(10)
    n = 12  # square, so swapping the roles of U and V would still type-check but give another value
    w = rng.standard_normal((n, n))
    p, q = orthonormal(rng, n, 2), orthonormal(rng, n, 2)
    dw = p @ np.diag([5.0, 2.0]) @ q.T  # SVD known by construction: U = p, V = q
    direct = math.sqrt(29.0) / np.linalg.norm(p.T @ w @ q)
    assert amplification_factor(dw, w, 2) == pytest.approx(direct, rel=1e-10)
    assert amplification_factor(dw, w) == pytest.approx(direct, rel=1e-10)  # numerical rank = 2
    # r = 1 keeps only the top direction; numerator stays the full ||ΔW||_F.
    assert amplification_factor(dw, w, 1) == pytest.approx(math.sqrt(29.0) / abs(p[:, 0] @ w @ q[:, 0]), rel=1e-10)
    # Discriminating: using V on the left and U on the right gives a different number.
    swapped = math.sqrt(29.0) / np.linalg.norm(q.T @ w @ p)
    assert not np.isclose(direct, swapped, rtol=1e-3)


def test_amplification_factor_planted_direction_in_w():
    rng = np.random.default_rng(11)
    m, n = 20, 14
    p, q = orthonormal(rng, m, 2), orthonormal(rng, n, 2)
    # W has a strong planted direction p0 q0ᵀ (weight 10) on top of small noise.
    w = 10.0 * np.outer(p[:, 0], q[:, 0]) + 0.01 * rng.standard_normal((m, n))
    along = 3.0 * np.outer(p[:, 0], q[:, 0])  # ΔW along W's planted direction
    across = 3.0 * np.outer(p[:, 1], q[:, 1])  # ΔW along a direction W does not use
    amp_along = amplification_factor(along, w, 1)
    amp_across = amplification_factor(across, w, 1)
    assert amp_along == pytest.approx(3.0 / abs(p[:, 0] @ w @ q[:, 0]), rel=1e-10)
    assert amp_across == pytest.approx(3.0 / abs(p[:, 1] @ w @ q[:, 1]), rel=1e-10)
    assert amp_along == pytest.approx(0.3, rel=0.01)
    assert amp_across > 30 * amp_along


def test_amplification_factor_invariant_to_transposing_both():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((16, 10))
    dw = rng.standard_normal((16, 3)) @ rng.standard_normal((3, 10))
    ours = amplification_factor(dw, w, 3)  # jlora (in, out) layout
    paper = amplification_factor(dw.T, w.T, 3)  # PyTorch (out, in) layout
    assert ours == pytest.approx(paper, rel=1e-10)
    # Independent check in the paper's own notation: U, V from svd(ΔW_paper).
    u, _, vh = np.linalg.svd(dw.T)
    direct = np.linalg.norm(dw) / np.linalg.norm(u[:, :3].T @ w.T @ vh[:3].T)
    assert ours == pytest.approx(direct, rel=1e-10)


def test_amplification_factor_default_rank_from_float32_lora_factors():
    key_a, key_b, key_w = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(key_a, (24, 3), dtype=np.float32)
    b = jax.random.normal(key_b, (3, 18), dtype=np.float32)
    dw = 0.5 * (a @ b)  # float32, rank 3 up to float32 round-off
    w = jax.random.normal(key_w, (24, 18), dtype=np.float32)
    assert amplification_factor(dw, w) == pytest.approx(amplification_factor(dw, w, 3), rel=1e-10)
    with pytest.raises(ValueError):
        amplification_factor(np.zeros((4, 4)), np.ones((4, 4)))


def test_amplification_factor_multi_axis_needs_n_in():
    rng = np.random.default_rng(13)
    w = rng.standard_normal((6, 4, 5))  # e.g. DenseGeneral in_shape (6,), out_shape (4, 5)
    dw = np.tensordot(rng.standard_normal((6, 2)), rng.standard_normal((2, 4, 5)), axes=1)
    with pytest.raises(ValueError, match="n_in"):
        amplification_factor(dw, w, 2)
    got = amplification_factor(dw, w, 2, n_in=1)
    assert got == pytest.approx(amplification_factor(dw.reshape(6, 20), w.reshape(6, 20), 2), rel=1e-12)
    # A different in/out split is a different matrix, hence (generically) a different answer.
    assert not np.isclose(got, amplification_factor(dw, w, 2, n_in=2), rtol=1e-6)


def test_projection_norms_table7_row():
    rng = np.random.default_rng(14)
    m, n, r = 30, 20, 4
    w = rng.standard_normal((m, n)) @ np.diag(np.linspace(3.0, 0.1, n))
    dw = rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) * 0.1
    row = projection_norms(w, dw, r, 0)
    assert set(row) == {"proj_delta_w", "proj_w", "proj_random", "norm_w", "norm_delta_w", "amplification"}
    s = np.linalg.svd(w, compute_uv=False)
    assert row["proj_w"] == pytest.approx(math.sqrt(np.sum(s[:r] ** 2)), rel=1e-10)
    assert row["norm_w"] == pytest.approx(np.linalg.norm(w), rel=1e-12)
    assert row["norm_delta_w"] == pytest.approx(np.linalg.norm(dw), rel=1e-12)
    assert row["amplification"] == pytest.approx(amplification_factor(dw, w, r), rel=1e-12)
    assert row["amplification"] == pytest.approx(row["norm_delta_w"] / row["proj_delta_w"], rel=1e-12)
    u, _, vh = np.linalg.svd(dw)
    assert row["proj_delta_w"] == pytest.approx(np.linalg.norm(u[:, :r].T @ w @ vh[:r].T), rel=1e-10)
    # W's own top directions capture the most of W, by definition (Ky Fan).
    assert row["proj_w"] >= row["proj_delta_w"] and row["proj_w"] >= row["proj_random"]
    # Reproducible for a seed, different for another; a JAX key also works.
    assert projection_norms(w, dw, r, 0)["proj_random"] == row["proj_random"]
    assert projection_norms(w, dw, r, 1)["proj_random"] != row["proj_random"]
    k1 = projection_norms(w, dw, r, jax.random.key(3))["proj_random"]
    k2 = projection_norms(w, dw, r, jax.random.PRNGKey(3))["proj_random"]
    assert np.isfinite(k1) and np.isfinite(k2)
    assert k1 == projection_norms(w, dw, r, jax.random.key(3))["proj_random"]


def test_projection_norms_random_column_expectation():
    # For independent Haar frames U (m×r), V (n×r): E||Uᵀ W V||_F² = r² ||W||_F² / (m n).
    rng = np.random.default_rng(15)
    m, n, r = 16, 12, 3
    w = rng.standard_normal((m, n))
    dw = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    vals = [projection_norms(w, dw, r, seed)["proj_random"] ** 2 for seed in range(400)]
    expected = r**2 * np.linalg.norm(w) ** 2 / (m * n)
    assert np.mean(vals) == pytest.approx(expected, rel=0.1)


# ---------------------------------------------------------------------------------------------
# Intruder dimensions
# ---------------------------------------------------------------------------------------------


def _base_kernel(rng, m=20, n=16):
    # Distinct, well-separated singular values so singular vectors are well defined.
    u, v = orthonormal(rng, m, n), orthonormal(rng, n, n)
    s = np.linspace(10.0, 1.0, n)
    return u, s, v, (u * s) @ v.T


def test_no_intruders_when_unchanged():
    rng = np.random.default_rng(20)
    _, _, _, w = _base_kernel(rng)
    res = intruder_dimensions(w, w)
    assert isinstance(res, IntruderDimensions)
    assert res.count == 0
    assert res.max_cos.shape == (10,)
    np.testing.assert_allclose(res.max_cos, 1.0, atol=1e-8)


def test_rank1_spike_orthogonal_to_top_directions_is_one_intruder():
    rng = np.random.default_rng(21)
    u, s, v, w = _base_kernel(rng)
    # Spike along an even mix of the 6 *bottom* singular directions on both sides: orthogonal to the
    # top-10 directions, and its best cosine with any single base direction is 1/sqrt(6) ≈ 0.41 < 0.5.
    su = u[:, -6:].sum(axis=1) / math.sqrt(6)
    sv = v[:, -6:].sum(axis=1) / math.sqrt(6)
    w_tuned = w + 50.0 * np.outer(su, sv)
    res = intruder_dimensions(w, w_tuned)
    assert res.count == 1
    assert res.max_cos[0] == pytest.approx(1 / math.sqrt(6), abs=0.02)  # the spike is the top direction
    np.testing.assert_allclose(res.max_cos[1:], 1.0, atol=1e-6)  # the rest are the base's top directions
    # Threshold semantics: with ε below 1/sqrt(6) it is no longer an intruder.
    assert intruder_dimensions(w, w_tuned, threshold=0.3).count == 0
    # The spike is only the top vector if it is big enough: a tiny one ranks last and is not counted.
    assert intruder_dimensions(w, w + 1e-3 * np.outer(su, sv)).count == 0


def test_intruders_match_paper_layout_reference():
    rng = np.random.default_rng(22)
    _, _, _, w = _base_kernel(rng, 24, 18)
    # A merged LoRA update: base + scale * A @ B, in jlora's (in, out) layout.
    w_tuned = w + 2.0 * rng.standard_normal((24, 4)) @ rng.standard_normal((4, 18))
    res = intruder_dimensions(w, w_tuned, top_k=8)
    ref = paper_intruder_max_cos(w.T, w_tuned.T, 8)  # paper: (out, in) weights, left singular vectors
    np.testing.assert_allclose(res.max_cos, ref, atol=1e-10)
    assert res.count == int(np.sum(ref < 0.5))


def test_intruder_side_is_the_output_space():
    # A spike whose *output*-space direction is new but whose *input*-space direction is the base's top
    # one. The paper's definition (left singular vectors of the (out, in) weight = output space) must
    # flag it; the input-side diagnostic must not.
    rng = np.random.default_rng(23)
    u, s, v, w = _base_kernel(rng)
    sv = v[:, -6:].sum(axis=1) / math.sqrt(6)
    w_tuned = w + 60.0 * np.outer(u[:, 0], sv)
    out = intruder_dimensions(w, w_tuned, top_k=5)
    inn = intruder_dimensions(w, w_tuned, top_k=5, side="in")
    assert out.count == 1 and out.max_cos[0] < 0.5
    assert inn.count == 0
    np.testing.assert_allclose(out.max_cos, paper_intruder_max_cos(w.T, w_tuned.T, 5), atol=1e-10)


def test_intruder_multi_axis_and_top_k_cap():
    rng = np.random.default_rng(24)
    w = rng.standard_normal((4, 3, 5))  # in_shape (4,), out_shape (3, 5) -> 4 x 15, only 4 directions
    wt = w + 5 * rng.standard_normal((4, 3, 5))
    with pytest.raises(ValueError, match="n_in"):
        intruder_dimensions(w, wt)
    res = intruder_dimensions(w, wt, n_in=1)
    ref = paper_intruder_max_cos(w.reshape(4, 15).T, wt.reshape(4, 15).T, 10)
    assert res.max_cos.shape == (4,)  # top_k=10 capped at min(4, 15)
    np.testing.assert_allclose(res.max_cos, ref, atol=1e-10)
