"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, arXiv:2103.00020) as a host function.

Reads a diffusers/transformers `tokenizer/` folder (vocab.json, merges.txt and the special tokens of
special_tokens_map.json / tokenizer_config.json) and gives exactly the ids transformers' slow
(4.x) `CLIPTokenizer` gives, on its path without ftfy, with `padding='max_length',
truncation=True, max_length=max_len` (as diffusers' encode_prompt calls it):

  1. added (special) tokens are split out of the text as written ('<|endoftext|>', and '!' where
     the folder pads with it, as SD 2.x does);
  2. every other piece is cleaned as transformers' BasicTokenizer does: control characters, NUL
     and U+FFFD dropped, whitespace collapsed, spaces around CJK ideographs, NFC, lower-case;
  3. CLIP's pre-tokenising regex splits it into words, whose UTF-8 bytes map to printable
     characters (`bytes_to_unicode`), and BPE merges them by rank, the last symbol ending `</w>`;
  4. <|startoftext|> ids <|endoftext|>, cut to max_len (the end token kept), padded with the
     folder's pad token.

transformers 5 has only a tokenizers-backed CLIPTokenizer; it gives the same ids except for CJK
ideographs, control/format characters, upper-case special tokens and word-final sigma.

Python's `re` has no \\p{L}/\\p{N}: the letter and number classes are built once from
`unicodedata` (the regex module is not a dependency); tests/test_text_clip_reference.py checks
the pattern against the regex one on every code point.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import sys
import unicodedata
from typing import Mapping, Sequence

import numpy as np

BOS, EOS = '<|startoftext|>', '<|endoftext|>'
_MAX_MERGES = 49152 - 256 - 2  # transformers reads at most this many merges.
_FOLDER_HINT = ('a diffusers tokenizer/ folder holds vocab.json, merges.txt, '
                'special_tokens_map.json and tokenizer_config.json (as '
                'CLIPTokenizer.save_pretrained writes them)')


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """Byte -> printable character: printable Latin-1 bytes map to themselves, the rest to 256+n."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) +
        list(range(ord('®'), ord('ÿ') + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _category_ranges() -> dict[str, list[tuple[int, int]]]:
  """Code-point ranges (first, last) of each major Unicode category ('L', 'N', ...)."""
  major = [unicodedata.category(chr(cp))[0] for cp in range(sys.maxunicode + 1)]
  ranges, start = {}, 0
  for cat, run in itertools.groupby(major):
    n = sum(1 for _ in run)
    ranges.setdefault(cat, []).append((start, start + n - 1))
    start += n
  return ranges


def _char_class(ranges: list[tuple[int, int]]) -> str:
  esc = lambda cp: f'\\U{cp:08x}'
  return ''.join(esc(a) if a == b else f'{esc(a)}-{esc(b)}' for a, b in ranges)


@functools.lru_cache(maxsize=None)
def word_pattern() -> re.Pattern:
  """CLIP's pre-tokenising regex with \\p{L} and \\p{N} spelled out as code-point ranges.

  Only the literals are case-insensitive: the regex module, matching the whole pattern with
  IGNORECASE, also skips U+0345 (a mark that case-folds to iota) instead of matching it, so it is
  left out of the last class here too (tests/test_text_clip_reference.py checks every code point).
  """
  ranges = _category_ranges()
  letter, number = _char_class(ranges['L']), _char_class(ranges['N'])
  return re.compile(
      r"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|"
      rf'[{letter}]+|[{number}]|[^\s{letter}{number}\u0345]+')


def _is_cjk(cp: int) -> bool:
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or
          0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or
          0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def clean_text(text: str) -> str:
  """transformers' BasicTokenizer(strip_accents=False, do_split_on_punc=False), joined by spaces."""
  out = []
  for ch in text:
    cp = ord(ch)
    if ch in '\t\n\r' or unicodedata.category(ch) == 'Zs':
      out.append(' ')
    elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch)[0] == 'C':
      continue
    elif _is_cjk(cp):
      out.append(f' {ch} ')
    else:
      out.append(ch)
  words = unicodedata.normalize('NFC', ''.join(out)).split()
  return ' '.join(' '.join(w.lower() for w in words).split())


def _special(value) -> str | None:
  """A special token as written in the json files: a string or {'content': ...}."""
  return value.get('content') if isinstance(value, dict) else value


