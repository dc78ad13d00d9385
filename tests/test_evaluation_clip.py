"""CLIP image/text embeddings, CLIP score and CMMD: a random CLIPModel folder vs numpy and closed forms.

No torch here; tests/test_evaluation_clip_reference.py compares with transformers and torchmetrics
where they are installed.
"""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy.special import erf

from evaluation import clip_metrics, clip_model
from tools.random_clip_model import write_random_clip_model

PROMPTS = ['a red circle', 'two dogs on a beach', 'a blue square left of a tree', '']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('clip_model') / 'b16')
  write_random_clip_model(out)  # 32 px, 8 px patches (a 4 x 4 grid, as ViT-B/16's 14 x 14).
  return out


@pytest.fixture(scope='module')
def model(folder):
  return clip_model.load_clip_model(folder)


def images(n, h, w, seed=0):
  """Smooth random RGB images in [0, 1] (low-frequency noise, so resizing keeps them)."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(size=(n, 4, 5, 3))
  yy, xx = np.linspace(0, 3, h), np.linspace(0, 4, w)
  y0, x0 = np.minimum(yy.astype(int), 2), np.minimum(xx.astype(int), 3)
  fy, fx = (yy - y0)[None, :, None, None], (xx - x0)[None, None, :, None]
  c = lambda dy, dx: coarse[:, y0 + dy][:, :, x0 + dx]
  return ((1 - fy) * ((1 - fx) * c(0, 0) + fx * c(0, 1)) +
          fy * ((1 - fx) * c(1, 0) + fx * c(1, 1))).astype(np.float32)


# ------------------------------------------------------------------------------ the model


def numpy_image_features(folder, pixels):
  """An independent numpy CLIPVisionTransformer + visual_projection from the safetensors."""
  w = load_file(os.path.join(folder, 'model.safetensors'))
  with open(os.path.join(folder, 'config.json')) as f:
    cfg = json.load(f)['vision_config']
  v = lambda name: w['vision_model.' + name].astype(np.float64)
  act = {'quick_gelu': lambda x: x / (1 + np.exp(-1.702 * x)),
         'gelu': lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))}[cfg['hidden_act']]

  def norm(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * v(name + '.weight') + v(name + '.bias')

  def linear(x, name):
    return x @ v(name + '.weight').T + v(name + '.bias')

  n, s, _, _ = pixels.shape
  p, d, heads = cfg['patch_size'], cfg['hidden_size'], cfg['num_attention_heads']
  g = s // p
  patches = pixels.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(n, g * g, -1)
  x = patches @ v('embeddings.patch_embedding.weight').reshape(d, -1).T
  x = np.concatenate([np.broadcast_to(v('embeddings.class_embedding'), (n, 1, d)), x], 1)
  x = norm(x + v('embeddings.position_embedding.weight'), 'pre_layrnorm')
  for i in range(cfg['num_hidden_layers']):
    pre = f'encoder.layers.{i}'
    h = norm(x, f'{pre}.layer_norm1')
    q, k, val = (linear(h, f'{pre}.self_attn.{t}_proj').reshape(n, -1, heads, d // heads)
                 for t in 'qkv')
    logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d // heads)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + linear(np.einsum('bhqk,bkhd->bqhd', probs, val).reshape(n, -1, d),
                   f'{pre}.self_attn.out_proj')
    x = x + linear(act(linear(norm(x, f'{pre}.layer_norm2'), f'{pre}.mlp.fc1')),
                   f'{pre}.mlp.fc2')
  return norm(x[:, 0], 'post_layernorm') @ w['visual_projection.weight'].T.astype(np.float64)


def test_loads_the_random_folder_with_shapes_and_a_fingerprint(model, folder):
  assert model.dim == 24 and model.processing.crop == (32, 32)
  assert set(model.params) == {'text_model', 'vision_model', 'visual_projection',
                               'text_projection'}
  assert model.params['vision_model']['patch_embedding']['kernel'].shape == (8, 8, 3, 48)
  assert model.fingerprint.startswith(f'clip_model:{folder}:')
  ids = model.tokenize(PROMPTS)
  assert ids.shape == (4, 77) and ids.dtype == np.int32
  txt = model.text_embeds(model.params, ids)
  assert txt.shape == (4, 24) and txt.dtype == np.float32
  img = model.image_embeds(model.params, images(3, 40, 56))  # Wider than high: resized.
  assert img.shape == (3, 24) and img.dtype == np.float32 and np.isfinite(img).all()
  unit = model.image_embeds(model.params, images(3, 61, 33), normalize=True)  # Taller.
  assert unit.shape == (3, 24)
  np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(model.text_embeds(model.params, ids, normalize=True),
                                            axis=-1), 1, atol=1e-6)


def test_image_tower_matches_an_independent_numpy_vit(model, folder):
  x = images(3, 32, 32)
  pixels = np.asarray(model.processing(x))  # 32 x 32 already: normalised only.
  got = model.image_embeds(model.params, x)
  np.testing.assert_allclose(got, numpy_image_features(folder, pixels.astype(np.float64)),
                             atol=2e-5)
  # Each image's embedding is its own: reordering the batch reorders the embeddings.
  np.testing.assert_allclose(model.image_embeds(model.params, x[::-1]), got[::-1], atol=1e-5)


def test_preprocessing_resizes_the_shorter_side_crops_the_centre_and_normalises(model):
  p = model.processing
  assert p.resized(40, 56) == (32, 44) and p.resized(61, 33) == (59, 32)  # int(), as transformers.
  x = images(2, 32, 32)
  np.testing.assert_allclose(p(x), (x - np.array(p.mean)) / np.array(p.std), atol=1e-6)
  u8 = (images(2, 40, 56) * 255).round().astype(np.uint8)
  np.testing.assert_allclose(p(u8), p(u8 / np.float32(255)), atol=1e-6)  # uint8 = value / 255.
  # A constant image stays constant through resize and crop; the crop is the centre.
  np.testing.assert_allclose(p(np.full((1, 50, 70, 3), 0.4, np.float32)),
                             np.broadcast_to((0.4 - np.array(p.mean)) / np.array(p.std),
                                             (1, 32, 32, 3)), atol=1e-5)
  stripe = np.zeros((1, 32, 48, 3), np.float32)  # Already 32 high: only the crop, columns 8..39.
  stripe[:, :, 8] = 1
  out = np.asarray(p(stripe))[0, 0, :, 0] * p.std[0] + p.mean[0]
  assert out[0] == pytest.approx(1) and np.allclose(out[1:], 0, atol=1e-6)


# ------------------------------------------------------------------------------ CLIP score


def test_clip_score_on_constructed_embeddings():
  e = np.eye(4, 6, dtype=np.float32)
  theta = np.deg2rad([0, 30, 60, 90])
  text = np.cos(theta)[:, None] * e + np.sin(theta)[:, None] * np.roll(e, 1, axis=1)
  np.testing.assert_allclose(clip_metrics.clip_scores(e, 3 * text), 100 * np.cos(theta),
                             atol=1e-4)
  assert float(clip_metrics.clip_score(e, text)) == pytest.approx(100 * np.cos(theta).mean(),
                                                                   abs=1e-4)
  assert float(clip_metrics.clip_score(e, e)) == pytest.approx(100)
  assert float(clip_metrics.clip_score(e, np.roll(e, 1, axis=0))) == pytest.approx(0)  # Shuffled.
  # torchmetrics clips the mean, not each pair: one pair at -100 pulls the mean down.
  mixed = np.concatenate([e[:3], -e[3:]])
  np.testing.assert_allclose(clip_metrics.clip_scores(e, mixed), [100, 100, 100, -100], atol=1e-4)
  assert float(clip_metrics.clip_score(e, mixed)) == pytest.approx(50)
  assert float(clip_metrics.clip_score(e, -e)) == 0
  with pytest.raises(ValueError, match='pair up'):
    clip_metrics.clip_scores(e, e[:3])


def test_clip_score_of_matching_prompts_beats_shuffled_ones(model):
  """Text embeddings made to match: each image's embedding plus a little noise, vs shuffled."""
  img = np.asarray(model.image_embeds(model.params, images(8, 40, 40)))
  noise = np.random.default_rng(1).normal(size=img.shape).astype(np.float32)
  txt = img + 0.3 * np.linalg.norm(img, axis=-1, keepdims=True) * noise / np.sqrt(img.shape[1])
  matching = float(clip_metrics.clip_score(img, txt))
  shuffled = float(clip_metrics.clip_score(img, txt[np.roll(np.arange(8), 3)]))
  assert matching > 90 and shuffled < matching - 10


