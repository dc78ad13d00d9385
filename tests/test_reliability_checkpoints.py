"""What a cluster does to a workdir's checkpoints: damaged newest checkpoint, stray folders, a
diverged step, kill -9 during a save. Each run continues from an intact checkpoint. The tests
that train are in the full tier (`make test-full`, run by CI)."""
import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import shapes, specs
from sampling import from_checkpoint
from runtime import checkpoint
from training import builder, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = dict(data=2, fsdp=2)  # The shared tiny run's mesh: its train step is compiled once.


def tiny_config(tmp_path, num_steps=4):
  config = shapes.get_config('tiny')  # A checkpoint every 2 steps.
  config.data.data_dir = str(tmp_path.parent / 'tfds')
  config.logging.eval_at_end = False
  config.mesh.data, config.mesh.fsdp = MESH['data'], MESH['fsdp']
  config.optim.num_steps = num_steps
  return config


def train(config, workdir, **kwargs):
  return loop.train_and_evaluate(config, str(workdir), devices=jax.devices()[:4], **kwargs)


def truncate(step_dir):
  """Cuts every data file of a checkpoint's state to half (a node died mid-upload)."""
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  assert files
  for path in files:
    os.truncate(path, os.path.getsize(path) // 2)


def garble_metadata(step_dir):
  with open(os.path.join(step_dir, 'state', '_METADATA'), 'w') as f:
    f.write('garbage')


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope='module')
def two_checkpoints(tmp_path_factory):
  """A workdir stopped at step 4 with checkpoints 2 and 4, and the uninterrupted 6-step run."""
  root = tmp_path_factory.mktemp('ckpt')
  config = tiny_config(root / 'x', num_steps=6)
  train(config, root / 'stopped', stop_at=4)
  full = train(config, root / 'full')
  return root, config, full


def copy_of(root, name):
  import shutil
  target = root / name
  shutil.copytree(root / 'stopped', target)
  return target


@pytest.mark.full  # Trains tiny runs: the full tier (CI runs it).
@pytest.mark.parametrize('damage', [truncate, garble_metadata])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(two_checkpoints, damage, caplog):
  root, config, full = two_checkpoints
  workdir = copy_of(root, damage.__name__)
  damage(str(workdir / 'checkpoints' / '4'))
  resumed = train(config, workdir)
  assert [s for s, _ in resumed.history] == [3, 4, 5, 6]  # From step 2, not 4.
  for a, b in zip(leaves(resumed.state.params), leaves(full.state.params)):
    np.testing.assert_array_equal(a, b)
  # Kept, not deleted, and out of the manager's way.
  assert os.path.isdir(workdir / 'checkpoints.corrupt' / '4' / 'state')
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '6']
  text = caplog.text
  assert f"step 4 at {workdir / 'checkpoints' / '4'} could not be restored" in text
  assert 'checkpoints.corrupt/4' in text


@pytest.mark.full  # Trains tiny runs: the full tier (CI runs it).
def test_a_stray_numeric_folder_is_set_aside(two_checkpoints, caplog):
  root, config, full = two_checkpoints
  workdir = copy_of(root, 'stray')
  os.makedirs(workdir / 'checkpoints' / '100')
  with open(workdir / 'checkpoints' / '100' / 'README', 'w') as f:
    f.write('notes, not a checkpoint\n')
  assert checkpoint.Checkpointer(str(workdir), read_only=True).all_steps() == [2, 4]
  resumed = train(config, workdir)
  assert [s for s, _ in resumed.history] == [5, 6]
  assert open(workdir / 'checkpoints.ignored' / '100' / 'README').read().startswith('notes')
  assert 'is not a checkpoint' in caplog.text


@pytest.mark.full  # Trains tiny runs: the full tier (CI runs it).
def test_sampling_skips_a_damaged_checkpoint_and_names_it_when_asked_for(two_checkpoints):
  root, _, _ = two_checkpoints
  workdir = copy_of(root, 'sample')
  truncate(str(workdir / 'checkpoints' / '4'))
  loaded = from_checkpoint.load(str(workdir), settings_of=specs.from_saved)
  assert loaded.step == 2
  assert os.path.isdir(workdir / 'checkpoints' / '4')  # Read-only: nothing is moved.
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"--step=4: the checkpoint {workdir}/checkpoints/4 cannot be restored"):
    from_checkpoint.load(str(workdir), settings_of=specs.from_saved, step=4)


@pytest.mark.full  # Trains tiny runs: the full tier (CI runs it).
def test_when_no_checkpoint_restores_nothing_is_moved(two_checkpoints):
  root, config, _ = two_checkpoints
  workdir = copy_of(root, 'all_bad')
  truncate(str(workdir / 'checkpoints' / '4'))
  garble_metadata(str(workdir / 'checkpoints' / '2'))
  with pytest.raises(checkpoint.CheckpointError, match=r'No checkpoint in .* can be restored: '
                                                       r'step 4: .*; step 2: JSONDecodeError'):
    train(config, workdir)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert not os.path.exists(workdir / 'checkpoints.corrupt')


