"""Optional: an exported pipeline folder read by diffusers and transformers themselves.

Skipped unless torch, diffusers and transformers import (the project needs none of them). A tiny
random SD 1.x-like and 2.x-like pipeline is exported (export.diffusers.write_pipeline) with
"fine-tuned" U-Net and CLIP parameters (moved off the folder's); diffusers' UNet2DConditionModel
and transformers' CLIPTextModel load them with no missing, unexpected or mismatched keys, the whole
StableDiffusionPipeline loads the folder, and both compute what ours computes with those
parameters to 1e-4 (float32, CPU).
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

# pylint: disable=g-import-not-at-top,wrong-import-position
from export import diffusers as export
from models import sd_loading
from models.sd_unet import SDUNet
from text import clip
from tools import make_sd_pipeline

TOLERANCE = 1e-4


def _moved(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.02, np.shape(x)).astype(
      np.float32), jax.device_get(params))


def _no_key_problems(info):
  return {k: info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys') if info[k]}


@pytest.mark.parametrize('preset', ['sd1', 'sd2'])
def test_diffusers_and_transformers_read_the_exported_weights(tmp_path, preset, record_property):
  source = make_sd_pipeline.write_pipeline(str(tmp_path / 'source'), preset=preset, seed=4)
  spec, unet_params = sd_loading.load_sd_unet(os.path.join(source, 'unet'))
  encoder = clip.load_clip(os.path.join(source, 'text_encoder'))
  trained = {'unet': _moved(unet_params, 0), 'text': _moved(encoder.params, 1)}
  out = export.write_pipeline(source, str(tmp_path / 'out'), trained, {'step': 0}, unet='unet',
                              text_encoder='text_encoder')

  unet, info = diffusers.UNet2DConditionModel.from_pretrained(
      os.path.join(out, 'unet'), torch_dtype=torch.float32, output_loading_info=True)
  assert not _no_key_problems(info), info
  text, info = transformers.CLIPTextModel.from_pretrained(
      os.path.join(out, 'text_encoder'), torch_dtype=torch.float32, output_loading_info=True)
  assert not _no_key_problems(info), info
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32)
  assert isinstance(pipe.unet, diffusers.UNet2DConditionModel)
  unet.eval()
  text.eval()

  r = np.random.RandomState(0)
  b, side, tokens = 2, 8, 7
  x = r.randn(b, side, side, spec.in_channels).astype(np.float32)
  t = np.asarray([3.0, 801.0], np.float32)
  context = r.randn(b, tokens, spec.cross_attention_dim).astype(np.float32)
  ids = encoder.tokenize(['a red circle above a blue square', ''])
  with torch.no_grad():
    want = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()
    ref = text(torch.tensor(ids, dtype=torch.long))
    want_hidden, want_pooled = ref.last_hidden_state.numpy(), ref.pooler_output.numpy()
  apply = jax.jit(functools.partial(SDUNet(spec).apply, train=False))
  got = np.asarray(apply({'params': trained['unet']}, jnp.asarray(x), jnp.asarray(t),
                         jnp.asarray(context), jnp.ones((b, tokens), bool), jnp.zeros((b, 1))))
  hidden, _, pooled = jax.jit(encoder.encode)(trained['text'], ids)

  diffs = {'unet': float(np.abs(got - want).max()),
           'clip_hidden': float(np.abs(np.asarray(hidden) - want_hidden).max()),
           'clip_pooled': float(np.abs(np.asarray(pooled) - want_pooled).max())}
  for name, diff in diffs.items():
    record_property(f'max_abs_diff_{name}', diff)
  print(f'{preset}: max |ours - reference| ' + ', '.join(f'{k} {v:.2g}' for k, v in diffs.items())
        + f' (diffusers {diffusers.__version__}, transformers {transformers.__version__})')
  assert np.std(want) > 0.1 and np.abs(want_hidden).max() > 0.5  # Not trivial outputs.
  assert max(diffs.values()) <= TOLERANCE, diffs
