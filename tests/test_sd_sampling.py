"""Sampling Stable Diffusion as diffusers does, without PyTorch: diffusers' timestep spacings as
grids, negative prompts in the unconditional branch, sample.py --pretrained on a pipeline folder.

(Equality of the images with diffusers' StableDiffusionPipeline: test_sd_sampling_reference.py,
which needs torch and diffusers.)"""
import json
import os

import jax
import numpy as np
import pytest

from configs import sd, specs
from diffusion import schedules, spacings
from diffusion import spec as settings
from sampling import from_pipeline
from tests.spec_fixtures import make_spec
from tests.test_reliability_cli import only_error_line, run
from tools import make_sd_pipeline

T = 1000


def diffusers_timesteps(scheduler, spacing, n, offset):
  """diffusers 0.42's set_timesteps, written out: DDIMScheduler, EulerDiscreteScheduler and
  DPMSolverMultistepScheduler (lambda_min_clipped=-inf, no Karras sigmas)."""
  if spacing == 'trailing':
    return np.round(np.arange(T, 0, -T / n)) - 1
  if scheduler == 'euler':
    if spacing == 'linspace':
      return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    return (np.arange(0, n) * (T // n)).round()[::-1] + offset
  if scheduler == 'dpm':
    if spacing == 'linspace':
      return np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    return (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + offset
  if spacing == 'linspace':
    return np.linspace(0, T - 1, n).round()[::-1]
  return (np.arange(0, n) * (T // n)).round()[::-1] + offset


SD_SPEC = dict(schedule='scaled_linear', beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False)
CASES = [(n, spacing, offset) for n in (4, 7, 10, 50) for spacing, offset in
         (('leading', 1), ('leading', 0), ('trailing', 0), ('linspace', 0))]


@pytest.mark.parametrize('sampler,scheduler', [('ddim', 'ddim'), ('ddpm', 'ddim'),
                                               ('euler', 'euler'), ('heun', 'euler'),
                                               ('dpmpp_2m', 'dpm'), ('dpmpp_2m_sde', 'dpm')])
def test_grids_walk_diffusers_timesteps_and_end_where_its_scheduler_ends(sampler, scheduler):
  to_timestep = jax.jit(schedules.timestep_from_logsnr, static_argnums=1)
  for n, spacing, offset in CASES:
    spec = make_spec(**SD_SPEC, sampling_grid=spacing, steps_offset=offset)
    want = diffusers_timesteps(scheduler, spacing, n, offset)
    np.testing.assert_array_equal(spacings.timesteps(spacing, sampler, n, T, offset), want)
    grid = np.asarray(schedules.sampling_logsnrs(spec, n, sampler))
    assert grid.shape == (n + 1,)
    alpha_bar = schedules.alpha_bar_table(spec)  # diffusers' alphas_cumprod[t]
    sigma = np.interp(want, np.arange(T), np.sqrt((1 - alpha_bar) / alpha_bar))
    np.testing.assert_allclose(grid[:-1], -2 * np.log(sigma), rtol=1e-6, atol=1e-6)
    # DDIM with set_alpha_to_one=False ends at alphas_cumprod[0]; the others at sigma = 0.
    end = np.log(alpha_bar[0] / (1 - alpha_bar[0])) if sampler == 'ddim' else np.inf
    np.testing.assert_allclose(grid[-1], end, rtol=1e-6)
    # The U-Net gets diffusers' timestep back (Euler's fractional 'linspace' ones to 0.01).
    np.testing.assert_allclose(np.asarray(to_timestep(grid[:-1], spec)), want,
                               atol=0.01 if spacing == 'linspace' else 1e-4)


def test_set_alpha_to_one_ends_ddim_at_clean_data_and_offsets_past_the_table_are_refused():
  spec = make_spec(**{**SD_SPEC, 'set_alpha_to_one': True}, sampling_grid='leading')
  assert np.asarray(schedules.sampling_logsnrs(spec, 5, 'ddim'))[-1] == np.inf
  with pytest.raises(ValueError, match='steps_offset=300'):
    schedules.sampling_logsnrs(spec.replace(steps_offset=300), 4, 'ddim')
  with pytest.raises(ValueError, match='steps_offset must be an integer >= 0'):
    spec.replace(steps_offset=-1)


def test_euler_starts_at_sigma_max_on_linspace_and_trailing_as_diffusers_init_noise_sigma():
  for spacing in ('leading', 'trailing', 'linspace'):
    spec = make_spec(**SD_SPEC, sampling_grid=spacing, steps_offset=1)
    grid = schedules.sampling_logsnrs(spec, 10, 'euler')
    alpha_bar = schedules.alpha_bar_table(spec)
    t0 = int(diffusers_timesteps('euler', spacing, 10, 1)[0])
    sigma_max = np.sqrt((1 - alpha_bar[t0]) / alpha_bar[t0])  # diffusers' VE sigma
    # init_noise_sigma in VE form, times alpha: our VP state's scale.
    init = sigma_max if spacing != 'leading' else np.sqrt(sigma_max**2 + 1)
    want = init * np.sqrt(alpha_bar[t0])
    assert schedules.initial_noise_scale(spec, grid, 'euler') == pytest.approx(want, rel=1e-6)
    assert schedules.initial_noise_scale(spec, grid, 'dpmpp_2m') == 1.0


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return make_sd_pipeline.write_pipeline(str(tmp_path_factory.mktemp('sd') / 'pipeline'))


@pytest.fixture(scope='module')
def loaded(folder):
  config = sd.get_config('sample')
  config.model.pretrained = folder
  return from_pipeline.load(specs.build(config))


def test_a_pipeline_folder_loads_with_its_scheduler_and_size(loaded, folder):
  assert loaded.pretrained == folder and loaded.step is None
  spec = loaded.settings.diffusion
  assert (spec.sampling_grid, spec.steps_offset, spec.set_alpha_to_one) == ('leading', 1, False)
  assert loaded.generator.image_size == 16  # sample_size 8 x the VAE's factor 2
  assert loaded.generator.image_shape == (8, 8, 4)


def test_the_negative_prompt_is_what_the_unconditional_branch_encodes(loaded):
  gen = loaded.generator
  recipe = settings.overridden(loaded.settings.sampler, sampler='ddim', num_steps=2)

  def sample(prompt, negative, w):
    return gen(loaded.unet_params, loaded.text_params, [prompt], seed=3,
               settings=recipe.replace(guidance_scale=w), negative_prompt=negative)

  plain = sample('a cat', '', 7.5)
  steered = sample('a cat', 'a dog', 7.5)
  assert np.abs(plain - steered).max() > 1e-3
  # w = 0 is the unconditional branch alone: the negative prompt as the condition (w = 1).
  np.testing.assert_allclose(sample('a cat', 'a dog', 0.0), sample('a dog', '', 1.0), atol=1e-5)
  # w = 1 is the conditional branch alone: the negative prompt plays no part.
  np.testing.assert_allclose(sample('a cat', 'a dog', 1.0), sample('a cat', 'a bird', 1.0),
                             atol=1e-6)
  assert gen.compiled_count() == 1  # The negative prompt is traced text, as the prompts are.


@pytest.mark.full  # Another sampler compile.
def test_given_latents_are_the_seeds_noise(loaded):
  gen = loaded.generator
  recipe = settings.overridden(loaded.settings.sampler, sampler='ddim', num_steps=2)
  latents = gen.initial_noise([3])  # (The program of the test above, and one taking latents.)
  assert latents.shape == (1, 8, 8, 4)
  args = (loaded.unet_params, loaded.text_params, ['a cat'])
  # Two programs (one takes the latents): equal up to how XLA fuses each (6.7e-6 seen with the
  # tests' XLA flags); another seed's noise differs by O(1).
  np.testing.assert_allclose(gen(*args, seed=3, settings=recipe, latents=latents),
                             gen(*args, seed=3, settings=recipe), rtol=0, atol=1e-4)
  with pytest.raises(ValueError, match=r'latents of shape \(2, 8, 8, 4\): expected \(1, 8, 8, 4\)'):
    gen(*args, seed=3, settings=recipe, latents=np.concatenate([latents, latents]))


def test_a_pipeline_folder_samples_height_by_width_where_the_network_takes_it(folder):
  config = sd.get_config('sample')
  config.model.pretrained = folder
  loaded = from_pipeline.load(specs.build(config), image_size=(16, 24))
  assert loaded.generator.image_shape == (8, 12, 4)  # (Sampling at (h, w): test_bucket_training.)
  with pytest.raises(ValueError, match='--width=18 must be divisible by 4: '):
    from_pipeline.load(specs.build(config), image_size=(16, 18))


@pytest.mark.full  # A sample.py process (~20 s); the library's sampling of the folder: tests above.
def test_sample_cli_samples_a_pipeline_folder(folder, tmp_path):
  out = tmp_path / 'out'
  proc = run('sample.py', f'--pretrained={folder}', '--prompt=a red circle', '--prompt=a cat',
             '--negative_prompt=blurry', '--steps=2', '--sampler=euler', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['00000.png', '00001.png', 'grid.png', 'manifest.jsonl']
  lines = [json.loads(line) for line in (out / 'manifest.jsonl').read_text().splitlines()]
  assert [line['prompt'] for line in lines] == ['a red circle', 'a cat']
  assert {(line['negative_prompt'], line['pretrained'], line['grid'], line['guidance'],
           line['image_size'], line['ema']) for line in lines} == {
               ('blurry', folder, 'leading', 7.5, 16, False)}


@pytest.mark.parametrize('flags, message', [
    ([], 'pass exactly one of --workdir (a training run) and --pretrained'),
    (['--workdir=WORK', '--pretrained=WORK'], 'pass exactly one of --workdir'),
    (['--pretrained=WORK/nowhere', '--out=WORK/out'], '--pretrained=WORK/nowhere: no such folder'),
    (['--pretrained=WORK', '--out=WORK/out'], '--pretrained=WORK: WORK/model_index.json not found'),
    (['--pretrained=WORK'], '--pretrained needs --out'),
    (['--pretrained=WORK', '--out=WORK/out', '--step=2'], '--step needs --workdir'),
])
def test_sample_source_flags_are_checked_before_loading(tmp_path, flags, message):
  proc = run('sample.py', '--prompt=a', *[f.replace('WORK', str(tmp_path)) for f in flags])
  assert message.replace('WORK', str(tmp_path)) in only_error_line(proc)
  assert not (tmp_path / 'out').exists()
