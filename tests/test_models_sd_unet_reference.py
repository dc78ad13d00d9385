"""Parity of models.sd_unet with diffusers' PyTorch UNet2DConditionModel on the same random folders.

Skipped unless torch and diffusers import (the project needs neither). Both load the folders
tools/random_sd_unet.py writes (SD 1.x-like and SD 2.x-like), run in float32 on the same inputs
(NCHW for diffusers, NHWC here), and must agree to 1e-4 (measured on CPU: about 2.5e-6).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

# pylint: disable=g-import-not-at-top,wrong-import-position
from models.sd_loading import load_sd_unet
from models.sd_unet import SDUNet
from tools.random_sd_unet import write_random_sd_unet

TOLERANCE = 1e-4


@pytest.mark.parametrize('preset', ['sd1', 'sd2'])
def test_matches_diffusers(tmp_path, preset, record_property):
  folder = write_random_sd_unet(str(tmp_path / preset), preset=preset, seed=3)
  spec, params = load_sd_unet(folder)
  reference = diffusers.UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
  reference.eval()

  r = np.random.RandomState(0)
  b, side, tokens = 3, 8, 7
  x = r.randn(b, side, side, spec.in_channels).astype(np.float32)
  t = np.asarray([0.0, 417.5, 999.0], np.float32)  # Fractional timesteps are allowed.
  context = r.randn(b, tokens, spec.cross_attention_dim).astype(np.float32)
  with torch.no_grad():
    want = reference(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                     torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()

  apply = jax.jit(functools.partial(SDUNet(spec).apply, train=False))
  got = np.asarray(apply({'params': params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context),
                         jnp.ones((b, tokens), bool), jnp.zeros((b, 1))))
  err = float(np.abs(got - want).max())
  record_property('max_abs_diff', err)
  print(f'{preset}: max |ours - diffusers| = {err:.3g} (outputs up to {np.abs(want).max():.3g})')
  assert np.std(want) > 0.1  # Not a trivial output.
  assert err <= TOLERANCE, err
