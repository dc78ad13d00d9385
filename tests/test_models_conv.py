"""models.conv: lax's convolution with its kernel gradient as matrix products on CPUs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models import conv
from models import layers

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _loss(conv_fn, x, w, padding='SAME'):
  y = conv_fn(x, w, (1, 1), padding, dimension_numbers=NHWC)
  return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[-1], dtype=y.dtype))


def _inputs(shape, kernel, c_out, seed=0):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, shape, jnp.float32)
  w = jax.random.normal(kw, (kernel, kernel, shape[-1], c_out), jnp.float32) / kernel
  return x, w


@pytest.mark.parametrize('shape, kernel, c_out', [
    ((2, 8, 8, 4), 3, 5), ((3, 7, 5, 6), 3, 2), ((2, 6, 6, 3), 1, 7), ((1, 9, 7, 2), 5, 3)])
def test_values_and_gradients_are_lax_convolutions(shape, kernel, c_out):
  x, w = _inputs(shape, kernel, c_out)
  ours = jax.jit(jax.value_and_grad(functools.partial(_loss, conv.conv_general_dilated), (0, 1)))
  ref = jax.jit(jax.value_and_grad(functools.partial(_loss, lax.conv_general_dilated), (0, 1)))
  (v1, (dx1, dw1)), (v0, (dx0, dw0)) = ours(x, w), ref(x, w)
  assert float(v1) == float(v0)  # The forward pass is XLA's own convolution.
  np.testing.assert_array_equal(dx1, dx0)  # So is the input gradient.
  scale = float(jnp.max(jnp.abs(dw0)))
  np.testing.assert_allclose(dw1, dw0, rtol=0, atol=1e-5 * scale)


def _rewritten(x, w, **kw):
  args = dict(window_strides=(1, 1), padding='SAME', dimension_numbers=NHWC)
  args.update(kw)
  jaxpr = jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(x, w, **args))(x, w)
  return 'custom_vjp' in str(jaxpr)


def test_explicit_symmetric_padding_is_the_same_case():
  x, w = _inputs((2, 6, 6, 3), 3, 4)
  assert _rewritten(x, w, padding=((1, 1), (1, 1)))
  grad = lambda fn, pad: jax.grad(lambda w: _loss(fn, x, w, pad))(w)
  ref = grad(lax.conv_general_dilated, 'SAME')
  np.testing.assert_allclose(grad(conv.conv_general_dilated, ((1, 1), (1, 1))), ref, rtol=0,
                             atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def test_only_the_stride_one_same_float32_case_is_rewritten():
  x, w = _inputs((2, 8, 8, 4), 3, 4)
  assert _rewritten(x, w)
  assert not _rewritten(x, w, window_strides=(2, 2))
  assert not _rewritten(x, w, padding='VALID')
  assert not _rewritten(x, w, rhs_dilation=(2, 2))
  assert not _rewritten(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert not _rewritten(x, w[:, :, :2], feature_group_count=2)
  assert not _rewritten(x, jnp.zeros((2, 2, 4, 4)))  # An even kernel: 'SAME' pads unevenly.
  assert not _rewritten(x, w, precision=lax.Precision.HIGHEST)


def test_layers_conv_uses_it():
  module = layers.conv(8, 3, jnp.float32, jnp.float32)
  assert module.conv_general_dilated is conv.conv_general_dilated


def test_kernel_gradient_over_a_batch_sharded_mesh():
  """The train step shards the batch: the products' sum over it is then one all-reduce away."""
  n = min(4, jax.device_count())
  mesh = Mesh(np.array(jax.devices()[:n]), ('data',))  # Automatic axes, as runtime.sharding's.
  x, w = _inputs((2 * n, 8, 8, 4), 3, 6, seed=1)
  sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  grad = jax.jit(jax.grad(functools.partial(_loss, conv.conv_general_dilated), (0, 1)))
  dx, dw = grad(sharded, w)
  dx0, dw0 = jax.grad(functools.partial(_loss, lax.conv_general_dilated), (0, 1))(x, w)
  np.testing.assert_allclose(dx, dx0, rtol=0, atol=1e-5)
  np.testing.assert_allclose(dw, dw0, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(dw0))))

