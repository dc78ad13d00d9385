"""U-Net behaviour on a tiny config: shapes, dtypes, zero init, text conditioning, masking, remat, axes."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.unet import UNet, UNetSpec

B, S, C, L, DT = 2, 8, 3, 5, 12

BASE = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            num_heads=2, head_dim=0, dropout=0.0, norm_groups=8, dtype='float32',
            param_dtype='float32', remat='none', attention='auto', patch_size=1,
            coord_channels=False,
            pooled_conditioning=True)

AXES_VOCAB = {None, 'conv_in', 'conv_out', 'embed', 'mlp', 'heads', 'kv', 'text_embed', 'norm'}


def make_config(**overrides):
  return UNetSpec(**{**BASE, **overrides})


def inputs(seed=0):
  r = np.random.RandomState(seed)
  x = jnp.asarray(r.randn(B, S, S, C), jnp.float32)
  c_noise = jnp.asarray(r.uniform(-3, 3, size=(B,)), jnp.float32)
  context = jnp.asarray(r.randn(B, L, DT), jnp.float32)
  mask = jnp.asarray([[True, True, True, False, False], [True, True, False, False, False]])
  pooled = jnp.asarray(r.randn(B, DT), jnp.float32)
  return x, c_noise, context, mask, pooled


def perturb_output_layer(variables, seed=1):
  """Replaces the zero-initialised output conv kernel with random values."""
  params = nn.unbox(variables)['params']
  kernel = params['conv_out']['kernel']
  new = 0.1 * jax.random.normal(jax.random.key(seed), kernel.shape, kernel.dtype)
  return {'params': {**params, 'conv_out': {**params['conv_out'], 'kernel': new}}}


@pytest.fixture(scope='module')
def boxed_variables():
  model = UNet(make_config())
  return jax.jit(lambda k: model.init(k, *inputs(), train=False))(jax.random.key(0))


@pytest.fixture(scope='module')
def variables(boxed_variables):
  return perturb_output_layer(boxed_variables)


@functools.cache
def _jitted_apply(config):
  return jax.jit(lambda variables, *args: UNet(config).apply(variables, *args, train=False))


def apply(config, variables, *args):
  """The U-Net in evaluation mode, jitted once per config (eager, its ops compile one by one)."""
  return _jitted_apply(config)(variables, *args)


def test_zero_init_output_layer_gives_zero_output(boxed_variables):
  out = apply(make_config(), nn.unbox(boxed_variables), *inputs())
  assert out.shape == (B, S, S, C) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize('dtype', ['float32', pytest.param('bfloat16', marks=pytest.mark.full)])
def test_output_shape_dtype_and_precision(variables, dtype):
  out = apply(make_config(dtype=dtype), variables, *inputs())
  assert out.shape == (B, S, S, C) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and np.abs(out).max() > 0
  if dtype == 'bfloat16':
    ref = apply(make_config(), variables, *inputs())
    err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert 0 < err < 0.1, err  # really computed in bf16, yet close to the f32 result.


def test_params_keep_param_dtype_under_bf16_compute():
  model = UNet(make_config(dtype='bfloat16'))
  shapes = jax.eval_shape(lambda k: model.init(k, *inputs(), train=False), jax.random.key(0))
  dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(nn.unbox(shapes))}
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_cross_attention_conditions_on_context(variables):
  x, c_noise, context, mask, pooled = inputs()
  out_a = apply(make_config(), variables, x, c_noise, context, mask, pooled)
  _, _, other_context, _, other_pooled = inputs(seed=7)
  out_b = apply(make_config(), variables, x, c_noise, other_context, mask, pooled)
  assert float(jnp.abs(out_a - out_b).max()) > 1e-4
  # The pooled vector conditions too (through the noise embedding).
  out_c = apply(make_config(), variables, x, c_noise, context, mask, other_pooled)
  assert float(jnp.abs(out_a - out_c).max()) > 1e-4


def test_noise_level_conditions(variables):
  x, c_noise, context, mask, pooled = inputs()
  out_a = apply(make_config(), variables, x, c_noise, context, mask, pooled)
  out_b = apply(make_config(), variables, x, c_noise + 0.5, context, mask, pooled)
  assert float(jnp.abs(out_a - out_b).max()) > 1e-4


def test_masked_tokens_have_no_influence(variables):
  x, c_noise, context, mask, pooled = inputs()
  out_a = apply(make_config(), variables, x, c_noise, context, mask, pooled)
  noise = 100.0 * jax.random.normal(jax.random.key(3), context.shape)
  changed = jnp.where(mask[..., None], context, noise)
  out_b = apply(make_config(), variables, x, c_noise, changed, mask, pooled)
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))


def test_fully_masked_context_is_finite_and_ignores_context(variables):
  x, c_noise, context, _, pooled = inputs()
  none = jnp.zeros((B, L), bool)
  out_a = apply(make_config(), variables, x, c_noise, context, none, pooled)
  out_b = apply(make_config(), variables, x, c_noise, -5.0 * context, none, pooled)
  assert np.all(np.isfinite(out_a))
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))
  grads = jax.jit(jax.grad(
      lambda ctx: jnp.sum(apply(make_config(), variables, x, c_noise, ctx, none, pooled))))(context)
  assert np.all(np.isfinite(grads)) and float(jnp.abs(grads).max()) == 0.0


@pytest.mark.full  # Another compile of the U-Net (with dropout).
def test_dropout_only_in_training(variables):
  config, args = make_config(dropout=0.5), inputs()
  train = jax.jit(lambda v, key, *a: UNet(config).apply(v, *a, train=True, rngs={'dropout': key}))
  eval_a = apply(config, variables, *args)
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(apply(make_config(), variables, *args)))
  train_a = train(variables, jax.random.key(1), *args)
  train_b = train(variables, jax.random.key(2), *args)
  assert float(jnp.abs(train_a - train_b).max()) > 1e-4
  assert float(jnp.abs(train_a - eval_a).max()) > 1e-4


@pytest.mark.full  # Three jitted value-and-grads of the U-Net, ~40 s: the full tier.
def test_remat_policies_give_same_outputs_and_gradients(variables):
  args = inputs()
  policies = ('none', 'dots', 'full')
  jaxprs = {remat: str(jax.make_jaxpr(lambda p: apply(make_config(remat=remat), p, *args))(
      variables)) for remat in policies}
  assert 'remat' not in jaxprs['none']  # Each policy reaches the blocks' remat:
  assert 'policy=DotsSaveable(only_if_no_batch_dims=True)' in jaxprs['dots']
  assert 'policy=<function nothing_saveable' in jaxprs['full']

  def loss_and_grad(remat):
    loss = lambda p: jnp.mean(apply(make_config(remat=remat), p, *args) ** 2)
    return jax.jit(jax.value_and_grad(loss))(variables)

  loss_a, grad_a = loss_and_grad('none')
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grad_a)) > 0
  for remat in ('dots', 'full'):
    loss_b, grad_b = loss_and_grad(remat)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    assert jax.tree_util.tree_structure(grad_a) == jax.tree_util.tree_structure(grad_b)
    for ga, gb in zip(jax.tree_util.tree_leaves(grad_a), jax.tree_util.tree_leaves(grad_b)):
      np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-6)


def test_remat_reads_the_old_booleans_and_refuses_other_values():
  assert make_config(remat=True).remat == 'full' and make_config(remat=False).remat == 'none'
  assert make_config(remat='True').remat == 'full'  # --config.model.remat=True arrives as a string.
  for bad in ('yes', 'dot', 1, None):
    with pytest.raises(ValueError, match=r"model.remat must be one of 'none', 'dots', 'full'"):
      make_config(remat=bad)


def test_every_param_has_logical_axes_of_its_rank(boxed_variables):
  leaves = jax.tree_util.tree_leaves(
      boxed_variables, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
  for box in leaves:
    assert len(box.names) == box.value.ndim, box.names
    assert set(box.names) <= AXES_VOCAB, box.names
  specs = nn.get_partition_spec(boxed_variables)['params']
  assert tuple(specs['conv_in']['kernel']) == (None, None, 'conv_in', 'conv_out')
  attn = specs['down_1_attn_0']
  assert tuple(attn['self_attn']['query']) == ('embed', 'heads', 'kv')
  assert tuple(attn['cross_attn']['key']) == ('text_embed', 'heads', 'kv')
  assert tuple(attn['cross_attn']['out']) == ('heads', 'kv', 'embed')
  assert tuple(specs['down_0_res_0']['norm_0']['scale']) == ('norm',)
  assert tuple(specs['noise_embed']['dense_0']['kernel']) == ('embed', 'mlp')


@pytest.mark.parametrize('overrides, size, field', [
    (dict(channel_mult=()), S, 'model.channel_mult'),
    (dict(channel_mult=(1, 2, 2, 2)), S + 4, 'model.channel_mult'),
    (dict(attn_resolutions=(16,)), S, 'model.attn_resolutions'),
    (dict(num_heads=3), S, 'model.num_heads'),
    (dict(dtype='float64'), S, 'model.dtype'),
    (dict(dropout=1.5), S, 'model.dropout'),
    (dict(num_res_blocks=0), S, 'model.num_res_blocks'),
])
def test_bad_config_raises_naming_field(overrides, size, field):
  x, c_noise, context, mask, pooled = inputs()
  x = jnp.zeros((B, size, size, C))
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    model = UNet(make_config(**overrides))  # Field checks raise here, size checks at init.
    jax.eval_shape(lambda k: model.init(k, x, c_noise, context, mask, pooled, train=False),
                   jax.random.key(0))


def test_missing_field_raises_naming_field():
  from configs import base, specs  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  del config.model['channels']
  with pytest.raises(ValueError, match=r'model\.channels is missing'):
    specs.model(config)


def test_head_dim_sets_heads_of_that_width():
  model = UNet(make_config(head_dim=4))  # width 32 at the attention level -> 8 heads of 4.
  variables = jax.eval_shape(lambda k: model.init(k, *inputs(), train=False), jax.random.key(0))
  query = nn.unbox(variables)['params']['down_1_attn_0']['self_attn']['query']
  assert query.shape == (32, 8, 4)


def test_coordinate_channels_encode_absolute_position():
  from models import unet as unet_lib
  x = jnp.zeros((2, 4, 6, 3))
  out = unet_lib.add_coordinates(x)
  assert out.shape == (2, 4, 6, 5)
  np.testing.assert_allclose(out[0, 0, :, 3], (np.arange(6) + 0.5) / 6 * 2 - 1, atol=1e-6)  # x: W
  np.testing.assert_allclose(out[0, :, 0, 4], (np.arange(4) + 0.5) / 4 * 2 - 1, atol=1e-6)  # y: H
  assert float(out[0, 0, 0, 3]) < 0 < float(out[0, 0, -1, 3])  # left is negative x


def test_patch_size_round_trips_space_to_depth():
  from models import unet as unet_lib
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  y = unet_lib.space_to_depth(x, 2)
  assert y.shape == (2, 4, 4, 12)
  np.testing.assert_array_equal(unet_lib.depth_to_space(y, 2), x)
  np.testing.assert_array_equal(y[0, 0, 0, :3], x[0, 0, 0])  # patch order: row-major pixels
  np.testing.assert_array_equal(y[0, 0, 0, 3:6], x[0, 0, 1])
