"""BERT encoder (Devlin et al. 2019, arXiv:1810.04805) in Flax linen, for pretrained text conditioning.

Post-LN transformer as in the reference implementation: embeddings (word + position + token type)
-> LayerNorm, then N x [self-attention -> add & LayerNorm -> GELU MLP -> add & LayerNorm]. Dimensions
come from a Hugging Face `config.json` (`BertConfig.from_hf`). Parameters carry logical axis names
('vocab', 'text_embed', 'heads', 'kv', 'mlp', 'norm') so the trainer's `logical_axis_rules` can shard
them; LayerNorm and softmax run in float32 whatever the compute dtype.

`convert_hf_weights` maps the Hugging Face tensor names (`embeddings.word_embeddings.weight`,
`encoder.layer.N.attention.self.query.weight`, ...) onto this module's parameter tree; reading the
file and checking shapes is `text.pretrained`'s job (it passes a `get(names, shape)` reader).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers

Dtype = Any

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': lambda x: nn.gelu(x, approximate=False),  # HF 'gelu' is the exact erf form.
    'gelu_new': lambda x: nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True),
    'relu': nn.relu,
    'silu': nn.silu,
    'swish': nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture hyper-parameters, named as in Hugging Face `BertConfig`."""
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  pad_token_id: int = 0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  position_embedding_type: str = 'absolute'

  def validate(self, source: str = 'config.json') -> None:
    """Raises ValueError naming the file and field if this architecture is not one we implement."""
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'{source}: hidden_size={self.hidden_size} is not divisible by '
                       f'num_attention_heads={self.num_attention_heads}.')
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f'{source}: hidden_act={self.hidden_act!r} is not supported; use one of '
                       f'{sorted(_ACTIVATIONS)}.')
    if self.position_embedding_type != 'absolute':
      raise ValueError(f'{source}: position_embedding_type={self.position_embedding_type!r} is '
                       "not supported (only 'absolute').")


def dense(features, names, dtype, param_dtype, axis=-1, name=None):
  """DenseGeneral with logically partitioned kernel and bias (BERT init: normal(0.02))."""
  return layers.DenseGeneral(features=features, names=names, axis=axis, dtype=dtype,
                             param_dtype=param_dtype, kernel_init=nn.initializers.normal(0.02),
                             name=name)


def layer_norm(eps, param_dtype, name):
  """LayerNorm computed in float32 with ('norm',) parameters."""
  return nn.LayerNorm(
      epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('norm',)))


class BertLayer(nn.Module):
  """One post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    heads, dh = c.num_attention_heads, c.head_dim
    h = x.astype(self.dtype)
    q, k, v = (dense((heads, dh), ('text_embed', 'heads', 'kv'), self.dtype, self.param_dtype,
                      name=n)(h) for n in ('query', 'key', 'value'))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / np.sqrt(dh)
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    ctx = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    attn = dense(c.hidden_size, ('heads', 'kv', 'text_embed'), self.dtype, self.param_dtype,
                  axis=(-2, -1), name='attn_out')(ctx)
    x = layer_norm(c.layer_norm_eps, self.param_dtype, 'attn_norm')(x + attn.astype(jnp.float32))

    h = dense(c.intermediate_size, ('text_embed', 'mlp'), self.dtype, self.param_dtype,
               name='mlp_in')(x.astype(self.dtype))
    h = _ACTIVATIONS[c.hidden_act](h)
    h = dense(c.hidden_size, ('mlp', 'text_embed'), self.dtype, self.param_dtype,
               name='mlp_out')(h)
    return layer_norm(c.layer_norm_eps, self.param_dtype, 'mlp_norm')(x + h.astype(jnp.float32))


class BertEncoder(nn.Module):
  """BERT encoder: token ids [B, L] and key mask [B, L] -> last hidden states [B, L, D] float32."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    if ids.shape[-1] > c.max_position_embeddings:
      raise ValueError(f'sequence length {ids.shape[-1]} exceeds max_position_embeddings='
                       f'{c.max_position_embeddings}; lower text.max_len.')

    def embed(num, names, name):
      return nn.Embed(num, c.hidden_size, param_dtype=self.param_dtype, name=name,
                      embedding_init=nn.with_logical_partitioning(
                          nn.initializers.normal(0.02), names))

    x = embed(c.vocab_size, ('vocab', 'text_embed'), 'word_embed')(ids)
    x += embed(c.max_position_embeddings, (None, 'text_embed'), 'pos_embed')(
        jnp.arange(ids.shape[-1]))[None]
    x += embed(c.type_vocab_size, (None, 'text_embed'), 'type_embed')(jnp.zeros_like(ids))
    x = layer_norm(c.layer_norm_eps, self.param_dtype, 'embed_norm')(x.astype(jnp.float32))
    for i in range(c.num_hidden_layers):
      x = BertLayer(c, self.dtype, self.param_dtype, name=f'layer_{i}')(x, mask)
    return x


Getter = Callable[[str | tuple[str, ...], tuple[int, ...]], np.ndarray]


def convert_hf_weights(get: Getter, config: BertConfig) -> dict[str, Any]:
  """Hugging Face BERT tensors (PyTorch (out, in) layout) -> `BertEncoder` params.

  `get(names, shape)` returns the first present tensor among `names` and raises if its shape is not
  `shape` (the shape the config implies, in the checkpoint's own layout).
  """
  c = config
  d, heads, dh, f = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size

  def norm(prefix):
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    return {'scale': get((f'{prefix}.weight', f'{prefix}.gamma'), (d,)),
            'bias': get((f'{prefix}.bias', f'{prefix}.beta'), (d,))}

  def linear(prefix, n_out, n_in, out_shape=None, in_shape=None):
    w = get(f'{prefix}.weight', (n_out, n_in)).T  # (in, out)
    b = get(f'{prefix}.bias', (n_out,))
    return {'kernel': w.reshape((in_shape or (n_in,)) + (out_shape or (n_out,))),
            'bias': b.reshape(out_shape or (n_out,))}

  e = 'embeddings'
  params: dict[str, Any] = {
      'word_embed': {'embedding': get(f'{e}.word_embeddings.weight', (c.vocab_size, d))},
      'pos_embed': {'embedding': get(f'{e}.position_embeddings.weight',
                                     (c.max_position_embeddings, d))},
      'type_embed': {'embedding': get(f'{e}.token_type_embeddings.weight',
                                      (c.type_vocab_size, d))},
      'embed_norm': norm(f'{e}.LayerNorm'),
  }
  for i in range(c.num_hidden_layers):
    p = f'encoder.layer.{i}'
    params[f'layer_{i}'] = {
        'query': linear(f'{p}.attention.self.query', d, d, out_shape=(heads, dh)),
        'key': linear(f'{p}.attention.self.key', d, d, out_shape=(heads, dh)),
        'value': linear(f'{p}.attention.self.value', d, d, out_shape=(heads, dh)),
        'attn_out': linear(f'{p}.attention.output.dense', d, d, in_shape=(heads, dh)),
        'attn_norm': norm(f'{p}.attention.output.LayerNorm'),
        'mlp_in': linear(f'{p}.intermediate.dense', f, d),
        'mlp_out': linear(f'{p}.output.dense', d, f),
        'mlp_norm': norm(f'{p}.output.LayerNorm'),
    }
  return params
