"""Configs: every variant validates; one loader parses overrides; train.py refuses bad flags by name."""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import base, images, loading, shapes, validation
from launch import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('variant', shapes.VARIANTS)
def test_every_variant_validates(variant, tmp_path):
  config = shapes.get_config(variant)
  if config.autoencoder.path:  # `latent`: a VAE of the demo's geometry (64 px -> 16 x 16 x 4).
    from tests.test_models_autoencoder import TINY, write_vae  # pylint: disable=g-import-not-at-top
    config.autoencoder.path = write_vae(str(tmp_path / 'vae'), dict(
        TINY, block_out_channels=[8, 16, 16], down_block_types=['DownEncoderBlock2D'] * 3,
        up_block_types=['UpDecoderBlock2D'] * 3))
  validation.validate(config)


@pytest.mark.parametrize('variant', images.VARIANTS)
def test_every_own_images_variant_validates(variant):
  validation.validate(images.get_config(variant))


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match='cpu'):
    shapes.get_config('huge')


def test_every_field_has_a_comment():
  text = open(os.path.join(ROOT, 'configs', 'base.py')).read()
  body = text[text.index('def get_config('):]
  source = body[:body.find('\ndef ', 1)].splitlines()  # get_config only: where fields are made.
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
    loading.check_override_keys(['--config.optim.learning_rat=1'], config)
  loading.check_override_keys(['--config.optim.learning_rate=1', '--workdir=x'], config)
  with pytest.raises(ValueError, match=r"Unknown config field 'model.chanels'.*model.channels"):
    loading.load(SPEC, ['--config.model.chanels=8'])


# ----------------------------------------------------------------------------- configs.loading

SPEC = os.path.join(ROOT, 'configs', 'shapes.py') + ':tiny'
TYPED = ['--config.optim.num_steps=7',  # int
         '--config.optim.learning_rate=1',  # float field: 1 -> 1.0
         "--config.model.channel_mult=(1, 2,2)",  # tuple
         '--config.text.cache_embeddings=False',  # bool
         '--config.data.dataset=shapes_rendered',  # string, as written
         '--config.data.data_dir=']  # empty string


