"""Optional: the fine-tuning loss equals diffusers' train_text_to_image.py on the same latents,
noise, timesteps and captions (needs torch, diffusers and transformers; skipped without them).

diffusers' script: noisy = scheduler.add_noise(latents, noise, t); target = noise (epsilon) or
scheduler.get_velocity(latents, noise, t) (v_prediction); loss = MSE(unet(noisy, t, text), target),
with --snr_gamma: per-example weights min(snr, gamma) / snr (epsilon) or / (snr + 1) (v).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

from configs import sd, specs  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffusion import losses, parameterization, schedules  # pylint: disable=g-import-not-at-top
from models import denoiser, family  # pylint: disable=g-import-not-at-top
from text import clip  # pylint: disable=g-import-not-at-top
from tools import make_sd_pipeline  # pylint: disable=g-import-not-at-top

CAPTIONS = ['a red circle left of a blue square', 'two green triangles', '', 'a photo, 1990s!']


def ours(folder, gamma):
  """(our mean loss, latents, noise, integer timesteps, token ids) for one seeded draw."""
  config = sd.get_config('tiny')
  config.model.pretrained = folder
  if gamma:
    config.diffusion.loss_weighting, config.diffusion.min_snr_gamma = 'min_snr', gamma
  settings = specs.build(config)
  unet = family.build(settings.model, 8)
  params = family.pretrained(settings.model)()
  encoder = clip.load_clip(os.path.join(folder, 'text_encoder'))
  ids = encoder.tokenize(CAPTIONS)
  emb, mask, pooled = jax.jit(encoder.encode)(encoder.params, ids)
  cond = {'emb': emb, 'mask': mask, 'pooled': pooled}
  latents = jax.random.normal(jax.random.key(1), (len(CAPTIONS), 8, 8, 4))

  def run(x):
    seen = {}

    def pred_fn(x_t, logsnr):
      seen['x_t'] = x_t  # The noisy latents the network saw (returned below, not leaked).
      return denoiser.apply_network(unet, params, x_t, logsnr, cond, settings.diffusion)

    per_example, aux = losses.diffusion_loss(pred_fn, x, jax.random.key(2), settings.diffusion)
    return per_example, aux, seen['x_t']

  per_example, aux, x_t = jax.jit(run)(latents)
  alpha, sigma = parameterization.per_example(aux['logsnr'], latents)
  noise = (x_t - alpha * latents) / sigma
  t = np.asarray(schedules.timestep_from_logsnr(aux['logsnr'], settings.diffusion))
  np.testing.assert_array_equal(t, np.round(t))  # Training draws the table's timesteps.
  return float(per_example.mean()), np.asarray(latents), np.asarray(noise), t.astype(np.int64), ids


def theirs(folder, latents, noise, t, ids, gamma):
  """diffusers' train_text_to_image.py loss on the same inputs (NCHW)."""
  unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(folder, 'unet')).eval()
  scheduler = diffusers.DDPMScheduler.from_pretrained(os.path.join(folder, 'scheduler'))
  text = transformers.CLIPTextModel.from_pretrained(os.path.join(folder, 'text_encoder')).eval()
  to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))
  latents, noise, t = to_torch(latents), to_torch(noise), torch.from_numpy(t)
  with torch.no_grad():
    hidden = text(torch.from_numpy(np.asarray(ids, np.int64)))[0]
    noisy = scheduler.add_noise(latents, noise, t)
    target = (noise if scheduler.config.prediction_type == 'epsilon'
              else scheduler.get_velocity(latents, noise, t))
    pred = unet(noisy, t, hidden).sample
    if not gamma:
      return float(torch.nn.functional.mse_loss(pred.float(), target.float(), reduction='mean'))
    alphas_cumprod = scheduler.alphas_cumprod[t]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weights = torch.clamp(snr, max=gamma) / (
        snr if scheduler.config.prediction_type == 'epsilon' else snr + 1)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction='none')
    return float((loss.mean(dim=(1, 2, 3)) * weights).mean())


@pytest.mark.parametrize('preset', ['sd1', 'sd2'])
@pytest.mark.parametrize('gamma', [0.0, 1.0])  # 1.0 clamps t=228's SNR (about 1.5)
def test_loss_equals_diffusers_train_text_to_image(tmp_path, preset, gamma):
  folder = make_sd_pipeline.write_pipeline(str(tmp_path / preset), preset=preset)
  got, latents, noise, t, ids = ours(folder, gamma)
  want = theirs(folder, latents, noise, t, ids, gamma)
  print(f'{preset} snr_gamma={gamma}: ours {got:.8f} diffusers {want:.8f} '
        f'|diff| {abs(got - want):.2e} (timesteps {t.tolist()})')
  assert abs(got - want) <= 1e-5, (got, want)
  assert jnp.isfinite(got)
