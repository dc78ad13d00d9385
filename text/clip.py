"""CLIP text encoder (Radford et al. 2021, arXiv:2103.00020) in Flax linen, as used by SD 1.x/2.x.

Pre-LN causal transformer: token + position embeddings, N x [x += Attn(LN1(x)); x += MLP(LN2(x))]
with biases everywhere, quick_gelu (OpenAI CLIP, SD 1.x) or exact gelu (OpenCLIP ViT-H, SD 2.x),
then final_layer_norm. Dimensions come from a diffusers `text_encoder/config.json`
(transformers' CLIPTextConfig). Kernels carry the logical axis names of the BERT/T5 encoders
('vocab', 'text_embed', 'heads', 'kv', 'mlp', 'norm'); layer norms and softmax run in float32.

Stable Diffusion's U-Net cross-attends to all 77 hidden states (padding included, no mask), so
`ClipEncoder.encode` returns them unmasked; `clip_skip=k` takes the hidden state k layers before
the last and applies final_layer_norm, as diffusers' `encode_prompt(clip_skip=k)` does. `pooled`
is transformers' pooler_output: the final layer's normed state at the end token.

  enc = load_clip('sd-pipeline/text_encoder')          # tokenizer from ../tokenizer
  emb, mask, pooled = jax.jit(enc.encode)(enc.params, enc.tokenize(['a red circle']))

`save_clip(out, params, source=folder)` writes params (e.g. fine-tuned ones) back in the same
layout; `hf_tensors` is the exact inverse of `convert_hf_weights` (`weights.invert_conversion`).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, weights
from text import clip_tokenizer
from text.bert import dense, layer_norm  # The same BERT-style layers, shared.
from text.pretrained import PretrainedEncoder

Dtype = Any
WEIGHTS = 'model.safetensors'
PREFIX = 'text_model.'  # transformers' CLIPTextModel names its tensors text_model.*.
Getter = Callable[[str | tuple[str, ...], tuple[int, ...]], np.ndarray]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu': lambda x: nn.gelu(x, approximate=False),  # transformers' 'gelu' is the erf form.
}
_CONVERT_HINT = ('convert it once where torch is installed: transformers.CLIPTextModel.'
                 'from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True) (or the '
                 "pipeline's save_pretrained(..., safe_serialization=True) in diffusers)")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Architecture hyper-parameters, named as in transformers' CLIPTextConfig (projection_dim,
  dropout and the initialiser settings are ignored)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407  # transformers' default; SD checkpoints say 2 (the legacy pooling).
  use_attention_mask: bool = False  # diffusers' flag to mask padding keys: not implemented.

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def validate(self, source: str = 'config.json') -> None:
    """Raises ValueError naming the file and field if this is not an architecture we implement."""
    if not isinstance(self.eos_token_id, int):
      raise ValueError(f'{source}: eos_token_id={self.eos_token_id!r} must be one int (the id of '
                       '<|endoftext|>, or 2 for the legacy pooling).')
    if self.use_attention_mask:
      raise ValueError(f'{source}: use_attention_mask=True (padding masked out of attention) is '
                       'not supported; SD 1.x/2.x text encoders attend to all positions.')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'{source}: hidden_size={self.hidden_size} is not divisible by '
                       f'num_attention_heads={self.num_attention_heads}.')
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f'{source}: hidden_act={self.hidden_act!r} is not supported; use one of '
                       f'{sorted(_ACTIVATIONS)} (SD 1.x: quick_gelu, SD 2.x: gelu).')


class CLIPEncoderLayer(nn.Module):
  """x += Attn(LN1(x)) (causal); x += fc2(act(fc1(LN2(x)))). The residual stream is float32."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, causal: jax.Array) -> jax.Array:
    c = self.config
    heads, dh = c.num_attention_heads, c.head_dim
    h = layer_norm(c.layer_norm_eps, self.param_dtype, 'layer_norm1')(x).astype(self.dtype)
    q, k, v = (dense((heads, dh), ('text_embed', 'heads', 'kv'), self.dtype, self.param_dtype,
                      name=n)(h) for n in ('q_proj', 'k_proj', 'v_proj'))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / np.sqrt(dh)
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    ctx = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    x = x + dense(c.hidden_size, ('heads', 'kv', 'text_embed'), self.dtype, self.param_dtype,
                   axis=(-2, -1), name='out_proj')(ctx).astype(jnp.float32)

    h = layer_norm(c.layer_norm_eps, self.param_dtype, 'layer_norm2')(x).astype(self.dtype)
    h = dense(c.intermediate_size, ('text_embed', 'mlp'), self.dtype, self.param_dtype,
               name='fc1')(h)
    h = _ACTIVATIONS[c.hidden_act](h)
    return x + dense(c.hidden_size, ('mlp', 'text_embed'), self.dtype, self.param_dtype,
                      name='fc2')(h).astype(jnp.float32)


