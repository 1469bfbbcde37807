"""Spectral diagnostics for LoRA adapters: subspace similarity, amplification, intruder dimensions.

These are the measurements behind three published findings, re-expressed for jlora's kernel layout:

* Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685),
  Sec. 7.2 / Eq. 4 / App. G (subspace similarity, Figures 3, 4, 6-8) and Sec. 7.3 / App. H.4
  (projection of W onto ΔW's subspace, Table 7, "amplification factor").
* Shuttleworth, Andreas, Torralba, Sharma 2024, "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence" (arXiv 2410.21228): intruder dimensions.

Layout convention (the one thing that is easy to get wrong)
-----------------------------------------------------------
jlora stores an adapted kernel ``W`` of shape ``in_shape + out_shape`` (Flax: ``y = x @ W``), with
factors ``lora_a: in_shape + (r,)`` and ``lora_b: (r,) + out_shape`` and
``ΔW = scale * tensordot(lora_a, lora_b, axes=1)``. The papers use the PyTorch layout, where a
weight is ``(d_out, d_in)`` and ``h = W x``; the paper's ``A ∈ R^{r×k}`` is our ``lora_a`` transposed
and the paper's ``B ∈ R^{d×r}`` is our ``lora_b`` transposed. Hence:

* the paper's "right singular vectors of A" (directions in the *input* space R^k) are the
  *left* singular vectors of our ``(prod(in_shape), r)`` ``lora_a``;
* the paper's "left singular vectors of B" (directions in the *output* space R^d) are the
  *right* singular vectors of our ``(r, prod(out_shape))`` ``lora_b``;
* the paper's "left singular vectors of W" (output space; used for intruder dimensions) are the
  *right* singular vectors of our ``(prod(in_shape), prod(out_shape))`` kernel.

Everything here therefore speaks of a *side* instead of left/right: ``side="in"`` means directions
in the flattened input space, ``side="out"`` directions in the flattened output space. Every array
is viewed as a 2-D matrix ``(prod(shape[:n_in]), prod(shape[n_in:]))``; ``side="in"`` takes its
left singular vectors and ``side="out"`` its right singular vectors. That one rule covers ``lora_a``,
``lora_b`` and merged ``ΔW``/``W`` kernels alike, so e.g. Figure 8 of Hu et al. (W's directions
against ΔW's) is just ``subspace_similarity(w, delta_w, i, j, side="in")``.

All computation is done in NumPy float64: these are offline diagnostics on single matrices, the
SVDs are tiny, and float32 SVDs of nearly-degenerate spectra (e.g. a LoRA ``A`` that barely moved
from its random init) are noisy enough to move φ in the second decimal.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = [
  "IntruderDimensions",
  "amplification_factor",
  "intruder_dimensions",
  "projection_norms",
  "random_subspace_baseline",
  "subspace_similarity",
  "subspace_similarity_grid",
]

_SIDES = ("in", "out")


# ---------------------------------------------------------------------------------------------
# Internal helpers
# ---------------------------------------------------------------------------------------------


def _check_side(side: str) -> None:
  if side not in _SIDES:
    raise ValueError(f"side must be 'in' or 'out', got {side!r}")


def _as_matrix(x: Any, n_in: int | None, *, default_n_in: int) -> np.ndarray:
  """View an array of shape ``S`` as the float64 matrix ``(prod(S[:n_in]), prod(S[n_in:]))``.

  ``n_in`` is the number of leading axes that form the row (input) space. It must leave at least
  one axis on each side: a 1-D array has no meaningful row/column split.
  """
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim < 2:
    raise ValueError(f"expected an array with at least 2 axes, got shape {arr.shape}")
  k = default_n_in if n_in is None else int(n_in)
  if not 1 <= k <= arr.ndim - 1:
    raise ValueError(f"n_in={k} must be in [1, {arr.ndim - 1}] for an array of shape {arr.shape}")
  rows = int(np.prod(arr.shape[:k]))
  return arr.reshape(rows, -1)


def _default_factor_n_in(ndim: int, side: str) -> int:
  # For side="in" the natural input is lora_a = in_shape + (r,): everything but the last axis is
  # the input space. For side="out" it is lora_b = (r,) + out_shape: only the first axis is the
  # rank axis. For a plain 2-D matrix both defaults are 1, which is what one wants. A merged
  # multi-axis kernel (in_shape + out_shape with both parts multi-axis or an unusual split) needs
  # an explicit n_in, because its shape alone does not say where in_shape ends.
  return ndim - 1 if side == "in" else 1


def _side_directions(mat: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray]:
  """Orthonormal singular directions of ``mat`` on one side, sorted by singular value.

  Returns ``(dirs, s)`` with ``dirs`` of shape ``(d, min(m, n))`` — columns are directions in the
  side's space (``d = m`` for "in", ``d = n`` for "out") — and the singular values ``s``
  (descending). Economy SVD: only the ``min(m, n)`` directions that carry singular values exist.
  """
  u, s, vh = np.linalg.svd(mat, full_matrices=False)
  return (u if side == "in" else vh.T), s


def _split_n_in(n_in: int | tuple[int | None, int | None] | None) -> tuple[int | None, int | None]:
  if isinstance(n_in, tuple):
    if len(n_in) != 2:
      raise ValueError(f"n_in as a tuple must have two entries, got {n_in!r}")
    return n_in[0], n_in[1]
  return n_in, n_in


def _pair_directions(
  a1: Any, a2: Any, side: str, n_in: int | tuple[int | None, int | None] | None
) -> tuple[np.ndarray, np.ndarray]:
  _check_side(side)
  n1, n2 = _split_n_in(n_in)
  m1 = _as_matrix(a1, n1, default_n_in=_default_factor_n_in(np.ndim(a1), side))
  m2 = _as_matrix(a2, n2, default_n_in=_default_factor_n_in(np.ndim(a2), side))
  u1, _ = _side_directions(m1, side)
  u2, _ = _side_directions(m2, side)
  if u1.shape[0] != u2.shape[0]:
    raise ValueError(
      f"side={side!r} spaces differ in dimension: {u1.shape[0]} vs {u2.shape[0]} "
      f"(shapes {np.shape(a1)} and {np.shape(a2)}); check side and n_in"
    )
  return u1, u2


def _numerical_rank(s: np.ndarray, shape: tuple[int, int], eps: float) -> int:
  # Same rule as numpy.linalg.matrix_rank, but with the epsilon of the *input* dtype: a ΔW that
  # was formed in float32 carries ~1e-7 relative noise in its null space, which a float64 epsilon
  # would count as rank.
  if s.size == 0 or s[0] == 0.0:
    return 0
  tol = s[0] * max(shape) * eps
  return int(np.sum(s > tol))


def _input_eps(x: Any) -> float:
  """Machine epsilon of the array's own dtype (float32, bfloat16, ...); float64's for non-floats."""
  dt = np.asarray(x).dtype
  try:
    return float(np.finfo(dt).eps)
  except ValueError:
    pass
  try:
    # bfloat16 and friends (ml_dtypes) are not known to np.finfo; jax.numpy.finfo handles them.
    import jax.numpy as jnp

    return float(jnp.finfo(dt).eps)
  except (ImportError, ValueError, TypeError):
    return float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------------------------------------
# 1. Subspace similarity (Hu et al. 2021, Sec. 7.2, Eq. 4, App. G)
# ---------------------------------------------------------------------------------------------


def subspace_similarity(
  a1: Any,
  a2: Any,
  i: int,
  j: int,
  *,
  side: str = "in",
  n_in: int | tuple[int | None, int | None] | None = None,
) -> float:
  """Normalized subspace similarity φ(A1, A2, i, j) of Hu et al. 2021, Eq. 4.

  ``φ = ||U1_iᵀ U2_j||_F² / min(i, j)``, where ``U1_i`` (``d × i``) holds the top-``i`` singular
  directions of ``a1`` on the chosen side and ``U2_j`` (``d × j``) the top-``j`` of ``a2``.
  Equivalently φ is the mean squared cosine of the ``min(i, j)`` principal angles between the two
  subspaces, i.e. ``Σ_k σ_k² / min(i, j)`` with σ_k the singular values of ``U1_iᵀ U2_j``; so
  φ ∈ [0, 1], φ = 1 iff one subspace contains the other, φ = 0 iff they are orthogonal.

  Note: App. G of the paper prints ``φ = (1 - d²)/p`` with the projection metric
  ``d = sqrt(p - Σσ_k²)`` (Ham & Lee 2008), which is inconsistent with Eq. 4. We implement Eq. 4,
  ``Σσ_k²/p = 1 - d²/p``, which is the quantity plotted in Figures 3, 4 and 6-8.

  Args:
    a1, a2: arrays viewed as 2-D ``(prod(shape[:n_in]), prod(shape[n_in:]))``.
    * ``side="in"`` (default): directions are the *left* singular vectors, i.e. subspaces of the
      flattened input space. Typical input: ``lora_a`` of shape ``in_shape + (r,)`` — this is
      the paper's "right-singular unitary matrix of A" (its A is ``r × k``, ours is ``k × r``).
    * ``side="out"``: directions are the *right* singular vectors, subspaces of the flattened
      output space. Typical input: ``lora_b`` of shape ``(r,) + out_shape`` — the paper's
      "left-singular" analysis of B (footnote 8).
    Merged kernels ``ΔW``/``W`` of shape ``in_shape + out_shape`` work with either side.
    The two arrays may have different ranks ``r`` but must share the side's dimension ``d``.
    i, j: number of top directions taken from ``a1`` and ``a2``; ``1 ≤ i ≤ min(a1's 2-D shape)``,
    likewise for ``j``. Directions beyond the numerical rank are arbitrary null-space vectors,
    so keep ``i``, ``j`` ≤ the ranks for a meaningful answer.
    side: "in" or "out", as above.
    n_in: number of leading axes forming the input (row) space; an int applies to both arrays,
    a pair ``(n1, n2)`` sets them separately. Default: ``ndim - 1`` for ``side="in"`` (the
    ``lora_a`` convention) and ``1`` for ``side="out"`` (the ``lora_b`` convention); both are 1
    for 2-D matrices. Pass it explicitly for merged kernels with a multi-axis in/out split.

  Returns:
    φ as a Python float in [0, 1].
  """
  u1, u2 = _pair_directions(a1, a2, side, n_in)
  _check_index("i", i, u1.shape[1])
  _check_index("j", j, u2.shape[1])
  g = u1[:, :i].T @ u2[:, :j]
  phi = float(np.sum(g * g) / min(i, j))
  # Orthonormal columns make Σσ² ≤ min(i, j) exactly; round-off can exceed 1 by ~1e-16.
  return min(max(phi, 0.0), 1.0)


def _check_index(name: str, k: int, available: int) -> None:
  if isinstance(k, bool) or int(k) != k or not 1 <= k <= available:
    raise ValueError(f"{name}={k!r} must be an integer in [1, {available}]")


def subspace_similarity_grid(
  a1: Any,
  a2: Any,
  *,
  side: str = "in",
  max_i: int | None = None,
  max_j: int | None = None,
  n_in: int | tuple[int | None, int | None] | None = None,
) -> np.ndarray:
  """All φ(A1, A2, i, j) for ``1 ≤ i ≤ max_i``, ``1 ≤ j ≤ max_j`` (the Figure 3/4 heat map).

  Same semantics and arguments as :func:`subspace_similarity`; the SVDs are computed once.

  Returns:
    float64 array of shape ``(max_i, max_j)`` with ``grid[i - 1, j - 1] = φ(a1, a2, i, j)``.
    ``max_i``/``max_j`` default to the number of available directions, ``min`` of each array's
    2-D shape (i.e. ``r`` for LoRA factors).
  """
  u1, u2 = _pair_directions(a1, a2, side, n_in)
  max_i = u1.shape[1] if max_i is None else max_i
  max_j = u2.shape[1] if max_j is None else max_j
  _check_index("max_i", max_i, u1.shape[1])
  _check_index("max_j", max_j, u2.shape[1])
  g = u1[:, :max_i].T @ u2[:, :max_j]
  # ||U1_iᵀ U2_j||_F² is the sum of g² over the leading i×j block, so a 2-D cumulative sum gives
  # every (i, j) numerator at once.
  num = np.cumsum(np.cumsum(g * g, axis=0), axis=1)
  ii = np.arange(1, max_i + 1)[:, None]
  jj = np.arange(1, max_j + 1)[None, :]
  return np.clip(num / np.minimum(ii, jj), 0.0, 1.0)


def random_subspace_baseline(i: Any, j: Any, d: Any) -> Any:
  """Expected φ(i, j) between independent uniformly random subspaces of R^d: ``max(i, j) / d``.

  Derivation: fix ``U_i`` (``d × i``, orthonormal) and let ``U_j = [u_1 … u_j]`` be Haar-random.
  Each ``u_k`` is marginally uniform on the sphere, so ``E[u_k u_kᵀ] = I/d`` and
  ``E||U_iᵀ u_k||² = tr(U_iᵀ (I/d) U_i) = i/d``. Summing over the ``j`` columns,
  ``E||U_iᵀ U_j||_F² = i·j/d``; dividing by the (deterministic) ``min(i, j)`` gives
  ``E[φ] = i·j / (d·min(i, j)) = max(i, j)/d`` exactly. The top singular subspaces of a Gaussian
  matrix are Haar-distributed (rotation invariance), so this is also the expected φ between two
  random Gaussian ``A`` matrices — the control of Hu et al. 2021, Figure 4 (right).

  At GPT-3 width (d = 12288) the baseline is ≈ 0, but at toy widths it is not (d = 128:
  φ(8, 64) ≈ 0.5 at random), so reproductions must compare against it.

  Args:
    i, j: subspace dimensions (ints, or integer arrays that broadcast, e.g.
    ``np.arange(1, 9)[:, None]`` and ``np.arange(1, 65)[None, :]`` for a Figure-3 overlay).
    d: ambient dimension.

  Returns:
    A Python float for scalar inputs, else a float64 array of the broadcast shape.
  """
  ii, jj, dd = np.asarray(i), np.asarray(j), np.asarray(d)
  if np.any(ii < 1) or np.any(jj < 1) or np.any(ii > dd) or np.any(jj > dd):
    raise ValueError("need 1 <= i, j <= d")
  out = np.maximum(ii, jj) / dd.astype(np.float64)
  return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------------------------
# 2. ΔW versus W: projections and the amplification factor (Hu et al. 2021, Sec. 7.3, Table 7)
# ---------------------------------------------------------------------------------------------


def _pair_matrices(w: Any, delta_w: Any, n_in: int | None) -> tuple[np.ndarray, np.ndarray]:
  w_shape, dw_shape = np.shape(w), np.shape(delta_w)
  if w_shape != dw_shape:
    raise ValueError(f"w and delta_w must have the same shape, got {w_shape} and {dw_shape}")
  if n_in is None and len(w_shape) != 2:
    raise ValueError(
      f"kernel of shape {w_shape} has {len(w_shape)} axes; pass n_in (number of leading "
      "input axes) so it can be flattened to (prod(in_shape), prod(out_shape))"
    )
  return _as_matrix(w, n_in, default_n_in=1), _as_matrix(delta_w, n_in, default_n_in=1)


def _projection_norm(w: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
  # ||Uᵀ W V||_F with U (m × r) and V (n × r) orthonormal frames of W's row/column spaces. The
  # paper writes Uᵀ W Vᵀ with Vᵀ meaning "the right singular vectors as columns".
  return float(np.linalg.norm(u.T @ w @ v))


def _delta_frames(dw: np.ndarray, r: int | None, eps: float) -> tuple[np.ndarray, np.ndarray, int]:
  u, s, vh = np.linalg.svd(dw, full_matrices=False)
  if r is None:
    r = _numerical_rank(s, dw.shape, eps)
    if r == 0:
      raise ValueError("delta_w is numerically zero; its singular subspace is undefined")
  _check_index("r", r, s.size)
  return u[:, :r], vh[:r].T, int(r)


def amplification_factor(delta_w: Any, w: Any, r: int | None = None, *, n_in: int | None = None) -> float:
  """Amplification factor ``||ΔW||_F / ||Uᵀ W V||_F`` of Hu et al. 2021, Sec. 7.3 / App. H.4.

  ``U`` (``m × r``) and ``V`` (``n × r``) are the top-``r`` left and right singular vectors of
  ``ΔW``, so ``Uᵀ W V`` is W restricted to ΔW's r-dimensional input/output subspaces. A large
  factor means ΔW strongly amplifies directions that W barely uses (paper: ≈ 21.5 for r = 4,
  ≈ 2 for r = 64, GPT-3 layer 48 Wq). The numerator is the *full* ``||ΔW||_F``, as in the paper.

  Layout: both arrays must be in the *same* layout. The value is the same for jlora's
  ``(in, out)`` kernels and the paper's ``(out, in)`` weights, because transposing both swaps the
  roles of U and V and ``||(Uᵀ W V)ᵀ||_F = ||Uᵀ W V||_F``; mixing layouts is wrong (and for square
  kernels silently so).

  Args:
    delta_w: the update ΔW (e.g. ``scale * tensordot(lora_a, lora_b, 1)``), shape ``in_shape +
    out_shape`` (or any 2-D matrix).
    w: the pretrained kernel, same shape as ``delta_w``.
    r: subspace dimension. Default: the numerical rank of ΔW (tolerance ``σ_max · max(m, n) · eps``
    with the input dtype's eps), which is the LoRA rank for a trained adapter. Pass the LoRA
    rank explicitly when you know it.
    n_in: number of leading input axes, required for kernels with more than two axes.

  Returns:
    The factor as a Python float (``inf`` if W has no component in ΔW's subspace).
  """
  wm, dwm = _pair_matrices(w, delta_w, n_in)
  u, v, _ = _delta_frames(dwm, r, _input_eps(delta_w))
  proj = _projection_norm(wm, u, v)
  dw_norm = float(np.linalg.norm(dwm))
  return float("inf") if proj == 0.0 else dw_norm / proj


def _orthonormal_frames(key_or_seed: Any, m: int, n: int, r: int) -> tuple[np.ndarray, np.ndarray]:
  """Haar-random orthonormal ``(m × r)`` and ``(n × r)`` frames from a seed or a JAX PRNG key.

  QR of a Gaussian matrix gives a frame whose span is uniformly distributed, which is all a
  Frobenius norm of a projection can see; it matches the paper's "random matrix" column, whose
  top-r singular subspaces are equally uniform.
  """
  g1, g2 = _gaussians(key_or_seed, (m, r), (n, r))
  q1, _ = np.linalg.qr(g1)
  q2, _ = np.linalg.qr(g2)
  return q1, q2


def _is_jax_key(x: Any) -> bool:
  try:
    import jax
  except ImportError:  # pragma: no cover - jax is a hard dependency of jlora
    return False
  if not isinstance(x, jax.Array):
    return False
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return True
  # Legacy raw uint32 keys, e.g. jax.random.PRNGKey(0) -> shape (2,).
  return x.dtype == np.uint32 and x.ndim == 1


def _gaussians(key_or_seed: Any, *shapes: tuple[int, int]) -> list[np.ndarray]:
  if _is_jax_key(key_or_seed):
    import jax

    keys = jax.random.split(key_or_seed, len(shapes))
    return [np.asarray(jax.random.normal(k, s), dtype=np.float64) for k, s in zip(keys, shapes)]
  rng = np.random.default_rng(key_or_seed)
  return [rng.standard_normal(s) for s in shapes]


def projection_norms(
  w: Any, delta_w: Any, r: int, key_or_seed: Any = 0, *, n_in: int | None = None
) -> dict[str, float]:
  """One row of Hu et al. 2021, Table 7: how much of W lives in ΔW's, W's and random r-subspaces.

  For each choice of orthonormal frames ``U`` (``m × r``, input side in jlora's layout) and ``V``
  (``n × r``) it reports ``||Uᵀ W V||_F``:

  * ``"proj_delta_w"``: ``U, V`` = top-r left/right singular vectors of ΔW (paper column "ΔWq").
  * ``"proj_w"``: top-r singular vectors of W itself (column "Wq"); this equals
    ``sqrt(σ_1² + … + σ_r²)`` of W.
  * ``"proj_random"``: Haar-random frames (column "Random"); ``E||Uᵀ W V||_F² = r²||W||_F²/(m n)``.

  plus ``"norm_w"`` = ``||W||_F``, ``"norm_delta_w"`` = ``||ΔW||_F`` and ``"amplification"`` =
  ``norm_delta_w / proj_delta_w`` (see :func:`amplification_factor`). The paper's reading:
  proj_w ≫ proj_delta_w > proj_random (21.67 ≫ 0.32 > 0.02 at r = 4).

  Note the argument order ``(w, delta_w)`` is the reverse of :func:`amplification_factor`'s.

  Args:
    w: pretrained kernel, ``in_shape + out_shape`` (or any 2-D matrix).
    delta_w: the update, same shape and layout as ``w``.
    r: subspace dimension (1 ≤ r ≤ min(m, n)).
    key_or_seed: randomness for the random frames: an int / ``np.random.Generator`` (NumPy) or a
    JAX PRNG key. Fixed default so the row is reproducible.
    n_in: number of leading input axes, required for kernels with more than two axes.
  """
  wm, dwm = _pair_matrices(w, delta_w, n_in)
  m, n = wm.shape
  u_dw, v_dw, r = _delta_frames(dwm, r, _input_eps(delta_w))
  u_w, _, vh_w = np.linalg.svd(wm, full_matrices=False)
  u_rand, v_rand = _orthonormal_frames(key_or_seed, m, n, r)
  proj_dw = _projection_norm(wm, u_dw, v_dw)
  norm_dw = float(np.linalg.norm(dwm))
  return {
    "proj_delta_w": proj_dw,
    "proj_w": _projection_norm(wm, u_w[:, :r], vh_w[:r].T),
    "proj_random": _projection_norm(wm, u_rand, v_rand),
    "norm_w": float(np.linalg.norm(wm)),
    "norm_delta_w": norm_dw,
    "amplification": float("inf") if proj_dw == 0.0 else norm_dw / proj_dw,
  }


# ---------------------------------------------------------------------------------------------
# 3. Intruder dimensions (Shuttleworth et al. 2024)
# ---------------------------------------------------------------------------------------------


class IntruderDimensions(NamedTuple):
  """Result of :func:`intruder_dimensions`.

  count: number of the top-k tuned singular vectors that are intruders (Python int).
  max_cos: float64 array ``(top_k,)``; entry k is ``max_l |<t_k, b_l>|`` over *all* base singular
    vectors ``b_l`` for the k-th tuned singular vector ``t_k``. Intruders are ``max_cos < threshold``.
  """

  count: int
  max_cos: np.ndarray


def intruder_dimensions(
  w_base: Any,
  w_tuned: Any,
  *,
  top_k: int = 10,
  threshold: float = 0.5,
  side: str = "out",
  n_in: int | None = None,
) -> IntruderDimensions:
  """Count intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion
  of Equivalence", arXiv 2410.21228).

  Take the SVDs of the pretrained and the fine-tuned (LoRA *merged* into) weight. For each of the
  top-``top_k`` singular vectors ``t_k`` of the tuned matrix, compute its largest absolute cosine
  with *all* singular vectors of the base matrix (economy SVD: ``min(m, n)`` of them). ``t_k`` is
  an intruder if that maximum is below ``threshold``: a new high-ranking direction that is nearly
  orthogonal to every pretrained direction. Defaults ``top_k=10``, ``threshold=0.5`` are those of
  the official ``find_intruder_dimensions.py``.

  Layout: the paper works on PyTorch ``(out, in)`` weights and uses their *left* singular vectors,
  i.e. output-space directions. In jlora's ``(in, out)`` layout those are the *right* singular
  vectors, which is what the default ``side="out"`` uses — so ``intruder_dimensions(W, W')``
  on jlora kernels matches the paper run on ``W.T, W'.T``. ``side="in"`` gives the input-space
  analogue (a diagnostic, not the paper's definition).

  Args:
    w_base: pretrained kernel, ``in_shape + out_shape`` (or any 2-D matrix).
    w_tuned: fine-tuned kernel with any LoRA update merged in, same shape.
    top_k: how many top tuned singular vectors to test (capped at ``min(m, n)``).
    threshold: ε; intruder iff max |cos| < ε.
    side: "out" (paper, default) or "in".
    n_in: number of leading input axes, required for kernels with more than two axes.

  Returns:
    ``IntruderDimensions(count, max_cos)``.
  """
  _check_side(side)
  wb, wt = _pair_matrices(w_base, w_tuned, n_in)
  base_dirs, _ = _side_directions(wb, side)
  tuned_dirs, _ = _side_directions(wt, side)
  if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
    raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
  k = min(int(top_k), tuned_dirs.shape[1])
  # Columns are unit vectors, so the dot products are the cosines; |.| because singular vectors
  # are only defined up to sign.
  cos = np.abs(tuned_dirs[:, :k].T @ base_dirs)
  max_cos = cos.max(axis=1)
  return IntruderDimensions(count=int(np.sum(max_cos < threshold)), max_cos=max_cos)
