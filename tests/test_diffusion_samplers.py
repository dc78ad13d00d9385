"""Samplers driven by exact denoisers: distributions, PF-ODE convergence order, NFE, compilation.

For Gaussian data x0 ~ N(mu, Sigma) the exact denoiser is E[x0 | x_t] = mu + alpha Sigma
(alpha^2 Sigma + sigma^2 I)^-1 (x_t - alpha mu), and the probability-flow ODE keeps the whitened
value (x_t - alpha mu) / sqrt(alpha^2 s + sigma^2) fixed in each eigen-direction s of Sigma, which
gives its exact solution. For a mixture of isotropic Gaussians E[x0 | x_t] is the
responsibility-weighted sum of the per-component posterior means.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import guidance
from diffusion import samplers
from diffusion import schedules
from tests.spec_fixtures import make_spec

MU = np.array([0.4, -0.2])
SIGMA = np.array([[0.5, 0.2], [0.2, 0.3]])
MEANS = np.array([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]])
WEIGHTS = np.array([0.5, 0.3, 0.2])
COMPONENT_VAR = 0.0625


def gaussian_denoiser(mu, cov):
  evals, U = np.linalg.eigh(cov)

  def denoise(x, logsnr):
    alpha, sigma = schedules.alpha_sigma(logsnr[:, None])
    y = (x - alpha * mu) @ U
    return mu + (alpha * evals / (alpha**2 * evals + sigma**2) * y) @ U.T

  return denoise


def pf_ode_solution(x, lam0, lam1, mu, cov):
  """Exact probability-flow ODE map from log-SNR lam0 to lam1 for N(mu, cov) data."""
  evals, U = np.linalg.eigh(cov)
  a0, s0 = (float(v) for v in schedules.alpha_sigma(lam0))
  a1, s1 = (float(v) for v in schedules.alpha_sigma(lam1))
  z = ((x - a0 * mu) @ U) / np.sqrt(a0**2 * evals + s0**2)
  return a1 * mu + (np.sqrt(a1**2 * evals + s1**2) * z) @ U.T


def mixture_denoiser(means, weights, var):
  means, log_w = jnp.asarray(means), jnp.log(jnp.asarray(weights))

  def denoise(x, logsnr):
    alpha, sigma = schedules.alpha_sigma(logsnr[:, None, None])
    v = alpha**2 * var + sigma**2  # marginal variance of component k at this level
    diff = x[:, None, :] - alpha * means[None]
    log_p = log_w - 0.5 * jnp.sum(diff**2, -1) / v[..., 0] - 0.5 * x.shape[-1] * jnp.log(v[..., 0])
    resp = jax.nn.softmax(log_p, axis=-1)
    return jnp.einsum('bk,bkd->bd', resp, means[None] + alpha * var / v * diff)

  return denoise


def grid(num_steps, **overrides):
  return schedules.sampling_logsnrs(make_spec(**overrides), num_steps)


ZTSNR = dict(zero_terminal_snr=True)  # starts at logsnr = -inf: x_T = noise exactly
EDM = dict(schedule='edm')
# First-order samplers carry an O(1/N) bias in the sampled variance; N is chosen so that it is
# well below the sampling error at these sample sizes (see the module docstring of samplers).
CASES = [
    ('ddpm', {}, 1000),
    ('ddim', {'eta': 0.0}, 1000),
    ('ddim', {'eta': 1.0}, 1000),
    ('euler', {'s_churn': 10.0}, 1000),
    ('heun', {}, 100),
    ('heun', {'s_churn': 10.0, 's_tmin': 0.05, 's_tmax': 50.0}, 100),
    ('dpmpp_2m', {}, 100),
    ('dpmpp_2m_sde', {'eta': 1.0}, 100),
]
IDS = [f'{name}-{"-".join(f"{k}{v:g}" for k, v in opts.items())}' for name, opts, _ in CASES]


def _sample(name, denoise, noise, logsnrs, seed=1, **opts):
  fn = jax.jit(lambda n, l, r: samplers.get_sampler(name)(denoise, n, l, r, **opts))
  return np.asarray(fn(noise, logsnrs, jax.random.PRNGKey(seed)), np.float64)


# The first-order samplers' 1,000 steps of 20,000 samples (~7 s each) run in the full tier; their
# distributions stay checked here by test_mixture_weights.
@pytest.mark.parametrize('name,opts,num_steps', [
    pytest.param(*case, marks=pytest.mark.full) if case[2] >= 1000 else case for case in CASES],
    ids=IDS)
def test_gaussian_mean_and_covariance(name, opts, num_steps):
  n = 20000
  noise = jax.random.normal(jax.random.PRNGKey(0), (n, 2))
  x = _sample(name, gaussian_denoiser(MU, SIGMA), noise, grid(num_steps, **ZTSNR), **opts)
  # 5 standard errors: mean se = sqrt(S_ii / n); cov se = sqrt((S_ii S_jj + S_ij^2) / n).
  mean_se = np.sqrt(np.diag(SIGMA) / n)
  cov_se = np.sqrt((np.outer(np.diag(SIGMA), np.diag(SIGMA)) + SIGMA**2) / n)
  np.testing.assert_array_less(np.abs(x.mean(0) - MU), 5 * mean_se)
  np.testing.assert_array_less(np.abs(np.cov(x.T) - SIGMA), 5 * cov_se)


@pytest.mark.parametrize('name,opts,num_steps', CASES, ids=IDS)
def test_mixture_weights(name, opts, num_steps):
  n = 8000
  noise = jax.random.normal(jax.random.PRNGKey(2), (n, 2))
  x = _sample(name, mixture_denoiser(MEANS, WEIGHTS, COMPONENT_VAR), noise,
              grid(num_steps // 2, **EDM), seed=3, **opts)
  dist = np.linalg.norm(x[:, None] - MEANS[None], axis=-1)
  fractions = np.bincount(dist.argmin(1), minlength=len(WEIGHTS)) / n
  np.testing.assert_array_less(np.abs(fractions - WEIGHTS),
                               5 * np.sqrt(WEIGHTS * (1 - WEIGHTS) / n))
  # Samples land on the modes with the components' spread (no collapse onto the means).
  spread = np.sqrt(np.mean(dist.min(1) ** 2) / 2)
  assert abs(spread - np.sqrt(COMPONENT_VAR)) < 0.1 * np.sqrt(COMPONENT_VAR)


def test_pathwise_identities():
  """DDIM(eta=1) is DDPM ancestral sampling, DDIM(eta=0) is Euler, 2M-SDE(eta=0) is 2M."""
  noise = jax.random.normal(jax.random.PRNGKey(4), (64, 2))
  denoise = gaussian_denoiser(MU, SIGMA)
  for logsnrs in (grid(20, **ZTSNR), grid(20, **EDM)):
    run = lambda name, **o: _sample(name, denoise, noise, logsnrs, seed=5, **o)
    np.testing.assert_allclose(run('ddim', eta=1.0), run('ddpm'), atol=2e-5)
    np.testing.assert_allclose(run('ddim', eta=0.0), run('euler'), atol=2e-5)
    np.testing.assert_allclose(run('dpmpp_2m_sde', eta=0.0), run('dpmpp_2m'), atol=2e-5)
    assert np.abs(run('ddim', eta=1.0) - run('ddim', eta=0.0)).max() > 0.1  # noise matters


def _pf_ode_errors(name, grids):
  """RMS errors against the exact PF-ODE solution, one per log-SNR grid, in float64. The final
  step to +inf is x0_hat at the last finite level for every sampler, so the reference is x0_hat of
  the exact solution at that level."""
  with jax.enable_x64(True):
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (256, 2), jnp.float64))
    denoise = gaussian_denoiser(MU, SIGMA)
    errors = []
    for logsnrs in grids:
      logsnrs = jnp.asarray(logsnrs, jnp.float64)
      x = samplers.get_sampler(name)(denoise, jnp.asarray(noise), logsnrs, jax.random.PRNGKey(0))
      lam_last = float(logsnrs[-2])
      exact = pf_ode_solution(noise, float(logsnrs[0]), lam_last, MU, SIGMA)
      ref = denoise(jnp.asarray(exact), jnp.full((len(noise),), lam_last))
      errors.append(float(jnp.sqrt(jnp.mean(jnp.square(x - ref)))))
  return np.array(errors)


def _order(name, steps, **grid_overrides):
  """Slope of log error against log num_steps."""
  errors = _pf_ode_errors(name, [grid(N, **grid_overrides) for N in steps])
  return np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.full  # Convergence orders (as the test below); a Heun step's order stays here.
@pytest.mark.parametrize('name,order', [('ddim', 1), ('euler', 1), ('heun', 2), ('dpmpp_2m', 2)])
def test_deterministic_samplers_converge_at_their_order(name, order):
  slope = _order(name, [8, 16, 32, 64], **EDM)
  assert -order - 0.3 < slope < -order + 0.3, slope


def test_heun_step_from_pure_noise_is_higher_order_than_euler():
  """From logsnr=-inf Heun takes the trapezoid in u = alpha/sigma: its one-step error must shrink
  at least one power of u faster than the Euler (= DDIM) step's as the step u -> 0."""
  u = np.array([0.025, 0.05, 0.1, 0.2])
  grids = [[-np.inf, 2 * np.log(v), np.inf] for v in u]
  slope = {name: np.polyfit(np.log(u), np.log(_pf_ode_errors(name, grids)), 1)[0]
           for name in ('heun', 'ddim')}
  assert slope['ddim'] > 1.5 and slope['heun'] > slope['ddim'] + 1.0, slope


