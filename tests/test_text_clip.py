"""CLIP text encoder and tokenizer: a random diffusers-layout folder vs an independent numpy CLIP.

No torch here; tests/test_text_clip_reference.py compares with transformers where it is installed.
"""
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy.special import erf

from text import clip, clip_tokenizer, pretrained
from tools.random_clip import write_random_clip

CAPTIONS = ['a photo of a cat', 'Two  DOGS, 3 birds & café!', 'x ' * 100, '']


def make(root, name, **kwargs):
  """Writes ROOT/NAME/{text_encoder,tokenizer}; returns (text_encoder dir, config dict)."""
  te = os.path.join(root, name, 'text_encoder')
  cfg = write_random_clip(te, os.path.join(root, name, 'tokenizer'), **kwargs)
  return te, cfg


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('clip'))
  return {'sd1': make(root, 'sd1', layers=3),  # quick_gelu, eos_token_id 2, pads <|endoftext|>
          'sd2': make(root, 'sd2', layers=3, hidden_act='gelu', pad_token='!', eos_token_id=None,
                      seed=1)}


@pytest.fixture(scope='module')
def sd1(folders):
  return pretrained.load_pretrained(folders['sd1'][0], max_len=77)


@pytest.fixture(scope='module')
def sd2(folders):
  return clip.load_clip(folders['sd2'][0])


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_bos_eos_padding_and_cleaning(sd1, sd2):
  tok = sd1.tokenizer
  # 2 x 256 byte characters, 314 merges, BOS, EOS.
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (826, 827, 827)
  ids = sd1.tokenize(CAPTIONS)
  assert ids.shape == (4, 77) and ids.dtype == np.int32
  n = len(tok.ids(CAPTIONS[0]))
  assert n == 5 and ids[0, 0] == tok.bos_id and ids[0, n + 1] == tok.eos_id
  assert (ids[0, n + 2:] == tok.pad_id).all()
  assert list(ids[3, :3]) == [tok.bos_id, tok.eos_id, tok.pad_id]  # "" -> BOS EOS pad...
  # Lower-casing and whitespace: case and runs of spaces, tabs and newlines do not matter.
  assert tok.tokens('A  Photo\tof\n CAT ') == tok.tokens('a photo of cat') == [
      'a</w>', 'photo</w>', 'of</w>', 'cat</w>']
  # Punctuation runs and each digit are words of their own; contractions split off.
  assert tok.tokens('cat,dog!?') == ['cat</w>', ',</w>', 'dog</w>', '!', '?</w>']
  assert tok.tokens('123') == ['1</w>', '2</w>', '3</w>']
  assert tok.tokens("it's")[-2:] == ["'", 's</w>']
  # Non-ASCII goes through UTF-8 bytes: 'é' is two byte characters.
  assert tok.tokens('café') == ['c', 'a', 'f', 'Ã', '©</w>']
  assert tok.tokens('中文') == ['ä', '¸', 'Ń</w>', 'æ', 'ĸ', 'ĩ</w>']  # CJK: one word each.
  # Control and format characters, NUL and U+FFFD are dropped (transformers' BasicTokenizer).
  assert tok.tokens('ph\u200bo\x00to\ufffd') == ['photo</w>']
  # Every word round-trips through the byte characters.
  decode = {v: k for k, v in clip_tokenizer.bytes_to_unicode().items()}
  text = 'Ünïcödé ÉLAN — naïve'
  joined = ''.join(tok.tokens(text)).replace('</w>', ' ')
  assert bytes(decode[c] for c in joined.replace(' ', '')).decode() == 'ünïcödéélan—naïve'
  # SD 2.x pads with '!' (id 0), which is then also cut out of the text as a token of its own.
  assert (sd2.pad_id, sd2.tokenizer.eos_id) == (0, 827)
  assert sd2.tokenize(['wow!'])[0, 4:8].tolist() == [0, 827, 0, 0]
  assert sd1.tokenize(['wow!'])[0, 4:7].tolist() == [256, 827, 827]  # '!</w>' in SD 1.x.


def test_tokenizer_truncation_keeps_eos_and_caches(folders):
  tok = clip_tokenizer.load_tokenizer(os.path.join(os.path.dirname(folders['sd1'][0]),
                                                   'tokenizer'), max_len=8)
  ids = tok.encode(['a photo of a cat on the left of a big red house'])
  assert ids.shape == (1, 8) and ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
  assert ids[0, 1:-1].tolist() == tok.ids('a photo of a cat on')
  assert 'photo' in tok._cache  # pylint: disable=protected-access  (BPE is cached per word)
  with pytest.raises(ValueError, match='single str'):
    tok.encode('a cat')
  with pytest.raises(ValueError, match='max_len'):
    clip_tokenizer.load_tokenizer(os.path.join(os.path.dirname(folders['sd1'][0]), 'tokenizer'), 1)


