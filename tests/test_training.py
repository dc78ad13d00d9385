"""The real training loop on the tiny config: sharding equivalence, resume, non-finite stop, specs."""

import logging as pylogging
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import shapes, specs
from data import pipeline
from runtime import checkpoint, sharding
from training import builder, loop


def tiny_config(tmp_path, **mesh):
  config = shapes.get_config('tiny')
  config.data.data_dir = str(tmp_path.parent / 'tfds')  # Shared by the tests of this module.
  config.logging.eval_at_end = False  # test_sampling covers the eval grid.
  for k, v in mesh.items():
    config.mesh[k] = v
  return config


def built(config, devices=None):
  """(the run's trainer, its mesh), as the loop builds them."""
  settings = specs.build(config)
  mesh = sharding.make_mesh(settings.mesh, devices)
  return builder.build_trainer(settings, mesh), mesh


def losses(result):
  return np.array([loss for _, loss in result.history])


def params_of(result):
  return jax.tree.leaves(jax.device_get(result.state.params))


@pytest.mark.full
def test_one_device_and_8_devices_give_the_same_losses(tmp_path):
  one = loop.train_and_evaluate(tiny_config(tmp_path, data=1, fsdp=1), str(tmp_path / 'one'),
                                devices=jax.devices()[:1])
  assert len(one.history) == 4 and len(set(losses(one).tolist())) == 4
  # 4 x 2 (data x fsdp), and 2 x 2 x 2 with tensor parallelism over heads, MLP and conv outputs.
  for name, mesh in (('dp_fsdp', dict(data=4, fsdp=2)), ('tp', dict(data=2, fsdp=2, tensor=2))):
    eight = loop.train_and_evaluate(tiny_config(tmp_path, **mesh), str(tmp_path / name))
    np.testing.assert_allclose(losses(one), losses(eight), rtol=2e-4, atol=2e-5)
    for a, b in zip(params_of(one), params_of(eight)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_tensor_parallel_rules_shard_heads_and_mlp(tmp_path):
  trainer, _ = built(tiny_config(tmp_path, data=2, fsdp=2, tensor=2))
  specs = {jax.tree_util.keystr(k): normalized(s.spec)
           for k, s in jax.tree_util.tree_leaves_with_path(trainer.shardings.params)}
  query = [v for k, v in specs.items() if k.endswith("['self_attn']['query']")]
  assert query and all(v == P('fsdp', 'tensor') for v in query), query
  mlp = [v for k, v in specs.items() if "['noise_embed']" in k and k.endswith("['kernel']")]
  assert P('fsdp', 'tensor') in mlp and P('tensor', 'fsdp') in mlp, mlp


def test_named_parameters_have_the_partition_specs_of_their_axes(tmp_path):
  """The specs of the state's shardings (nothing is compiled): conv kernels split their input
  channels over 'fsdp', the text embedding table its width; the EMA follows the parameters."""
  trainer, _ = built(tiny_config(tmp_path, data=4, fsdp=2))
  specs = {jax.tree_util.keystr(k): normalized(s.spec)
           for k, s in jax.tree_util.tree_leaves_with_path(trainer.shardings.params)}
  conv = [k for k in specs
          if k.endswith("['kernel']") and len(abstract_leaf(trainer.abstract, k).shape) == 4]
  sharded = [k for k in conv if specs[k] == P(None, None, 'fsdp')]
  assert conv and len(sharded) >= len(conv) // 2, {k: specs[k] for k in conv}
  emb = [k for k in specs if 'text' in k and 'embedding' in k]
  assert emb and all(specs[k] == P(None, 'fsdp') for k in emb), {k: specs[k] for k in emb}
  assert trainer.shardings.ema_params == trainer.shardings.params


@pytest.mark.full  # Compiles the initialiser over 8 devices (the specs alone: the test above).
def test_named_parameters_are_really_sharded(tmp_path):
  trainer, mesh = built(tiny_config(tmp_path, data=4, fsdp=2))
  abstract, init_fn = trainer.abstract, trainer.init
  specs = {jax.tree_util.keystr(k): normalized(s.spec)
           for k, s in jax.tree_util.tree_leaves_with_path(trainer.shardings.params)}
  # Conv kernels (3, 3, in, out): 'conv_in' -> fsdp. The text embedding table: 'text_embed' -> fsdp.
  conv = [k for k in specs if k.endswith("['kernel']") and len(abstract_leaf(abstract, k).shape) == 4]
  assert conv, 'the U-Net has conv kernels'
  sharded = [k for k in conv if specs[k] == P(None, None, 'fsdp')]
  assert len(sharded) >= len(conv) // 2, {k: specs[k] for k in conv}
  emb = [k for k in specs if 'text' in k and 'embedding' in k]
  assert emb and all(specs[k] == P(None, 'fsdp') for k in emb), {k: specs[k] for k in emb}
  state = init_fn(jax.random.PRNGKey(0))
  leaf = next(v for k, v in jax.tree_util.tree_leaves_with_path(state.params)
              if jax.tree_util.keystr(k) == sharded[0])
  # Each device holds half of the input-channel dimension.
  shard_shape = leaf.sharding.shard_shape(leaf.shape)
  assert shard_shape[2] == leaf.shape[2] // 2
  # The optimiser's moments and the EMA follow the parameters' layout.
  assert trainer.shardings.ema_params == trainer.shardings.params


def normalized(spec):
  """PartitionSpec without trailing Nones (P(a, None) and P(a) mean the same)."""
  parts = list(spec)
  while parts and parts[-1] is None:
    parts.pop()
  return P(*parts)


def abstract_leaf(abstract, key):
  return next(v for k, v in jax.tree_util.tree_leaves_with_path(abstract.params)
              if jax.tree_util.keystr(k) == key)


@pytest.mark.full  # The shared tiny Shapes run and runs of its own (the default tier: the SD run).
def test_resume_replays_the_uninterrupted_run(tmp_path, tiny_run, caplog):
  config = tiny_config(tmp_path, data=2, fsdp=2)
  config.data.data_dir = tiny_run.config.data.data_dir  # Its data, prepared already.
  full = tiny_run.result  # The same config and 2 x 2 mesh, uninterrupted (tests/conftest.py).
  assert len(full.history) == 4
  first = loop.train_and_evaluate(config, str(tmp_path / 'cut'), devices=jax.devices()[:4],
                                  stop_at=2)
  assert [s for s, _ in first.history] == [1, 2]
  with caplog.at_level(pylogging.INFO):
    second = loop.train_and_evaluate(config, str(tmp_path / 'cut'), devices=jax.devices()[:4])
  assert [s for s, _ in second.history] == [3, 4]
  # The resumed run's step is the first run's traced program, read back (runtime/trace_cache).
  assert any(r.getMessage().startswith('train_step: traced program loaded from')
             for r in caplog.records), [r.getMessage() for r in caplog.records][-20:]
  np.testing.assert_allclose(losses(first).tolist() + losses(second).tolist(), losses(full),
                             rtol=1e-6)
  for a, b in zip(params_of(second), params_of(full)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  ema_a = jax.tree.leaves(jax.device_get(second.state.ema_params))
  ema_b = jax.tree.leaves(jax.device_get(full.state.ema_params))
  for a, b in zip(ema_a, ema_b):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# The next tests train the tiny config on the shared run's 2 x 2 mesh, so their train step is
# compiled once per session (tests/conftest.py keeps a compilation cache).
SHARED_MESH = dict(data=2, fsdp=2)


@pytest.mark.full  # The shared tiny Shapes run and runs of its own (the default tier: the SD run).
def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path, tiny_run, monkeypatch):
  config = tiny_config(tmp_path, **SHARED_MESH)  # 4 steps, a checkpoint every 2.
  config.data.data_dir = tiny_run.config.data.data_dir  # Its data, prepared already.
  workdir = str(tmp_path / 'nan')  # Resumes the shared run's step-2 checkpoint: steps 3 and 4.
  shutil.copytree(os.path.join(tiny_run.workdir, 'checkpoints', '2'),
                  os.path.join(workdir, 'checkpoints', '2'))
  real_get = pipeline.iterate

  def poisoned(*args, **kwargs):
    for step, batch in real_get(*args, **kwargs):
      if step == 3:
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield step, batch

  monkeypatch.setattr(pipeline, 'iterate', poisoned)
  with pytest.raises(loop.NonFiniteError, match='step 3'):
    loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4])
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert ckpt.all_steps() == [2]  # Nothing of the poisoned step was saved.
  trainer, _ = built(config, jax.devices()[:4])
  state, position = ckpt.restore(checkpoint.abstract_with_shardings(trainer.abstract,
                                                                    trainer.shardings))
  assert position['step'] == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


