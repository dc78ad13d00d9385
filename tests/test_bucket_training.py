"""Training on aspect-ratio buckets: a folder of portrait, square and landscape images trains with
three bucket shapes, the train step compiles once per shape, a resume replays exactly, and
sample.py samples at the buckets' sizes."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import images as images_config
from configs import specs
from data import buckets, sources
from runtime import compile_cache
from sampling import from_checkpoint
from training import loop
from tests.test_buckets import BUCKETS, make_mixed_folder

NUM_STEPS = 6


def bucket_config(root):
  config = images_config.get_config('tiny')
  config.data.path = str(root)
  config.data.buckets = BUCKETS
  config.data.global_batch_size = 4
  config.mesh.data, config.mesh.fsdp = 2, 2
  config.optim.num_steps = NUM_STEPS
  config.logging.eval_at_end = False
  return config


def _train(config, workdir, **kwargs):
  with compile_cache.CompileCounter() as counter:
    result = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4], **kwargs)
  steps = [name for name, _, _ in counter.programs if name == 'jit(train_step)']
  return result, steps, counter


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('mixed')
  make_mixed_folder(str(root), counts=(8, 4, 8), broken=False)
  config = bucket_config(root)
  schedule = buckets.make_loader(specs.build(config).data, sources.FolderSource(str(root)),
                                 step=2).schedule
  shapes = [BUCKETS[schedule(s)[0]] for s in range(NUM_STEPS)]
  assert len(set(shapes)) == 3 and len(set(shapes[:4])) >= 2  # Every shape; the cut run sees two.
  workdir = str(tmp_path_factory.mktemp('bucket_run') / 'full')
  return config, workdir, shapes, _train(config, workdir)


@pytest.mark.full  # Two runs of the tiny U-Net at three shapes: ~3 min on 2 cores.
def test_three_buckets_train_compile_once_each_and_resume_exactly(full_run, tmp_path):
  config, _, shapes, (full, programs, counter) = full_run
  assert [s for s, _ in full.history] == list(range(1, NUM_STEPS + 1))
  # One train-step program per bucket shape, compiled before the first step (or loaded from the
  # persistent cache), none after.
  assert len(programs) == 3, counter.summary()

  cut = str(tmp_path / 'cut')
  first, _, _ = _train(config, cut, stop_at=4)
  second, programs, counter = _train(config, cut)
  assert [s for s, _ in first.history + second.history] == list(range(1, NUM_STEPS + 1))
  losses = [loss for _, loss in first.history + second.history]
  np.testing.assert_allclose(losses, [loss for _, loss in full.history], rtol=1e-6)
  assert all(np.isfinite(losses))
  # The resumed run (steps 5, 6) compiles no train step: the persistent cache has them, whichever
  # shape comes first (runtime/trace_cache.py keeps a traced program per shape).
  assert len(programs) == 3 and 'jit(train_step)' not in counter.compiled, counter.summary()


@pytest.mark.full  # Needs the run above.
def test_samples_at_two_bucket_sizes_and_refuses_others(full_run, tmp_path):
  _, workdir, _, _ = full_run
  for height, width in ((12, 20), (20, 12)):
    loaded = from_checkpoint.load(workdir, settings_of=specs.from_saved,
                                  image_size=(height, width))
    out = str(tmp_path / f'{height}x{width}')
    from_checkpoint.sample_to_folder(loaded, out, ['a portrait picture', 'a landscape picture'],
                                     loaded.settings.sampler, seed=0)
    assert Image.open(os.path.join(out, '00001.png')).size == (width, height)
    with open(os.path.join(out, 'manifest.jsonl')) as f:
      assert json.loads(f.readline())['image_size'] == [height, width]
  with pytest.raises(ValueError, match=r'--height=16 --width=24: this model was trained at '
                                       r'12x20, 16x16, 20x12 px'):
    from_checkpoint.load(workdir, settings_of=specs.from_saved, image_size=(16, 24))
  with pytest.raises(ValueError, match='--height=13 must be divisible by'):
    from_checkpoint.load(workdir, settings_of=specs.from_saved, image_size=(13, 20),
                         allow_other_resolution=True)
