"""Configs: every variant validates; overrides are checked; train.py refuses bad flags by name."""

import os
import subprocess
import sys

import pytest

from configs import base, shapes, validation
from launch import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('variant', shapes.VARIANTS)
def test_every_variant_validates(variant):
  validation.validate(shapes.get_config(variant))


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match='cpu'):
    shapes.get_config('huge')


def test_every_field_has_a_comment():
  source = open(os.path.join(ROOT, 'configs', 'base.py')).read().splitlines()
  fields = [line for line in source if line.strip().startswith(('config.', 'data.', 'text.',
                                                                  'model.', 'diff.', 'sampler.',
                                                                  'optim.', 'mesh.', 'ckpt.',
                                                                  'log.', 'dist.'))
            and ' = ' in line and 'ConfigDict()' not in line]
  assert len(fields) > 60
  missing = [f for f in fields if '#' not in f and not f.rstrip().endswith('(')]
  assert not missing, missing


def test_unknown_override_is_refused_with_a_suggestion():
  config = base.get_config()
  with pytest.raises(ValueError, match=r"'optim.learning_rat'.*optim.learning_rate"):
    validation.check_override_keys(['--config.optim.learning_rat=1'], config)
  validation.check_override_keys(['--config.optim.learning_rate=1', '--workdir=x'], config)


@pytest.mark.parametrize('path,value,message', [
    ('diffusion.schedule', 'cosin', 'diffusion.schedule'),
    ('sampler.name', 'plms', 'sampler.name'),
    ('text.cond_drop_prob', 1.5, 'text.cond_drop_prob'),
    ('data.global_batch_size', 0, 'data.global_batch_size'),
    ('data.image_size', 17, 'data.image_size'),
    ('sampler.eta', -0.5, 'sampler.eta'),
])
def test_bad_values_name_the_field(path, value, message):
  config = shapes.get_config('tiny')
  section, field = path.split('.')
  config[section][field] = value
  with pytest.raises(ValueError, match=message):
    validation.validate(config)


def test_eta_with_a_sampler_that_ignores_it_is_refused():
  config = shapes.get_config('tiny')
  config.sampler.eta = 1.0
  validation.validate(config)  # The default sampler is DDIM.
  config.sampler.name = 'dpmpp_2m'
  with pytest.raises(ValueError, match=r"sampler.eta=1.0 is DDIM's eta, but sampler.name='dpmpp_2m"):
    validation.validate(config)


def _train_cli(*flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, 'train.py', '--config=configs/shapes.py:tiny',
                         '--workdir=/nonexistent/never', *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_train_cli_refuses_unknown_field_and_wrong_type():
  unknown = _train_cli('--config.optim.nope=3')
  assert unknown.returncode != 0 and "Unknown config field 'optim.nope'" in unknown.stderr
  wrong_type = _train_cli('--config.optim.num_steps=abc')
  assert wrong_type.returncode != 0 and 'config.optim.num_steps' in wrong_type.stderr


def test_sweep_grid_and_dry_run(capsys):
  points = sweep.parse_grid('optim.learning_rate=1e-3,2e-3;sampler.guidance_scale=2,4')
  assert len(points) == 4 and points[0] == {'optim.learning_rate': '1e-3',
                                            'sampler.guidance_scale': '2'}
  assert sweep.main([f'--config={ROOT}/configs/shapes.py:tiny', '--root=/tmp/sw', '--dry_run',
                     '--grid=optim.learning_rate=1e-3,2e-3']) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 2 and '--config.optim.learning_rate=2e-3' in out[1]
  assert '--workdir=/tmp/sw/learning_rate=2e-3' in out[1]
  with pytest.raises(ValueError, match='optim.lr'):
    sweep.main([f'--config={ROOT}/configs/shapes.py:tiny', '--root=/tmp/sw', '--dry_run',
                '--grid=optim.lr=1'])


def test_sweep_from_config_expands_get_sweep(capsys):
  assert sweep.main([f'--config={ROOT}/configs/shapes.py:cpu', '--root=/tmp/sw', '--from_config',
                     '--dry_run']) == 0
  assert len(capsys.readouterr().out.strip().splitlines()) == len(shapes.get_sweep())
