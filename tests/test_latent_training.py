"""Latent diffusion end to end on a tiny random VAE (full tier): folder -> on-the-fly latents ->
train -> sample decoded images; resume; cached posteriors. The validation of sizes (default tier)."""
import json
import os

import jax
import numpy as np
import pytest

from configs import images as images_config
from configs import specs, validation
from sampling import from_checkpoint
from tests import image_folders
from tests.test_models_autoencoder import write_vae
from training import builder, loop


@pytest.fixture(scope='module')
def latent_setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('latent')
  image_folders.make_folder(root / 'images', broken=False)
  vae_dir = write_vae(str(root / 'vae'))  # Channels (8, 16): latents of side S/2, 4 channels.
  config = images_config.get_config('tiny')
  config.data.path = str(root / 'images')
  config.autoencoder.path = vae_dir
  config.mesh.data, config.mesh.fsdp = 2, 2
  config.logging.eval_at_end = False
  return root, config


@pytest.fixture(scope='module')
def full_run(latent_setup):
  root, config = latent_setup
  workdir = str(root / 'full')
  return workdir, loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4])


@pytest.mark.full  # (The default tier keeps the VAE's unit tests; this trains and samples.)
def test_latent_run_trains_and_samples_images(latent_setup, full_run):
  root, _ = latent_setup
  workdir, full = full_run
  assert [s for s, _ in full.history] == [1, 2, 3, 4]
  assert np.isfinite([l for _, l in full.history]).all()
  # The U-Net works on latents: its output conv has 4 (latent) channels, not 3.
  out_bias = jax.device_get(full.state.params['unet']['conv_out']['bias'])
  assert out_bias.shape == (4,)
  loaded = from_checkpoint.load(workdir, settings_of=specs.from_saved)
  assert loaded.generator.image_shape == (8, 8, 4)
  out = str(root / 'samples')
  recipe = loaded.settings.sampler.replace(num_steps=2)
  from_checkpoint.sample_to_folder(loaded, out, ['a photo of a rgb', 'the grey picture'], recipe)
  from PIL import Image
  assert Image.open(os.path.join(out, '00000.png')).size == (16, 16)  # Decoded to pixels.
  with open(os.path.join(out, 'manifest.jsonl')) as f:
    line = json.loads(f.readline())
  assert line['autoencoder'].startswith('vae:')


@pytest.mark.full
def test_latent_run_resumes_to_the_same_parameters(latent_setup, full_run):
  root, config = latent_setup
  _, full = full_run
  workdir = str(root / 'resumed')
  loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4], stop_at=2)
  resumed = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4])
  assert [s for s, _ in resumed.history] == [3, 4]
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state.params)),
                  jax.tree.leaves(jax.device_get(full.state.params))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_image_size_must_fit_the_latent_unet(latent_setup):
  _, config = latent_setup
  config = config.copy_and_resolve_references()
  config.data.image_size = 18  # Fits the pixel U-Net (18 / 2), not the latent one (9 / 2).
  with pytest.raises(ValueError, match=r"autoencoder's downsampling \(2"):
    validation.validate(config)
  config.data.image_size = 16  # Latents of 8 x 8: the U-Net's levels are 8 and 4 px high.
  config.model.attn_resolutions = (16,)
  with pytest.raises(ValueError, match=r"model.attn_resolutions has \[16\].*heights \[8, 4\]"):
    validation.validate(config)


@pytest.mark.full
def test_cached_posteriors_give_the_on_the_fly_loss(latent_setup):
  """tools.prepare --autoencoder stores the moments; step 1's loss matches encoding on the fly."""
  from data import sources
  from tools import prepare
  root, config = latent_setup
  opts = prepare.Options(latent=dict(path=config.autoencoder.path, image_size=16))
  prepare.prepare(prepare.open_source('folder', path=config.data.path), str(root / 'shards' / 'tr'),
                  num_shards=2, options=opts, progress=False)
  config = config.copy_and_resolve_references()
  config.data.update(dataset='array_record', path=str(root / 'shards' / 'tr-*.array_record'),
                     crop='center', flip=False)
  from runtime import state
  settings = specs.build(config)
  source = sources.make(settings.data)
  assert 'latent' in source[0]
  assert builder._cached_latents(  # pylint: disable=protected-access
      settings, source, state.build_autoencoder(settings.autoencoder))
  cached = loop.train_and_evaluate(config, str(root / 'cached'), devices=jax.devices()[:4],
                                   stop_at=1)
  config.autoencoder.cached_latents = False
  fly = loop.train_and_evaluate(config, str(root / 'fly'), devices=jax.devices()[:4], stop_at=1)
  np.testing.assert_allclose(cached.history[0][1], fly.history[0][1], rtol=1e-4)
  config.autoencoder.cached_latents = True
  config.data.flip = True  # Moments of unflipped centre crops cannot serve flipped images.
  with pytest.raises(sources.DataError, match='cached latents.*data.flip=False'):
    loop.train_and_evaluate(config, str(root / 'flip'), devices=jax.devices()[:4], stop_at=1)
