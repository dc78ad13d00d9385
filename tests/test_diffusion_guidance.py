"""Classifier-free guidance: limits of w and phi, thresholding, intervals, one batched call."""
import jax
import jax.numpy as jnp
import numpy as np

from diffusion import guidance


def strengths(w, phi=0.0, interval=(-jnp.inf, jnp.inf), percentile=99.5):
  return guidance.Guidance(scale=w, rescale=phi, interval=interval, threshold_percentile=percentile)


def _pair(shape=(3, 4, 4, 2)):
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return jax.random.normal(k1, shape), 2.0 * jax.random.normal(k2, shape) + 0.3


def test_cfg_combine_limits_and_formula():
  cond, uncond = _pair()
  np.testing.assert_array_equal(guidance.cfg_combine(cond, uncond, 1.0), cond)
  np.testing.assert_array_equal(guidance.cfg_combine(cond, uncond, 0.0), uncond)
  np.testing.assert_allclose(guidance.cfg_combine(cond, uncond, 4.0), uncond + 4 * (cond - uncond),
                             rtol=1e-5, atol=1e-5)
  per_example = guidance.cfg_combine(cond, uncond, jnp.array([0.0, 1.0, 3.0]))
  np.testing.assert_array_equal(per_example[0], uncond[0])
  np.testing.assert_array_equal(per_example[1], cond[1])


def test_rescale():
  cond, uncond = _pair()
  guided = guidance.cfg_combine(cond, uncond, 7.5)
  np.testing.assert_array_equal(guidance.rescale(guided, cond, 0.0), guided)  # plain CFG
  full = guidance.rescale(guided, cond, 1.0)
  np.testing.assert_allclose(jnp.std(full, axis=(1, 2, 3)), jnp.std(cond, axis=(1, 2, 3)),
                             rtol=1e-5)
  half = guidance.rescale(guided, cond, 0.7)
  np.testing.assert_allclose(half, 0.7 * full + 0.3 * guided, rtol=1e-5, atol=1e-6)


def test_dynamic_threshold_matches_imagen():
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  x = x.at[1].multiply(0.1)  # second example: all |x| < 1 -> s = 1, unchanged
  out = np.asarray(guidance.dynamic_threshold(x, 99.5))
  s = max(np.percentile(np.abs(np.asarray(x[0])), 99.5), 1.0)
  np.testing.assert_allclose(out[0], np.clip(x[0], -s, s) / s, rtol=1e-5)
  assert np.abs(out[0]).max() <= 1.0 + 1e-6
  np.testing.assert_allclose(out[1], x[1])
  # Percentile 0 (--threshold=0): s = max(1, min |x0|) = 1 for any image with a pixel inside
  # [-1, 1], i.e. static clipping.
  np.testing.assert_allclose(guidance.dynamic_threshold(x, 0.0), np.clip(x, -1.0, 1.0))


def test_guidance_interval():
  w = jnp.full((4,), 5.0)
  logsnr = jnp.array([-10.0, -1.0, 2.0, 9.0])
  np.testing.assert_array_equal(guidance.guidance_interval(w, logsnr, -2.0, 3.0), [1, 5, 5, 1])


class Model:
  """x0_hat = tanh(x) * scale(cond) + 0.01 logsnr; records the batch of every call."""

  def __init__(self):
    self.batches = []

  def __call__(self, x_t, logsnr, cond):
    self.batches.append(x_t.shape[0])
    return (jnp.tanh(x_t) * cond['scale'][:, None, None, None] + cond['shift']
            + 0.01 * logsnr[:, None, None, None])


def test_guided_denoiser_one_batched_call_equals_separate_calls():
  B = 3
  x = jax.random.normal(jax.random.PRNGKey(2), (B, 4, 4, 2))
  cond = {'scale': jnp.array([1.0, 2.0, 3.0]), 'shift': jnp.ones((B, 1, 1, 2))}
  uncond = {'scale': jnp.zeros(B), 'shift': jnp.zeros((B, 1, 1, 2))}
  model = Model()
  logsnr = jnp.array(0.5)
  out = guidance.guided_denoiser(model, cond, uncond, strengths(3.0))(x, logsnr)
  assert model.batches == [2 * B]  # one call with cond and uncond stacked
  ref = Model()
  c = ref(x, jnp.full((B,), 0.5), cond)
  u = ref(x, jnp.full((B,), 0.5), uncond)
  np.testing.assert_allclose(out, u + 3.0 * (c - u), rtol=1e-5, atol=1e-6)
  # Interval excluding this logsnr -> w = 1 -> the conditional prediction.
  outside = guidance.guided_denoiser(ref, cond, uncond, strengths(3.0, interval=(1.0, 4.0)))(
      x, logsnr)
  np.testing.assert_allclose(outside, c, rtol=1e-6)
  inside = guidance.guided_denoiser(ref, cond, uncond, strengths(3.0, interval=(0.0, 4.0)))(
      x, logsnr)
  np.testing.assert_allclose(inside, out, rtol=1e-6)
  # The percentile is only used with thresholding on.
  unthresholded = guidance.guided_denoiser(ref, cond, uncond, strengths(3.0, percentile=50.0))(
      x, logsnr)
  np.testing.assert_allclose(unthresholded, out, rtol=1e-6)
  thresholded = guidance.guided_denoiser(ref, cond, uncond, strengths(3.0, 0.7, percentile=99.0),
                                         thresholding=True)(x, logsnr)
  expected = guidance.dynamic_threshold(guidance.rescale(u + 3.0 * (c - u), c, 0.7), 99.0)
  np.testing.assert_allclose(thresholded, expected, rtol=1e-5, atol=1e-6)


def test_guided_denoiser_does_not_retrace_for_new_strengths():
  B = 2
  cond, uncond = {'scale': jnp.ones(B), 'shift': jnp.ones((B, 1, 1, 1))}, {
      'scale': jnp.zeros(B), 'shift': jnp.zeros((B, 1, 1, 1))}

  @jax.jit
  def f(x, w, phi, lo, hi, pct):
    return guidance.guided_denoiser(Model(), cond, uncond, strengths(w, phi, (lo, hi), pct),
                                    thresholding=True)(x, jnp.zeros(B))

  x = jnp.ones((B, 2, 2, 1))
  for w, phi, lo, hi, pct in [(1.0, 0.0, -1.0, 1.0, 99.0), (7.5, 0.7, -5.0, 2.0, 95.0)]:
    f(x, w, phi, lo, hi, pct)
  assert f._cache_size() == 1
