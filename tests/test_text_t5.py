"""T5 encoder: a tiny random HF-layout checkpoint written on the fly vs an independent numpy T5."""
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
import tokenizers

from text import pretrained
from text import t5

WORDS = ('a red blue green small big circle square triangle on the left right of above below '
         'and with two three').split()
TINY = dict(vocab_size=32, d_model=16, d_kv=4, num_heads=3, d_ff=24, num_layers=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=12,
            layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1)


def write_tiny_t5(folder, *, feed_forward_proj='gated-gelu', seed=0, embed_name='shared.weight',
                  with_decoder=True, overrides=None):
  """Writes config.json, model.safetensors (random, HF T5 names) and a WordLevel tokenizer.json."""
  os.makedirs(folder, exist_ok=True)
  cfg = dict(TINY, model_type='t5', feed_forward_proj=feed_forward_proj)
  cfg.update(overrides or {})
  rng = np.random.default_rng(seed)
  d, inner, f = cfg['d_model'], cfg['num_heads'] * cfg['d_kv'], cfg['d_ff']

  def rand(*shape, scale=0.3):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  w = {embed_name: rand(cfg['vocab_size'], d, scale=1.0),
       'encoder.final_layer_norm.weight': 1 + rand(d, scale=0.1),
       'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight':
           rand(cfg['relative_attention_num_buckets'], cfg['num_heads'], scale=1.0)}
  for i in range(cfg['num_layers']):
    a, m = f'encoder.block.{i}.layer.0', f'encoder.block.{i}.layer.1'
    w[f'{a}.layer_norm.weight'] = 1 + rand(d, scale=0.1)
    for n in 'qkv':
      w[f'{a}.SelfAttention.{n}.weight'] = rand(inner, d)
    w[f'{a}.SelfAttention.o.weight'] = rand(d, inner)
    w[f'{m}.layer_norm.weight'] = 1 + rand(d, scale=0.1)
    names = ('wi_0', 'wi_1') if feed_forward_proj.startswith('gated') else ('wi',)
    for n in names:
      w[f'{m}.DenseReluDense.{n}.weight'] = rand(f, d)
    w[f'{m}.DenseReluDense.wo.weight'] = rand(d, f)
  if with_decoder:  # Full T5 checkpoints carry a decoder, which the encoder loader must ignore.
    w['decoder.block.0.layer.0.SelfAttention.q.weight'] = rand(inner, d)
  save_file(w, os.path.join(folder, 'model.safetensors'))
  with open(os.path.join(folder, 'config.json'), 'w') as fh:
    json.dump(cfg, fh)
  vocab = {'<pad>': 0, '</s>': 1, '<unk>': 2, **{wd: i + 3 for i, wd in enumerate(WORDS)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single='$A </s>', special_tokens=[('</s>', 1)])
  tok.save(os.path.join(folder, 'tokenizer.json'))
  return w, cfg


# ----------------------------------------------------------- independent numpy reference (HF T5)


def ref_bucket(rel, num_buckets, max_distance):
  """Hugging Face T5Attention._relative_position_bucket, bidirectional, rewritten in numpy."""
  num_buckets //= 2
  out = (rel > 0).astype(np.int64) * num_buckets
  rel = np.abs(rel)
  max_exact = num_buckets // 2
  with np.errstate(divide='ignore', invalid='ignore'):
    large = max_exact + (np.log(rel.astype(np.float32) / max_exact) /
                         np.float32(math.log(max_distance / max_exact)) *
                         (num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return out + np.where(rel < max_exact, rel, large)


def ref_t5_encoder(w, cfg, ids):
  """T5 encoder forward in float64 numpy straight from the HF tensors."""
  b, length = ids.shape
  heads, dk, eps = cfg['num_heads'], cfg['d_kv'], cfg['layer_norm_epsilon']
  mask = ids != cfg['pad_token_id']
  g = lambda n: w[n].astype(np.float64)

  def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale

  def act(x):
    if cfg['feed_forward_proj'] == 'relu':
      return np.maximum(x, 0)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  emb = w.get('shared.weight', w.get('encoder.embed_tokens.weight')).astype(np.float64)
  x = emb[ids]
  pos = np.arange(length)
  bucket = ref_bucket(pos[None, :] - pos[:, None], cfg['relative_attention_num_buckets'],
                      cfg['relative_attention_max_distance'])
  bias = g('encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight')[bucket]
  bias = bias.transpose(2, 0, 1)[None]  # [1, H, q, k]
  for i in range(cfg['num_layers']):
    a, m = f'encoder.block.{i}.layer.0', f'encoder.block.{i}.layer.1'
    h = rms(x, g(f'{a}.layer_norm.weight'))
    split = lambda t: t.reshape(b, length, heads, dk).transpose(0, 2, 1, 3)
    q, k, v = (split(h @ g(f'{a}.SelfAttention.{n}.weight').T) for n in 'qkv')
    s = q @ k.transpose(0, 1, 3, 2) + bias + np.where(mask, 0.0, -1e30)[:, None, None, :]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ctx = (p @ v).transpose(0, 2, 1, 3).reshape(b, length, heads * dk)
    x = x + ctx @ g(f'{a}.SelfAttention.o.weight').T
    h = rms(x, g(f'{m}.layer_norm.weight'))
    if cfg['feed_forward_proj'].startswith('gated'):
      u = act(h @ g(f'{m}.DenseReluDense.wi_0.weight').T) * (
          h @ g(f'{m}.DenseReluDense.wi_1.weight').T)
    else:
      u = act(h @ g(f'{m}.DenseReluDense.wi.weight').T)
    x = x + u @ g(f'{m}.DenseReluDense.wo.weight').T
  return rms(x, g('encoder.final_layer_norm.weight')), mask


CAPTIONS = ['a red circle', 'two big blue squares on the left of a small green triangle',
            'a circle above three triangles and two squares with a red circle below the big one '
            'on the right of a green square',
            '']


@pytest.mark.parametrize('ffn,embed_name', [('gated-gelu', 'shared.weight'),
                                            ('relu', 'encoder.embed_tokens.weight')])
def test_tiny_t5_matches_numpy_reference(tmp_path, ffn, embed_name):
  w, cfg = write_tiny_t5(str(tmp_path), feed_forward_proj=ffn, embed_name=embed_name)
  max_len = 20  # > relative_attention_max_distance: exercises log buckets and the clamp.
  enc = pretrained.load_pretrained(str(tmp_path), max_len=max_len)
  assert (enc.arch, enc.dim, enc.pad_id) == ('t5', 16, 0)
  ids = enc.tokenize(CAPTIONS)
  assert ids.shape == (4, max_len) and ids.dtype == np.int32
  assert ids[3, 0] == 1 and (ids[3, 1:] == 0).all()  # "" -> just </s>, then padding.
  assert ids[2, -1] == 1  # Truncated caption still ends with </s>.
  emb, mask, pooled = jax.jit(enc.encode)(enc.params, ids)
  ref, ref_mask = ref_t5_encoder(w, cfg, ids)
  np.testing.assert_array_equal(np.asarray(mask), ref_mask)
  diff = np.abs(np.asarray(emb) - np.where(ref_mask[..., None], ref, 0)).max()
  ref_pooled = (ref * ref_mask[..., None]).sum(1) / ref_mask.sum(1, keepdims=True)
  pooled_diff = np.abs(np.asarray(pooled) - ref_pooled).max()
  print(f'T5 {ffn}: max abs diff tokens {diff:.2e}, pooled {pooled_diff:.2e}')
  assert diff <= 1e-4 and pooled_diff <= 1e-4
  assert np.abs(ref).max() > 0.5  # The comparison is not between near-zero tensors.


def param_axes(enc):
  """Logical axis names of the encoder's parameters, from its module's abstract init."""
  ids = jax.ShapeDtypeStruct((1, enc.max_len), jnp.int32)
  abstract = jax.eval_shape(lambda i: enc.module.init(jax.random.key(0), i, i != 0), ids)
  return nn.get_partition_spec(abstract['params'])


def test_relative_position_bucket_matches_reference():
  rel = np.arange(-300, 301)
  for buckets, dist in [(32, 128), (8, 12), (16, 64)]:
    np.testing.assert_array_equal(np.asarray(t5.relative_position_bucket(rel, buckets, dist)),
                                  ref_bucket(rel, buckets, dist))
  b = np.asarray(t5.relative_position_bucket(rel, 32, 128))
  assert b[rel == 0] == 0 and b[rel == 3] == 16 + 3 and b[rel == -3] == 3  # Exact region.
  assert b[rel == 300] == 31 and b[rel == -300] == 15  # Beyond max_distance: last bucket.


@pytest.mark.full  # A dtype variant (the float32 encoder: the tests above).
def test_t5_bfloat16_compute_close_to_float32(tmp_path):
  write_tiny_t5(str(tmp_path))
  e32 = pretrained.load_pretrained(str(tmp_path), max_len=8)
  e16 = pretrained.load_pretrained(str(tmp_path), max_len=8, dtype='bfloat16')
  ids = e32.tokenize(CAPTIONS)
  a = np.asarray(e32.encode(e32.params, ids)[0])
  b = e16.encode(e16.params, ids)[0]
  assert b.dtype == jnp.float32
  assert np.abs(a - np.asarray(b)).max() < 0.1 * np.abs(a).max()
  assert e16.module.dtype == jnp.bfloat16


def test_t5_param_axes_and_unsupported_ffn(tmp_path):
  write_tiny_t5(str(tmp_path))
  enc = pretrained.load_pretrained(str(tmp_path), max_len=8)
  axes = param_axes(enc)
  assert tuple(axes['token_embed']['embedding']) == ('vocab', 'text_embed')
  assert tuple(axes['block_0']['query']['kernel']) == ('text_embed', 'heads', 'kv')
  assert tuple(axes['block_1']['mlp_gate']['kernel']) == ('text_embed', 'mlp')
  assert tuple(axes['final_norm']['scale']) == ('norm',)
  write_tiny_t5(str(tmp_path / 'bad'), overrides={'feed_forward_proj': 'gated-swiglu-x'})
  with pytest.raises(ValueError, match='feed_forward_proj'):
    pretrained.load_pretrained(str(tmp_path / 'bad'), max_len=8)
