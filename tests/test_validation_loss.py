"""The validation loss: fixed examples, noise and noise levels, so the same weights give the same
numbers bit for bit, on 1 or (the full tier) 8 devices; and a run reports it with its
evaluations."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import images, specs
from data import sources
from diffusion import schedules
from models import lora
from runtime import sharding
from tests import image_folders
from training import builder, validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('val')
  image_folders.make_folder(root / 'images', broken=False)
  return str(root / 'images')


def tiny_config(path, **logging):
  config = images.get_config('tiny')
  config.data.path = path
  config.text.vocab = 'shapes'  # (No tokenizer to train.)
  config.logging.val_examples = 8
  config.logging.update(logging)
  return config


def _validation(config, devices, workdir, init=True):
  """(The ValidationLoss of `config` on `devices`, weights to score: the initial ones, or with
  init=False random ones of their shapes, which compile no initialiser.)"""
  settings = specs.build(config)
  mesh = sharding.make_mesh(settings.mesh, devices)
  source = sources.make(settings.data, 'train')
  trainer = builder.build_trainer(settings, mesh, source=source, workdir=workdir)
  validate = validation.ValidationLoss(settings, trainer, mesh, source)
  if init:
    params = trainer.init(jax.random.PRNGKey(0)).ema_params
  else:
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jax.device_put(
        (0.05 * rng.standard_normal(a.shape)).astype(a.dtype), a.sharding),
                          trainer.abstract.ema_params)
  return validate, lora.combine(params, trainer.frozen_weights)


def one_and_eight(path, workdir):
  """The validation loss of the same initial weights on 1 device, twice, and on 8."""
  config = tiny_config(path)
  one, weights_one = _validation(config, jax.devices()[:1], workdir)
  eight, weights_eight = _validation(config, jax.devices()[:8], workdir)
  assert one.n == 8 and eight.n == 8
  return one(weights_one), one(weights_one), eight(weights_eight)


def test_the_same_weights_give_the_same_numbers_twice_one_per_noise_level(folder, tmp_path):
  # 3 noise levels: the program holds one network application per level (8 in the tests below).
  validate, weights = _validation(tiny_config(folder, val_bins=3), jax.devices()[:1],
                                  str(tmp_path), init=False)
  assert validate.n == 8
  first = validate(weights)
  assert validate(weights) == first  # Bit for bit.
  bins = [first[f'val_loss/bin{k}'] for k in range(3)]
  assert len(set(bins)) == 3 and all(np.isfinite(bins)) and 'val_loss/bin3' not in first
  assert first['val_loss'] == pytest.approx(np.mean(bins), rel=1e-12)


@pytest.mark.full  # Two more programs (1 and 8 devices) under the fast-compile preset: ~1 min.
def test_the_same_weights_give_the_same_numbers_twice_and_on_8_devices(folder, tmp_path):
  # Under the suite's fast-compile preset (tests/conftest.py) XLA fuses the 1- and 8-device
  # programs differently: equal to float32 rounding here, bit for bit with XLA's own settings
  # (the full-tier test below).
  first, again, eight = one_and_eight(folder, str(tmp_path))
  assert first == again  # Bit for bit.
  assert eight.keys() == first.keys()
  for key, value in first.items():
    assert eight[key] == pytest.approx(value, rel=1e-6, abs=0), key
  bins = [first[f'val_loss/bin{k}'] for k in range(8)]
  assert len(set(bins)) == 8 and all(np.isfinite(bins))
  assert first['val_loss'] == pytest.approx(np.mean(bins), rel=1e-12)


@pytest.mark.full  # XLA's default CPU compile of the two programs: ~2 min.
def test_1_and_8_devices_agree_bit_for_bit_with_xla_defaults(folder, tmp_path):
  script = ('import json, sys; from tests import test_validation_loss as t; '
            'print(json.dumps(t.one_and_eight(sys.argv[1], sys.argv[2])))')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run([sys.executable, '-c', script, folder, str(tmp_path)], env=env,
                       capture_output=True, text=True, check=True, cwd=ROOT)
  first, again, eight = json.loads(out.stdout.strip().splitlines()[-1])
  assert first == again
  assert eight == first  # Bit for bit: the same float64 means.


def test_the_noise_levels_are_quantile_midpoints_of_training_lowest_noise_first():
  settings = specs.build(images.get_config('tiny'))
  levels = schedules.train_logsnr_quantiles(settings.diffusion, 8)
  assert levels.shape == (8,) and np.all(np.diff(levels) < 0)
  draws = np.asarray(schedules.sample_train_logsnr(jax.random.key(0), (20000,), settings.diffusion))
  # Each midpoint sits at the (k + 0.5) / 8 quantile of training's draws (lowest noise first).
  quantiles = np.quantile(draws, 1 - (np.arange(8) + 0.5) / 8)
  np.testing.assert_allclose(levels, quantiles, atol=0.15)


# A run reporting it in metrics.jsonl: tests/test_evaluation_quality.py.


def test_too_few_examples_for_the_devices_is_refused(folder, tmp_path):
  config = tiny_config(folder)
  config.logging.val_examples = 4
  with pytest.raises(ValueError, match=r'logging\.val_examples=4'):
    _validation(config, jax.devices()[:8], str(tmp_path))
