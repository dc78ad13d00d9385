"""Embedding cache: each unique caption encoded once, reuse, stale detection, lookup == encode."""
import json
import os

import numpy as np
import pytest

from tests.test_text_t5 import write_tiny_t5
from text import embedding_cache
from text import pretrained

CAPTIONS = ['a red circle', 'two blue squares', 'a red circle', 'a small green triangle',
            'three big squares on the left', 'two blue squares', 'a circle above a square']


class CountingEncoder:
  """Delegates to a real encoder and records every caption it is asked to tokenize."""

  def __init__(self, enc):
    self.enc, self.seen = enc, []

  def __getattr__(self, name):
    return getattr(self.enc, name)

  def tokenize(self, captions):
    self.seen.extend(captions)
    return self.enc.tokenize(captions)


@pytest.fixture
def t5_folder(tmp_path):
  write_tiny_t5(str(tmp_path / 't5'))
  return str(tmp_path / 't5')


def _direct(enc, captions):
  emb, mask, pooled = enc.encode(enc.params, enc.tokenize(captions))
  return np.asarray(emb), np.asarray(mask), np.asarray(pooled)


def test_build_once_reuse_and_lookup(t5_folder, tmp_path):
  enc = CountingEncoder(pretrained.load_pretrained(t5_folder, max_len=8))
  path = str(tmp_path / 'cache')
  cache = embedding_cache.build_cache(enc, CAPTIONS, path, batch_size=4)
  unique = set(CAPTIONS) | {''}
  assert sorted(enc.seen) == sorted(unique)  # Each unique caption once, "" included.
  assert len(cache) == len(unique) and '' in cache
  assert cache.emb.dtype == np.float16 and cache.emb.shape == (len(unique), 8, 16)

  query = CAPTIONS[::-1] + ['']
  emb, mask, pooled = cache.lookup(query)
  ref_emb, ref_mask, ref_pooled = _direct(enc.enc, query)
  assert emb.dtype == np.float32 and mask.dtype == np.bool_
  np.testing.assert_array_equal(mask, ref_mask)
  np.testing.assert_allclose(emb, ref_emb, rtol=2e-3, atol=2e-3 * np.abs(ref_emb).max())
  np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-5, atol=1e-5)

  enc.seen.clear()  # Same captions again: nothing is encoded, the folder is reused.
  again = embedding_cache.build_cache(enc, CAPTIONS[:3], path, batch_size=4)
  assert enc.seen == [] and len(again) == len(unique)
  loaded = embedding_cache.EmbeddingCache.load(path, embedding_cache.encoder_fingerprint(enc))
  np.testing.assert_array_equal(loaded.lookup(query)[0], emb)

  bigger = embedding_cache.build_cache(enc, CAPTIONS + ['a blue triangle'], path, batch_size=4)
  assert enc.seen == ['a blue triangle'] and len(bigger) == len(unique) + 1  # Appended only.
  np.testing.assert_array_equal(bigger.lookup(query)[0], emb)
  with pytest.raises(ValueError, match='not in the embedding cache'):
    bigger.lookup(['an unseen caption'])


def test_fingerprint_mismatch_rebuilds(t5_folder, tmp_path):
  path = str(tmp_path / 'cache')
  enc8 = CountingEncoder(pretrained.load_pretrained(t5_folder, max_len=8))
  embedding_cache.build_cache(enc8, CAPTIONS, path, batch_size=8)

  enc10 = CountingEncoder(pretrained.load_pretrained(t5_folder, max_len=10))
  with pytest.raises(ValueError, match='max_len: 8 -> 10'):
    embedding_cache.EmbeddingCache.load(path, embedding_cache.encoder_fingerprint(enc10))
  cache = embedding_cache.build_cache(enc10, CAPTIONS, path, batch_size=8)
  assert len(enc10.seen) == len(set(CAPTIONS)) + 1 and cache.emb.shape[1] == 10

  write_tiny_t5(t5_folder, seed=1)  # Same folder and max_len, new weights.
  enc_new = CountingEncoder(pretrained.load_pretrained(t5_folder, max_len=10))
  assert embedding_cache.encoder_fingerprint(enc_new)['encoder'] != cache.fingerprint['encoder']
  rebuilt = embedding_cache.build_cache(enc_new, CAPTIONS, path, batch_size=8)
  assert len(enc_new.seen) == len(set(CAPTIONS)) + 1
  np.testing.assert_allclose(rebuilt.lookup(['a red circle'])[2],
                             _direct(enc_new.enc, ['a red circle'])[2], rtol=1e-5, atol=1e-5)


def test_bfloat16_and_float32_storage_and_errors(t5_folder, tmp_path):
  enc = pretrained.load_pretrained(t5_folder, max_len=8)
  ref = _direct(enc, CAPTIONS)[0]
  for store, tol in [('bfloat16', 1e-2), ('float32', 1e-5)]:
    cache = embedding_cache.build_cache(enc, CAPTIONS, str(tmp_path / store), batch_size=3,
                                        params=enc.params, store_dtype=store)
    np.testing.assert_allclose(cache.lookup(CAPTIONS)[0], ref, rtol=tol,
                               atol=tol * np.abs(ref).max())
    reloaded = embedding_cache.EmbeddingCache.load(str(tmp_path / store))
    np.testing.assert_array_equal(reloaded.lookup(CAPTIONS)[0], cache.lookup(CAPTIONS)[0])
  with pytest.raises(ValueError, match='store_dtype'):
    embedding_cache.build_cache(enc, CAPTIONS, str(tmp_path / 'x'), store_dtype='int8')
  with pytest.raises(FileNotFoundError, match='index.json'):
    embedding_cache.EmbeddingCache.load(str(tmp_path / 'nothing'))
  with pytest.raises(ValueError, match='must be str'):
    embedding_cache.build_cache(enc, ['ok', 3], str(tmp_path / 'y'))
  with pytest.raises(ValueError, match='no fingerprint'):
    embedding_cache.build_cache(object(), CAPTIONS, str(tmp_path / 'z'))


def test_interrupted_write_is_detected_and_rebuilt(t5_folder, tmp_path):
  enc = CountingEncoder(pretrained.load_pretrained(t5_folder, max_len=8))
  path = str(tmp_path / 'cache')
  embedding_cache.build_cache(enc, CAPTIONS, path, batch_size=4)
  index = os.path.join(path, 'index.json')
  with open(index) as f:
    data = json.load(f)
  data['captions'] = data['captions'][:-1]  # Index and arrays now disagree.
  with open(index, 'w') as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match='inconsistent'):
    embedding_cache.EmbeddingCache.load(path)
  enc.seen.clear()
  cache = embedding_cache.build_cache(enc, CAPTIONS, path, batch_size=4)
  assert len(enc.seen) == len(set(CAPTIONS)) + 1 and len(cache) == len(enc.seen)
