"""Start-up validation: every bad config value is refused before any heavy work, naming the field
and saying what to do; train.py prints it as one `error:` line (the traceback: --verbose)."""
import os
import subprocess
import sys

import jax
import pytest

from configs import shapes, specs, validation
from runtime import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('field, value, match', [
    ('optim.learning_rate', -1e-3, 'optim.learning_rate=-0.001 must be positive'),
    ('optim.learning_rate', 0.0, 'optim.learning_rate=0.0 must be positive'),
    ('optim.b1', 1.0, r'optim.b1=1.0 must be in \[0, 1\)'),
    ('optim.b2', -0.5, r'optim.b2=-0.5 must be in \[0, 1\)'),
    ('optim.eps', 0.0, 'optim.eps=0.0 must be positive'),
    ('optim.weight_decay', -0.1, 'optim.weight_decay=-0.1 must be >= 0'),
    ('optim.grad_clip', -1.0, 'optim.grad_clip=-1.0 must be >= 0'),
    ('optim.end_lr_factor', -0.1, 'optim.end_lr_factor=-0.1 must be >= 0'),
    ('optim.warmup_steps', -5, 'optim.warmup_steps=-5 must be >= 0'),
    ('checkpoint.divergence_factor', -1.0, 'checkpoint.divergence_factor=-1.0 must be >= 0'),
    ('checkpoint.divergence_window', 0, 'checkpoint.divergence_window=0 must be a positive'),
    ('sampler.guidance_scale', -2.0, 'sampler.guidance_scale=-2.0 must be >= 0'),
])
def test_optimiser_and_guard_values_are_checked(field, value, match):
  config = shapes.get_config('tiny')
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    validation.validate(config)


def test_a_missing_eval_prompts_file_is_found_at_start_up(tmp_path):
  config = shapes.get_config('tiny')
  config.logging.eval_prompts = str(tmp_path / 'prompts.txt')
  with pytest.raises(ValueError, match=r"logging.eval_prompts=.*prompts.txt': no such file"):
    validation.validate(config)
  config.logging.eval_at_end = False  # No evaluation at all: the file is not needed.
  validation.validate(config)


def test_the_batch_must_split_over_the_data_parallel_devices():
  config = shapes.get_config('tiny')
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(specs.build(config).mesh, jax.devices()[:8])
  config.data.global_batch_size = 6
  with pytest.raises(ValueError, match=r'data.global_batch_size=6 must be divisible by the '
                                       r'data-parallel devices: mesh.data=2 x mesh.fsdp=2 = 4 .*'
                                       r'e.g. 8'):
    validation.check_mesh(validation.validate(config), mesh, 1)
  config.data.global_batch_size = 8
  validation.check_mesh(validation.validate(config), mesh, 1)


def run_train(*args, env=None):
  return subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env={**os.environ, **(env or {})})


def error_lines(proc):
  return [line for line in proc.stderr.splitlines() if line.startswith('error:')]


def test_train_py_refuses_a_batch_the_mesh_cannot_split_in_one_line(tmp_path):
  proc = run_train('--config=configs/shapes.py:tiny', f'--workdir={tmp_path / "w"}',
                   '--config.data.global_batch_size=6', '--config.logging.eval_at_end=False',
                   env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert proc.returncode == 1
  assert error_lines(proc) == [
      'error: data.global_batch_size=6 must be divisible by the data-parallel devices: '
      'mesh.data=4 x mesh.fsdp=1 = 4 (of 4 devices); use a multiple of 4, e.g. 8. On the CPU, '
      'train.py makes one device per core, as many as the batch splits over, unless XLA_FLAGS '
      'sets --xla_force_host_platform_device_count.']
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')  # Refused before anything was made.
  assert 'ValueError: data.global_batch_size=6' in open(tmp_path / 'w' / 'error.log').read()


@pytest.mark.full  # Two train.py processes; the one-line refusal: the batch test above.
def test_train_py_negative_learning_rate_and_verbose(tmp_path):
  args = ['--config=configs/shapes.py:tiny', f'--workdir={tmp_path / "w"}',
          '--config.optim.learning_rate=-0.001']
  proc = run_train(*args)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert error_lines(proc) == ['error: optim.learning_rate=-0.001 must be positive (a negative '
                               'rate is gradient ascent).']
  verbose = run_train(*args, '--verbose')
  assert verbose.returncode == 1 and 'Traceback' in verbose.stderr
  assert 'ValueError: optim.learning_rate=-0.001' in verbose.stderr


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path):
  bad = tmp_path / 'my_config.py'
  bad.write_text('def get_config(:\n')
  proc = run_train(f'--config={bad}', f'--workdir={tmp_path / "w"}')
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert len(error_lines(proc)) == 1
  assert error_lines(proc)[0].startswith(f"error: Config file '{bad}' failed to import: "
                                         'SyntaxError')
