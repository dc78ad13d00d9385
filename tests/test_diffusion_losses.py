"""Training loss against hand computations in x0 space and EDM's own loss in VE coordinates."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import losses
from diffusion import parameterization as param
from tests.spec_fixtures import make_spec as make_cfg



class Recorder:
  """A fake network: out = 0.3 x_t + 0.1 sin(c_noise); records every call."""

  def __init__(self, cfg):
    self.cfg, self.calls = cfg, []

  def __call__(self, x_t, logsnr):
    self.calls.append((x_t, logsnr))
    net_in, c_noise = param.network_inputs(x_t, logsnr, self.cfg)
    return 0.3 * net_in + 0.1 * jnp.sin(c_noise)[:, None, None, None]


def _x0(seed=0, shape=(16, 4, 4, 3)):
  return 0.5 * jax.random.normal(jax.random.PRNGKey(seed), shape)


def _run(cfg, x0, seed=1):
  net = Recorder(cfg)
  loss, aux = losses.diffusion_loss(net, x0, jax.random.PRNGKey(seed), cfg)
  assert len(net.calls) == 1  # the network is called once per loss
  x_t, logsnr = net.calls[0]
  np.testing.assert_array_equal(logsnr, aux['logsnr'])
  alpha, sigma = param.per_example(logsnr, x0)
  eps = (x_t - alpha * x0) / sigma  # recover the noise the loss drew
  x0_hat = param.network_output_to_x0(net(x_t, logsnr), x_t, logsnr, cfg)
  mse_x0 = np.mean(np.square(np.asarray(x0_hat - x0, np.float64)), axis=(1, 2, 3))
  return np.asarray(loss), aux, np.exp(np.asarray(logsnr, np.float64)), mse_x0, eps


X0_SPACE_FACTOR = {'x0': lambda snr: 1.0, 'eps': lambda snr: snr, 'v': lambda snr: 1 + snr}


@pytest.mark.parametrize('prediction,target', list(itertools.product(['eps', 'x0', 'v'],
                                                                     ['eps', 'x0', 'v'])))
def test_unweighted_loss_is_mse_in_target_space(prediction, target):
  cfg = make_cfg(prediction=prediction, loss_target=target, loss_weighting='none')
  loss, aux, snr, mse_x0, _ = _run(cfg, _x0())
  # ||pred - target||^2 in eps / v space equals snr / (1 + snr) times the x0-space error.
  np.testing.assert_allclose(loss, X0_SPACE_FACTOR[target](snr) * mse_x0, rtol=2e-3)
  np.testing.assert_array_equal(aux['weight'], 1.0)


X0_SPACE_WEIGHT = {'min_snr': lambda snr: np.minimum(snr, 5.0),  # Hang et al. 2023
                   'edm': lambda snr: snr + 1 / 0.5**2}  # EDM lambda(sigma), sigma_data = 0.5


@pytest.mark.parametrize('prediction,target,weighting', list(itertools.product(
    ['eps', 'x0', 'v'], ['eps', 'x0', 'v'], ['min_snr', 'edm'])))
def test_weighting_means_the_same_x0_space_weight_in_every_target_space(prediction, target,
                                                                        weighting):
  """Min-SNR: min(snr, gamma) ||x0_hat - x0||^2 in every space; 'edm': (snr + 1/sd^2) ||.||^2."""
  cfg = make_cfg(prediction=prediction, loss_target=target, loss_weighting=weighting,
                 min_snr_gamma=5.0)
  loss, _, snr, mse_x0, _ = _run(cfg, _x0(seed=2), seed=3)
  assert np.any(snr > 5.0) and np.any(snr < 5.0)  # both branches of the min are exercised
  np.testing.assert_allclose(loss, X0_SPACE_WEIGHT[weighting](snr) * mse_x0, rtol=2e-3)


def test_min_snr_weights_hand_values():
  logsnr = jnp.log(jnp.array([0.0, 1.0, 5.0, 20.0]))
  w = lambda kind: np.asarray(losses.loss_weight(logsnr, kind, 'min_snr', min_snr_gamma=5.0,
                                                       sigma_data=0.5))
  np.testing.assert_allclose(w('x0'), [0.0, 1.0, 5.0, 5.0], rtol=1e-6)
  np.testing.assert_allclose(w('eps'), [1.0, 1.0, 1.0, 0.25], rtol=1e-6)
  np.testing.assert_allclose(w('v'), [0.0, 0.5, 5 / 6, 5 / 21], rtol=1e-6)


def test_edm_loss_matches_karras_loss_in_ve_coordinates():
  cfg = make_cfg(schedule='edm', prediction='edm')
  x0 = _x0(seed=4)
  loss, aux, _, _, eps = _run(cfg, x0, seed=5)
  # EDM training/loss.py: y = x0, n = sigma eps, D = c_skip (y+n) + c_out F(c_in (y+n), c_noise),
  # loss = lambda(sigma) (D - y)^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2.
  sigma = np.exp(-np.asarray(aux['logsnr'], np.float64) / 2)[:, None, None, None]
  sd = 0.5
  y, n = np.asarray(x0, np.float64), sigma * np.asarray(eps, np.float64)
  c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / np.sqrt(sigma**2 + sd**2)
  c_in, c_noise = 1 / np.sqrt(sigma**2 + sd**2), np.log(sigma) / 4
  F = 0.3 * c_in * (y + n) + 0.1 * np.sin(np.clip(c_noise, -3, 3))
  D = c_skip * (y + n) + c_out * F
  lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
  np.testing.assert_allclose(loss, np.mean(lam * (D - y) ** 2, axis=(1, 2, 3)), rtol=2e-3)


def test_loss_is_finite_with_zero_terminal_snr_v_prediction():
  cfg = make_cfg(prediction='v', zero_terminal_snr=True, num_train_timesteps=2,
                 loss_weighting='min_snr')
  loss, aux, _, _, _ = _run(cfg, _x0(seed=6, shape=(64, 2, 2, 1)), seed=7)
  assert np.any(np.isneginf(aux['logsnr'])) and np.all(np.isfinite(loss))


def test_loss_jits_and_bad_options_raise():
  cfg = make_cfg(prediction='v')
  fn = jax.jit(lambda x0, rng: losses.diffusion_loss(lambda x, l: 0.5 * x, x0, rng, cfg)[0])
  assert fn(_x0(), jax.random.PRNGKey(0)).shape == (16,)
  with pytest.raises(ValueError, match='diffusion.loss_weighting'):
    losses.diffusion_loss(lambda x, l: x, _x0(), jax.random.PRNGKey(0),
                          make_cfg(loss_weighting='p2'))
  with pytest.raises(ValueError, match='diffusion.loss_target'):
    losses.diffusion_loss(lambda x, l: x, _x0(), jax.random.PRNGKey(0),
                          make_cfg(loss_target='score'))


def test_offset_noise_adds_one_normal_per_example_and_channel():
  """With eps prediction and a network that predicts 0, the loss is E[eps^2] = 1 + offset^2;
  the offset is shared by every pixel of an example's channel."""
  x0 = jnp.zeros((512, 4, 4, 3))
  zero = lambda x_t, logsnr: jnp.zeros_like(x_t)
  plain, _ = losses.diffusion_loss(zero, x0, jax.random.key(0), make_cfg())
  offset, _ = losses.diffusion_loss(zero, x0, jax.random.key(0), make_cfg(noise_offset=1.0))
  assert abs(float(plain.mean()) - 1.0) < 0.05
  assert abs(float(offset.mean()) - 2.0) < 0.1
  seen = []
  pred = lambda x_t, logsnr: seen.append(x_t) or jnp.zeros_like(x_t)
  losses.diffusion_loss(pred, jnp.zeros((2, 8, 8, 3)), jax.random.key(1),
                        make_cfg(noise_offset=100.0))
  x_t = np.asarray(seen[0])  # x0 = 0: x_t = sigma eps, dominated by the shared offset.
  per_channel = x_t.mean(axis=(1, 2), keepdims=True)
  residual = x_t - per_channel  # sigma x unit noise, against sigma x 100 x a shared normal.
  assert residual.std() < 0.05 * np.sqrt(np.mean(per_channel**2))
  with pytest.raises(ValueError, match='noise_offset'):
    make_cfg(noise_offset=-0.1)
