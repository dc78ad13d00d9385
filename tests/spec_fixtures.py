"""Specs for the diffusion-math tests: the textbook DDPM set-up (linear betas, eps prediction),
each test changing only what it is about."""
from diffusion.spec import DiffusionSpec

DDPM = dict(schedule='linear', num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
            zero_terminal_snr=False, logsnr_shift=0.0, sigma_min=0.002, sigma_max=80.0, rho=7.0,
            sigma_data=0.5, p_mean=-1.2, p_std=1.2, noise_sampling='uniform',
            sampling_grid='auto', steps_offset=0, set_alpha_to_one=True, prediction='eps',
            loss_target='auto', loss_weighting='auto', min_snr_gamma=5.0, noise_offset=0.0)


def make_spec(**overrides) -> DiffusionSpec:
  """DDPM's spec with `overrides` (zero terminal SNR switches the prediction to 'v' unless given)."""
  if overrides.get('zero_terminal_snr') and 'prediction' not in overrides:
    overrides['prediction'] = 'v'
  return DiffusionSpec(**{**DDPM, **overrides})
