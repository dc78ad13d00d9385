"""Word tokenizer and from-scratch text encoder: ids, padding, vocab files, masking."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from models import layers
from text import tokenizer as tok
from text.scratch import ScratchTextEncoder
from text.spec import TextSpec

CAPTIONS = ['a red square', 'a green triangle to the left of a white circle', '']


def test_shapes_vocab_covers_every_shapes_caption_word():
  assert len(set(tok.SHAPES_VOCAB)) == len(tok.SHAPES_VOCAB) == 16
  t = tok.WordTokenizer(tok.SHAPES_VOCAB, max_len=16)
  ids = t.encode(['a magenta triangle to the right of a cyan square',
                  'a yellow circle to the left of a blue square'])
  assert tok.UNK_ID not in ids
  assert t.vocab_size == 19 and t.pad_id == 0


def test_encode_bos_padding_and_round_trip():
  t = tok.WordTokenizer(tok.SHAPES_VOCAB, max_len=12)
  ids = t.encode(CAPTIONS)
  assert ids.dtype == np.int32 and ids.shape == (3, 12)
  assert np.all(ids[:, 0] == tok.BOS_ID)
  np.testing.assert_array_equal(ids[0, :4], [2, 3, 4, 11])  # [BOS] a red square.
  assert np.all(ids[0, 4:] == 0)
  np.testing.assert_array_equal(ids[2], [tok.BOS_ID] + [0] * 11)  # Null caption: one real token.
  assert t.decode(ids) == CAPTIONS


def test_normalisation_unknown_words_and_truncation():
  t = tok.WordTokenizer(tok.SHAPES_VOCAB, max_len=4)
  ids = t.encode(['A  RED, Dog!', 'a red square to the left'])
  np.testing.assert_array_equal(ids[0], [2, 3, 4, tok.UNK_ID])
  np.testing.assert_array_equal(ids[1], [2, 3, 4, 11])  # Truncated to max_len.
  assert t.decode(ids) == ['a red [UNK]', 'a red square']
  with pytest.raises(ValueError, match='sequence of captions'):
    t.encode('a red square')


def test_build_vocab_orders_by_frequency_and_respects_min_count():
  captions = ['A cat.', 'a dog', 'a cat', 'the bird']
  assert tok.build_vocab(captions) == ['a', 'cat', 'bird', 'dog', 'the']
  assert tok.build_vocab(captions, min_count=2) == ['a', 'cat']
  assert tok.build_vocab(captions, max_size=3) == ['a', 'cat', 'bird']


def test_vocab_file_round_trip(tmp_path):
  t = tok.WordTokenizer(tok.build_vocab(CAPTIONS), max_len=8)
  path = tmp_path / 'vocab.txt'
  t.save(path)
  lines = path.read_text().splitlines()
  assert lines[:3] == ['[PAD]', '[UNK]', '[BOS]'] and len(lines) == t.vocab_size
  loaded = tok.WordTokenizer.load(path, max_len=8)
  np.testing.assert_array_equal(loaded.encode(CAPTIONS), t.encode(CAPTIONS))
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    tok.load_vocab(tmp_path / 'missing.txt')
  (tmp_path / 'bad.txt').write_text('red\nblue\n')
  with pytest.raises(ValueError, match='bad.txt'):
    tok.load_vocab(tmp_path / 'bad.txt')


def test_bad_tokenizer_arguments():
  with pytest.raises(ValueError, match='max_len'):
    tok.WordTokenizer(tok.SHAPES_VOCAB, max_len=0)
  with pytest.raises(ValueError, match='duplicate'):
    tok.WordTokenizer(['red', 'red'], max_len=4)
  with pytest.raises(ValueError, match='special'):
    tok.WordTokenizer(['[PAD]', 'red'], max_len=4)


TEXT_CFG = dict(vocab_size=19, width=16, depth=2, num_heads=4, max_len=8, dtype='float32',
                param_dtype='float32')


def _encoder(cfg):
  return ScratchTextEncoder(**{**cfg, 'dtype': layers.resolve_dtype(cfg['dtype'], 'text.dtype'),
                               'param_dtype': layers.resolve_dtype(cfg['param_dtype'], 'x')})


@pytest.fixture(scope='module')
def encoder_and_vars():
  encoder = _encoder(TEXT_CFG)
  ids = jnp.zeros((2, 8), jnp.int32)
  return encoder, jax.jit(encoder.init)(jax.random.key(0), ids)


def test_encoder_shapes_and_mask_from_padding(encoder_and_vars):
  encoder, variables = encoder_and_vars
  ids = tok.WordTokenizer(tok.SHAPES_VOCAB, max_len=8).encode(CAPTIONS)
  emb, mask, pooled = jax.jit(encoder.apply)(variables, jnp.asarray(ids))
  assert emb.shape == (3, 8, 16) and emb.dtype == jnp.float32
  assert pooled.shape == (3, 16) and pooled.dtype == jnp.float32
  np.testing.assert_array_equal(mask, ids != 0)
  assert np.all(np.asarray(emb)[~np.asarray(mask)] == 0.0)
  m = np.asarray(mask)[..., None]
  np.testing.assert_allclose(pooled, (np.asarray(emb) * m).sum(1) / m.sum(1), rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(emb)) and float(jnp.abs(pooled[0] - pooled[1]).max()) > 1e-3


def test_padding_does_not_influence_real_tokens(encoder_and_vars):
  encoder, variables = encoder_and_vars
  ids = jnp.asarray([[2, 3, 4, 11, 0, 0, 0, 0]], jnp.int32)
  emb_a, _, pooled_a = jax.jit(encoder.apply)(variables, ids)
  # The same real tokens in a shorter array: padding length must not matter.
  emb_b, _, pooled_b = jax.jit(encoder.apply)(variables, ids[:, :5])
  np.testing.assert_allclose(emb_a[:, :5], emb_b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(pooled_a, pooled_b, rtol=1e-6, atol=1e-6)
  # Changing the padding embedding row (what padded positions would carry) changes nothing.
  params = nn.unbox(variables)['params']
  table = params['token_embed']['embedding'].at[0].add(10.0)
  changed = {'params': {**params, 'token_embed': {'embedding': table}}}
  emb_c, _, pooled_c = jax.jit(encoder.apply)(changed, ids)
  np.testing.assert_array_equal(np.asarray(emb_a), np.asarray(emb_c))
  np.testing.assert_array_equal(np.asarray(pooled_a), np.asarray(pooled_c))
  # ...while changing a real token's row does.
  table = params['token_embed']['embedding'].at[3].add(jnp.linspace(-1.0, 1.0, 16))
  emb_d, _, _ = jax.jit(encoder.apply)({'params': {**params, 'token_embed': {'embedding': table}}}, ids)
  assert float(jnp.abs(emb_a - emb_d).max()) > 1e-3


def test_encoder_logical_axes(encoder_and_vars):
  _, variables = encoder_and_vars
  leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) and len(v.names) == v.value.ndim for v in leaves)
  specs = nn.get_partition_spec(variables)['params']
  assert tuple(specs['token_embed']['embedding']) == ('vocab', 'text_embed')
  block = specs['block_0']
  assert tuple(block['attn']['query']) == ('text_embed', 'heads', 'kv')
  assert tuple(block['mlp_in']['kernel']) == ('text_embed', 'mlp')
  assert tuple(block['mlp_out']['kernel']) == ('mlp', 'text_embed')
  assert tuple(block['norm_attn']['scale']) == ('norm',)


@pytest.mark.parametrize('overrides, field', [
    (dict(num_heads=3), 'text.num_heads'),
    (dict(width=0), 'text.width'),
    (dict(dtype='int8'), 'text.dtype'),
    (dict(encoder='clip'), 'text.encoder'),
    (dict(finetune=True), 'text.finetune'),  # A scratch encoder always trains.
    (dict(finetune=1), 'text.finetune'),
])
def test_bad_text_section_is_refused_naming_the_field(overrides, field):
  section = dict(base.get_config().text)
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    TextSpec(**{**section, **overrides})


def test_ids_longer_than_max_len_are_refused_naming_it():
  encoder = _encoder({**TEXT_CFG, 'max_len': 4})
  with pytest.raises(ValueError, match=r'text\.max_len'):
    jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