class CLIPTextTransformer(nn.Module):
  """ids [B, L] -> (hidden [B, L, D] float32 `clip_skip` layers before the last, normed;
  pooled [B, D] float32, the final layer's normed state at the end token)."""
  config: CLIPTextConfig
  clip_skip: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    del mask  # CLIP masks causally only; SD passes no attention mask (padding is attended).
    c = self.config
    length = ids.shape[-1]
    if length > c.max_position_embeddings:
      raise ValueError(f'sequence length {length} exceeds max_position_embeddings='
                       f'{c.max_position_embeddings}; lower text.max_len.')

    def embed(num, names, name):
      return nn.Embed(num, c.hidden_size, param_dtype=self.param_dtype, name=name,
                      embedding_init=nn.with_logical_partitioning(
                          nn.initializers.normal(0.02), names))

    x = embed(c.vocab_size, ('vocab', 'text_embed'), 'token_embedding')(ids)
    x = x + embed(c.max_position_embeddings, (None, 'text_embed'), 'position_embedding')(
        jnp.arange(length))[None]
    x = x.astype(jnp.float32)
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    states = [x]  # transformers' hidden_states: the embeddings, then each layer's output.
    for i in range(c.num_hidden_layers):
      states.append(CLIPEncoderLayer(c, self.dtype, self.param_dtype, name=f'layers_{i}')(
          states[-1], causal))
    final_norm = layer_norm(c.layer_norm_eps, self.param_dtype, 'final_layer_norm')
    last = final_norm(states[-1])
    if c.eos_token_id == 2:  # Configs from before transformers#24773: the end token has the top id.
      eos = jnp.argmax(ids, axis=-1)
    else:  # The first end token (the pad token may equal it).
      eos = jnp.argmax(ids == c.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
    hidden = last if self.clip_skip == 0 else final_norm(states[-1 - self.clip_skip])
    return hidden, pooled


def convert_hf_weights(get: Getter, config: CLIPTextConfig) -> dict[str, Any]:
  """transformers CLIPTextModel tensors (PyTorch (out, in) layout) -> `CLIPTextTransformer` params.

  `get(names, shape)` is a `weights.TensorGetter` over the prefixes PREFIX and ''.
  """
  c = config
  d = c.hidden_size
  params: dict[str, Any] = {
      'token_embedding': {'embedding': get('embeddings.token_embedding.weight',
                                           (c.vocab_size, d))},
      'position_embedding': {'embedding': get('embeddings.position_embedding.weight',
                                              (c.max_position_embeddings, d))},
      'final_layer_norm': convert_norm(get, 'final_layer_norm', d),
  }
  for i in range(c.num_hidden_layers):
    params[f'layers_{i}'] = convert_layer(get, c, f'encoder.layers.{i}')
  return params


def convert_norm(get: Getter, prefix: str, d: int) -> dict[str, Any]:
  """A transformers LayerNorm's tensors `prefix`.{weight,bias} -> `layer_norm` params."""
  return {'scale': get(f'{prefix}.weight', (d,)), 'bias': get(f'{prefix}.bias', (d,))}


def convert_layer(get: Getter, config: Any, p: str) -> dict[str, Any]:
  """transformers CLIPEncoderLayer tensors `p`.* -> `CLIPEncoderLayer` params. `config` has
  hidden_size, num_attention_heads, head_dim and intermediate_size (the text or vision config)."""
  c = config
  d, heads, dh, f = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size

  def linear(prefix, n_out, n_in, out_shape=None, in_shape=None):
    w = get(f'{prefix}.weight', (n_out, n_in)).T  # (in, out)
    return {'kernel': w.reshape((in_shape or (n_in,)) + (out_shape or (n_out,))),
            'bias': get(f'{prefix}.bias', (n_out,)).reshape(out_shape or (n_out,))}

  return {
      'layer_norm1': convert_norm(get, f'{p}.layer_norm1', d),
      **{n: linear(f'{p}.self_attn.{n}', d, d, out_shape=(heads, dh))
         for n in ('q_proj', 'k_proj', 'v_proj')},
      'out_proj': linear(f'{p}.self_attn.out_proj', d, d, in_shape=(heads, dh)),
      'layer_norm2': convert_norm(get, f'{p}.layer_norm2', d),
      'fc1': linear(f'{p}.mlp.fc1', f, d),
      'fc2': linear(f'{p}.mlp.fc2', d, f),
  }


@dataclasses.dataclass(frozen=True, eq=False)
class ClipEncoder(PretrainedEncoder):
  """A loaded CLIP text encoder with `PretrainedEncoder`'s interface and SD's semantics."""
  clip_skip: int = 0  # Hidden state taken this many layers before the last (0: the last).

  def tokenize(self, captions: Sequence[str]) -> np.ndarray:
    """Captions -> int32 ids [B, max_len]: <|startoftext|> ... <|endoftext|>, then pad_id."""
    return self.tokenizer.encode(captions)

  def encode(self, params: Any, ids: jax.Array, *, normalize: bool = False
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ids [B, L] -> (emb [B, L, D] f32, padding included; mask [B, L] all True; pooled [B, D]
    f32, L2-normalised if `normalize`)."""
    emb, pooled = self.module.apply({'params': params}, ids)
    if normalize:
      pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return emb, jnp.ones(ids.shape, bool), pooled


def _read_tensors(folder: str) -> tuple[dict[str, np.ndarray], str]:
  found = weights.read_safetensors(folder, WEIGHTS)
  if found is not None:
    return found
  others = sorted(os.path.basename(p) for ext in ('bin', 'ckpt', 'pt', 'pth', 'safetensors')
                  for p in glob.glob(os.path.join(folder, f'*.{ext}')))
  if any(not name.endswith('.safetensors') for name in others):
    raise FileNotFoundError(
        f'{folder} holds {others} but no model.safetensors: PyTorch pickles are not read (they '
        f'can run code); {_CONVERT_HINT}.')
  raise FileNotFoundError(
      f'{os.path.join(folder, "model.safetensors")} not found (nor model.safetensors.index.json'
      f'{"; found " + str(others) if others else ""}): a diffusers text_encoder/ folder holds '
      'config.json and model.safetensors. Rename a variant such as model.fp16.safetensors, or '
      'point at the pipeline\'s text_encoder/.')


def _tokenizer_folder(folder: str, tokenizer_folder: str | None) -> str:
  """The explicit folder, else the pipeline's ../tokenizer, else the encoder folder itself."""
  if tokenizer_folder is not None:
    return os.path.abspath(os.path.expanduser(tokenizer_folder))
  candidates = [os.path.join(os.path.dirname(folder), 'tokenizer'), folder]
  for candidate in candidates:
    if os.path.isfile(os.path.join(candidate, 'vocab.json')):
      return candidate
  raise FileNotFoundError(
      f'no CLIP tokenizer for {folder}: looked for vocab.json and merges.txt in {candidates}. '
      'A diffusers pipeline keeps them in tokenizer/ next to text_encoder/; pass '
      'tokenizer_folder= otherwise.')


def read_config(folder: str) -> CLIPTextConfig:
  """FOLDER/config.json (transformers' CLIPTextConfig) -> a checked `CLIPTextConfig`."""
  config_path = os.path.join(folder, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path} not found: a diffusers text_encoder/ folder holds '
                            f'config.json and {WEIGHTS}.')
  with open(config_path) as f:
    cfg = json.load(f)
  if cfg.get('model_type') != 'clip_text_model':
    raise ValueError(f"{config_path}: model_type={cfg.get('model_type')!r}, expected "
                     "'clip_text_model' (a pipeline's text_encoder/, transformers' CLIPTextModel).")
  config = CLIPTextConfig(**weights.dataclass_fields(CLIPTextConfig, cfg, config_path))
  config.validate(config_path)
  return config


def load_clip(text_encoder_folder: str, *, tokenizer_folder: str | None = None,
              max_len: int = 77, clip_skip: int = 0, dtype: str | Any = 'float32',
              param_dtype: Any = jnp.float32) -> ClipEncoder:
  """Loads a diffusers `text_encoder/` folder (and its tokenizer) as a frozen `ClipEncoder`.

  Args:
    text_encoder_folder: config.json (model_type 'clip_text_model') and model.safetensors (or a
      sharded model.safetensors.index.json).
    tokenizer_folder: vocab.json, merges.txt and special tokens; default the sibling
      ../tokenizer, then `text_encoder_folder` itself.
    max_len: token length L (77 in SD), at most max_position_embeddings.
    clip_skip: 0 takes the last layer; k the hidden state k layers before it (then
      final_layer_norm), as diffusers' encode_prompt(clip_skip=k).
    dtype: compute dtype of the matmuls; layer norms, softmax and the outputs stay float32.
    param_dtype: dtype the weights are stored in.
  """
  folder = os.path.abspath(os.path.expanduser(text_encoder_folder))
  config_path = os.path.join(folder, 'config.json')
  config = read_config(folder)
  compute_dtype = layers.resolve_dtype(dtype, 'text.dtype') if isinstance(dtype, str) else dtype
  if compute_dtype not in layers.DTYPES.values():
    raise ValueError(f'text.dtype={dtype!r} is not supported; use one of {sorted(layers.DTYPES)}.')
  if not isinstance(max_len, (int, np.integer)) or not 2 <= max_len <= \
      config.max_position_embeddings:
    raise ValueError(f'text.max_len={max_len!r} must be an int in [2, max_position_embeddings='
                     f'{config.max_position_embeddings}] ({config_path}); SD uses 77.')
  if not isinstance(clip_skip, (int, np.integer)) or not 0 <= clip_skip <= \
      config.num_hidden_layers:
    raise ValueError(f'clip_skip={clip_skip!r} must be an int in [0, num_hidden_layers='
                     f'{config.num_hidden_layers}] ({config_path}); 0 takes the last layer.')
  tokenizer = clip_tokenizer.load_tokenizer(_tokenizer_folder(folder, tokenizer_folder),
                                            int(max_len))
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f'the tokenizer has {tokenizer.vocab_size} tokens but {config_path} says '
                     f'vocab_size={config.vocab_size}: the tokenizer belongs to another model.')
  tensors, source = _read_tensors(folder)
  getter = weights.TensorGetter(tensors, source, (PREFIX, ''), param_dtype)
  params = convert_hf_weights(getter, config)
  module = CLIPTextTransformer(config, int(clip_skip), compute_dtype, param_dtype)
  ids = jax.ShapeDtypeStruct((1, int(max_len)), jnp.int32)
  abstract = jax.eval_shape(lambda i: module.init(jax.random.key(0), i), ids)['params']
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(abstract))
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if expected != got:  # A bug in the converter, not a user error.
    raise AssertionError(f'converted CLIP params do not match the module: {got} vs {expected}')
  arch = hashlib.sha256(repr(config).encode()).hexdigest()[:8]  # hidden_act, eos_token_id, ...
  fingerprint = (f'clip:{folder}:config={arch}:max_len={int(max_len)}:clip_skip={int(clip_skip)}:'
                 f'dtype={jnp.dtype(compute_dtype).name}:tokenizer={tokenizer.fingerprint()}:'
                 f'{weights.digest(params)}')
  return ClipEncoder(
      arch='clip', path=folder, module=module, params=jax.tree.map(jnp.asarray, params),
      tokenizer=tokenizer, max_len=int(max_len), dim=config.hidden_size,
      pad_id=tokenizer.pad_id, fingerprint=fingerprint, clip_skip=int(clip_skip))


