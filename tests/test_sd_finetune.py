"""Fine-tuning a (tiny, random) Stable Diffusion pipeline folder end to end, without PyTorch:
configs/sd.py:tiny from model.pretrained, exact resume, sampling from the workdir."""
import jax
import numpy as np
import pytest

from configs import sd, specs
from models import family
from sampling import from_checkpoint
from tests import image_folders
from tools import make_sd_pipeline
from training import loop


@pytest.fixture(scope='module')
def pipeline_and_data(tmp_path_factory):
  root = tmp_path_factory.mktemp('sd')
  folder = make_sd_pipeline.write_pipeline(str(root / 'pipeline'), preset='sd1')
  image_folders.make_folder(root / 'images', broken=False)
  return folder, str(root / 'images')


def tiny_config(folder, data, **changes):
  config = sd.get_config('tiny')
  config.model.pretrained = folder
  config.data.path = data
  config.logging.eval_at_end = False
  for key, value in changes.items():
    section, field = key.split('__')
    config[section][field] = value
  return config


@pytest.mark.full  # Three runs of the tiny pipeline (~60 s): the full tier.
def test_the_run_starts_from_the_folder_weights_and_resumes_exactly(pipeline_and_data, tmp_path):
  folder, data = pipeline_and_data
  config = tiny_config(folder, data, optim__num_steps=4, checkpoint__every_steps=2)
  settings = specs.build(config)
  assert settings.model.network.in_channels == 4 and settings.diffusion.prediction == 'eps'
  assert settings.text.max_len == 77 and settings.autoencoder.path.endswith('vae')
  full = loop.train_and_evaluate(config, str(tmp_path / 'full'), devices=jax.devices()[:1])
  cut = str(tmp_path / 'cut')
  first = loop.train_and_evaluate(config, cut, devices=jax.devices()[:1], stop_at=2)
  second = loop.train_and_evaluate(config, cut, devices=jax.devices()[:1])
  losses = [loss for _, loss in first.history + second.history]
  np.testing.assert_allclose(losses, [loss for _, loss in full.history], rtol=1e-6)
  assert all(np.isfinite(losses))
  # Step 1 started from the pipeline's U-Net, not from a random initialisation.
  loaded = family.pretrained(settings.model)()
  trained = jax.device_get(full.state.params['unet'])
  conv_in_before = np.asarray(loaded['conv_in']['kernel'])
  conv_in_after = np.asarray(trained['conv_in']['kernel'])
  assert np.abs(conv_in_after - conv_in_before).max() < 0.01 * np.abs(conv_in_before).max() + 1e-3


def test_a_two_step_fine_tune_loads_for_sampling(pipeline_and_data, tmp_path):
  folder, data = pipeline_and_data
  config = tiny_config(folder, data, optim__num_steps=2, checkpoint__every_steps=2)
  workdir = str(tmp_path / 'run')
  result = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  assert [step for step, _ in result.history] == [1, 2]
  assert all(np.isfinite(loss) for _, loss in result.history)
  loaded = from_checkpoint.load(workdir, settings_of=specs.from_saved, use_ema=False)
  assert loaded.settings.model.folder == folder and loaded.step == 2
  assert loaded.settings.diffusion.schedule == 'scaled_linear'
  assert loaded.settings.text.max_len == 77