class CLIPTokenizer:
  """Captions -> int32 ids [B, max_len]: <|startoftext|> BPE ids <|endoftext|> pad..."""

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *, max_len: int,
               bos_token: str = BOS, eos_token: str = EOS, pad_token: str = EOS,
               unk_token: str = EOS, added_tokens: Mapping[str, int] | None = None,
               source: str = 'tokenizer'):
    if not isinstance(max_len, (int, np.integer)) or max_len < 2:
      raise ValueError(f'max_len={max_len!r} must be an int >= 2 (room for <|startoftext|> and '
                       '<|endoftext|>).')
    self.vocab = dict(vocab)
    self.max_len = int(max_len)
    self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
    self._added = dict(added_tokens or {})
    ids = {}
    for role, token in (('bos_token', bos_token), ('eos_token', eos_token),
                        ('pad_token', pad_token), ('unk_token', unk_token)):
      if token in self._added:
        ids[role] = self._added[token]
      elif token in self.vocab:
        ids[role] = self.vocab[token]
      else:
        raise ValueError(f'{source}: {role} {token!r} is not in vocab.json; the vocabulary and '
                         'special_tokens_map.json do not belong together.')
      self._added.setdefault(token, ids[role])
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
        ids['bos_token'], ids['eos_token'], ids['pad_token'], ids['unk_token'])
    self.pad_token = pad_token
    # Added tokens are cut out of the raw text before cleaning, longest first, case-sensitively.
    self._split = re.compile('|'.join(re.escape(t) for t in sorted(self._added, key=len,
                                                                   reverse=True)))
    self._byte_encoder = bytes_to_unicode()
    self._pattern = word_pattern()
    self._cache: dict[str, tuple[str, ...]] = {BOS: (BOS,), EOS: (EOS,)}

  @property
  def vocab_size(self) -> int:
    return max(max(self.vocab.values(), default=-1), max(self._added.values())) + 1

  def fingerprint(self) -> str:
    """sha256 (16 hex digits) of the vocabulary, merges, special tokens and max_len."""
    h = hashlib.sha256(json.dumps(sorted(self.vocab.items())).encode())
    h.update(json.dumps(sorted(self.bpe_ranks, key=self.bpe_ranks.get)).encode())
    h.update(json.dumps([sorted(self._added.items()), self.pad_id, self.max_len]).encode())
    return h.hexdigest()[:16]

  def bpe(self, word: str) -> tuple[str, ...]:
    """One pre-tokenised word (byte characters) -> BPE symbols, the last ending in `</w>`."""
    if word in self._cache:
      return self._cache[word]
    symbols = list(word[:-1]) + [word[-1] + '</w>']
    while len(symbols) > 1:
      pairs = set(zip(symbols, symbols[1:]))
      best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float('inf')))
      if best not in self.bpe_ranks:
        break
      merged, i = [], 0
      while i < len(symbols):
        if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
          merged.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    self._cache[word] = tuple(symbols)
    return self._cache[word]

  def tokens(self, text: str) -> list[str]:
    """The BPE symbols of a caption, without special tokens (added tokens kept whole)."""
    out, pieces, pos = [], [], 0
    for m in self._split.finditer(text):
      pieces += [(text[pos:m.start()], False), (m.group(), True)]
      pos = m.end()
    pieces.append((text[pos:], False))
    for piece, added in pieces:
      if added:
        out.append(piece)
        continue
      for word in self._pattern.findall(clean_text(piece)):
        out.extend(self.bpe(''.join(self._byte_encoder[b] for b in word.encode('utf-8'))))
    return out

  def ids(self, text: str) -> list[int]:
    """The ids of a caption without special tokens, padding or truncation."""
    return [self._added[t] if t in self._added else self.vocab.get(t, self.unk_id)
            for t in self.tokens(text)]

  def encode(self, captions: Sequence[str]) -> np.ndarray:
    """Captions -> int32 [B, max_len]: BOS, ids cut to max_len - 2, EOS, then pad_id."""
    if isinstance(captions, str):
      raise ValueError('tokenize expects a sequence of captions, got a single str; wrap it in a '
                       'list.')
    out = np.full((len(captions), self.max_len), self.pad_id, np.int32)
    for row, caption in enumerate(captions):
      if not isinstance(caption, str):
        raise TypeError(f'caption {row} is a {type(caption).__name__}, not a str.')
      ids = [self.bos_id] + self.ids(caption)[:self.max_len - 2] + [self.eos_id]
      out[row, :len(ids)] = ids
    return out

  __call__ = encode


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); {_FOLDER_HINT}.') from e


def load_tokenizer(folder: str, max_len: int = 77) -> CLIPTokenizer:
  """The CLIP tokenizer of a diffusers `tokenizer/` folder, padding/truncating to `max_len`."""
  for name in ('vocab.json', 'merges.txt'):
    if not os.path.isfile(os.path.join(folder, name)):
      raise FileNotFoundError(f'{os.path.join(folder, name)} not found: {_FOLDER_HINT}. Point '
                              'the tokenizer folder at the pipeline\'s tokenizer/.')
  vocab = _read_json(os.path.join(folder, 'vocab.json'))
  with open(os.path.join(folder, 'merges.txt'), encoding='utf-8') as f:
    lines = f.read().strip().split('\n')[1:_MAX_MERGES + 1]  # Line 0 is the '#version' header.
  merges = [tuple(line.split()) for line in lines]
  bad = [i for i, m in enumerate(merges) if len(m) != 2]
  if bad:
    raise ValueError(f'{os.path.join(folder, "merges.txt")}: line {bad[0] + 2} is not a pair of '
                     'symbols "a b"; the file is not a BPE merges file.')
  # special_tokens_map.json overrides tokenizer_config.json, as in transformers' from_pretrained.
  config = _read_json(os.path.join(folder, 'tokenizer_config.json'))
  specials = {k: _special(config.get(k)) for k in ('bos_token', 'eos_token', 'pad_token',
                                                    'unk_token')}
  for k, v in _read_json(os.path.join(folder, 'special_tokens_map.json')).items():
    if k in specials and _special(v):
      specials[k] = _special(v)
  added = {v['content']: int(k) for k, v in config.get('added_tokens_decoder', {}).items()}
  added.update(_read_json(os.path.join(folder, 'added_tokens.json')))
  defaults = {'bos_token': BOS, 'eos_token': EOS, 'pad_token': EOS, 'unk_token': EOS}
  return CLIPTokenizer(vocab, merges, max_len=max_len, added_tokens=added, source=folder,
                       **{k: specials[k] or defaults[k] for k in defaults})
