"""Memory and scale levers of the train step: gradient accumulation, bf16 compute, config checks."""

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import shapes, specs, validation
from data import shapes as shapes_data
from runtime import checkpoint, sharding
from runtime import state as state_lib
from training import builder
from training import step as step_lib


class Setup:
  """The tiny config's first state and one fixed batch of Shapes images on a mesh of `devices`,
  and its jitted train steps (no donation: a state can be stepped twice) for config variants."""

  def __init__(self, config, devices, tmp_path):
    self.config = config
    settings = specs.build(config)
    self.mesh = sharding.make_mesh(settings.mesh, devices)
    trainer = builder.build_trainer(settings, self.mesh, workdir=str(tmp_path))
    self.text_encoder, self.tx, self.shardings = trainer.text_encoder, trainer.tx, trainer.shardings
    init_fn, self.inputs = trainer.init, trainer.text_inputs
    b, s = config.data.global_batch_size, config.data.image_size
    examples = [shapes_data.example('train', i, s) for i in range(b)]
    local = {'image': np.stack([im for im, _ in examples]).astype(np.float32) / 127.5 - 1.0,
             'bad': np.zeros(b, np.int32), **self.inputs({'caption': [c for _, c in examples]})}
    self.rng = jax.random.PRNGKey(config.seed)
    with self.context():
      self.state = init_fn(self.rng)
      self.batch = sharding.global_batch(self.mesh, local)

  @contextlib.contextmanager
  def context(self):
    """The mesh and the logical axis rules, as the loop sets them around a step."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.config.mesh.logical_axis_rules):
      yield

  def train_step(self, **fields):
    """step(state) -> (state, metrics) of the config with `fields` changed; step(state,
    trace=True): its jaxpr."""
    settings = validation.validate(tiny_config(self.config, **fields))
    validation.check_mesh(settings, self.mesh, 1)
    unet, _ = state_lib.build_networks(settings, autoencoder=None)
    step = functools.partial(step_lib.train_step, unet=unet, text_encoder=self.text_encoder,
                             null_inputs=self.inputs.null, tx=self.tx,
                             diffusion=settings.diffusion, optim=settings.optim,
                             cond_drop_prob=settings.text.cond_drop_prob)
    jitted = jax.jit(step, out_shardings=(self.shardings, None))

    def run(state, trace=False):
      with self.context():
        if trace:
          return jax.make_jaxpr(step)(state, self.batch, self.rng, None).jaxpr
        return jitted(state, self.batch, self.rng, None)
    return run


def tiny_config(config=None, **fields):
  """A copy of `config` (default: configs/shapes.py:tiny) with section__field=value changes."""
  config = ml_collections.ConfigDict((config or shapes.get_config('tiny')).to_dict())
  for path, value in fields.items():
    section, name = path.split('__')
    with config.ignore_type():  # Also the old boolean model.remat, and wrong types on purpose.
      config[section][name] = value
  return config


def conv_inputs(jaxpr) -> list:
  """Avals of every convolution's input in a jaxpr and its sub-jaxprs (scan, remat, pjit)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      found.append(eqn.invars[0].aval)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          found += conv_inputs(sub)
  return found


def scan_lengths(jaxpr) -> list:
  return [e.params['length'] for e in jaxpr.eqns if e.primitive.name == 'scan']


