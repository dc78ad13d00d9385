"""A Shapes run with the frozen MiniLM encoder and cached caption embeddings, end to end."""

import json
import os

import jax
import numpy as np
import pytest

from configs import shapes, specs
from sampling import from_checkpoint
from text import embedding_cache
from training import loop
from runtime import checkpoint


def pretrained_tiny_config(**text):
  """The tiny config with the packaged MiniLM encoder (rendered data: no TFDS files)."""
  config = shapes.get_config('tiny')
  config.data.dataset = 'shapes_rendered'
  config.text.encoder = 'pretrained'
  config.text.max_len = 16
  config.logging.eval_at_end = False
  config.text.update(text)
  return config


@pytest.mark.full
def test_pretrained_cached_encoder_trains_resumes_and_samples(tmp_path):
  config = pretrained_tiny_config(cache_embeddings=True)
  workdir = str(tmp_path / 'run')
  first = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:2], stop_at=2)
  assert np.isfinite([l for _, l in first.history]).all()
  # Frozen: the encoder is not in the trained (and checkpointed) parameters.
  assert set(first.state.params) == {'unet'} and set(first.state.ema_params) == {'unet'}
  part = os.path.join(workdir, 'text_cache', 'part-00000-of-00001')  # One process, one part.
  cache = embedding_cache.EmbeddingCache.load(os.path.join(workdir, 'text_cache'), 1)
  assert '' in cache  # The CFG null caption is cached too.
  assert json.load(open(os.path.join(part, 'index.json')))['count'] <= config.data.num_train + 1
  mtime = os.path.getmtime(os.path.join(part, 'emb.npy'))
  second = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:2])
  assert [s for s, _ in second.history] == [3, 4]
  assert os.path.getmtime(os.path.join(part, 'emb.npy')) == mtime  # Reused.
  assert checkpoint.Checkpointer(workdir, read_only=True).latest_step() == 4
  out = str(tmp_path / 'samples')
  loaded = from_checkpoint.load(workdir, settings_of=specs.from_saved)
  recipe = loaded.settings.sampler.replace(num_steps=2, guidance_scale=2.0)
  summary = from_checkpoint.sample_to_folder(loaded, out, ['a red square'], recipe)
  assert summary['num_images'] == 1 and os.path.exists(os.path.join(out, '00000.png'))


@pytest.mark.full
def test_pretrained_encoder_runs_inside_the_sharded_train_step(tmp_path):
  """Without the cache the frozen encoder runs in the jitted step, under the mesh and rules."""
  config = pretrained_tiny_config()
  config.mesh.data, config.mesh.fsdp = 2, 2
  result = loop.train_and_evaluate(config, str(tmp_path / 'run'), devices=jax.devices()[:4],
                                   stop_at=2)
  assert len(result.history) == 2 and np.isfinite([l for _, l in result.history]).all()


@pytest.mark.full
def test_embeddings_precomputed_by_prepare_feed_training(tmp_path):
  """tools.prepare stores MiniLM embeddings in the records; training reads them, builds no cache."""
  from tools import prepare
  from tests import image_folders
  image_folders.make_folder(tmp_path / 'images', broken=False)
  opts = prepare.Options(text=prepare.text_config(max_len=16))
  summary = prepare.prepare(prepare.open_source('folder', path=str(tmp_path / 'images')),
                            str(tmp_path / 'shards' / 'train'), num_shards=2, options=opts,
                            progress=False)
  assert summary['written'] == len(image_folders.GOOD)
  config = pretrained_tiny_config(cache_embeddings=True)
  config.data.update(dataset='array_record', path=str(tmp_path / 'shards' / 'train-*.array_record'))
  workdir = str(tmp_path / 'run')
  result = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:2])
  assert len(result.history) == 4 and np.isfinite([l for _, l in result.history]).all()
  assert not os.path.exists(os.path.join(workdir, 'text_cache'))  # Read from the records.
  config.text.max_len = 12  # Another encoder setting than the records were written with.
  with pytest.raises(ValueError, match='run tools.prepare again'):
    loop.train_and_evaluate(config, str(tmp_path / 'other'), devices=jax.devices()[:2])
