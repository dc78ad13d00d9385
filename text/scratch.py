"""Small bidirectional transformer text encoder trained from scratch with the diffusion model.

Token + learned position embeddings, `depth` pre-LN blocks (Xiong et al. 2020) of padding-masked
self-attention and GELU MLP, final LayerNorm. Sized by the text section (`text.encoders.build`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.attention import MultiHeadAttention
from text.tokenizer import PAD_ID



class TransformerBlock(nn.Module):
  """Pre-LN block: x + MHA(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    width = x.shape[-1]
    dt, pdt = self.dtype, self.param_dtype
    h = layers.layer_norm(dt, pdt, name='norm_attn')(x)
    x = x + MultiHeadAttention(
        self.num_heads, width // self.num_heads, q_axis='text_embed', kv_axis='text_embed',
        dtype=dt, param_dtype=pdt, name='attn')(h, None, mask)
    h = layers.layer_norm(dt, pdt, name='norm_mlp')(x)
    h = nn.gelu(layers.dense(4 * width, ('text_embed', 'mlp'), dt, pdt, name='mlp_in')(h))
    return x + layers.dense(width, ('mlp', 'text_embed'), dt, pdt, name='mlp_out')(h)


class ScratchTextEncoder(nn.Module):
  """ids [B, L] -> (emb [B, L, width] f32, mask [B, L] bool, pooled [B, width] f32).

  mask = ids != [PAD]; emb is zero at padded positions; pooled is the mean of emb over real
  tokens. Padding never influences real-token outputs (keys are masked).
  """
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  max_len: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    width, num_heads, max_len = self.width, self.num_heads, self.max_len
    dt, pdt = self.dtype, self.param_dtype
    if width % num_heads:
      raise ValueError(f'text.num_heads={num_heads} must divide text.width={width}.')
    if ids.ndim != 2:
      raise ValueError(f'token ids must have shape [B, L], got {ids.shape}.')
    if ids.shape[1] > max_len:
      raise ValueError(
          f'token ids have length {ids.shape[1]} > text.max_len={max_len}; tokenize with '
          'max_len=text.max_len or raise text.max_len.')

    mask = ids != PAD_ID
    init = nn.initializers.normal(stddev=0.02)
    x = nn.Embed(self.vocab_size, width, dtype=dt, param_dtype=pdt,
                 embedding_init=layers.partitioned(init, ('vocab', 'text_embed')),
                 name='token_embed')(ids)
    pos = self.param('pos_embed', layers.partitioned(init, (None, 'text_embed')),
                     (max_len, width), pdt)
    x = x + jnp.asarray(pos[:ids.shape[1]], dt)[None]
    for i in range(self.depth):
      x = TransformerBlock(num_heads, dt, pdt, name=f'block_{i}')(x, mask)
    x = layers.layer_norm(dt, pdt, name='norm_out')(x).astype(jnp.float32)
    x = jnp.where(mask[..., None], x, 0.0)
    count = jnp.maximum(mask.sum(axis=1, keepdims=True), 1).astype(jnp.float32)
    pooled = x.sum(axis=1) / count
    return x, mask, pooled
