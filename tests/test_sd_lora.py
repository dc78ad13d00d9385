"""LoRA fine-tuning of a (tiny, random) Stable Diffusion pipeline, without PyTorch: adapters sit on
the target layers, bad settings are refused naming the field; in the full tier (the shared LoRA
run), only the adapters train and are saved, resuming refuses another base and is exact, and an
untrained adapter is the base network bit for bit."""
import dataclasses
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base as base_config
from configs import specs
from models import family, lora, sd_loading, sd_unet
from runtime import checkpoint
from sampling import from_checkpoint
from tests import sd_runs
from tools import make_sd_pipeline
from training import loop

TARGETS = sd_runs.LORA_TARGETS


def _leaf_names(tree):
  last = lambda k: getattr(k, 'key', getattr(k, 'name', k))
  return {str(last(path[-1])) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _adapted(folder):
  """(the folder's U-Net spec and weights, that spec with rank-3 adapters on TARGETS, inputs)."""
  spec, base = sd_loading.load_sd_unet(os.path.join(folder, 'unet'))
  adapted = dataclasses.replace(spec, lora=lora.LoRASpec(rank=3, alpha=6.0, targets=TARGETS,
                                                         dropout=0.0))
  r = np.random.RandomState(0)
  x, t = jnp.asarray(r.randn(2, 8, 8, 4), jnp.float32), jnp.array([10.0, 700.0])
  ctx = jnp.asarray(r.randn(2, 77, spec.cross_attention_dim), jnp.float32)
  args = (x, t, ctx, jnp.ones((2, 77), bool), jnp.zeros((2, spec.cross_attention_dim)))
  return spec, base, adapted, args


def test_adapters_sit_on_the_target_layers_beside_the_base_params(sd_pipeline):
  _, base, adapted, args = _adapted(sd_pipeline[0])
  params = jax.eval_shape(lambda k: sd_unet.SDUNet(adapted).init(k, *args, train=False),
                          jax.random.key(1))['params']
  adapters, random_base = lora.split(nn.meta.unbox(params))
  assert jax.tree.structure(random_base) == jax.tree.structure(base)
  assert _leaf_names(adapters) == set(lora.ADAPTERS)
  blocks = adapters['down_blocks_0']['attentions_0']['transformer_blocks_0']
  assert set(blocks) == {'attn1', 'attn2', 'ff'} and set(blocks['ff']) == {'net_0_proj', 'net_2'}
  assert blocks['attn1']['to_q']['lora_A'].shape == (32, 3)


@pytest.mark.full  # Compiles the adapted U-Net's initialiser and two U-Nets (~25 s).
def test_an_untrained_adapter_is_the_base_network_bit_for_bit(sd_pipeline):
  spec, base, adapted, args = _adapted(sd_pipeline[0])
  params = jax.jit(lambda k: sd_unet.SDUNet(adapted).init(k, *args, train=False))(
      jax.random.key(1))['params']
  adapters, _ = lora.split(nn.meta.unbox(params))
  blocks = adapters['down_blocks_0']['attentions_0']['transformer_blocks_0']
  assert not np.any(blocks['attn1']['to_q']['lora_B'])  # B starts at zero; A does not.
  assert np.any(blocks['attn1']['to_q']['lora_A'])
  apply = lambda net: jax.jit(lambda p: net.apply({'params': p}, *args, train=False))
  plain = apply(sd_unet.SDUNet(spec))(base)
  with_adapters = apply(sd_unet.SDUNet(adapted))(lora.combine(adapters, base))
  np.testing.assert_array_equal(plain, with_adapters)
  # A trained adapter changes the output by (alpha / r) x A B (here 2 x).
  nudged = jax.tree.map(lambda a: a + 0.01, adapters)
  changed = apply(sd_unet.SDUNet(adapted))(lora.combine(nudged, base))
  assert np.abs(changed - plain).max() > 1e-4


@pytest.mark.full  # The shared LoRA run (~50 s on 2 cores); LoRA's layers, errors: the tests here.
def test_only_the_adapters_train_are_saved_and_sample(sd_lora_run, tmp_path):
  """The run: tests/conftest.py's `sd_lora_run`, shared with tests/test_export_lora.py."""
  config, full, workdir = sd_lora_run.config, sd_lora_run.full, sd_lora_run.workdir
  assert config.model.lora.rank == 2 and config.model.lora.dropout == 0.1
  assert [step for step, _ in full.history] == [1, 2]
  state = jax.device_get(full.state)
  # The train state (so the optimiser, the EMA and every checkpoint) holds the adapters alone.
  for tree in (state.params, state.ema_params, state.opt_state):
    assert _leaf_names(tree) <= set(lora.ADAPTERS) | {'count'}, _leaf_names(tree)
  b = state.params['unet']['down_blocks_0']['attentions_0']['transformer_blocks_0']['attn1'][
      'to_q']['lora_B']
  assert 0 < np.abs(b).max() <= 3 * config.optim.learning_rate
  saved = os.path.join(checkpoint.state_dir(workdir), '2')
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(saved) for f in fs)
  unet_bytes = sum(x.nbytes for x in jax.tree.leaves(family.pretrained(
      specs.build(config).model)()))
  assert size < unet_bytes, (size, unet_bytes)

  # Sampling: the adapters over the folder's base; --lora_scale=0 is the base network exactly.
  base = family.pretrained(specs.build(config).model)()
  _assert_samples_with(workdir, state.params, base)
  off = from_checkpoint.load(workdir, settings_of=specs.from_saved, use_ema=False, lora_scale=0.0)
  off_adapters, off_base = lora.split(jax.device_get(off.unet_params))
  jax.tree.map(np.testing.assert_array_equal, off_base, base)
  assert not any(np.any(b) for b in jax.tree.leaves(off_adapters['mid_block'])[1::2])  # lora_B

  # Resuming the adapters over another base (same shapes, other weights) is refused.
  other = make_sd_pipeline.write_pipeline(str(tmp_path / 'other'), preset='sd1', seed=7)
  moved = sd_runs.tiny_config(other, sd_lora_run.images, **dict(sd_runs.LORA,
                                                                 optim__num_steps=3))
  copy = shutil.copytree(workdir, str(tmp_path / 'run'))  # (Not written into the shared run.)
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match='U-Net under the LoRA adapters'):
    loop.train_and_evaluate(moved, copy, devices=jax.devices()[:1])


