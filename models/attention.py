"""Masked multi-head attention, shared by the U-Net and the from-scratch text encoder.

Softmax statistics are float32 whatever the compute dtype. Masked keys get exactly zero
weight, and a query whose keys are all masked attends to nothing (output 0, never NaN).

Unmasked attention (the U-Net's self-attention over pixels) on a GPU in bfloat16/float16 goes to
cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation='cudnn')`), which
never writes the [B, heads, L, L] scores to memory; everywhere else (CPUs, TPUs, float32, masked
cross-attention over a few text tokens) the einsum form below runs, which XLA:CPU executes faster
than jax.nn's own XLA path (BENCHMARKS.md, issue 17). `attention_impl` names the choice.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers

Dtype = Any


IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')


def attention_impl(requested: str, q: jax.Array, masked: bool) -> str:
  """'cudnn' or 'xla' for one attention call: 'auto' takes cuDNN's flash attention for unmasked
  bfloat16/float16 attention on a GPU with a head width it supports (a multiple of 8, <= 128)."""
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention must be one of {IMPLEMENTATIONS}, got {requested!r}.')
  if requested != 'auto':
    return requested
  fused = (jax.default_backend() == 'gpu' and not masked
           and q.dtype in (jnp.bfloat16, jnp.float16)
           and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)
  return 'cudnn' if fused else 'xla'


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None, implementation: str = 'xla') -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over keys (Vaswani et al. 2017, eq. 1), masked.

  Args:
    q: [B, Lq, heads, d] queries.
    k: [B, Lk, heads, d] keys.
    v: [B, Lk, heads, dv] values.
    mask: optional [B, Lk] bool, True = key may be attended to.
    implementation: 'xla' (the einsum form) or 'cudnn' (fused, unmasked only); see
      `attention_impl`.

  Returns:
    [B, Lq, heads, dv] in v's dtype.
  """
  if implementation == 'cudnn':
    if mask is not None:
      raise ValueError("implementation='cudnn' is for unmasked attention.")
    return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
  batch = q.shape[0]
  # Under a mesh each device holds `shards` contiguous parts of the batch; the chunk is sized by
  # a device's part and keeps one slot per part (else each device would compute every example).
  shards = _batch_shards()
  shards = shards if batch % shards == 0 else 1
  chunk = shards * _cpu_chunk(batch // shards, q.shape[2] * q.shape[1] * k.shape[1] * 4)
  if chunk == batch:
    return _attend(q, k, v, mask)
  # XLA:CPU: the scores of the whole batch do not fit in cache; `chunk` examples at a time do.
  # Strided chunks (example i in chunk i % n) keep each chunk spread over the batch's shards.
  n = batch // chunk
  split = lambda x: None if x is None else jnp.swapaxes(x.reshape((chunk, n) + x.shape[1:]), 0, 1)
  out = jax.lax.map(lambda a: _attend(*a), (split(q), split(k), split(v), split(mask)))
  return jnp.swapaxes(out, 0, 1).reshape(q.shape[:-1] + v.shape[-1:])


# Largest scores tensor (float32 bytes) one XLA:CPU attention call keeps: ~ a core's share of cache.
_CPU_SCORES_BYTES = 4 << 20


def _batch_shards() -> int:
  """Devices the batch axis is split over: the mesh axes the logical rules map 'batch' to, in
  the mesh being traced under (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = dict(nn.get_logical_axis_rules()).get(layers.ACTIVATION_AXES[0])
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape.get(a, 1) for a in axes)


def _cpu_chunk(batch: int, bytes_per_example: int) -> int:
  """Examples per attention call on a CPU: the largest divisor of `batch` whose scores fit in
  _CPU_SCORES_BYTES (at least 1), or the whole batch when it fits twice over or off the CPU."""
  if jax.default_backend() != 'cpu' or batch * bytes_per_example <= 2 * _CPU_SCORES_BYTES:
    return batch
  fits = max(1, _CPU_SCORES_BYTES // bytes_per_example)
  return max(d for d in range(1, min(fits, batch) + 1) if batch % d == 0)


def _attend(q, k, v, mask):
  """The attention of `dot_product_attention` with the softmax's normalisation deferred: the
  unnormalised weights exp(s - max s) multiply v, and the [B, Lq, heads, dv] result is divided by
  their sum, one pass over the scores fewer than softmax-then-matmul, forward and backward."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    keep = mask[:, None, None, :]
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  # The shift leaves the softmax unchanged, so it needs no gradient.
  weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  if mask is not None:
    # Exact zeros for masked keys; rows with no valid key sum to 0 and give 0, not NaN.
    weights = jnp.where(keep, weights, 0.0)
  total = jnp.swapaxes(jnp.sum(weights, axis=-1), 1, 2)[..., None]  # [B, Lq, heads, 1]
  out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / jnp.where(total > 0, total, 1.0)).astype(v.dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head (self- or cross-) attention with logical axis names on every kernel.

  Attributes:
    num_heads: number of heads.
    head_dim: width of each head.
    q_axis: logical name of the query/output feature axis ('embed' or 'text_embed').
    kv_axis: logical name of the key/value input feature axis ('embed' for self-attention
      in the U-Net, 'text_embed' for keys/values computed from text).
  """
  num_heads: int
  head_dim: int
  q_axis: str = 'embed'
  kv_axis: str = 'embed'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = 'auto'  # IMPLEMENTATIONS; 'auto': `attention_impl` decides per call.

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """x [B, Lq, D] attends to context [B, Lk, Dc] (x itself if None); returns [B, Lq, D]."""
    context = x if context is None else context
    heads, hd = self.num_heads, self.head_dim
    # Explicit 3-D kernels (not DenseGeneral's flat-then-reshape init, which breaks under
    # logical axis rules): fan-in is the input features, fan-out heads x head_dim.
    in_init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    out_init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)

    def project(name, inp, axis):
      kernel = self.param(name, layers.partitioned(in_init, (axis, 'heads', 'kv')),
                          (inp.shape[-1], heads, hd), self.param_dtype)
      return jnp.einsum('bld,dhk->blhk', inp.astype(self.dtype), kernel.astype(self.dtype))

    q = project('query', x, self.q_axis)
    k = project('key', context, self.kv_axis)
    v = project('value', context, self.kv_axis)
    out = dot_product_attention(q, k, v, mask,
                                attention_impl(self.implementation, q, mask is not None))
    w_out = self.param('out', layers.partitioned(out_init, ('heads', 'kv', self.q_axis)),
                       (heads, hd, x.shape[-1]), self.param_dtype)
    b_out = self.param('out_bias', layers.partitioned(nn.initializers.zeros, (self.q_axis,)),
                       (x.shape[-1],), self.param_dtype)
    y = jnp.einsum('blhk,hkd->bld', out, w_out.astype(self.dtype))
    return y + b_out.astype(self.dtype)


class SpatialAttention(nn.Module):
  """U-Net attention block: GN + self-attention over pixels, then GN + cross-attention to text.

  Both are residual. The text keys/values are masked by `context_mask`; pixels attend to
  no text at all when every token of an example is masked (e.g. the CFG null caption).
  """
  num_heads: int
  head_dim: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = 'auto'  # Of the self-attention (IMPLEMENTATIONS).

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    attn = lambda kv_axis, name: MultiHeadAttention(
        self.num_heads, self.head_dim, q_axis='embed', kv_axis=kv_axis, dtype=self.dtype,
        param_dtype=self.param_dtype, implementation=self.implementation, name=name)
    h = layers.group_norm(c, self.norm_groups, self.dtype, self.param_dtype, name='norm_self')(x)
    x = x + attn('embed', 'self_attn')(h.reshape(b, hgt * wid, c)).reshape(x.shape)
    x = layers.constrain(x)
    h = layers.group_norm(c, self.norm_groups, self.dtype, self.param_dtype, name='norm_cross')(x)
    h = attn('text_embed', 'cross_attn')(h.reshape(b, hgt * wid, c), context, context_mask)
    return layers.constrain(x + h.reshape(x.shape))
