"""The names a user picks from, without jax: the samplers and the sampling grids.

`diffusion/samplers.py`, `diffusion/schedules.py` and `diffusion/spacings.py` implement them (and
check that they implement exactly these); `sample.py` offers them as flag choices before jax is
imported.
"""

SAMPLER_NAMES = ('ddpm', 'ddim', 'euler', 'heun', 'dpmpp_2m', 'dpmpp_2m_sde')  # sampler.name
# diffusers' `timestep_spacing` values: grids spaced as its schedulers space them (spacings.py).
TIMESTEP_SPACINGS = ('leading', 'trailing', 'linspace')
# diffusion.sampling_grid
SAMPLING_GRIDS = ('auto', 'uniform_t', 'karras', 'uniform_logsnr') + TIMESTEP_SPACINGS