@pytest.mark.full
@pytest.mark.parametrize('name,order,overrides', [
    ('heun', 2, dict(zero_terminal_snr=True, sampling_grid='karras')),  # first step from -inf
    ('heun', 2, dict(sampling_grid='karras')),
    ('dpmpp_2m', 2, dict(sampling_grid='karras')),
    ('ddim', 1, dict(sampling_grid='karras')),
])
def test_convergence_order_on_discrete_schedule_grids(name, order, overrides):
  slope = _order(name, [16, 32, 64, 128], **overrides)
  assert -order - 0.35 < slope < -order + 0.3, slope


@pytest.mark.parametrize('name', list(samplers.SAMPLERS))
def test_compiles_once_and_counts_network_evaluations(name):
  """Changing w, eta/churn or the seed does not recompile; a new step count does."""
  B, calls = 4, []
  base = gaussian_denoiser(MU, SIGMA)

  def model_fn(x_t, logsnr, cond):
    jax.debug.callback(lambda: calls.append(1))
    return base(x_t, logsnr) + cond['shift']

  cond, uncond = {'shift': jnp.full((B, 2), 0.1)}, {'shift': jnp.zeros((B, 2))}
  option = {'ddim': 'eta', 'dpmpp_2m_sde': 'eta', 'euler': 's_churn', 'heun': 's_churn'}.get(name)

  @jax.jit
  def run(noise, logsnrs, rng, w, value):
    strengths = guidance.Guidance(scale=w, rescale=0.0, interval=(-jnp.inf, jnp.inf),
                                  threshold_percentile=99.5)
    denoise = guidance.guided_denoiser(model_fn, cond, uncond, strengths)
    opts = {option: value} if option else {}
    return samplers.get_sampler(name)(denoise, noise, logsnrs, rng, **opts)

  noise = jax.random.normal(jax.random.PRNGKey(0), (B, 2))
  logsnrs = grid(3, **ZTSNR)
  for seed, w, value in [(0, 1.0, 0.0), (1, 4.5, 1.0), (2, 7.0, 0.5)]:
    x = run(noise, logsnrs, jax.random.PRNGKey(seed), w, value)
    jax.block_until_ready(x)
    assert np.all(np.isfinite(x))
  assert run._cache_size() == 1
  assert len(calls) == 3 * samplers.nfe(name, 3)
  run(noise, grid(5, **EDM), jax.random.PRNGKey(0), 2.0, 0.0)
  assert run._cache_size() == 2


def test_registry_and_options():
  assert samplers.nfe('heun', 10) == 19 and samplers.nfe('dpmpp_2m', 10) == 10
  with pytest.raises(ValueError, match=r'sampler\.name.*ddpm'):
    samplers.get_sampler('plms')
  assert samplers.sampler_options('heun', s_churn=5) == {
      's_churn': 5.0, 's_tmin': 0.0, 's_tmax': np.inf, 's_noise': 1.0}  # Defaults filled in.
  assert samplers.SAMPLER_OPTIONS['dpmpp_2m_sde'] == ('eta', 's_noise')
  assert samplers.sampler_options('ddim') == {'eta': 0.0} and samplers.sampler_options('ddpm') == {}
  with pytest.raises(ValueError, match=r"'dpmpp_2m' takes no option eta; its options: none"):
    samplers.sampler_options('dpmpp_2m', eta=1.0)
  with pytest.raises(ValueError, match='logsnrs'):
    samplers.ddim(lambda x, l: x, jnp.zeros((2, 2)), jnp.zeros(1), jax.random.PRNGKey(0))
