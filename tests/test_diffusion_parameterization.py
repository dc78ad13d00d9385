"""eps/x0/v conversions and EDM preconditioning against their closed forms."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import parameterization as param
from diffusion import schedules
from tests.spec_fixtures import make_spec

KINDS = ['eps', 'x0', 'v']


def _pair(seed=0, shape=(4, 3, 3, 2)):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  x0 = jax.random.normal(k1, shape)
  eps = jax.random.normal(k2, shape)
  logsnr = jax.random.uniform(k3, shape[:1], minval=-8, maxval=8)
  alpha, sigma = param.per_example(logsnr, x0)
  return x0, eps, logsnr, alpha, sigma, alpha * x0 + sigma * eps


@pytest.mark.parametrize('kind,to', list(itertools.product(KINDS, KINDS)))
def test_conversions_are_exact_round_trips(kind, to):
  x0, eps, _, alpha, sigma, x_t = _pair()
  pred = param.target(x0, eps, alpha, sigma, kind)
  expected = param.target(x0, eps, alpha, sigma, to)
  np.testing.assert_allclose(param.convert(pred, x_t, alpha, sigma, kind, to), expected,
                             atol=2e-3, rtol=1e-3)
  back = param.convert(param.convert(pred, x_t, alpha, sigma, kind, to), x_t, alpha, sigma, to,
                       kind)
  np.testing.assert_allclose(back, pred, atol=2e-3, rtol=1e-3)


def test_v_definition_and_safety_at_alpha_zero():
  x0, eps, _, alpha, sigma, x_t = _pair()
  np.testing.assert_allclose(param.target(x0, eps, alpha, sigma, 'v'), alpha * eps - sigma * x0)
  # Zero terminal SNR: alpha = 0, sigma = 1, x_t = eps, v = -x0.
  a, s = schedules.alpha_sigma(jnp.array(-jnp.inf))
  x_t = eps
  v = param.target(x0, eps, a, s, 'v')
  np.testing.assert_array_equal(v, -x0)
  np.testing.assert_array_equal(param.x0_from(v, x_t, a, s, 'v'), x0)
  np.testing.assert_array_equal(param.eps_from(v, x_t, a, s, 'v'), eps)
  np.testing.assert_array_equal(param.v_from(x0, x_t, a, s, 'x0'), -x0)
  np.testing.assert_array_equal(param.eps_from(x0, x_t, a, s, 'x0'), eps)


def test_unknown_kind_raises():
  with pytest.raises(ValueError, match='kind'):
    param.x0_from(1.0, 1.0, 1.0, 0.0, 'score')


def edm_scalings(sigma_ve, sigma_data):
  """Karras et al. 2022 Table 1: (c_skip, c_out, c_in, c_noise), the reference for the VP forms."""
  s2, d2 = jnp.square(sigma_ve), sigma_data**2
  c_skip = d2 / (s2 + d2)
  c_out = sigma_ve * sigma_data / jnp.sqrt(s2 + d2)
  c_in = 1.0 / jnp.sqrt(s2 + d2)
  c_noise = jnp.log(sigma_ve) / 4.0
  return c_skip, c_out, c_in, c_noise


def test_edm_scalings_table1():
  sigma, sd = jnp.array([0.01, 0.5, 3.0, 80.0]), 0.5
  c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sd)
  np.testing.assert_allclose(c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_out, sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-6)
  # Unit-variance input and effective target when x0 has std sigma_data (EDM appendix B.6).
  x0 = sd * jax.random.normal(jax.random.PRNGKey(0), (20000, 4))
  n = jax.random.normal(jax.random.PRNGKey(1), (20000, 4))
  for i in range(4):
    x_ve = x0[:, i] + sigma[i] * n[:, i]
    assert abs(float(jnp.var(c_in[i] * x_ve)) - 1) < 0.05
    target = (x0[:, i] - c_skip[i] * x_ve) / c_out[i]
    assert abs(float(jnp.var(target)) - 1) < 0.05


def _cfg(prediction, **kw):
  return make_spec(prediction=prediction, sigma_data=0.5, **kw)


def test_network_io_edm_matches_karras_in_ve_coordinates():
  x0, eps, logsnr, alpha, sigma, x_t = _pair(1)
  cfg = _cfg('edm')
  net_in, c_noise = param.network_inputs(x_t, logsnr, cfg)
  s = schedules.sigma_ve_from_logsnr(logsnr)
  c_skip, c_out, c_in, c_noise_edm = edm_scalings(s, 0.5)
  b = (-1, 1, 1, 1)
  x_ve = x_t / alpha
  np.testing.assert_allclose(net_in, c_in.reshape(b) * x_ve, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(c_noise, c_noise_edm, rtol=1e-4, atol=1e-5)
  out = jnp.tanh(net_in)  # any network output F
  expected = c_skip.reshape(b) * x_ve + c_out.reshape(b) * out  # EDM eq. 7
  np.testing.assert_allclose(param.network_output_to_x0(out, x_t, logsnr, cfg), expected,
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('prediction', ['v', 'x0', 'edm'])
def test_network_io_finite_at_infinite_logsnr(prediction):
  x_t = jax.random.normal(jax.random.PRNGKey(2), (3, 4, 4, 1))
  logsnr = jnp.array([-jnp.inf, jnp.inf, 0.0])
  net_in, c_noise = param.network_inputs(x_t, logsnr, _cfg(prediction, zero_terminal_snr=True))
  assert np.all(np.isfinite(net_in)) and np.all(np.isfinite(c_noise))
  np.testing.assert_allclose(c_noise, [param.C_NOISE_MAX, -param.C_NOISE_MAX, 0.0])
  x0_hat = param.network_output_to_x0(x_t, x_t, logsnr, _cfg(prediction, zero_terminal_snr=True))
  assert np.all(np.isfinite(x0_hat))


def test_network_io_vp_passes_x_t_and_converts():
  x0, eps, logsnr, alpha, sigma, x_t = _pair(3)
  net_in, c_noise = param.network_inputs(x_t, logsnr, _cfg('eps'))
  np.testing.assert_array_equal(net_in, x_t)
  np.testing.assert_allclose(c_noise, -logsnr / 8, rtol=1e-6)
  for kind in KINDS:
    out = param.target(x0, eps, alpha, sigma, kind)
    np.testing.assert_allclose(param.network_output_to_x0(out, x_t, logsnr, _cfg(kind)), x0,
                               atol=2e-3)


def test_bad_prediction_configs_raise():
  x = jnp.zeros((1, 2, 2, 1))
  with pytest.raises(ValueError, match='diffusion.prediction'):
    param.network_inputs(x, jnp.zeros(1), _cfg('score'))
  with pytest.raises(ValueError, match='zero_terminal_snr'):
    param.network_output_to_x0(x, x, jnp.zeros(1), _cfg('eps', zero_terminal_snr=True))
