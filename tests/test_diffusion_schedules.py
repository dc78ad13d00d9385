"""Schedules: beta tables against their papers' formulas, log-SNR views, grids, training levels."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import schedules
from tests.spec_fixtures import make_spec as make_cfg


DISCRETE = ['linear', 'scaled_linear', 'cosine', 'sigmoid']


def test_alpha_sigma_exact_at_infinities_and_unit_variance():
  alpha, sigma = schedules.alpha_sigma(jnp.array([-jnp.inf, jnp.inf, 0.0, 3.0, -7.0]))
  np.testing.assert_array_equal(alpha[:2], [0.0, 1.0])
  np.testing.assert_array_equal(sigma[:2], [1.0, 0.0])
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.log(alpha[2:]**2 / sigma[2:]**2), [0.0, 3.0, -7.0], atol=1e-5)


def test_linear_and_scaled_linear_betas_match_formulas():
  T = 10
  np.testing.assert_allclose(schedules.betas(make_cfg(num_train_timesteps=T)),
                             1e-4 + (0.02 - 1e-4) * np.arange(T) / (T - 1))
  sd = schedules.betas(make_cfg(schedule='scaled_linear', num_train_timesteps=T,
                                beta_start=0.00085, beta_end=0.012))
  np.testing.assert_allclose(np.sqrt(sd), np.linspace(0.00085**0.5, 0.012**0.5, T))
  np.testing.assert_allclose(schedules.alpha_bar_table(make_cfg(num_train_timesteps=T)),
                             [np.prod(1 - schedules.betas(make_cfg(num_train_timesteps=T))[:k + 1])
                              for k in range(T)])


def test_cosine_alpha_bar_matches_nichol_dhariwal():
  T = 1000
  alpha_bar = schedules.alpha_bar_table(make_cfg(schedule='cosine', num_train_timesteps=T))
  f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
  k = np.arange(1, T + 1)
  # Away from the end (where betas are clipped at 0.999) alpha_bar_k = f(k/T)/f(0) exactly.
  np.testing.assert_allclose(alpha_bar[:-20], (f(k / T) / f(0))[:-20], rtol=1e-9)
  assert np.all(np.diff(alpha_bar) < 0)


def test_sigmoid_alpha_bar_matches_chen():
  T = 200
  alpha_bar = schedules.alpha_bar_table(make_cfg(schedule='sigmoid', num_train_timesteps=T))
  sig = lambda z: 1 / (1 + np.exp(-z))
  t = np.arange(1, T + 1) / T
  expected = (sig(3.0) - sig(6 * t - 3)) / (sig(3.0) - sig(-3.0))
  np.testing.assert_allclose(alpha_bar[:-5], expected[:-5], rtol=1e-9)
  assert np.all(np.diff(alpha_bar) < 0)


@pytest.mark.parametrize('name', DISCRETE)
def test_zero_terminal_snr_rescale(name):
  cfg = make_cfg(schedule=name, num_train_timesteps=100)
  plain = schedules.alpha_bar_table(cfg)
  cfg = cfg.replace(zero_terminal_snr=True, prediction='v')
  rescaled = schedules.alpha_bar_table(cfg)
  assert rescaled[-1] == 0.0  # exactly
  assert np.all(np.diff(rescaled) < 0)  # otherwise strictly monotone
  np.testing.assert_allclose(rescaled[0], plain[0], rtol=1e-12)  # first step kept (Lin et al.)
  # sqrt(alpha_bar) is an affine map of the original.
  a, b = np.polyfit(np.sqrt(plain), np.sqrt(rescaled), 1)
  np.testing.assert_allclose(np.sqrt(rescaled), a * np.sqrt(plain) + b, atol=1e-12)
  # The continuous view reaches -inf at t = 1 and stays continuous just before it.
  fn = schedules.get_logsnr_fn(cfg)
  assert float(fn(1.0)) == -np.inf
  values = np.asarray(fn(jnp.array([0.99, 0.999, 0.9999])))
  assert np.all(np.isfinite(values)) and np.all(np.diff(values) < 0)


@pytest.mark.parametrize('name', DISCRETE)
def test_logsnr_fn_hits_table_and_is_monotone(name):
  T = 50
  cfg = make_cfg(schedule=name, num_train_timesteps=T)
  fn = jax.jit(schedules.get_logsnr_fn(cfg))
  alpha_bar = schedules.alpha_bar_table(cfg)
  k = np.arange(1, T + 1)
  np.testing.assert_allclose(fn(jnp.asarray(k / T)), np.log(alpha_bar / (1 - alpha_bar)),
                             rtol=1e-5, atol=1e-4)
  assert float(fn(0.0)) == np.inf
  dense = np.asarray(fn(jnp.linspace(0.0, 1.0, 4001)))
  assert np.all(np.diff(dense) < 0)
  # Views agree: alpha^2 from alpha_sigma equals alpha_bar.
  alpha, _ = schedules.alpha_sigma(fn(jnp.asarray(k / T)))
  np.testing.assert_allclose(np.asarray(alpha)**2, alpha_bar, rtol=1e-4)


def test_edm_logsnr_fn_and_shift():
  cfg = make_cfg(schedule='edm')
  fn = schedules.get_logsnr_fn(cfg)
  np.testing.assert_allclose(fn(jnp.array([0.0, 1.0])), [-2 * math.log(0.002), -2 * math.log(80.0)],
                             rtol=1e-5)
  shift = schedules.resolution_logsnr_shift(256, 64)
  np.testing.assert_allclose(shift, 2 * math.log(64 / 256))
  cfg_shift = make_cfg(schedule='edm', logsnr_shift=shift)
  t = jnp.linspace(0, 1, 7)
  np.testing.assert_allclose(schedules.get_logsnr_fn(cfg_shift)(t), fn(t) + shift, rtol=1e-5)
  lin = schedules.get_logsnr_fn(make_cfg(logsnr_shift=shift))
  assert float(lin(0.0)) == np.inf  # clean stays clean
  np.testing.assert_allclose(lin(0.5), schedules.get_logsnr_fn(make_cfg())(0.5) + shift, rtol=1e-5)


def test_karras_sigmas_eq5():
  sig = schedules.karras_sigmas(6, 0.002, 80.0, 7.0)
  assert sig[0] == pytest.approx(80.0) and sig[-1] == pytest.approx(0.002)
  np.testing.assert_allclose(np.diff(sig ** (1 / 7)), np.diff(sig ** (1 / 7))[0])
  assert np.all(np.diff(sig) < 0)
  np.testing.assert_allclose(schedules.karras_sigmas(1, 0.002, 80.0), [80.0])


def test_sampling_grid_edm_is_karras_then_clean():
  grid = np.asarray(schedules.sampling_logsnrs(make_cfg(schedule='edm'), 5))
  assert grid.shape == (6,) and grid[-1] == np.inf
  np.testing.assert_allclose(np.exp(-grid[:-1] / 2), schedules.karras_sigmas(5, 0.002, 80.0, 7.0),
                             rtol=1e-5)


@pytest.mark.parametrize('zero_terminal_snr', [False, True])
def test_sampling_grid_discrete(zero_terminal_snr):
  cfg = make_cfg(num_train_timesteps=100, zero_terminal_snr=zero_terminal_snr)
  table = schedules.discrete_logsnrs(cfg)
  grid = np.asarray(schedules.sampling_logsnrs(cfg, 4))  # trailing: k = 100, 75, 50, 25, 0
  np.testing.assert_allclose(grid, table[[100, 75, 50, 25, 0]].astype(np.float32), rtol=1e-6)
  assert grid[-1] == np.inf and (grid[0] == -np.inf) == zero_terminal_snr
  cfg = cfg.replace(sampling_grid='karras')
  karras = np.asarray(schedules.sampling_logsnrs(cfg, 6))
  assert karras.shape == (7,) and karras[-1] == np.inf and np.all(np.diff(karras) > 0)
  finite = table[1:][np.isfinite(table[1:])]
  # The linear schedule's sigma_ve range (0.01 .. 157 at T = 100) clipped to sigma_max = 80.
  first = 1 if zero_terminal_snr else 0
  np.testing.assert_allclose([karras[first], karras[-2]],
                             [-2 * np.log(min(np.exp(-finite.min() / 2), 80.0)), finite.max()],
                             rtol=1e-5)
  assert (karras[0] == -np.inf) == zero_terminal_snr
  # Karras spacing: sigma^(1/rho) equally spaced.
  steps = np.diff(np.exp(-karras[first:-1].astype(np.float64) / 2) ** (1 / 7.0))
  np.testing.assert_allclose(steps, steps[0], rtol=1e-4)
  cfg = cfg.replace(sampling_grid='uniform_logsnr')
  uniform = np.asarray(schedules.sampling_logsnrs(cfg, 6), np.float64)
  np.testing.assert_allclose(uniform[[first, -2]], karras[[first, -2]], rtol=1e-5)
  np.testing.assert_allclose(np.diff(uniform[first:-1]), np.diff(uniform[first:-1])[0], rtol=1e-4)
  assert uniform[-1] == np.inf and (uniform[0] == -np.inf) == zero_terminal_snr


def test_karras_grid_of_cosine_is_capped_at_sigma_max():
  cfg = make_cfg(schedule='cosine', sampling_grid='karras')
  sigma = np.exp(-np.asarray(schedules.sampling_logsnrs(cfg, 10), np.float64)[:-1] / 2)
  assert np.exp(-schedules.discrete_logsnrs(cfg)[-1] / 2) > 1e4  # the uncapped cosine sigma_T
  np.testing.assert_allclose(sigma[0], 80.0, rtol=1e-5)
  cfg = cfg.replace(sigma_max=1e6)  # a cap above the schedule's range leaves the schedule's own maximum
  sigma = np.exp(-np.asarray(schedules.sampling_logsnrs(cfg, 10), np.float64)[:-1] / 2)
  np.testing.assert_allclose(sigma[0], np.exp(-schedules.discrete_logsnrs(cfg)[-1] / 2), rtol=1e-4)
  cfg = cfg.replace(sigma_min=1e5, sigma_max=2e5)  # entirely above the schedule's largest sigma
  with pytest.raises(ValueError, match='diffusion.sigma_min'):
    schedules.sampling_logsnrs(cfg, 10)


def test_sampling_grid_with_one_step_and_bad_values():
  assert np.asarray(schedules.sampling_logsnrs(make_cfg(schedule='edm'), 1)).shape == (2,)
  with pytest.raises(ValueError, match='num_steps'):
    schedules.sampling_logsnrs(make_cfg(num_train_timesteps=10), 20)
  with pytest.raises(ValueError, match='diffusion.sampling_grid'):
    schedules.sampling_logsnrs(make_cfg(sampling_grid='log'), 4)


def test_unknown_schedule_raises_naming_field():
  with pytest.raises(ValueError, match=r'diffusion\.schedule.*linear, scaled_linear'):
    schedules.get_logsnr_fn(make_cfg(schedule='quadratic'))


def test_sample_train_logsnr_discrete_uses_table_uniformly():
  cfg = make_cfg(num_train_timesteps=4)
  table = schedules.discrete_logsnrs(cfg)[1:].astype(np.float32)
  logsnr = np.asarray(schedules.sample_train_logsnr(jax.random.PRNGKey(0), (8000,), cfg))
  counts = np.array([np.sum(np.isclose(logsnr, v)) for v in table])
  assert counts.sum() == 8000
  np.testing.assert_allclose(counts / 8000, 0.25, atol=5 * np.sqrt(0.25 * 0.75 / 8000))


@pytest.mark.parametrize('overrides', [dict(schedule='edm'), dict(noise_sampling='lognormal')])
def test_sample_train_logsnr_lognormal(overrides):
  n = 20000
  logsnr = schedules.sample_train_logsnr(jax.random.PRNGKey(1), (n,), make_cfg(**overrides))
  ln_sigma = -np.asarray(logsnr) / 2
  assert abs(ln_sigma.mean() + 1.2) < 5 * 1.2 / np.sqrt(n)
  assert abs(ln_sigma.std() - 1.2) < 5 * 1.2 / np.sqrt(2 * n)


def test_auto_grid_is_karras_for_heun_only():
  cfg = make_cfg(schedule='cosine')
  uniform = np.asarray(schedules.sampling_logsnrs(cfg, 8))
  np.testing.assert_array_equal(np.asarray(schedules.sampling_logsnrs(cfg, 8, 'ddim')), uniform)
  heun = np.asarray(schedules.sampling_logsnrs(cfg, 8, 'heun'))
  cfg = cfg.replace(sampling_grid='karras')
  np.testing.assert_array_equal(heun, np.asarray(schedules.sampling_logsnrs(cfg, 8)))
  assert not np.allclose(heun[:-1], uniform[:-1])
  auto = make_cfg(schedule='cosine')
  assert [schedules.effective_grid(auto, s) for s in ('ddim', 'heun')] == ['uniform_t', 'karras']
  assert schedules.effective_grid(make_cfg(schedule='edm'), 'ddim') == 'karras'
  cfg = cfg.replace(sampling_grid='uniform_t')  # an explicit grid is kept for heun too
  np.testing.assert_array_equal(np.asarray(schedules.sampling_logsnrs(cfg, 8, 'heun')), uniform)