# ------------------------------------------------------------------------------ CMMD


def reference_mmd(x, y, sigma=10.0, scale=1000.0):
  """google-research/cmmd distance.py's mmd, transcribed to numpy float64."""
  gamma = 1 / (2 * sigma**2)
  k = lambda a, b: np.mean(np.exp(-gamma * (-2 * a @ b.T + np.diag(a @ a.T)[:, None] +
                                            np.diag(b @ b.T)[None])))
  return scale * (k(x, x) + k(y, y) - 2 * k(x, y))


def test_cmmd_is_the_reference_formula_and_zero_on_a_set_against_itself():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(37, 16)), rng.normal(0.3, 1, size=(23, 16))
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  want = reference_mmd(unit(x), unit(y))
  got = float(clip_metrics.cmmd(x.astype(np.float32), y.astype(np.float32)))
  assert got == pytest.approx(want, rel=1e-4) and want > 1
  for block in (8, 100):  # Row blocks (37 is not a multiple of 8) give the same value.
    assert float(clip_metrics.cmmd(x, y, block=block)) == pytest.approx(got, rel=1e-5)
  assert float(clip_metrics.cmmd(y, x)) == pytest.approx(got, rel=1e-5)
  assert float(clip_metrics.cmmd(x, x.copy())) == 0
  assert float(clip_metrics.cmmd(x, 5 * x)) == pytest.approx(0, abs=1e-4)  # Normalised first.
  with pytest.raises(ValueError, match=r'\[N, D\]'):
    clip_metrics.cmmd(x, y[:, :8])