def hf_tensors(config: CLIPTextConfig, params: Any) -> dict[str, np.ndarray]:
  """`CLIPTextTransformer` params -> {transformers CLIPTextModel tensor name (text_model.*):
  float32 array in PyTorch layout}: the exact inverse of `convert_hf_weights`."""
  tensors = weights.invert_conversion(
      lambda get: convert_hf_weights(get, config), params,
      f'the CLIP params are not those of a CLIPTextModel with hidden_size={config.hidden_size}, '
      f'num_hidden_layers={config.num_hidden_layers}, vocab_size={config.vocab_size}; save them '
      'with the config.json they were trained from.')
  return {PREFIX + name: value for name, value in tensors.items()}


def save_clip(folder: str, params: Any, *, source: str) -> str:
  """Writes `params` as a transformers CLIPTextModel folder (a pipeline's text_encoder/) that
  `load_clip` and transformers read: `source`'s config.json copied byte for byte, and model.
  safetensors (float32) holding `hf_tensors` plus the tensors of `source` the converter does not
  read (the position_ids buffer older transformers saved) as they were.

  Args:
    folder: destination (created if missing; other files in it are left alone).
    params: `CLIPTextTransformer` parameters (plain or boxed) of `source`'s architecture.
    source: the text_encoder/ folder the params were trained from.
  Returns:
    The absolute folder.
  """
  source = os.path.abspath(os.path.expanduser(source))
  tensors = hf_tensors(read_config(source), params)
  unread = lambda name: PREFIX + name.removeprefix(PREFIX) not in tensors
  found = weights.read_safetensors(source, WEIGHTS, keep=unread)
  kept = found[0] if found is not None else {}
  with open(os.path.join(source, 'config.json'), 'rb') as f:
    config = f.read()
  return weights.write_weights(folder, WEIGHTS, {**kept, **tensors}, config)
