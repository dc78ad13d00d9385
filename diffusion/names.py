"""The names a user picks from, without jax: the samplers and the sampling grids.

`diffusion/samplers.py` and `diffusion/schedules.py` implement them (and check that they
implement exactly these); `sample.py` offers them as flag choices before jax is imported.
"""

SAMPLER_NAMES = ('ddpm', 'ddim', 'euler', 'heun', 'dpmpp_2m', 'dpmpp_2m_sde')  # sampler.name
SAMPLING_GRIDS = ('auto', 'uniform_t', 'karras', 'uniform_logsnr')  # diffusion.sampling_grid