def test_cmmd_grows_with_the_noise_added_to_one_set(model):
  clean = images(16, 40, 40, seed=2)
  noise = np.random.default_rng(3).normal(size=clean.shape).astype(np.float32)
  ref = model.image_embeds(model.params, clean)
  values = [float(clip_metrics.cmmd(ref, model.image_embeds(
      model.params, np.clip(clean + level * noise, 0, 1)))) for level in (0, .05, .1, .2, .4)]
  assert values[0] == 0 and all(b > a for a, b in zip(values, values[1:])), values


# ------------------------------------------------------------------------------ bad folders


def edited(folder, tmp_path, config=None, preprocessor=None, tensors=None, remove=()):
  """A copy of `folder` with config.json / preprocessor_config.json / tensors edited."""
  out = str(tmp_path / 'bad')
  shutil.copytree(folder, out)
  for name, edit in (('config.json', config), ('preprocessor_config.json', preprocessor)):
    if edit is not None:
      with open(os.path.join(out, name)) as f:
        cfg = json.load(f)
      edit(cfg)
      with open(os.path.join(out, name), 'w') as f:
        json.dump(cfg, f)
  if tensors is not None:
    w = load_file(os.path.join(out, 'model.safetensors'))
    tensors(w)
    save_file(w, os.path.join(out, 'model.safetensors'))
  for name in remove:
    os.remove(os.path.join(out, name))
  return out


@pytest.mark.parametrize('edit,error,message', [
    (dict(remove=['config.json']), FileNotFoundError, r'config\.json not found'),
    (dict(config=lambda c: c.update(model_type='clip_text_model')), ValueError,
     r"config\.json: model_type='clip_text_model', expected 'clip'"),
    (dict(config=lambda c: c.pop('vision_config')), ValueError,
     r'config\.json: vision_config is missing'),
    (dict(config=lambda c: c['vision_config'].update(hidden_act='relu')), ValueError,
     r"config\.json vision_config: hidden_act='relu' is not supported"),
    (dict(config=lambda c: c['vision_config'].update(num_channels=4)), ValueError,
     r'vision_config: num_channels=4'),
    (dict(config=lambda c: c['vision_config'].update(image_size=[32, 48])), ValueError,
     r'vision_config: image_size=\[32, 48\] must be one positive int'),
    (dict(config=lambda c: c['text_config'].update(use_attention_mask=True)), ValueError,
     r'text_config: use_attention_mask=True'),
    (dict(remove=['model.safetensors']), FileNotFoundError, r'model\.safetensors not found'),
    (dict(tensors=lambda w: w.pop('vision_model.post_layernorm.weight')), ValueError,
     r"model\.safetensors: tensor 'post_layernorm\.weight' is missing"),
    (dict(tensors=lambda w: w.pop('text_projection.weight')), ValueError,
     r"model\.safetensors: tensor 'text_projection\.weight' is missing"),
    (dict(config=lambda c: c.update(projection_dim=16)), ValueError,
     r"model\.safetensors: tensor 'visual_projection\.weight' has shape \(24, 48\)"),
    (dict(preprocessor=lambda p: p.update(crop_size=28)), ValueError,
     r'preprocessor_config\.json: crop_size .* gives \(28, 28\) images .*image_size=32'),
    (dict(preprocessor=lambda p: p.update(resample=1)), ValueError,
     r'preprocessor_config\.json: resample=1 is not supported'),
    (dict(preprocessor=lambda p: p.update(size={'shortest_edge': 24})), ValueError,
     r'preprocessor_config\.json: crop_size \(32, 32\) exceeds the resized size'),
    (dict(remove=['vocab.json']), FileNotFoundError, r'vocab\.json not found'),
])
def test_bad_folders_are_refused_naming_the_file_and_field(folder, tmp_path, edit, error,
                                                           message):
  with pytest.raises(error, match=message):
    clip_model.load_clip_model(edited(folder, tmp_path, **edit))


def test_a_pickle_only_folder_is_refused_with_the_conversion(folder, tmp_path):
  bad = edited(folder, tmp_path, remove=['model.safetensors'])
  open(os.path.join(bad, 'pytorch_model.bin'), 'wb').close()
  with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*safe_serialization=True"):
    clip_model.load_clip_model(bad)


def test_without_a_preprocessor_config_clip_defaults_at_the_model_size(folder, tmp_path, model):
  bare = clip_model.load_clip_model(edited(folder, tmp_path, remove=['preprocessor_config.json']))
  assert bare.processing == model.processing
  assert bare.processing.mean == clip_model.OPENAI_CLIP_MEAN
