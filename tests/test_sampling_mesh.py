"""sampling/generate.py on a mesh: each device samples its share of the batch (padded to a
multiple of the mesh's batch axes), and the images are those of the unsplit program."""

import re

import numpy as np
import pytest

from tests.test_trace_cache import tiny_sampler  # The tiny config's networks, random parameters.


@pytest.fixture(scope='module')
def sampler():
  from runtime import trace_cache  # pylint: disable=g-import-not-at-top
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(trace_cache.ENV_SWITCH, 'off')  # Plain jit: this test reads its compiled program.
    new, params, recipe = tiny_sampler()
    recipe = recipe.replace(name='ddim', num_steps=2, guidance_scale=2.0, thresholding=False)
    yield new, params, recipe


def _plain(gen):
  """The same networks and spec without a mesh: the whole batch in one program."""
  from sampling import generate  # pylint: disable=g-import-not-at-top
  return generate.Generator(gen.unet, gen.text, gen.spec, gen.image_size)


def test_the_batch_is_split_over_the_mesh_and_the_images_are_the_same(sampler):
  new, params, recipe = sampler
  gen = new()
  devices = gen.mesh.shape['data'] * gen.mesh.shape['fsdp']
  assert devices == 8  # tests/conftest.py's CPU devices, data-parallel.
  prompts = ['a red square', 'a blue circle', 'a green triangle']  # Padded to 8.
  out = gen(*params, prompts, seed=3, settings=recipe)
  want = _plain(gen)(*params, prompts, seed=3, settings=recipe)
  assert out.shape == want.shape == (3,) + want.shape[1:]
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
  # The U-Net's convolutions run on each device's share: guidance's 2 x 8 rows over 8 devices.
  text = gen.lower(*params, prompts, seed=3, settings=recipe).compile().as_text()
  batches = {int(b) for b in re.findall(r'f32\[(\d+),\d+,\d+,\d+\]\S* convolution\(', text)}
  assert batches == {2}, batches


def test_given_latents_are_padded_and_split_as_the_prompts(sampler):
  new, params, recipe = sampler
  gen = new()
  prompts = ['a red square'] * 5
  latents = gen.initial_noise(range(100, 105))
  out = gen(*params, prompts, seed=0, settings=recipe, latents=latents)
  want = _plain(gen)(*params, prompts, seed=0, settings=recipe, latents=latents)
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match='latents of shape'):
    gen(*params, prompts, seed=0, settings=recipe, latents=latents[:4])
