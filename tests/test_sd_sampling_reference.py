"""Our Stable Diffusion sampling makes the images diffusers' StableDiffusionPipeline makes.

Skipped unless torch and diffusers import (the project needs neither). Both sides read the random
pipeline folders tools/make_sd_pipeline.py writes (sd1: epsilon, sd2: v_prediction; 16 px images,
8 x 8 latents) in float32 and sample the same initial latents, prompts, negative prompt, guidance
scale 7.5 and step count with the folder's scheduler config as DDIMScheduler,
EulerDiscreteScheduler and DPMSolverMultistepScheduler (ours: ddim, euler, dpmpp_2m on the
folder's 'leading' grid, steps_offset 1, set_alpha_to_one False), and other timestep spacings
written into the folder. The [0, 1] images must agree to 1e-3 (measured on CPU: 3e-6 to 6e-6;
3e-5 seen with Euler's fractional 'linspace' timesteps on sd2). Both routes of sample.py are checked: the
folder sampled as it is (sampling/from_pipeline.py), and a workdir fine-tuned from it (one step at
a learning rate too small to move a weight, so its weights are still the folder's).
"""
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import sd, specs
from diffusion import spacings
from diffusion import spec as settings
from sampling import from_checkpoint, from_pipeline
from tests import image_folders
from tools import make_sd_pipeline
from training import loop

TOLERANCE = 1e-3
SCHEDULERS = {'ddim': 'DDIMScheduler', 'euler': 'EulerDiscreteScheduler',
              'dpmpp_2m': 'DPMSolverMultistepScheduler'}
STEPS = {'ddim': 6, 'euler': 5, 'dpmpp_2m': 8}
PROMPTS = ['a red circle above a blue square', 'a cat']
NEGATIVE = 'blurry, low quality'
GUIDANCE = 7.5


class Case:
  """One preset's folder, our loaded sampler and diffusers' pipeline."""

  def __init__(self, root, preset, spacing=None):
    self.folder = make_sd_pipeline.write_pipeline(str(root / preset), preset=preset, seed=5)
    if spacing:  # Another timestep_spacing in the folder's scheduler_config.json.
      path = os.path.join(self.folder, 'scheduler', 'scheduler_config.json')
      with open(path) as f:
        scheduler = json.load(f)
      with open(path, 'w') as f:
        json.dump(dict(scheduler, timestep_spacing=spacing), f)
    config = sd.get_config('sample')
    config.model.pretrained = self.folder
    self.loaded = from_pipeline.load(specs.build(config))
    self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        self.folder, torch_dtype=torch.float32, safety_checker=None)
    self.pipe.set_progress_bar_config(disable=True)
    self.latents = self.loaded.generator.initial_noise([0, 1])  # What seeds 0, 1 start from.

  def diffusers_images(self, sampler, steps=None):
    steps = steps or STEPS[sampler]
    pipe = self.pipe
    pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    with torch.no_grad():
      images = pipe(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), guidance_scale=GUIDANCE,
                    num_inference_steps=steps, height=16, width=16, output_type='np',
                    latents=torch.from_numpy(np.array(self.latents)).permute(0, 3, 1, 2)).images
    spec = self.loaded.settings.diffusion
    np.testing.assert_array_equal(  # The same timesteps, before comparing images.
        pipe.scheduler.timesteps.numpy(), spacings.timesteps(
            spec.sampling_grid, sampler, steps, spec.num_train_timesteps, spec.steps_offset))
    return images

  def our_images(self, loaded, sampler, steps=None):
    recipe = settings.overridden(loaded.settings.sampler, sampler=sampler,
                                 num_steps=steps or STEPS[sampler], guidance_scale=GUIDANCE)
    out = loaded.generator(loaded.unet_params, loaded.text_params, PROMPTS, seed=[0, 1],
                           settings=recipe, negative_prompt=NEGATIVE, latents=self.latents)
    return (out + 1.0) / 2.0  # [-1, 1] -> diffusers' [0, 1]


@pytest.fixture(scope='module', params=['sd1', 'sd2'])
def case(request, tmp_path_factory):
  return Case(tmp_path_factory.mktemp('sd'), request.param)


def _compare(want, got, record_property, name):
  assert want.shape == got.shape == (len(PROMPTS), 16, 16, 3)
  err = float(np.abs(got - want).max())
  record_property('max_abs_diff', err)
  interior = float(np.mean((want > 0) & (want < 1)))
  print(f'{name}: max |ours - diffusers| = {err:.3g} ({interior:.0%} of pixels unclipped)')
  assert interior > 0.5 and np.std(want) > 0.05  # Not an image clipped flat.
  assert err <= TOLERANCE, err


@pytest.mark.parametrize('sampler', list(SCHEDULERS))
def test_a_pipeline_folder_samples_what_diffusers_samples(case, sampler, record_property):
  want = case.diffusers_images(sampler)
  got = case.our_images(case.loaded, sampler)
  _compare(want, got, record_property, f'{case.loaded.settings.diffusion.prediction} {sampler}')


@pytest.mark.parametrize('spacing,sampler,steps', [
    ('trailing', 'euler', 7),  # Euler starts at init_noise_sigma = sigma_max here.
    ('trailing', 'ddim', 5),  # (DDIM's stride T // N is the grid's where N divides T.)
    ('linspace', 'euler', 7),  # Fractional timesteps.
    ('linspace', 'dpmpp_2m', 7),
])
def test_other_timestep_spacings_sample_what_diffusers_samples(tmp_path, spacing, sampler, steps,
                                                               record_property):
  case = Case(tmp_path, 'sd1', spacing)
  assert case.loaded.settings.diffusion.sampling_grid == spacing
  _compare(case.diffusers_images(sampler, steps), case.our_images(case.loaded, sampler, steps),
           record_property, f'{spacing} {sampler}')


def test_a_workdir_fine_tuned_from_the_folder_samples_what_diffusers_samples(
    tmp_path_factory, record_property):
  root = tmp_path_factory.mktemp('sd_workdir')
  case = Case(root, 'sd1')
  image_folders.make_folder(root / 'images', broken=False)
  config = sd.get_config('tiny')
  config.model.pretrained = case.folder
  config.data.path = str(root / 'images')
  config.optim.num_steps = config.checkpoint.every_steps = 1
  config.optim.learning_rate = 1e-30  # Below every weight's float32 spacing: nothing moves.
  config.logging.eval_at_end = False
  workdir = str(root / 'run')
  loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  loaded = from_checkpoint.load(workdir, settings_of=specs.from_saved, use_ema=False)
  assert loaded.step == 1 and loaded.settings.diffusion.sampling_grid == 'leading'
  sampler = loaded.settings.sampler.name  # configs/sd.py's: dpmpp_2m.
  _compare(case.diffusers_images(sampler), case.our_images(loaded, sampler), record_property,
           f'workdir {sampler}')
