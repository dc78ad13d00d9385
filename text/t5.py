"""T5 encoder (Raffel et al. 2020, arXiv:1910.10683) in Flax linen, for pretrained text conditioning.

Pre-norm transformer with RMS LayerNorm (no mean subtraction, no bias), no biases anywhere,
unscaled dot-product attention plus a learned relative position bias (bucketed, shared by all
layers, stored in block 0), ReLU MLP for the original T5 and gated-GELU for T5 v1.1 / mT5
(`feed_forward_proj`), and a final RMS norm. Dimensions come from a Hugging Face `config.json`.
Parameters carry logical axis names ('vocab', 'text_embed', 'heads', 'kv', 'mlp', 'norm').

`convert_hf_weights` maps Hugging Face names (`shared.weight`,
`encoder.block.N.layer.0.SelfAttention.q.weight`, ..., `encoder.final_layer_norm.weight`) onto
this module's parameter tree; decoder tensors in a full T5 checkpoint are ignored.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers

Dtype = Any
Getter = Callable[[str | tuple[str, ...], tuple[int, ...]], np.ndarray]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nn.relu,
    'gelu': lambda x: nn.gelu(x, approximate=False),
    'gelu_new': lambda x: nn.gelu(x, approximate=True),
    'silu': nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture hyper-parameters, named as in Hugging Face `T5Config`."""
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = 'relu'
  pad_token_id: int = 0

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith('gated-')

  @property
  def activation(self) -> str:
    """Activation name as Hugging Face resolves it ('gated-gelu' means the tanh GELU)."""
    act = self.feed_forward_proj.split('-')[-1]
    return 'gelu_new' if self.feed_forward_proj == 'gated-gelu' else act

  def validate(self, source: str = 'config.json') -> None:
    """Raises ValueError naming the file and field if this architecture is not one we implement."""
    parts = self.feed_forward_proj.split('-')
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != 'gated') or \
        self.activation not in _ACTIVATIONS:
      raise ValueError(f"{source}: feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                       "use 'relu', 'gelu', 'gated-gelu', 'gated-relu' or 'gated-silu'.")


def relative_position_bucket(rel: np.ndarray | jax.Array, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """Bidirectional T5 bucket of `rel = key_pos - query_pos` (Raffel et al. 2020, Sec. 2.1).

  Half the buckets per direction; within a direction, half of those are exact offsets and the
  rest grow logarithmically up to `max_distance`, beyond which everything shares the last bucket.
  """
  rel = jnp.asarray(rel)
  half = num_buckets // 2
  bucket = jnp.where(rel > 0, half, 0)
  dist = jnp.abs(rel)
  exact = half // 2
  # Clamp before the log so dist=0 is finite; those entries take the exact branch anyway.
  log_ratio = jnp.log(jnp.maximum(dist, 1).astype(jnp.float32) / exact) / math.log(
      max_distance / exact)
  large = exact + (log_ratio * (half - exact)).astype(jnp.int32)
  large = jnp.minimum(large, half - 1)
  return bucket + jnp.where(dist < exact, dist, large)


class RMSNorm(nn.Module):
  """T5 LayerNorm: x / sqrt(mean(x^2) + eps) * scale, in float32, no mean and no bias."""
  epsilon: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ('norm',)),
                       (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return x * jnp.asarray(scale, jnp.float32)


def _dense(features, names, dtype, param_dtype, axis=-1, name=None):
  """Bias-free DenseGeneral with a logically partitioned kernel."""
  return layers.DenseGeneral(features=features, names=names, axis=axis, use_bias=False,
                             dtype=dtype, param_dtype=param_dtype,
                             kernel_init=nn.initializers.normal(0.05), name=name)


class T5Block(nn.Module):
  """Pre-norm block: x += Attn(RMS(x)) + bias; x += FFN(RMS(x))."""
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    h = RMSNorm(c.layer_norm_epsilon, self.param_dtype, name='attn_norm')(x).astype(self.dtype)
    q, k, v = (_dense((c.num_heads, c.d_kv), ('text_embed', 'heads', 'kv'), self.dtype,
                      self.param_dtype, name=n)(h) for n in ('query', 'key', 'value'))
    # T5 folds the 1/sqrt(d_kv) scale into the query initialisation: no scaling here.
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) + position_bias
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    ctx = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    x = x + _dense(c.d_model, ('heads', 'kv', 'text_embed'), self.dtype, self.param_dtype,
                   axis=(-2, -1), name='attn_out')(ctx).astype(jnp.float32)

    h = RMSNorm(c.layer_norm_epsilon, self.param_dtype, name='mlp_norm')(x).astype(self.dtype)
    act = _ACTIVATIONS[c.activation]
    if c.is_gated:
      u = act(_dense(c.d_ff, ('text_embed', 'mlp'), self.dtype, self.param_dtype,
                     name='mlp_gate')(h))
      u = u * _dense(c.d_ff, ('text_embed', 'mlp'), self.dtype, self.param_dtype,
                     name='mlp_in')(h)
    else:
      u = act(_dense(c.d_ff, ('text_embed', 'mlp'), self.dtype, self.param_dtype,
                     name='mlp_in')(h))
    return x + _dense(c.d_model, ('mlp', 'text_embed'), self.dtype, self.param_dtype,
                      name='mlp_out')(u).astype(jnp.float32)


class T5Encoder(nn.Module):
  """T5 encoder stack: token ids [B, L] and key mask [B, L] -> hidden states [B, L, D] float32."""
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    x = nn.Embed(c.vocab_size, c.d_model, param_dtype=self.param_dtype, name='token_embed',
                 embedding_init=nn.with_logical_partitioning(
                     nn.initializers.normal(1.0), ('vocab', 'text_embed')))(ids)
    x = x.astype(jnp.float32)
    length = ids.shape[-1]
    pos = np.arange(length)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None],
                                       c.relative_attention_num_buckets,
                                       c.relative_attention_max_distance)  # [q, k]
    rel_table = nn.Embed(c.relative_attention_num_buckets, c.num_heads,
                         param_dtype=self.param_dtype, name='rel_bias',
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.1), (None, 'heads')))
    position_bias = jnp.transpose(rel_table(buckets), (2, 0, 1))[None].astype(jnp.float32)
    for i in range(c.num_layers):
      x = T5Block(c, self.dtype, self.param_dtype, name=f'block_{i}')(x, position_bias, mask)
    return RMSNorm(c.layer_norm_epsilon, self.param_dtype, name='final_norm')(x)