@pytest.mark.full  # Two compiled steps on 2 devices, ~1 min: the full tier.
@pytest.mark.parametrize('k', [4, 2])
def test_accumulating_over_micro_batches_is_the_full_batch_step(tmp_path, k):
  # Half the captions dropped, so the condition dropout must be sliced like the images; fsdp=2,
  # so parameters (and the summed gradients) are sharded; k=4: 8 examples = 4 micro-batches of 2,
  # one example per device and micro-batch.
  setup = Setup(tiny_config(text__cond_drop_prob=0.5, mesh__data=1, mesh__fsdp=2),
                jax.devices()[:2], tmp_path)
  full, accumulated = setup.train_step(), setup.train_step(optim__grad_accum_steps=k)
  state = setup.state  # A few full-batch steps first: from the init, the zero output layer
  for _ in range(3):  # blocks every gradient but its own (and step 0 has learning rate 0).
    state, _ = full(state)
  # The network really ran k times, on B/k examples at a time.
  for step, scans, examples in ((full, [], 8), (accumulated, [k], 8 // k)):
    jaxpr = step(state, trace=True)
    assert scan_lengths(jaxpr) == scans
    assert {a.shape[0] for a in conv_inputs(jaxpr)} == {examples}
  (state_1, m_1), (state_k, m_k) = jax.device_get((full(state), accumulated(state)))
  assert m_1['finite'] and m_1['grad_norm'] > 0
  # Seen on CPU: the same loss, gradient norms within 1e-7 relative, the state within 6e-8.
  np.testing.assert_allclose(m_k['loss'], m_1['loss'], rtol=1e-6)
  np.testing.assert_allclose(m_k['grad_norm'], m_1['grad_norm'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_1), jax.tree.leaves(state_k)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.full  # Two compilations and 2 x 60 steps: 70-120 s on 2 shared cores.
def test_bf16_compute_trains_with_float32_weights_like_float32(tmp_path):
  # 60 steps on one fixed batch of 8 Shapes images, from the same state and seed in both dtypes.
  setup = Setup(tiny_config(optim__num_steps=60, optim__warmup_steps=5, mesh__data=1),
                jax.devices()[:1], tmp_path)
  curves, held_out = {}, {}
  for dtype in ('float32', 'bfloat16'):
    step = setup.train_step(model__dtype=dtype)
    if dtype == 'bfloat16':  # The U-Net computes in bf16, its output head in float32.
      dtypes = {a.dtype for a in conv_inputs(step(setup.state, trace=True))}
      assert dtypes == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}, dtypes
    state, losses = setup.state, []
    for _ in range(60):
      state, m = step(state)
      assert m['loss'].dtype == jnp.float32 and bool(m['finite'])
      losses.append(float(m['loss']))
    curves[dtype] = np.array(losses)
    for tree in (state.params, state.opt_state, state.ema_params):  # fp32 weights and moments.
      floats = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
      assert floats == {jnp.dtype(jnp.float32)}, (dtype, floats)
    # The loss of the first and the last parameters on the same unseen noise (the draws of steps
    # 1000-1009): the per-step loss itself swings with the noise levels drawn.
    held_out[dtype] = [np.mean([float(step(s.replace(step=jnp.int32(1000 + i)))[1]['loss'])
                                for i in range(10)]) for s in (setup.state, state)]
  for dtype, (first, last) in held_out.items():
    assert np.all(np.isfinite(curves[dtype]))
    assert last < 0.7 * first, (dtype, held_out)
  gap = np.abs(curves['bfloat16'] - curves['float32']) / curves['float32']
  print('bf16/f32 relative loss gap: max', gap.max(), 'held-out (first, last):', held_out)
  assert gap.max() < 0.02, gap  # 0.25% seen on CPU: bf16 rounding, not another training run.


def test_grad_accum_steps_must_split_each_devices_share():
  mesh = sharding.make_mesh(specs.build(tiny_config(mesh__data=2, mesh__fsdp=2, mesh__tensor=2)).mesh,
                            jax.devices()[:8])
  config = tiny_config(optim__grad_accum_steps=2)  # 8 examples: 2 per device, 1 per micro-batch.
  validation.check_mesh(validation.validate(config), mesh, 1)
  config.optim.grad_accum_steps = 4
  settings = validation.validate(config)  # 8 = 4 x 2: fine without a mesh, not on 4 devices.
  with pytest.raises(ValueError, match=r'data.global_batch_size=8 must be divisible by '
                                       r'optim.grad_accum_steps=4 x the data-parallel devices '
                                       r'\(mesh.data=2 x mesh.fsdp=2 = 4 .*\) = 16.* e.g. 16'):
    validation.check_mesh(settings, mesh, 1)
  for bad, match in ((0, 'optim.grad_accum_steps=0 must be a positive integer'),
                     (2.0, 'optim.grad_accum_steps=2.0 must be a positive integer'),
                     (3, 'data.global_batch_size=8 must be divisible by optim.grad_accum_steps=3')):
    with pytest.raises(ValueError, match=match):
      validation.validate(tiny_config(optim__grad_accum_steps=bad))


def test_remat_accepts_the_old_booleans_and_names_the_choices(tmp_path):
  for old, new in ((True, 'full'), (False, 'none')):
    config = tiny_config(model__remat=old)  # What a checkpoint written before the policies holds.
    assert specs.model(config).remat == new
  # --config.model.remat=True on the command line arrives as the string.
  assert specs.model(tiny_config(model__remat='True')).remat == 'full'
  with pytest.raises(ValueError, match=r"model.remat must be one of 'none', 'dots', 'full' .* "
                                       r"got 'yes'"):
    specs.model(tiny_config(model__remat='yes'))
  # Resuming such a checkpoint with a policy name is no architecture change.
  saved = shapes.get_config('tiny').to_dict()
  saved['model']['remat'] = True
  checkpoint.check_compatible(saved, tiny_config(model__remat='dots').to_dict(), str(tmp_path))


def test_a_frozen_component_with_other_weights_is_refused_but_a_moved_folder_resumes(tmp_path):
  saved = shapes.get_config('tiny').to_dict()
  saved[checkpoint.FROZEN_KEY] = {'autoencoder': ['aaaa', '/models/vae']}
  moved = dict(saved, **{checkpoint.FROZEN_KEY: {'autoencoder': ['aaaa', '/elsewhere/vae']}})
  checkpoint.check_compatible(saved, moved, str(tmp_path))  # Same weights, another path.
  other = dict(saved, **{checkpoint.FROZEN_KEY: {'autoencoder': ['bbbb', '/models/vae2']}})
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match=r'The autoencoder differs .* weight digest bbbb \(/models/vae2\) vs '
                           r'aaaa \(/models/vae\)'):
    checkpoint.check_compatible(saved, other, str(tmp_path))
  del saved[checkpoint.FROZEN_KEY]  # A checkpoint written before digests were kept.
  checkpoint.check_compatible(saved, other, str(tmp_path))