@pytest.mark.full  # The shared tiny Shapes run and runs of its own (the default tier: the SD run).
def test_checkpoint_from_another_architecture_is_refused(tmp_path, tiny_run):
  config = tiny_config(tmp_path, **SHARED_MESH)
  workdir = str(tmp_path / 'arch')  # A copy of the shared run's checkpoints: nothing to train.
  shutil.copytree(os.path.join(tiny_run.workdir, 'checkpoints'),
                  os.path.join(workdir, 'checkpoints'))
  config.model.channels = 32
  with pytest.raises(ValueError, match='model.channels'):
    loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4])


@pytest.mark.full  # Trains its own run (~15 s alone): the full tier.
def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, monkeypatch):
  import os
  import signal
  config = tiny_config(tmp_path, **SHARED_MESH)  # 4 steps.
  config.checkpoint.every_steps = 100  # Only the signal makes it save.
  real_iterate = pipeline.iterate

  def signalling(*args, **kwargs):
    for step, batch in real_iterate(*args, **kwargs):
      if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)  # As a scheduler's pre-emption notice would.
      yield step, batch

  monkeypatch.setattr(pipeline, 'iterate', signalling)
  workdir = str(tmp_path / 'term')
  result = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4])
  assert [s for s, _ in result.history] == [1, 2, 3]
  assert checkpoint.Checkpointer(workdir, read_only=True).latest_step() == 3
  assert signal.getsignal(signal.SIGTERM) is not None  # The previous handler is back.
