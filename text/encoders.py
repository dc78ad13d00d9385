"""The text-encoder seam: one interface for the from-scratch and the pretrained encoders.

The trainer sees only `TextEncoder`: tokenize on the host, `init` for trainable
parameters, and a pure `encode(params, ids) -> (emb, mask, pooled)`. The CFG null
condition is the encoding of the empty caption "" (for both kinds): it is a real
input the encoder already understands ([BOS] or [CLS][SEP]), needs no extra
parameter, and is what users type for "no prompt".
"""

import dataclasses
import hashlib
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers
from text.spec import ENCODERS, TextSpec

NULL_CAPTION = ''


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """A text encoder as data: host tokenizer + pure jittable encode."""
  tokenize: Callable[[Sequence[str]], np.ndarray]  # captions -> int32 [B, max_len]
  init: Callable[[jax.Array], Any]  # rng -> params (trainable) or the frozen params
  encode: Callable[[Any, jax.Array], tuple]  # (params, ids) -> (emb [B,L,D], mask [B,L], pooled [B,D])
  trainable: bool  # False: params are frozen and kept out of the optimiser
  dim: int  # D
  max_len: int
  module: Any = None  # The flax module (logical partitioning of trainable params), if any.
  fingerprint: str = ''  # Identifies the weights (embedding caches check it).


def _scratch_tokenizer(cfg: TextSpec, workdir):
  """(tokenizer, fingerprint) for `text.vocab`: 'shapes', 'bpe', a *.json or a word-list file."""
  from text import tokenizer as tok
  vocab = str(cfg.vocab)
  is_file = os.path.isfile(vocab)
  if vocab == 'shapes':
    return tok.WordTokenizer(list(tok.SHAPES_VOCAB), cfg.max_len), 'scratch'
  if is_file and vocab != 'bpe' and not vocab.endswith('.json'):
    return tok.WordTokenizer(tok.load_vocab(vocab), cfg.max_len), 'scratch'
  from text import subword  # Only subword vocabularies need the tokenizers library.
  if vocab == 'bpe':
    if workdir is None:
      raise ValueError("text.vocab='bpe' keeps its tokenizer in the workdir; pass workdir= to "
                       'encoders.build / runtime.state.build_networks.')
    path = subword.workdir_path(workdir)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"text.vocab='bpe' needs {path}, which is missing; training creates it "
          '(text.subword.ensure_trained, on the captions) before building the encoder. '
          'Sample from the workdir the run trained in.')
  elif is_file:
    path = vocab
  else:
    raise FileNotFoundError(
        f'text.vocab={cfg.vocab!r} is not "shapes", not "bpe" and not an existing file; use '
        '"shapes", "bpe" (train a BPE tokenizer on the captions into WORKDIR/tokenizer.json), '
        'a path to a tokenizer.json, or a one-word-per-line vocabulary file (build one with '
        'text.tokenizer.build_vocab).')
  with open(path, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:16]
  return subword.SubwordTokenizer.from_file(path, cfg.max_len), f'scratch-subword:{digest}'


def _scratch(cfg: TextSpec, workdir=None) -> TextEncoder:
  from text import scratch
  tokenizer, fingerprint = _scratch_tokenizer(cfg, workdir)
  module = scratch.ScratchTextEncoder(
      vocab_size=tokenizer.vocab_size, width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
      max_len=cfg.max_len, dtype=layers.resolve_dtype(cfg.dtype, 'text.dtype'),
      param_dtype=layers.resolve_dtype(cfg.param_dtype, 'text.param_dtype'))

  def init(rng):
    return module.init(rng, jnp.zeros((1, cfg.max_len), jnp.int32))['params']

  def encode(params, ids):
    return module.apply({'params': params}, ids)

  return TextEncoder(tokenize=tokenizer.encode, init=init, encode=encode, trainable=True,
                     dim=cfg.width, max_len=cfg.max_len, module=module, fingerprint=fingerprint)


def _pretrained(cfg: TextSpec) -> TextEncoder:
  from text import pretrained
  path = cfg.pretrained_path or pretrained.default_minilm_path()
  extra = {'clip_skip': cfg.clip_skip} if cfg.clip_skip else {}  # CLIP folders only.
  enc = pretrained.load_pretrained(path, max_len=cfg.max_len, dtype=cfg.dtype,
                                   allow_download=cfg.allow_download, **extra)
  params = enc.params
  # Fine-tuned: the weights get logical axis names, so they, their optimiser state and EMA split
  # over 'fsdp' as the frozen ones do (runtime.sharding.frozen_shardings).
  init = (lambda rng: annotate(params)) if cfg.finetune else (lambda rng: params)
  return TextEncoder(tokenize=enc.tokenize, init=init, encode=enc.encode,
                     trainable=cfg.finetune, dim=enc.dim, max_len=cfg.max_len, module=None,
                     fingerprint=getattr(enc, 'fingerprint', str(path)))


def annotate(params: Any, min_size: int = 1 << 14) -> Any:
  """A pretrained (unannotated) parameter tree boxed for training: each array of at least
  `min_size` elements gets the logical name 'text_embed' on its last axis (the rest replicated)."""
  def box(x):
    if x.size < min_size:
      return x
    return nn.Partitioned(x, (None,) * (x.ndim - 1) + ('text_embed',))
  return jax.tree.map(box, params)


def build(cfg: TextSpec, workdir=None) -> TextEncoder:
  """Builds the encoder named by `text.encoder` from the text section's `TextSpec`.

  `workdir`: the run's directory, where text.vocab='bpe' keeps its tokenizer.json.
  """
  if cfg.encoder == 'scratch':
    return _scratch(cfg, workdir)
  if cfg.encoder == 'pretrained':
    return _pretrained(cfg)
  raise ValueError(f'text.encoder={cfg.encoder!r} is not supported; use one of {ENCODERS}.')
