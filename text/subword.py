"""Subword tokenizer for the from-scratch text encoder: any `tokenizer.json`, or BPE trained here.

`SubwordTokenizer` has the interface of `text.tokenizer.WordTokenizer`. Our ids are the
tokenizer's ids shifted by 3, below which sit the reserved 0 = [PAD], 1 = [UNK] (reserved;
encode never emits it: a tokenizer's own unknown token keeps its shifted id) and 2 = [BOS].
[BOS] is prepended, then the ids are truncated to `max_len` and 0-padded, so the empty
caption "" encodes to [BOS] alone (the classifier-free-guidance null caption). The wrapped
tokenizer's own padding, truncation and special tokens ([CLS]/[SEP], <s>...) are switched off,
so a tokenizer.json from any Hugging Face model folder works.

`train_bpe` trains a byte-level BPE on captions; `ensure_trained` does so once per workdir
for `text.vocab='bpe'` (WORKDIR/tokenizer.json, reused on resume and by sampling).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from text.tokenizer import BOS_ID, PAD_ID, SPECIAL_TOKENS

OFFSET = len(SPECIAL_TOKENS)  # Our id = OFFSET + the tokenizer's id.
TOKENIZER_FILE = 'tokenizer.json'  # text.vocab='bpe': the trained tokenizer, in the workdir.
BYTE_ALPHABET = len(pre_tokenizers.ByteLevel.alphabet())  # 256 base tokens of byte-level BPE.


class SubwordTokenizer:
  """Captions -> int32 ids [B, max_len]: [BOS] + (3 + subword ids), truncated, 0-padded."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_len: int):
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
      raise ValueError(f'text.max_len must be a positive integer, got {max_len!r}.')
    # A private copy: switching off padding/truncation must not change the caller's object.
    self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    self.tokenizer.no_padding()
    self.tokenizer.no_truncation()
    self.max_len = max_len
    # Added tokens may sit past the model's vocabulary (or leave holes): size by the largest id.
    self._num_ids = max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

  @classmethod
  def from_file(cls, path: str | os.PathLike, max_len: int) -> 'SubwordTokenizer':
    """Reads a `tokenizer.json` (a Hugging Face tokenizers file, e.g. from a model folder)."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f'tokenizer file {os.fspath(path)} not found; pass an existing '
                              'tokenizer.json or train one with text.subword.train_bpe.')
    try:
      tokenizer = tokenizers.Tokenizer.from_file(os.fspath(path))
    except Exception as e:  # pylint: disable=broad-except  (the library raises bare Exceptions)
      raise ValueError(f'tokenizer file {os.fspath(path)} is not a valid tokenizers JSON file '
                       f'({e}); save one with tokenizers.Tokenizer.save.') from e
    return cls(tokenizer, max_len)

  @property
  def vocab_size(self) -> int:
    """Number of ids, the 3 reserved ones included (the text encoder's embedding rows)."""
    return OFFSET + self._num_ids

  @property
  def pad_id(self) -> int:
    return PAD_ID

  def encode(self, captions: Sequence[str]) -> np.ndarray:
    """np.int32 [len(captions), max_len]."""
    if isinstance(captions, str):
      raise ValueError('encode takes a sequence of captions, not a single string; wrap it in a '
                       'list.')
    captions = [str(c) for c in captions]
    out = np.full((len(captions), self.max_len), PAD_ID, dtype=np.int32)
    out[:, 0] = BOS_ID
    encodings = self.tokenizer.encode_batch(captions, add_special_tokens=False)
    for row, enc in enumerate(encodings):
      ids = enc.ids[:self.max_len - 1]
      out[row, 1:1 + len(ids)] = np.asarray(ids, np.int32) + OFFSET
    return out

  def decode(self, ids: np.ndarray) -> list[str]:
    """Inverse of `encode` up to normalisation and truncation; drops the reserved ids."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
      raise ValueError(f'decode expects ids of shape [B, L], got {ids.shape}.')
    if ids.size and ids.max() >= self.vocab_size:
      raise ValueError(f'decode got id {int(ids.max())} >= vocab_size {self.vocab_size}.')
    rows = [[int(i) - OFFSET for i in row if i >= OFFSET] for row in ids]
    return [s.strip() for s in self.tokenizer.decode_batch(rows, skip_special_tokens=False)]


def _check_vocab_size(vocab_size) -> None:
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or (
      vocab_size < OFFSET + BYTE_ALPHABET):
    raise ValueError(f'text.vocab_size={vocab_size!r} must be an integer >= '
                     f'{OFFSET + BYTE_ALPHABET} (3 reserved ids + 256 byte tokens).')


def _bpe_tokenizer() -> tokenizers.Tokenizer:
  """An untrained byte-level BPE with NFKC + lower-case normalisation."""
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer


def train_bpe(captions: Iterable[str], vocab_size: int, path: str | os.PathLike) -> str:
  """Trains a BPE on `captions` and writes it atomically to `path` (a tokenizer.json); returns path.

  Byte-level BPE (GPT-2's pre-tokenisation): every string is encodable, so no caption ever
  meets [UNK], and decoding is lossless up to normalisation. The text is NFKC-normalised and
  lower-cased first, as the word tokenizer does: case rarely changes what an image shows, and
  merges are not spent on 'Red'/'RED'/'red'. `vocab_size` counts all ids, our 3 reserved ones
  included, so the encoder's embedding table has at most `vocab_size` rows (fewer when the
  captions run out of pairs seen twice). The result depends only on the multiset of captions.
  """
  _check_vocab_size(vocab_size)
  if isinstance(captions, str):
    raise ValueError('train_bpe takes an iterable of captions, not a single string.')
  tokenizer = _bpe_tokenizer()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size - OFFSET, min_frequency=2, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
  seen = [0]

  def texts():
    for caption in captions:
      seen[0] += 1
      yield str(caption)

  tokenizer.train_from_iterator(texts(), trainer=trainer)
  if not seen[0]:
    raise ValueError('train_bpe got no captions; the dataset (data.*) must have captions to '
                     "train text.vocab='bpe' on.")
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'  # Same folder, so os.replace is an atomic rename.
  try:
    tokenizer.save(tmp, pretty=True)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def workdir_path(workdir: str | os.PathLike) -> str:
  """Where text.vocab='bpe' keeps its tokenizer: WORKDIR/tokenizer.json."""
  return os.path.join(os.fspath(workdir), TOKENIZER_FILE)


def ensure_trained(cfg_text, workdir: str | os.PathLike,
                   captions_fn: Callable[[], Iterable[str]]) -> str | None:
  """text.vocab='bpe': trains WORKDIR/tokenizer.json from `captions_fn()` unless it exists.

  Returns its path; returns None (and reads no captions) for any other text.encoder/text.vocab.
  Call it on one process only, before `encoders.build`, and make the others wait.
  """
  if cfg_text.encoder != 'scratch' or cfg_text.vocab != 'bpe':
    return None
  path = workdir_path(workdir)
  if not os.path.isfile(path):
    _check_vocab_size(cfg_text.vocab_size)  # Before reading any captions.
    train_bpe(captions_fn(), cfg_text.vocab_size, path)
  return path