# ------------------------------------------------------------------ independent numpy reference


def ref_clip(w, cfg, ids, clip_skip=0):
  """transformers' CLIPTextModel forward in float64 numpy from the tensors: (hidden, pooled)."""
  g = lambda n: w['text_model.' + n].astype(np.float64)
  b, length = ids.shape
  heads, d = cfg['num_attention_heads'], cfg['hidden_size']
  dh = d // heads

  def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg['layer_norm_eps']) * g(p + '.weight') + g(p + '.bias')

  def lin(x, p):
    return x @ g(p + '.weight').T + g(p + '.bias')

  def act(x):
    if cfg['hidden_act'] == 'quick_gelu':
      return x / (1 + np.exp(-1.702 * x))
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))

  x = g('embeddings.token_embedding.weight')[ids] + g('embeddings.position_embedding.weight')[
      :length][None]
  states = [x]
  causal = np.tril(np.ones((length, length), bool))
  for i in range(cfg['num_hidden_layers']):
    p = f'encoder.layers.{i}'
    h = ln(x, f'{p}.layer_norm1')
    split = lambda t: t.reshape(b, length, heads, dh).transpose(0, 2, 1, 3)
    q, k, v = (split(lin(h, f'{p}.self_attn.{n}_proj')) for n in 'qkv')
    s = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh), -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + lin((a @ v).transpose(0, 2, 1, 3).reshape(b, length, d), f'{p}.self_attn.out_proj')
    x = x + lin(act(lin(ln(x, f'{p}.layer_norm2'), f'{p}.mlp.fc1')), f'{p}.mlp.fc2')
    states.append(x)
  last = ln(x, 'final_layer_norm')
  eos = ids.argmax(-1) if cfg['eos_token_id'] == 2 else (ids == cfg['eos_token_id']).argmax(-1)
  return ln(states[-1 - clip_skip], 'final_layer_norm'), last[np.arange(b), eos]


@pytest.mark.parametrize('name', ['sd1', 'sd2'])
def test_encode_matches_numpy_reference(folders, sd1, sd2, name):
  enc = {'sd1': sd1, 'sd2': sd2}[name]
  te, cfg = folders[name]
  assert (enc.arch, enc.dim, enc.max_len, enc.path) == ('clip', 32, 77, te)
  assert isinstance(enc, pretrained.PretrainedEncoder) and 'clip_skip=0' in enc.fingerprint
  ids = enc.tokenize(CAPTIONS)
  emb, mask, pooled = jax.jit(enc.encode)(enc.params, ids)
  assert emb.shape == (4, 77, 32) and emb.dtype == jnp.float32 and pooled.shape == (4, 32)
  assert mask.dtype == jnp.bool_ and bool(mask.all())  # SD attends to every position.
  ref, ref_pooled = ref_clip(load_file(os.path.join(te, 'model.safetensors')), cfg, ids)
  assert np.abs(np.asarray(emb) - ref).max() < 1e-4
  assert np.abs(np.asarray(pooled) - ref_pooled).max() < 1e-4
  assert np.abs(ref[:, -1]).max() > 0.5  # Padding positions carry real states, not zeros.
  # pooled is the (final) hidden state at the end token.
  eos = [int(np.argmax(row == enc.tokenizer.eos_id)) for row in ids]
  np.testing.assert_allclose(np.asarray(pooled), np.asarray(emb)[np.arange(4), eos], atol=1e-6)


def test_causal_mask(sd1):
  ids = sd1.tokenize(['a photo of a cat on the left', 'a photo of a dog on the left'])
  emb = np.asarray(jax.jit(sd1.encode)(sd1.params, ids)[0])
  change = int(np.argmax(ids[0] != ids[1]))
  assert change == 5
  np.testing.assert_allclose(emb[0, :change], emb[1, :change], atol=1e-6)
  assert np.abs(emb[0, change:] - emb[1, change:]).max() > 1e-2


