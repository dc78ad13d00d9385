"""Embedding cache in parts: each process encodes its own captions once; lookup == encode."""
import hashlib
import json
import os

import numpy as np
import pytest

from tests.test_text_t5 import write_tiny_t5
from text import embedding_cache
from text import pretrained
from text.embedding_cache import EmbeddingCache

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


def _share(captions, p, num_parts):
  """The caller's split: process p takes records p, p + P, p + 2P, ..."""
  return [captions[i] for i in range(p, len(captions), num_parts)]


def _build_all(enc, captions, path, num_parts, **kw):
  for p in range(num_parts):  # One call per simulated process.
    embedding_cache.build_part(enc, _share(captions, p, num_parts), path, p, num_parts,
                               batch_size=3, **kw)


def _count(path, p, num_parts):
  folder = os.path.join(path, embedding_cache.part_name(p, num_parts))
  return json.load(open(os.path.join(folder, 'index.json')))['count']


@pytest.mark.full  # Two encoding processes.
def test_parts_from_two_processes_lookup_equals_encoding(t5_folder, tmp_path):
  enc = CountingEncoder(pretrained.load_pretrained(t5_folder, max_len=8))
  path = str(tmp_path / 'cache')
  _build_all(enc, CAPTIONS, path, 2)
  unique = set(CAPTIONS)
  # Each process encodes only its own unique captions, plus "".
  assert sorted(enc.seen) == sorted([*set(_share(CAPTIONS, 0, 2)), '',
                                     *set(_share(CAPTIONS, 1, 2)), ''])
  assert sorted(os.listdir(path)) == ['part-00000-of-00002', 'part-00001-of-00002']
  index = json.load(open(os.path.join(path, 'part-00001-of-00002', 'index.json')))
  assert set(index) == {'fingerprint', 'count', 'part', 'num_parts'}  # No caption text.

  cache = EmbeddingCache.load(path, 2, embedding_cache.encoder_fingerprint(enc))
  assert '' in cache and 'a red circle' in cache and 'a blue circle' not in cache
  assert len(cache) == sum(_count(path, p, 2) for p in range(2))
  for part in cache.parts:  # Sorted 64-bit keys, memory-mapped; the cache holds no captions.
    assert isinstance(part.keys, np.memmap) and part.keys.dtype == np.uint64
    assert np.all(part.keys[1:] > part.keys[:-1])
    assert isinstance(part.emb, np.memmap) and part.emb.dtype == np.float16
    assert part.emb.shape[1:] == (8, 16)
  assert not any(isinstance(v, (list, tuple)) and v and isinstance(v[0], str)
                 for v in vars(cache).values())

  query = CAPTIONS[::-1] + ['']
  emb, mask, pooled = cache.lookup(query)
  ref_emb, ref_mask, ref_pooled = _direct(enc.enc, query)
  assert emb.dtype == np.float32 and mask.dtype == np.bool_ and emb.shape == (len(query), 8, 16)
  np.testing.assert_array_equal(mask, ref_mask)
  np.testing.assert_allclose(emb, ref_emb, rtol=2e-3, atol=2e-3 * np.abs(ref_emb).max())
  np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
  assert len(unique) + 2 == len(cache)  # No caption is in both shares here; "" is in both.

  with pytest.raises(ValueError, match="not in the embedding cache.*'an unseen caption'"):
    cache.lookup(['a red circle', 'an unseen caption'])


@pytest.mark.full  # More encodings of the tiny T5; the cache's own checks: the tests around.
def test_reuse_extend_and_other_part_counts(t5_folder, tmp_path):
  enc = CountingEncoder(pretrained.load_pretrained(t5_folder, max_len=8))
  path = str(tmp_path / 'cache')
  _build_all(enc, CAPTIONS, path, 2)
  ref = EmbeddingCache.load(path, 2).lookup(CAPTIONS)
  keys_file = os.path.join(path, 'part-00000-of-00002', 'keys.npy')
  written = (os.stat(keys_file).st_ino, os.stat(keys_file).st_mtime_ns)

  enc.seen.clear()  # Same captions (or fewer): nothing encoded, the parts are not rewritten.
  _build_all(enc, CAPTIONS, path, 2)
  embedding_cache.build_part(enc, _share(CAPTIONS, 0, 2)[:1], path, 0, 2)
  assert enc.seen == [] and (os.stat(keys_file).st_ino, os.stat(keys_file).st_mtime_ns) == written

  # A new caption in part 0: only it is encoded; the old rows are copied.
  embedding_cache.build_part(enc, _share(CAPTIONS, 0, 2) + ['a blue triangle'], path, 0, 2)
  assert enc.seen == ['a blue triangle']
  cache = EmbeddingCache.load(path, 2)
  np.testing.assert_array_equal(cache.lookup(CAPTIONS)[0], ref[0])
  np.testing.assert_allclose(cache.lookup(['a blue triangle'])[2],
                             _direct(enc.enc, ['a blue triangle'])[2], rtol=1e-5, atol=1e-5)

  # Another number of processes: rows come from the parts of the earlier count, none encoded.
  # Its shares overlap ('a red circle' is in parts 0 and 2): either row is right.
  enc.seen.clear()
  _build_all(enc, CAPTIONS, path, 3)
  assert enc.seen == []
  three = EmbeddingCache.load(path, 3)
  assert three.num_parts == 3 and len(three.parts) == 3
  for got, want in zip(three.lookup(CAPTIONS), ref):
    np.testing.assert_array_equal(got, want)
  assert EmbeddingCache.load(path, 2).num_parts == 2  # The older count still loads by itself.

  # An interrupted build leaves a temporary folder: ignored by load, removed by the next build.
  os.makedirs(os.path.join(path, 'part-00001-of-00003.tmp-123'))
  EmbeddingCache.load(path, 3)
  embedding_cache.build_part(enc, _share(CAPTIONS, 1, 3), path, 1, 3)
  assert not os.path.exists(os.path.join(path, 'part-00001-of-00003.tmp-123'))