def _config_flags(spec, overrides):
  """What train.py's `config_flags.DEFINE_config_file` makes of these flags."""
  argv = ['train.py', f'--config={spec}', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def test_typed_overrides_parse_as_config_flags_parses_them():
  config = loading.load(SPEC, TYPED)
  assert config.optim.num_steps == 7 and isinstance(config.optim.num_steps, int)
  assert config.optim.learning_rate == 1.0 and isinstance(config.optim.learning_rate, float)
  assert config.model.channel_mult == (1, 2, 2)
  assert config.text.cache_embeddings is False
  assert (config.data.dataset, config.data.data_dir) == ('shapes_rendered', '')
  assert config.to_dict() == _config_flags(SPEC, TYPED).to_dict()
  assert config.is_locked  # As train.py's: a typo in code cannot add a field.
  assert loading.load(SPEC).to_dict() == shapes.get_config('tiny').to_dict()


def test_missing_file_and_failing_file_are_refused_by_name(tmp_path):
  with pytest.raises(FileNotFoundError, match='configs/nope.py'):
    loading.load('configs/nope.py:tiny')
  with pytest.raises(ValueError, match="huge.*configs/shapes.py:cpu"):
    loading.load(os.path.join(ROOT, 'configs', 'shapes.py') + ':huge')
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(:\n')
  with pytest.raises(ValueError, match=f'{broken}.*SyntaxError'):
    loading.load(str(broken))


def test_bad_value_and_malformed_override_name_the_field():
  with pytest.raises(ValueError, match=r'config.optim.num_steps=abc'):
    loading.load(SPEC, ['--config.optim.num_steps=abc'])
  with pytest.raises(ValueError, match=r'config.model=3'):
    loading.load(SPEC, ['--config.model=3'])
  with pytest.raises(ValueError, match=r"'optim.num_steps=3' must look like --config"):
    loading.load(SPEC, ['optim.num_steps=3'])


def test_split_argv_finds_the_spec_and_the_overrides():
  argv = ['--config', 'a.py:x', '--config.a.b', '3', '--config.c=-1', '--workdir=w', '--config.d']
  assert loading.split_argv(argv) == ('a.py:x', ['--config.a.b=3', '--config.c=-1',
                                                 '--config.d'])
  assert loading.split_argv(['--workdir=w'], 'default.py') == ('default.py', [])


def test_train_sweep_and_benchmark_load_through_the_same_loader(monkeypatch, capsys):
  from benchmarks import train_and_score  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(ROOT)
  spec = 'configs/shapes.py:tiny'  # Error messages name the spec as given.
  with pytest.raises(ValueError) as expected:
    loading.load(spec, ['--config.optim.num_steps=abc'])
  message = str(expected.value)
  # train.py: the same message, as one line.
  train = _train_cli('--config.optim.num_steps=abc')
  assert train.returncode != 0 and train.stderr.strip() == f'error: {message}'
  # launch.sweep: every point goes through loading.load.
  with pytest.raises(SystemExit) as swept:  # As one `error:` line.
    sweep.main([f'--config={spec}', '--root=/tmp/sw', '--dry_run', '--grid=optim.num_steps=abc'])
  assert str(swept.value) == f'error: {message}'
  # benchmarks.train_and_score: the same message, and the same config for good overrides.
  with pytest.raises(SystemExit):
    train_and_score.main([f'--config={spec}', '--workdir=/tmp/b', '--config.optim.num_steps=abc'])
  assert message in capsys.readouterr().err
  seen = []

  class Stop(Exception):
    pass

  def fake_train(config, workdir):
    seen.append((config, workdir))
    raise Stop

  monkeypatch.setattr(train_and_score.loop, 'train_and_evaluate', fake_train)
  with pytest.raises(Stop):
    train_and_score.main([f'--config={spec}', '--workdir=/tmp/b', *TYPED])
  expected_config = loading.load(spec, TYPED)
  expected_config.logging.eval_at_end = False  # The benchmark scores after training itself.
  assert seen[0][0].to_dict() == expected_config.to_dict()


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


@pytest.mark.parametrize('spec,names', [('configs/shapes.py:huge', "'huge'"),
                                        ('configs/nope.py', 'configs/nope.py')])
def test_train_cli_reports_a_failing_or_missing_config_file_in_one_line(spec, names):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, 'train.py', f'--config={spec}', '--workdir=/nonexistent'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  lines = out.stderr.strip().splitlines()
  assert out.returncode != 0 and len(lines) == 1, out.stderr
  assert lines[0].startswith('error: ') and names in lines[0]


def test_sweep_grid_and_dry_run(capsys):
  points = sweep.parse_grid('optim.learning_rate=1e-3,2e-3;sampler.guidance_scale=2,4')
  assert len(points) == 4 and points[0] == {'optim.learning_rate': '1e-3',
                                            'sampler.guidance_scale': '2'}
  assert sweep.main([f'--config={ROOT}/configs/shapes.py:tiny', '--root=/tmp/sw', '--dry_run',
                     '--grid=optim.learning_rate=1e-3,2e-3']) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 2 and '--config.optim.learning_rate=2e-3' in out[1]
  assert '--workdir=/tmp/sw/learning_rate=2e-3' in out[1]
  with pytest.raises(SystemExit, match='error: .*optim.lr'):
    sweep.main([f'--config={ROOT}/configs/shapes.py:tiny', '--root=/tmp/sw', '--dry_run',
                '--grid=optim.lr=1'])


def test_sweep_from_config_expands_get_sweep(capsys):
  assert sweep.main([f'--config={ROOT}/configs/shapes.py:cpu', '--root=/tmp/sw', '--from_config',
                     '--dry_run']) == 0
  assert len(capsys.readouterr().out.strip().splitlines()) == len(shapes.get_sweep())
