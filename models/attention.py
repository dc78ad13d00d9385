"""Masked multi-head attention, shared by the U-Net and the from-scratch text encoder.

Softmax statistics are float32 whatever the compute dtype. Masked keys get exactly zero
weight, and a query whose keys are all masked attends to nothing (output 0, never NaN).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers

Dtype = Any


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over keys (Vaswani et al. 2017, eq. 1), masked.

  Args:
    q: [B, Lq, heads, d] queries.
    k: [B, Lk, heads, d] keys.
    v: [B, Lk, heads, dv] values.
    mask: optional [B, Lk] bool, True = key may be attended to.

  Returns:
    [B, Lq, heads, dv] in v's dtype.
  """
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    keep = mask[:, None, None, :]
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    # Exact zeros for masked keys; rows with no valid key become all-zero instead of uniform.
    probs = jnp.where(keep, probs, 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


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
    out = dot_product_attention(q, k, v, mask)
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

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    attn = lambda kv_axis, name: MultiHeadAttention(
        self.num_heads, self.head_dim, q_axis='embed', kv_axis=kv_axis, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    h = layers.group_norm(c, self.norm_groups, self.dtype, self.param_dtype, name='norm_self')(x)
    x = x + attn('embed', 'self_attn')(h.reshape(b, hgt * wid, c)).reshape(x.shape)
    x = layers.constrain(x)
    h = layers.group_norm(c, self.norm_groups, self.dtype, self.param_dtype, name='norm_cross')(x)
    h = attn('text_embed', 'cross_attn')(h.reshape(b, hgt * wid, c), context, context_mask)
    return layers.constrain(x + h.reshape(x.shape))
