"""The text-encoder seam: one interface for the from-scratch and the pretrained encoders.

The trainer sees only `TextEncoder`: tokenize on the host, `init` for trainable
parameters, and a pure `encode(params, ids) -> (emb, mask, pooled)`. The CFG null
condition is the encoding of the empty caption "" (for both kinds): it is a real
input the encoder already understands ([BOS] or [CLS][SEP]), needs no extra
parameter, and is what users type for "no prompt".
"""

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

NULL_CAPTION = ''
ENCODERS = ('scratch', 'pretrained')  # config.text.encoder


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


def _scratch(cfg) -> TextEncoder:
  from text import scratch, tokenizer as tok
  if cfg.vocab == 'shapes':
    vocab = list(tok.SHAPES_VOCAB)
  elif os.path.isfile(cfg.vocab):
    vocab = tok.load_vocab(cfg.vocab)
  else:
    raise FileNotFoundError(f'text.vocab={cfg.vocab!r} is neither "shapes" nor an existing vocabulary '
                            'file (one word per line); build one with text.tokenizer.build_vocab.')
  tokenizer = tok.WordTokenizer(vocab, cfg.max_len)
  module_cfg = ml_collections.ConfigDict(cfg.to_dict())
  module_cfg.vocab_size = tokenizer.vocab_size
  module = scratch.ScratchTextEncoder(config=ml_collections.FrozenConfigDict(module_cfg))

  def init(rng):
    return module.init(rng, jnp.zeros((1, cfg.max_len), jnp.int32))['params']

  def encode(params, ids):
    return module.apply({'params': params}, ids)

  return TextEncoder(tokenize=tokenizer.encode, init=init, encode=encode, trainable=True,
                     dim=cfg.width, max_len=cfg.max_len, module=module, fingerprint='scratch')


def _pretrained(cfg) -> TextEncoder:
  from text import pretrained
  path = pretrained.resolve_path(cfg.pretrained_path) if cfg.pretrained_path else (
      pretrained.default_minilm_path())
  enc = pretrained.load_pretrained(path, max_len=cfg.max_len, dtype=cfg.dtype)
  params = enc.params
  return TextEncoder(tokenize=enc.tokenize, init=lambda rng: params, encode=enc.encode,
                     trainable=False, dim=enc.dim, max_len=cfg.max_len, module=None,
                     fingerprint=getattr(enc, 'fingerprint', str(path)))


def build(cfg) -> TextEncoder:
  """Builds the encoder named by `config.text.encoder` from the `config.text` section."""
  if cfg.encoder == 'scratch':
    return _scratch(cfg)
  if cfg.encoder == 'pretrained':
    return _pretrained(cfg)
  raise ValueError(f'text.encoder={cfg.encoder!r} is not supported; use one of {ENCODERS}.')