def convert_hf_weights(get: Getter, config: T5Config) -> dict[str, Any]:
  """Hugging Face T5 encoder tensors (PyTorch (out, in) layout) -> `T5Encoder` params.

  `get(names, shape)` returns the first present tensor among `names` and raises if its shape is not
  `shape` (the shape the config implies, in the checkpoint's own layout).
  """
  c = config
  d, inner, f = c.d_model, c.num_heads * c.d_kv, c.d_ff

  def kernel(name, n_out, n_in, in_shape=None, out_shape=None):
    w = get(name, (n_out, n_in)).T  # (in, out)
    return {'kernel': w.reshape((in_shape or (n_in,)) + (out_shape or (n_out,)))}

  params: dict[str, Any] = {
      # Tied embeddings: safetensors keeps one of the two names.
      'token_embed': {'embedding': get(('shared.weight', 'encoder.embed_tokens.weight'),
                                       (c.vocab_size, d))},
      'rel_bias': {'embedding': get(
          'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
          (c.relative_attention_num_buckets, c.num_heads))},
      'final_norm': {'scale': get('encoder.final_layer_norm.weight', (d,))},
  }
  for i in range(c.num_layers):
    a, m = f'encoder.block.{i}.layer.0', f'encoder.block.{i}.layer.1'
    hk = (c.num_heads, c.d_kv)
    block = {
        'attn_norm': {'scale': get(f'{a}.layer_norm.weight', (d,))},
        'query': kernel(f'{a}.SelfAttention.q.weight', inner, d, out_shape=hk),
        'key': kernel(f'{a}.SelfAttention.k.weight', inner, d, out_shape=hk),
        'value': kernel(f'{a}.SelfAttention.v.weight', inner, d, out_shape=hk),
        'attn_out': kernel(f'{a}.SelfAttention.o.weight', d, inner, in_shape=hk),
        'mlp_norm': {'scale': get(f'{m}.layer_norm.weight', (d,))},
        'mlp_out': kernel(f'{m}.DenseReluDense.wo.weight', d, f),
    }
    if c.is_gated:
      block['mlp_gate'] = kernel(f'{m}.DenseReluDense.wi_0.weight', f, d)
      block['mlp_in'] = kernel(f'{m}.DenseReluDense.wi_1.weight', f, d)
    else:
      block['mlp_in'] = kernel(f'{m}.DenseReluDense.wi.weight', f, d)
    params[f'block_{i}'] = block
  return params
