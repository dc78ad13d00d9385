"""Typed settings: every default lives in configs/base.py, and each spec is read from it once."""
import dataclasses
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, specs
from diffusion.spec import overridden
from models.unet import UNetSpec
from runtime import checkpoint

SECTIONS = [f.name for f in dataclasses.fields(specs.Settings) if f.name not in ('seed', 'record')]


@pytest.mark.parametrize('section', SECTIONS)
def test_each_section_becomes_its_spec_holding_every_field(section):
  config = base.get_config()
  spec = getattr(specs.build(config), section)
  fields = [f.name for f in dataclasses.fields(spec) if f.name != 'options']
  assert {f: getattr(spec, f) for f in fields} == {f: config[section][f] for f in fields}
  # The spec has no default of its own: configs/base.py is the one place defaults live.
  assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
             for f in dataclasses.fields(spec))
  # And every field of the section is read (`sampler.eta` becomes DDIM's option, `model.family`
  # picks the spec class).
  assert set(config[section].keys()) == specs.spec_fields(section, spec)


def test_settings_are_hashable_and_keep_the_whole_config():
  config = base.get_config()
  settings = specs.build(config)
  assert hash(settings) == hash(specs.build(base.get_config()))
  assert settings.config_record() == json.loads(json.dumps(config.to_dict()))
  assert settings.seed == config.seed and isinstance(settings.model, UNetSpec)


def test_sampler_settings_take_the_configured_ddim_eta():
  config = base.get_config()
  config.sampler.eta = 0.5
  assert specs.sampler(config).options == (('eta', 0.5),)
  config.sampler.name, config.sampler.eta = 'dpmpp_2m', 0.0
  assert specs.sampler(config).options == ()
  config.sampler.eta = 0.5
  with pytest.raises(ValueError, match="sampler.eta=0.5 is DDIM's eta"):
    specs.sampler(config)


@pytest.mark.parametrize('section', SECTIONS)
def test_a_config_missing_a_field_is_refused_naming_it(section):
  config = base.get_config()
  field = dataclasses.fields(getattr(specs.build(config), section))[0].name
  del config[section][field]
  with pytest.raises(ValueError, match=rf'{section}\.{field} is missing'):
    specs.build(config)


@pytest.mark.parametrize('section, field, value', [
    ('diffusion', 'schedule', 'quadratic'), ('diffusion', 'prediction', 'score'),
    ('diffusion', 'num_train_timesteps', 0), ('model', 'dtype', 'float64'),
    ('model', 'channel_mult', ()), ('sampler', 'name', 'plms'), ('sampler', 'num_steps', 0),
    ('sampler', 'threshold_percentile', 101.0), ('sampler', 'guidance_interval', (2.0, 1.0)),
    ('model', 'family', 'dit'), ('data', 'crop', 'top'), ('text', 'encoder', 'clip'),
    ('optim', 'b2', 1.0), ('checkpoint', 'keep', 0), ('logging', 'every_steps', 0),
    ('autoencoder', 'decode_chunk', 0), ('distributed', 'heartbeat_timeout_s', 0.0)])
def test_bad_values_are_refused_by_the_spec_that_owns_them(section, field, value):
  config = base.get_config()
  with config.ignore_type():
    config[section][field] = value
  with pytest.raises(ValueError, match=rf'{section}\.{field}|sampler\.name'):
    specs.build(config)


def test_overridden_is_how_flags_change_a_recipe():
  recipe = specs.sampler(base.get_config())  # ddim with eta 0.
  assert overridden(recipe, num_steps=None, guidance_scale=None) == recipe  # unset flags
  heun = overridden(recipe, sampler='heun', options={'s_churn': 2.0, 's_noise': None})
  assert heun.name == 'heun' and heun.options == (('s_churn', 2.0),)  # DDIM's eta dropped.
  with pytest.raises(ValueError, match="'heun' takes no option eta"):
    overridden(recipe, sampler='heun', options={'eta': 1.0})
  strengths = overridden(recipe, guidance_scale=5.0, guidance_interval=(-1.0, 2.0)).guidance()
  assert float(strengths.scale) == 5.0 and tuple(map(float, strengths.interval)) == (-1.0, 2.0)
  off = recipe.guidance()
  assert float(off.interval[0]) == -np.inf and float(off.interval[1]) == np.inf
  assert recipe.sampler_kwargs() == {'eta': jnp.float32(0.0)}


def test_a_checkpointed_config_gets_defaults_for_fields_added_since(tmp_path):
  """A workdir written before a field existed restores with that field's base default."""
  old = base.get_config()
  old.model.channels = 24
  del old.model['head_dim']
  del old.model['family']
  ckpt = checkpoint.Checkpointer(str(tmp_path), specs.build(base.get_config()).checkpoint)
  ckpt.save(1, {'x': np.zeros(2, np.float32)}, old.to_dict(), {'step': 1})
  ckpt.close()
  saved = checkpoint.Checkpointer(str(tmp_path), read_only=True).saved_config()
  assert 'head_dim' not in saved['model'] and saved['model']['channel_mult'] == (1, 2, 2)
  restored = specs.from_saved(saved)
  assert restored.model.head_dim == base.get_config().model.head_dim
  assert restored.model.channels == 24 and restored.model.channel_mult == (1, 2, 2)
  assert restored.config_record()['model']['family'] == 'unet'


def test_settings_are_made_before_any_device_is_touched():
  """The loop builds settings before jax.distributed joins the job, which must come before the
  XLA backend starts: making and checking settings must start no backend."""
  code = ('from jax._src import xla_bridge\n'
          'from configs import shapes, validation\n'
          "validation.validate(shapes.get_config('tiny'))\n"
          'print(xla_bridge.backends_are_initialized())')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['False']
