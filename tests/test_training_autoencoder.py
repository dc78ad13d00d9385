"""The VAE the repository trains itself: save_vae round trips, a 30-step run, the CLI's errors.

The run is the real `train_autoencoder` on 16 px rendered Shapes with a tiny VAE (channels (8, 16),
4 groups); the saved folder must load with `load_vae` and, when diffusers imports, with diffusers'
`AutoencoderKL.from_pretrained` (no missing or unexpected keys, the same outputs).
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, specs
from models import vae_loading
from models.autoencoder import AutoencoderKL
from tools import train_autoencoder as vae_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = vae_training.demo_config((8, 16), latent_channels=4, norm_num_groups=4, image_size=16)


def _images(n=2, size=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)), jnp.float32)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """(folder, params) of a randomly initialised tiny VAE written by save_vae."""
  model = AutoencoderKL(TINY)
  params = vae_training.init_params(model, 16, seed=3)
  # Non-trivial norms and biases, so a swapped or untransposed tensor would show.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x if p[-1].key == 'kernel' else x + 0.1 * jnp.arange(x.size).reshape(x.shape)
      / x.size, params)
  folder = str(tmp_path_factory.mktemp('saved') / 'vae')
  vae_loading.save_vae(folder, TINY, params, scaling_factor=0.5)
  return folder, params


def test_save_vae_round_trips(saved):
  folder, params = saved
  vae = vae_loading.load_vae(folder)
  assert jax.tree.structure(vae.params) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(vae.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert vae.config.scaling_factor == 0.5
  assert vae.config.shift_factor == 0.0
  assert vae.config.block_out_channels == (8, 16) and vae.config.norm_num_groups == 4
  model = AutoencoderKL(TINY)
  x = _images()
  mean, logvar = vae.encode(vae.params, x)
  ref = model.apply({'params': params}, x, method=AutoencoderKL.encode)
  np.testing.assert_array_equal(np.asarray(mean), np.asarray(ref.mean))
  np.testing.assert_array_equal(np.asarray(logvar), np.asarray(ref.logvar))
  np.testing.assert_array_equal(
      np.asarray(vae.decode(vae.params, mean)),
      np.asarray(model.apply({'params': params}, ref.mean, method=AutoencoderKL.decode)))
  assert sorted(os.listdir(folder)) == ['config.json', vae_loading.WEIGHTS]  # No temp files.


def test_save_vae_refuses_params_of_another_config(tmp_path, saved):
  _, params = saved
  other = vae_training.demo_config((8, 8), 4, 4, 16)
  with pytest.raises(ValueError, match='params do not match.*block_out_channels=\\[8, 8\\]'):
    vae_loading.save_vae(str(tmp_path / 'x'), other, params)
  with pytest.raises(ValueError, match='scaling_factor=nan'):
    vae_loading.save_vae(str(tmp_path / 'x'), TINY, params, scaling_factor=float('nan'))
  assert not os.path.exists(tmp_path / 'x' / 'config.json')


def test_diffusers_loads_saved_folder(saved):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  folder, params = saved
  ref, info = diffusers.AutoencoderKL.from_pretrained(folder, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert ref.config.scaling_factor == 0.5
  x = np.array(_images())
  with torch.no_grad():
    mean = ref.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist.mean
  ours = AutoencoderKL(TINY).apply({'params': params}, jnp.asarray(x),
                                   method=AutoencoderKL.encode).mean
  np.testing.assert_allclose(mean.numpy().transpose(0, 2, 3, 1), np.asarray(ours), atol=1e-4)


@pytest.mark.full
def test_train_autoencoder_learns_and_saves(tmp_path):
  data = specs.build(base.get_config()).data.replace(dataset='shapes_rendered', image_size=16)
  out = str(tmp_path / 'vae')
  summary = vae_training.train_autoencoder(
      data, TINY, steps=30, batch_size=8, learning_rate=2e-3, kl_weight=1e-6, seed=0,
      out_dir=out, log_every=10, progress=False)
  first, last = summary['history'][0], summary['history'][-1]
  assert first[0] == 0 and last[0] == 29
  assert last[1] < 0.5 * first[1], summary['history']  # L1 falls (0.92 -> 0.22 measured).
  assert summary['held_out'] == 'eval' and summary['psnr'] > 8
  with open(os.path.join(out, 'config.json')) as f:
    scale = json.load(f)['scaling_factor']
  assert math.isfinite(scale) and scale > 0 and scale == pytest.approx(summary['scaling_factor'])
  assert os.path.isfile(os.path.join(out, 'reconstructions.png'))
  vae = vae_loading.load_vae(out)
  x = _images(4)
  mean, logvar = vae.encode(vae.params, x)
  assert mean.shape == (4, 8, 8, 4)
  images = vae.decode(vae.params, vae.from_latents(vae.to_latents(mean, logvar,
                                                                  jax.random.key(0))))
  assert images.shape == (4, 16, 16, 3) and bool(jnp.all(jnp.isfinite(images)))


@pytest.mark.parametrize('args, message', [
    (['--steps=0'], 'steps=0 must be a positive int'),
    *(pytest.param(*case, marks=pytest.mark.full) for case in [  # A process each.
        (['--steps=abc'], "--steps"),
        (['--channels=8,x'], '--channels='),
        (['--channels=8,12', '--norm_num_groups=8'], 'norm_num_groups=8 must divide'),
        (['--image_size=16', '--channels=8,8,8,8,8,8'], 'image_size=16 must be a multiple')]),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
  proc = subprocess.run(
      [sys.executable, '-m', 'tools.train_autoencoder', f'--out={tmp_path / "v"}', *args],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and message in lines[0], proc.stderr
  assert 'Traceback' not in proc.stderr