@pytest.mark.full  # Trains tiny runs: the full tier (CI runs it).
def test_a_diverged_state_is_not_saved(tmp_path, monkeypatch, caplog):
  """A checkpoint every step; from the 13th update on, updates are 1e8 times too large: the state
  after step 13 is finite (its step's loss and gradient are normal) but its parameters are huge,
  and the next step's loss is not finite. The guard keeps step 12 the latest checkpoint."""
  real = builder.make_optimizer

  def exploding(cfg):
    tx, lr = real(cfg)
    return optax.chain(tx, optax.scale_by_schedule(lambda n: jnp.where(n >= 12, 1e8, 1.0))), lr

  monkeypatch.setattr(builder, 'make_optimizer', exploding)
  config = tiny_config(tmp_path, num_steps=16)
  config.checkpoint.every_steps = 1
  config.checkpoint.keep = 20
  workdir = str(tmp_path / 'diverge')
  with pytest.raises(loop.NonFiniteError, match='at step 13'):  # (0-based: the 14th update.)
    train(config, workdir)
  assert checkpoint.Checkpointer(workdir, read_only=True).latest_step() == 12
  assert 'Not saving step 13: its parameter norm' in caplog.text
  # Without the guard, the diverged state would have been the latest checkpoint.
  config.checkpoint.divergence_factor = 0.0
  off = str(tmp_path / 'off')
  with pytest.raises(loop.NonFiniteError):
    train(config, off)
  assert checkpoint.Checkpointer(off, read_only=True).latest_step() == 13


def test_guard_verdicts():
  guard = checkpoint.DivergenceGuard(factor=10.0, window=5)
  for _ in range(12):
    guard.observe(1.0, 2.0, 30.0)
  assert guard.verdict() is None
  guard.observe(50.0, 2.0, 30.0)
  assert guard.verdict().startswith('its loss 50 is over checkpoint.divergence_factor=10')
  guard.observe(1.0, 2.0, float('nan'))
  assert 'parameters are not finite' in guard.verdict()
  off = checkpoint.DivergenceGuard(factor=0.0, window=5)
  for loss in [1.0] * 12 + [1e9]:
    off.observe(loss, 1.0, 1.0)
  assert off.verdict() is None  # Off: only non-finite parameters are refused.


_DRIVER = """
import os, signal, sys
import jax
from configs import shapes
from training import loop
from runtime import checkpoint
config = shapes.get_config('tiny')
config.data.data_dir, workdir, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
config.logging.eval_at_end = False
config.mesh.data, config.mesh.fsdp = 2, 2
config.optim.num_steps = 8
config.checkpoint.async_save = True
save = checkpoint.Checkpointer.save
def save_then_die(self, step, *args, **kwargs):
  out = save(self, step, *args, **kwargs)
  if step == kill_at:  # The write has started in the background: kill -9 now.
    os.kill(os.getpid(), signal.SIGKILL)
  return out
checkpoint.Checkpointer.save = save_then_die
loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4])
"""


def _drive(tmp_path, workdir, kill_at):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  return subprocess.run([sys.executable, '-c', _DRIVER, str(tmp_path / 'tfds'), str(workdir),
                         str(kill_at)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.full
def test_kill_during_a_save_then_a_truncated_newest_checkpoint(tmp_path):
  """kill -9 while checkpoint 6 is being written, then the newest finished checkpoint truncated:
  the same command resumes from the one before and ends bitwise-equal to an uninterrupted run."""
  full = _drive(tmp_path, tmp_path / 'full', kill_at=-1)
  assert full.returncode == 0, full.stderr[-2000:]
  cut = tmp_path / 'cut'
  killed = _drive(tmp_path, cut, kill_at=6)
  assert killed.returncode == -9
  steps = checkpoint.Checkpointer(str(cut), read_only=True).all_steps()
  assert len(steps) >= 2 and max(steps) <= 6  # 2 and 4, and 6 if its write finished in time.
  newest = max(steps)
  truncate(str(cut / 'checkpoints' / str(newest)))
  again = _drive(tmp_path, cut, kill_at=-1)
  assert again.returncode == 0, again.stderr[-2000:]
  assert f'Checkpoint step {newest} at' in again.stderr
  for use_ema in (False, True):
    a = from_checkpoint.load(str(tmp_path / 'full'), settings_of=specs.from_saved,
                             use_ema=use_ema)
    b = from_checkpoint.load(str(cut), settings_of=specs.from_saved, use_ema=use_ema)
    assert a.step == b.step == 8
    for x, y in zip(leaves(a.unet_params), leaves(b.unet_params)):
      np.testing.assert_array_equal(x, y)
