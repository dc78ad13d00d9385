"""Fine-tuning a (tiny, random) Stable Diffusion pipeline folder end to end, without PyTorch:
configs/sd.py:tiny from model.pretrained, sampling from the workdir, exact resume (the full
tier)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import specs
from models import family
from sampling import from_checkpoint
from text import encoders
from tests import sd_runs
from training import loop


@pytest.mark.full  # Trains the shared SD run (~80 s, most of it compiling its step).
def test_the_run_starts_from_the_folder_weights_and_samples(sd_run):
  """Both the U-Net and (text.finetune) the CLIP text encoder train from the folder's weights.
  The run: tests/conftest.py's `sd_run`, shared with the export tests."""
  folder, config, full = sd_run.pipeline, sd_run.config, sd_run.full
  settings = specs.build(config)
  assert settings.model.network.in_channels == 4 and settings.diffusion.prediction == 'eps'
  assert settings.text.max_len == 77 and settings.autoencoder.path.endswith('vae')
  assert config.text.finetune and config.optim.num_steps == 2
  assert [step for step, _ in full.history] == [1, 2]
  assert all(np.isfinite([loss for _, loss in full.history]))
  # Step 1 started from the pipeline's weights (moved by Adam's ~lr per step), not random ones.
  start = {'unet': family.pretrained(settings.model)(),
           'text': nn.meta.unbox(encoders.build(settings.text).init(None))}
  trained = jax.device_get(full.state.params)
  for part, path in (('unet', ('conv_in', 'kernel')), ('text', ('token_embedding', 'embedding'))):
    before, after = (np.asarray(tree[part][path[0]][path[1]]) for tree in (start, trained))
    moved = np.abs(after - before).max()
    assert 0 < moved < 3 * config.optim.learning_rate + 1e-6, (part, moved)
  _assert_samples_with(sd_run.workdir, folder, trained)


def _assert_samples_with(workdir, folder, trained):
  """The workdir loads for sampling, with the trained text encoder."""
  loaded = from_checkpoint.load(workdir, settings_of=specs.from_saved, use_ema=False)
  assert loaded.settings.model.folder == folder and loaded.step == 2
  assert loaded.settings.diffusion.schedule == 'scaled_linear'
  np.testing.assert_array_equal(jax.device_get(loaded.text_params['token_embedding']['embedding']),
                                trained['text']['token_embedding']['embedding'])


@pytest.mark.full  # Two more starts of the shared run (~30 s).
def test_the_run_stopped_after_step_1_resumes_exactly(sd_run):
  cut, resumed = sd_run.resumed
  losses = [loss for _, loss in resumed]
  assert [step for step, _ in resumed] == [1, 2]
  np.testing.assert_allclose(losses, [loss for _, loss in sd_run.full.history], rtol=1e-6)
  _assert_samples_with(cut, sd_run.pipeline, jax.device_get(sd_run.full.state.params))


def test_a_fine_tuned_text_encoder_cannot_use_cached_embeddings(sd_pipeline, tmp_path):
  folder, data = sd_pipeline
  config = sd_runs.tiny_config(folder, data, text__finetune=True, text__cache_embeddings=True)
  with pytest.raises(ValueError, match='text.cache_embeddings=True needs a frozen encoder'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
