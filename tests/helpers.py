"""Tiny models and reference helpers shared by the tests."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import strategies as st

import jlora
from jlora import tree as tree_lib
from jlora.optim import trainable_roles


def randomize(params, key, scale=0.5):
  """Adapted params with random A and B (init puts B = 0, which tests nothing)."""
  flat = tree_lib.flatten(params)
  roles = trainable_roles(flat)
  out = {}
  for i, (p, leaf) in enumerate(flat.items()):
    if roles.get(p) in ("lora_a", "lora_b"):
      v = tree_lib.value(leaf)
      arr = scale * jax.random.normal(jax.random.fold_in(key, i), v.shape, jnp.float32)
      out[p] = tree_lib.rewrap(leaf, arr.astype(v.dtype))
    elif roles.get(p) == "lora_m":
      v = tree_lib.value(leaf)
      out[p] = tree_lib.rewrap(leaf, v * (1 + 0.3 * jax.random.uniform(jax.random.fold_in(key, i), v.shape)))
    else:
      out[p] = leaf
  return tree_lib.unflatten(out, params)


def assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
  fa, fb = tree_lib.flatten(a), tree_lib.flatten(b)
  assert fa.keys() == fb.keys()
  for p in fa:
    np.testing.assert_allclose(np.asarray(tree_lib.value(fa[p]), np.float64),
                               np.asarray(tree_lib.value(fb[p]), np.float64),
                               rtol=rtol, atol=atol, err_msg=tree_lib.path_str(p))


def adapter_grads(g):
  flat = tree_lib.flatten(g)
  roles = trainable_roles(flat)
  return {p: tree_lib.value(v) for p, v in flat.items() if p in roles}


def kernel_shaped_products(jaxpr, shapes) -> list[str]:
  """The dot_general/conv equations anywhere in ``jaxpr`` (sub-jaxprs included) whose output
  has one of ``shapes`` (given as sorted dims, so any axis order matches): weight gradients,
  seen before XLA can remove anything."""
  found = []

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        if tuple(sorted(eqn.outvars[0].aval.shape)) in shapes:
          found.append(str(eqn))
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else [v]):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)
  walk(jaxpr.jaxpr)
  return found


class LinenNet(nn.Module):
  """Embed -> attention -> conv -> MLP: every kernel kind jlora covers."""
  vocab: int = 11
  d: int = 8

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(self.vocab, self.d, name="embed")(tokens)
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h)
    h = h + nn.Conv(self.d, (3,), padding="SAME", name="conv")(h)
    h = nn.Dense(12, name="fc1")(h)
    h = nn.Dense(self.d, name="fc2")(nn.gelu(h))
    return nn.Einsum((self.d, 3, 2), "btd,dhk->bthk", name="head")(h)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 8, rngs=rngs)
    self.fc1 = nnx.Linear(8, 12, rngs=rngs)
    self.conv = nnx.Conv(12, 6, (3,), rngs=rngs)
    self.fc2 = nnx.Linear(6, 5, rngs=rngs)

  def __call__(self, tokens):
    return self.fc2(nnx.relu(self.conv(self.fc1(self.embed(tokens)))))


def plain_params(key):
  k = jax.random.split(key, 3)
  return {"layer1": {"w": jax.random.normal(k[0], (6, 10)), "b": jnp.zeros(10)},
          "layer2": {"w": jax.random.normal(k[1], (10, 4)) / 3},
          "conv": {"w": jax.random.normal(k[2], (3, 3, 2, 5)) / 3}}


def plain_fn(params, x, img):
  h = jnp.tanh(jnp.dot(x, params["layer1"]["w"]) + params["layer1"]["b"])
  y = jnp.einsum("bh,ho->bo", h, params["layer2"]["w"])
  c = jax.lax.conv_general_dilated(img, params["conv"]["w"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y, c


TOKENS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 10]], jnp.int32)


@st.composite
def kernels(draw):
  """A params dict with one kernel of random kind and shape, its split and a rank."""
  kind = draw(st.sampled_from(["dense", "qkv", "out", "conv1d", "conv2d", "embed", "stacked"]))
  dim = st.integers(1, 6)
  if kind == "dense":
    shape, n_stack, n_in = (draw(dim), draw(dim)), 0, 1
  elif kind == "qkv":
    shape, n_stack, n_in = (draw(dim), draw(dim), draw(dim)), 0, 1
  elif kind == "out":
    shape, n_stack, n_in = (draw(dim), draw(dim), draw(dim)), 0, 2
  elif kind == "conv1d":
    shape, n_stack, n_in = (draw(dim), draw(dim), draw(dim)), 0, 2
  elif kind == "conv2d":
    shape, n_stack, n_in = (draw(dim), draw(dim), draw(dim), draw(dim)), 0, 3
  elif kind == "embed":
    shape, n_stack, n_in = (draw(dim), draw(dim)), 0, 1
  else:
    shape, n_stack, n_in = (draw(st.integers(1, 3)), draw(dim), draw(dim)), 1, 1
  fan_in = math.prod(shape[n_stack:n_stack + n_in])
  fan_out = math.prod(shape[n_stack + n_in:])
  rank = draw(st.integers(1, min(fan_in, fan_out)))
  seed = draw(st.integers(0, 2**16))
  name = "embedding" if kind == "embed" else "kernel"
  w = jax.random.normal(jax.random.key(seed), shape)
  return {"params": {"layer": {name: w, "bias": jnp.ones(shape[-1])}}}, n_stack, n_in, rank
