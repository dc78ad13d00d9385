"""A random CLIP text encoder and its tokenizer in the diffusers/transformers folder layout.

For tests and smoke runs without network: `text_encoder/` gets config.json (model_type
'clip_text_model', architectures ['CLIPTextModel']) and a float32 model.safetensors under
transformers' tensor names; `tokenizer/` gets vocab.json, merges.txt, special_tokens_map.json and
tokenizer_config.json as a Stable Diffusion pipeline's tokenizer/ holds them.

The vocabulary is built the way CLIP's is (the 256 byte characters, the same with `</w>`, one
entry per merge, then <|startoftext|> and <|endoftext|>): from merges learned on a small English
word list, or from open_clip's `bpe_simple_vocab_16e6.txt.gz` (the real 49,408-token vocabulary).

  python -m tools.random_clip OUT_DIR   # writes OUT_DIR/text_encoder and OUT_DIR/tokenizer
"""
from __future__ import annotations

import collections
import gzip
import json
import os
import sys
from typing import Sequence

import numpy as np

from text.clip_tokenizer import BOS, EOS, bytes_to_unicode

# Words the built-in merges are learned from (caption-like English, with repeats as weights).
_WORDS = ('a an the of on in with and to at is are photo picture painting drawing portrait '
          'of cat cats dog dogs horse bird birds red green blue yellow black white orange purple '
          'small big large tiny round square circle circles triangle triangles left right above '
          'below next beside sitting standing running flying table chair house tree trees sky '
          'city street night day sunset mountain mountains river water beach ocean forest '
          'flower flowers garden woman man people person child children girl boy car cars '
          'train boat light dark bright highly detailed digital art style oil canvas render '
          'realistic beautiful old new two three four many some this that there their under '
          'over into from wearing holding looking playing eating dinner breakfast kitchen').split()
_MAX_MERGES = 49152 - 256 - 2