def test_clip_skip(folders, sd2):
  te, cfg = folders['sd2']
  skip1 = pretrained.load_pretrained(te, max_len=77, clip_skip=1)
  assert skip1.fingerprint != sd2.fingerprint and 'clip_skip=1' in skip1.fingerprint
  ids = sd2.tokenize(CAPTIONS[:2])
  emb0, _, pooled0 = jax.jit(sd2.encode)(sd2.params, ids)
  emb1, _, pooled1 = jax.jit(skip1.encode)(skip1.params, ids)
  ref1, _ = ref_clip(load_file(os.path.join(te, 'model.safetensors')), cfg, ids, clip_skip=1)
  assert np.abs(np.asarray(emb1) - ref1).max() < 1e-4
  assert np.abs(np.asarray(emb1) - np.asarray(emb0)).max() > 0.1
  np.testing.assert_allclose(np.asarray(pooled1), np.asarray(pooled0), atol=1e-6)  # Final layer.
  # clip_skip=0 is the final layer: the output at the pooled position is the pooled output.
  eos = [int(np.argmax(row == sd2.tokenizer.eos_id)) for row in ids]
  np.testing.assert_allclose(np.asarray(emb0)[np.arange(2), eos], np.asarray(pooled0), atol=1e-6)
  with pytest.raises(ValueError, match='clip_skip'):
    clip.load_clip(te, clip_skip=4)


def test_bfloat16_compute_close_to_float32(folders, sd1):
  e16 = clip.load_clip(folders['sd1'][0], dtype='bfloat16', max_len=16)
  assert e16.module.dtype == jnp.bfloat16 and e16.fingerprint != sd1.fingerprint
  ids = e16.tokenize(CAPTIONS)
  emb, _, pooled = jax.jit(e16.encode)(e16.params, ids)
  assert emb.dtype == jnp.float32 and pooled.dtype == jnp.float32
  ref, ref_pooled = ref_clip(load_file(os.path.join(folders['sd1'][0], 'model.safetensors')),
                             folders['sd1'][1], ids)
  assert np.abs(np.asarray(emb) - ref).max() < 0.05 * np.abs(ref).max()
  assert np.abs(np.asarray(pooled) - ref_pooled).max() < 0.05 * np.abs(ref_pooled).max()


def test_param_logical_axes(sd1):
  ids = jax.ShapeDtypeStruct((1, 77), jnp.int32)
  abstract = jax.eval_shape(lambda i: sd1.module.init(jax.random.key(0), i, i != 0), ids)
  axes = nn.get_partition_spec(abstract['params'])
  assert tuple(axes['token_embedding']['embedding']) == ('vocab', 'text_embed')
  assert tuple(axes['position_embedding']['embedding']) == (None, 'text_embed')
  layer = axes['layers_2']
  for n in ('q_proj', 'k_proj', 'v_proj'):
    assert tuple(layer[n]['kernel']) == ('text_embed', 'heads', 'kv')
    assert tuple(layer[n]['bias']) == ('heads', 'kv')
  assert tuple(layer['out_proj']['kernel']) == ('heads', 'kv', 'text_embed')
  assert tuple(layer['fc1']['kernel']) == ('text_embed', 'mlp')
  assert tuple(layer['fc2']['kernel']) == ('mlp', 'text_embed')
  assert tuple(layer['layer_norm1']['scale']) == tuple(axes['final_layer_norm']['bias']) == (
      'norm',)


def test_sharded_weights_and_tokenizer_in_the_same_folder(tmp_path, folders, sd1):
  te = str(tmp_path / 'enc')
  shutil.copytree(os.path.join(os.path.dirname(folders['sd1'][0]), 'tokenizer'), te)
  shutil.copy(os.path.join(folders['sd1'][0], 'config.json'), te)
  tensors = load_file(os.path.join(folders['sd1'][0], 'model.safetensors'))
  names = sorted(tensors)
  index = {'metadata': {}, 'weight_map': {}}
  for k, part in enumerate((names[::2], names[1::2])):
    shard = f'model-0000{k + 1}-of-00002.safetensors'
    save_file({n: tensors[n] for n in part}, os.path.join(te, shard))
    index['weight_map'].update({n: shard for n in part})
  with open(os.path.join(te, 'model.safetensors.index.json'), 'w') as f:
    json.dump(index, f)
  enc = clip.load_clip(te)  # No ../tokenizer: the tokenizer files sit next to the weights.
  jax.tree.map(np.testing.assert_array_equal, enc.params, sd1.params)
  assert enc.tokenize(CAPTIONS).tolist() == sd1.tokenize(CAPTIONS).tolist()


# ---------------------------------------------------------------------------------- errors


def copy_pipeline(folders, tmp_path, name='sd1'):
  root = str(tmp_path / 'pipe')
  shutil.copytree(os.path.dirname(folders[name][0]), root)
  return os.path.join(root, 'text_encoder'), os.path.join(root, 'tokenizer')


