"""A convolution whose kernel gradient XLA:CPU runs as matrix products.

`conv_general_dilated` is `lax.conv_general_dilated` with one case rewritten for CPUs: a float32,
stride-1, 'SAME' (or its explicit padding), undilated, ungrouped NHWC/HWIO convolution with an
odd square kernel. Its forward pass and input gradient stay XLA's own convolutions. Its kernel
gradient, which XLA:CPU lowers to a convolution whose window is the whole image (1.4-4.4x slower
than products of the same size, up to 22x slower than PyTorch's; BENCHMARKS.md, issue 29), is
k*k matrix products instead: dW[i, j] = sum over (b, h, w) of x_pad[b, h + i, w + j]^T dy[b, h, w].
On other backends, and in every other case, it is lax's convolution unchanged. The kernel
gradients agree to float32 rounding (tests/test_models_conv.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         **kwargs):
  """`lax.conv_general_dilated`'s signature (what flax's nn.Conv calls)."""
  if kwargs or not _rewritten(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                              dimension_numbers, feature_group_count, precision):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, **kwargs)
  return same_conv(lhs, rhs)


def _rewritten(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count, precision) -> bool:
  if jax.default_backend() != 'cpu' or lhs.ndim != 4 or precision is not None:
    return False
  if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32 or feature_group_count != 1:
    return False
  ones = lambda d: d is None or all(v == 1 for v in d)
  if not (ones(window_strides) and ones(lhs_dilation) and ones(rhs_dilation)):
    return False
  kh, kw = rhs.shape[:2]
  if kh != kw or kh % 2 == 0:
    return False
  if padding != 'SAME' and [tuple(p) for p in padding] != [(kh // 2, kh // 2)] * 2:
    return False
  expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == expected


def _xla_conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=_NHWC)


@jax.custom_vjp
def same_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-1 'SAME' convolution of NHWC `x` with an odd square HWIO kernel `w`."""
  return _xla_conv(x, w)


def _same_conv_fwd(x, w):
  return _xla_conv(x, w), (x, w)


def _same_conv_bwd(residuals, dy):
  x, w = residuals
  dx = jax.vjp(lambda x: _xla_conv(x, w), x)[1](dy)[0]
  return dx, kernel_gradient(x, dy, w.shape[0])


def kernel_gradient(x: jax.Array, dy: jax.Array, k: int) -> jax.Array:
  """dL/dW of a stride-1 'SAME' k x k convolution, [k, k, C_in, C_out], as k*k matrix products.

  Each tap is dy^T (pixels contracted) times a shifted window of the padded input, in that
  order: the input windows stay in their NHWC layout as the products' right-hand side, and only
  dy is transposed, once for all taps. (As x_window^T dy, XLA:CPU transposes every window.)
  """
  _, h, w, _ = x.shape
  p = k // 2
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x
  taps = [[jnp.einsum('bhwd,bhwc->dc', dy, xp[:, i:i + h, j:j + w]) for j in range(k)]
          for i in range(k)]
  return jnp.stack([jnp.stack(t) for t in taps]).transpose(0, 1, 3, 2)



same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)