def test_stale_fingerprint_rebuilds_and_mixed_parts_raise(t5_folder, tmp_path):
  path = str(tmp_path / 'cache')
  enc8 = CountingEncoder(pretrained.load_pretrained(t5_folder, max_len=8))
  _build_all(enc8, CAPTIONS, path, 2)

  enc10 = CountingEncoder(pretrained.load_pretrained(t5_folder, max_len=10))
  fp10 = embedding_cache.encoder_fingerprint(enc10)
  with pytest.raises(ValueError, match='max_len: 8 -> 10'):
    EmbeddingCache.load(path, 2, fp10)
  embedding_cache.build_part(enc10, _share(CAPTIONS, 0, 2), path, 0, 2)
  assert sorted(enc10.seen) == sorted(set(_share(CAPTIONS, 0, 2)) | {''})  # All re-encoded.
  with pytest.raises(ValueError, match='part-00001-of-00002 was built by a different encoder'):
    EmbeddingCache.load(path, 2)  # Part 0 rebuilt, part 1 not yet: the parts disagree.
  embedding_cache.build_part(enc10, _share(CAPTIONS, 1, 2), path, 1, 2)
  assert EmbeddingCache.load(path, 2, fp10).parts[0].emb.shape[1] == 10

  write_tiny_t5(t5_folder, seed=1)  # Same folder and max_len, new weights.
  enc_new = CountingEncoder(pretrained.load_pretrained(t5_folder, max_len=10))
  assert embedding_cache.encoder_fingerprint(enc_new)['encoder'] != fp10['encoder']
  rebuilt = embedding_cache.build_cache(enc_new, CAPTIONS, path, batch_size=8)
  assert len(enc_new.seen) == len(set(CAPTIONS)) + 1  # Nothing copied from the old weights.
  np.testing.assert_allclose(rebuilt.lookup(['a red circle'])[2],
                             _direct(enc_new.enc, ['a red circle'])[2], rtol=1e-5, atol=1e-5)


def test_storage_dtypes_missing_parts_and_errors(t5_folder, tmp_path):
  enc = pretrained.load_pretrained(t5_folder, max_len=8)
  ref = _direct(enc, CAPTIONS)[0]
  for store, tol in [('bfloat16', 1e-2), ('float32', 1e-5)]:
    cache = embedding_cache.build_cache(enc, CAPTIONS, str(tmp_path / store), batch_size=3,
                                        params=enc.params, store_dtype=store)
    np.testing.assert_allclose(cache.lookup(CAPTIONS)[0], ref, rtol=tol,
                               atol=tol * np.abs(ref).max())
    reloaded = EmbeddingCache.load(str(tmp_path / store), 1)
    assert str(reloaded.parts[0].emb.dtype) == store
    np.testing.assert_array_equal(reloaded.lookup(CAPTIONS)[0], cache.lookup(CAPTIONS)[0])

  path = str(tmp_path / 'half')
  embedding_cache.build_part(enc, _share(CAPTIONS, 0, 2), path, 0, 2)
  with pytest.raises(FileNotFoundError, match=f'{path} lacks 1 of its 2 parts.*part-00001-of-00002'
                                              '.*build_part'):
    EmbeddingCache.load(path, 2)
  with pytest.raises(FileNotFoundError, match=r'num_parts=\[2\]'):
    EmbeddingCache.load(path, 4)
  with pytest.raises(FileNotFoundError, match='nothing'):
    EmbeddingCache.load(str(tmp_path / 'nothing'), 1)

  # A damaged part (arrays and index disagree) is reported by load and rebuilt by build_part.
  np.save(os.path.join(path, 'part-00000-of-00002', 'keys.npy'), np.zeros(1, np.uint64))
  embedding_cache.build_part(enc, _share(CAPTIONS, 1, 2), path, 1, 2)
  with pytest.raises(ValueError, match='part-00000-of-00002 is unreadable.*inconsistent'):
    EmbeddingCache.load(path, 2)
  embedding_cache.build_part(enc, _share(CAPTIONS, 0, 2), path, 0, 2)
  np.testing.assert_allclose(EmbeddingCache.load(path, 2).lookup(CAPTIONS)[0], ref, rtol=2e-3,
                             atol=2e-3 * np.abs(ref).max())

  with pytest.raises(ValueError, match='store_dtype'):
    embedding_cache.build_cache(enc, CAPTIONS, str(tmp_path / 'x'), store_dtype='int8')
  with pytest.raises(ValueError, match='must be str'):
    embedding_cache.build_cache(enc, ['ok', 3], str(tmp_path / 'y'))
  with pytest.raises(ValueError, match='no fingerprint'):
    embedding_cache.build_cache(object(), CAPTIONS, str(tmp_path / 'z'))
  with pytest.raises(ValueError, match='0 <= part < num_parts'):
    embedding_cache.build_part(enc, CAPTIONS, str(tmp_path / 'w'), 2, 2)


def test_caption_keys_are_stable_64_bit_hashes():
  keys = embedding_cache.caption_keys(['', 'a red circle', 'a red circle '])
  assert keys.dtype == np.uint64 and len(set(keys.tolist())) == 3
  want = int.from_bytes(hashlib.blake2b(b'a red circle', digest_size=8).digest(), 'little')
  assert int(keys[1]) == want
