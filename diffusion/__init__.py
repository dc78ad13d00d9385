"""Diffusion math as pure functions: schedules, parameterisation, losses, guidance, samplers."""