@pytest.mark.parametrize('missing', ['merges.txt', 'vocab.json'])
def test_missing_tokenizer_file(folders, tmp_path, missing):
  te, tok = copy_pipeline(folders, tmp_path)
  os.remove(os.path.join(tok, missing))
  with pytest.raises(FileNotFoundError, match=f'{missing} not found: a diffusers tokenizer/'):
    clip_tokenizer.load_tokenizer(tok)
  if missing == 'vocab.json':  # The encoder then finds no tokenizer at all.
    with pytest.raises(FileNotFoundError, match='no CLIP tokenizer'):
      clip.load_clip(te)
  else:
    with pytest.raises(FileNotFoundError, match='merges.txt'):
      clip.load_clip(te)


def test_wrong_and_missing_tensors(folders, tmp_path):
  te, _ = copy_pipeline(folders, tmp_path)
  path = os.path.join(te, 'model.safetensors')
  tensors = load_file(path)
  name = 'text_model.encoder.layers.1.mlp.fc1.weight'
  save_file(dict(tensors, **{name: tensors[name][:10]}), path)
  with pytest.raises(ValueError, match=r"'text_model.encoder.layers.1.mlp.fc1.weight' has shape "
                     r'\(10, 32\) but config.json implies \(64, 32\)'):
    clip.load_clip(te)
  save_file({k: v for k, v in tensors.items() if 'final_layer_norm.bias' not in k}, path)
  with pytest.raises(ValueError, match="tensor 'final_layer_norm.bias' is missing"):
    clip.load_clip(te)
  # Without the 'text_model.' prefix the same tensors load.
  save_file({k.removeprefix('text_model.'): v for k, v in tensors.items()}, path)
  assert clip.load_clip(te, max_len=8).dim == 32


def test_bad_config_and_pickled_weights(folders, tmp_path):
  te, _ = copy_pipeline(folders, tmp_path)
  with open(os.path.join(te, 'config.json')) as f:
    cfg = json.load(f)
  with open(os.path.join(te, 'config.json'), 'w') as f:
    json.dump(dict(cfg, hidden_act='relu'), f)
  with pytest.raises(ValueError, match=r"config.json: hidden_act='relu' is not supported"):
    pretrained.load_pretrained(te, max_len=77)
  with open(os.path.join(te, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match='max_position_embeddings=77'):
    clip.load_clip(te, max_len=78)
  os.rename(os.path.join(te, 'model.safetensors'), os.path.join(te, 'pytorch_model.bin'))
  with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin.*safe_serialization=True"):
    clip.load_clip(te)


def test_a_fine_tuned_clip_trains_from_its_weights_split_over_fsdp(folders):
  """text.finetune: the folder's weights are the trainable 'text' parameters, and they, Adam's
  moments and the EMA split over 'fsdp' as the frozen ones do."""
  import optax
  from configs import base
  from runtime import sharding, state
  from text import encoders
  from text.spec import TextSpec
  section = dict(base.get_config().text, encoder='pretrained', pretrained_path=folders['sd1'][0],
                 max_len=77, finetune=True)
  encoder = encoders.build(TextSpec(**section))
  assert encoder.trainable
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2, 1), sharding.MESH_AXES)
  unet = nn.Dense(4)  # Stands in for the denoiser: only the text part matters here.
  unet.init = lambda rngs, x, *a, **k: {'params': {'kernel': jnp.zeros((3, 4))}}
  abstract, shardings, init = state.create_sharded_state(
      mesh, base.get_config().mesh.logical_axis_rules, unet=unet, text_encoder=encoder,
      tx=optax.adam(1e-3), input_shape=(4, 4, 3),
      pretrained=lambda: {'text': nn.meta.unbox(encoder.init(None))})
  embedding = ('token_embedding', 'embedding')
  for tree in (shardings.params, shardings.ema_params, shardings.opt_state[0].mu):
    assert tree['text'][embedding[0]][embedding[1]].spec == jax.sharding.PartitionSpec(None, 'fsdp')
  started = init(jax.random.key(0))
  folder_values = pretrained.load_pretrained(folders['sd1'][0], max_len=77).params
  np.testing.assert_array_equal(
      np.asarray(started.params['text'][embedding[0]][embedding[1]]),
      np.asarray(folder_values[embedding[0]][embedding[1]]))
  assert abstract.params['text'][embedding[0]][embedding[1]].shape == \
      folder_values[embedding[0]][embedding[1]].shape