def _assert_samples_with(workdir, params, base):
  """Sampling from `workdir` takes the adapters `params` over the folder's U-Net `base`."""
  loaded = from_checkpoint.load(workdir, settings_of=specs.from_saved, use_ema=False)
  want = lora.combine(params, {'unet': base})['unet']
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.unet_params), want)


@pytest.mark.full  # Two more starts of the shared run (~30 s).
def test_the_run_stopped_after_step_1_resumes_exactly(sd_lora_run):
  cut, resumed = sd_lora_run.resumed
  assert [step for step, _ in resumed] == [1, 2]
  np.testing.assert_allclose([loss for _, loss in resumed],
                             [loss for _, loss in sd_lora_run.full.history], rtol=1e-6)
  _assert_samples_with(cut, jax.device_get(sd_lora_run.full.state.params),
                       family.pretrained(specs.build(sd_lora_run.config).model)())


@pytest.mark.parametrize('changes, match', [
    (dict(lora__rank=-1), r'model\.lora\.rank=-1'),
    (dict(lora__rank=2, lora__targets=('to_q', 'attn')), r"model\.lora\.targets.*'to_out\.0'"),
    (dict(lora__rank=2, lora__dropout=1.0), r'model\.lora\.dropout'),
])
def test_bad_lora_settings_are_refused_naming_the_field(sd_pipeline, changes, match):
  folder, data = sd_pipeline
  with pytest.raises(ValueError, match=match):
    specs.build(sd_runs.tiny_config(folder, data, **changes))


def test_a_rank_wider_than_a_layer_is_refused_naming_it(sd_pipeline):
  folder, data = sd_pipeline
  settings = specs.build(sd_runs.tiny_config(folder, data, lora__rank=64))
  net = family.build(settings.model, 2)
  with pytest.raises(ValueError, match=r"model\.lora\.rank=64 is larger than the layer 'to_q'"):
    jax.eval_shape(lambda k: net.init(k, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                                      jnp.zeros((1, 77, 32)), jnp.ones((1, 77), bool),
                                      jnp.zeros((1, 32)), train=False), jax.random.key(0))


def test_lora_needs_a_pretrained_family():
  config = base_config.get_config()
  config.model.lora.rank = 4
  with pytest.raises(ValueError, match=r"model\.lora\.rank=4 .*model\.family='sd'"):
    specs.build(config)