def learn_merges(words: Sequence[str], num_merges: int) -> list[tuple[str, str]]:
  """Byte-level BPE merges (most frequent pair first, ties by the pair) on `words`' byte chars."""
  enc = bytes_to_unicode()
  counts = collections.Counter(w.lower() for w in words)
  corpus = {}
  for word, n in counts.items():
    chars = [enc[b] for b in word.encode('utf-8')]
    corpus[tuple(chars[:-1] + [chars[-1] + '</w>'])] = n
  merges = []
  while len(merges) < num_merges:
    pairs = collections.Counter()
    for symbols, n in corpus.items():
      for pair in zip(symbols, symbols[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    new_corpus = {}
    for symbols, n in corpus.items():
      out, i = [], 0
      while i < len(symbols):
        if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
          out.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          out.append(symbols[i])
          i += 1
      new_corpus[tuple(out)] = new_corpus.get(tuple(out), 0) + n
    corpus = new_corpus
  return merges


def read_open_clip_merges(path: str) -> list[tuple[str, str]]:
  """The merges of open_clip's bpe_simple_vocab_16e6.txt(.gz) as SD's merges.txt holds them."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8') as f:
    lines = f.read().split('\n')[1:_MAX_MERGES + 1]
  return [tuple(line.split()) for line in lines]


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
  """vocab.json of a CLIP tokenizer: byte chars, byte chars + '</w>', merges, BOS, EOS."""
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + '</w>' for c in chars] + [''.join(m) for m in merges] + [BOS, EOS]
  vocab = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  return vocab


def write_tokenizer(folder: str, merges: Sequence[tuple[str, str]], *,
                    pad_token: str = EOS, max_length: int = 77) -> dict[str, int]:
  """Writes a diffusers tokenizer/ folder; returns the vocabulary."""
  os.makedirs(folder, exist_ok=True)
  vocab = clip_vocab(merges)
  if pad_token not in vocab:
    raise ValueError(f'pad_token={pad_token!r} is not in the vocabulary.')
  with open(os.path.join(folder, 'vocab.json'), 'w', encoding='utf-8') as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  token = lambda t: {'content': t, 'lstrip': False, 'normalized': True, 'rstrip': False,
                     'single_word': False}
  specials = {'bos_token': token(BOS), 'eos_token': token(EOS), 'unk_token': token(EOS),
              'pad_token': pad_token}
  with open(os.path.join(folder, 'special_tokens_map.json'), 'w') as f:
    json.dump(specials, f, indent=2)
  config = dict(specials, add_prefix_space=False, do_lower_case=True, errors='replace',
                model_max_length=max_length, tokenizer_class='CLIPTokenizer')
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  return vocab


def random_clip_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 CLIPTextModel tensors under transformers' names for config dict `cfg`."""
  rng = np.random.default_rng(seed)
  d, f = cfg['hidden_size'], cfg['intermediate_size']

  def rand(*shape, scale):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  def norm(name):
    w[f'{name}.weight'] = 1 + rand(d, scale=0.1)
    w[f'{name}.bias'] = rand(d, scale=0.1)

  def linear(name, n_out, n_in):
    w[f'{name}.weight'] = rand(n_out, n_in, scale=1 / np.sqrt(n_in))
    w[f'{name}.bias'] = rand(n_out, scale=0.1)

  t = 'text_model'
  w = {f'{t}.embeddings.token_embedding.weight': rand(cfg['vocab_size'], d, scale=0.5),
       f'{t}.embeddings.position_embedding.weight':
           rand(cfg['max_position_embeddings'], d, scale=0.5),
       # Older transformers saved this buffer; SD 1.x checkpoints carry it. Loaders ignore it.
       f'{t}.embeddings.position_ids': np.arange(cfg['max_position_embeddings'])[None]}
  for i in range(cfg['num_hidden_layers']):
    p = f'{t}.encoder.layers.{i}'
    norm(f'{p}.layer_norm1')
    for n in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      linear(f'{p}.self_attn.{n}', d, d)
    norm(f'{p}.layer_norm2')
    linear(f'{p}.mlp.fc1', f, d)
    linear(f'{p}.mlp.fc2', d, f)
  norm(f'{t}.final_layer_norm')
  return w


def write_random_clip(text_encoder_dir: str, tokenizer_dir: str, *, hidden_size: int = 32,
                      layers: int = 2, heads: int = 2, intermediate: int = 64,
                      vocab: str | Sequence[str] | None = None, hidden_act: str = 'quick_gelu',
                      pad_token: str = EOS, seed: int = 0, max_position_embeddings: int = 77,
                      eos_token_id: int | None = 2, num_merges: int = 400) -> dict:
  """Writes a random CLIP text encoder and its tokenizer; returns the config dict.

  Args:
    vocab: None (merges learned from a built-in word list), a list of words to learn them from,
      or the path of open_clip's bpe_simple_vocab_16e6.txt.gz (the real CLIP vocabulary).
    pad_token: '<|endoftext|>' as SD 1.x pads, or '!' as SD 2.x does.
    eos_token_id: config.json's eos_token_id: 2 as SD 1.x/2.x configs (transformers' legacy
      pooling at argmax(ids)), or None for the tokenizer's real <|endoftext|> id.
    num_merges: merges to learn when `vocab` is not a file.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if isinstance(vocab, str):
    merges = read_open_clip_merges(vocab)
  else:
    merges = learn_merges(list(vocab) if vocab is not None else list(_WORDS) * 2, num_merges)
  token_ids = write_tokenizer(tokenizer_dir, merges, pad_token=pad_token,
                              max_length=max_position_embeddings)
  cfg = {
      'architectures': ['CLIPTextModel'], 'model_type': 'clip_text_model',
      'attention_dropout': 0.0, 'dropout': 0.0, 'initializer_factor': 1.0,
      'initializer_range': 0.02, 'hidden_act': hidden_act, 'hidden_size': hidden_size,
      'intermediate_size': intermediate, 'layer_norm_eps': 1e-5,
      'max_position_embeddings': max_position_embeddings, 'num_attention_heads': heads,
      'num_hidden_layers': layers, 'projection_dim': hidden_size, 'vocab_size': len(token_ids),
      'bos_token_id': 0 if eos_token_id == 2 else token_ids[BOS],
      'eos_token_id': token_ids[EOS] if eos_token_id is None else eos_token_id,
      'pad_token_id': 1, 'torch_dtype': 'float32',
  }
  os.makedirs(text_encoder_dir, exist_ok=True)
  with open(os.path.join(text_encoder_dir, 'config.json'), 'w') as f:
    json.dump(cfg, f, indent=2)
  save_file(random_clip_tensors(cfg, seed), os.path.join(text_encoder_dir, 'model.safetensors'))
  return cfg


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: python -m tools.random_clip OUT_DIR')
  write_random_clip(os.path.join(sys.argv[1], 'text_encoder'),
                    os.path.join(sys.argv[1], 'tokenizer'))
