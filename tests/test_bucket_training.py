"""Training on aspect-ratio buckets: a folder of portrait, square and landscape images trains with
three bucket shapes, the train step compiles once per shape, a resume replays exactly, and
sample.py samples at the buckets' sizes; the validation loss at the examples' buckets, the eval
grid's second shape, and latents cached at each record's bucket."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import images as images_config
from configs import specs
from data import buckets, sources
from evaluation import sample_grid
from models import lora
from runtime import compile_cache, sharding
from sampling import from_checkpoint
from training import builder, loop, validation
from tests.test_buckets import BUCKETS, make_mixed_folder
from tests.test_models_autoencoder import write_vae
from tools import prepare

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


def _validation(config, devices, workdir):
  settings = specs.build(config)
  mesh = sharding.make_mesh(settings.mesh, devices)
  source = sources.make(settings.data, 'train')
  trainer = builder.build_trainer(settings, mesh, source=source, workdir=workdir)
  weights = lora.combine(trainer.init(jax.random.PRNGKey(0)).ema_params, trainer.frozen_weights)
  return validation.ValidationLoss(settings, trainer, mesh, source)(weights)


def test_validation_examples_are_grouped_by_bucket(tmp_path):
  root = tmp_path / 'mixed'
  make_mixed_folder(str(root), counts=(3, 2, 3))  # With a file that is no image, a cut JPEG.
  config = bucket_config(root)
  source = sources.make(specs.build(config).data)
  loader = validation.pipeline.BatchLoader(
      source, validation.pipeline.Transform(16, 'center', False, True), seed=0,
      global_batch_size=len(source), on_bad_record='skip')
  groups = validation._by_bucket(loader, BUCKETS)  # pylint: disable=protected-access
  assert list(groups) == list(BUCKETS)
  for shape, group in groups.items():
    names = [os.path.basename(source.files[i]) for i in group['index']]
    assert group['image'].shape == (len(names),) + shape + (3,)
    kind = {BUCKETS[0]: 'portrait', BUCKETS[1]: 'square', BUCKETS[2]: 'landscape'}[shape]
    assert all(name.startswith(kind) for name in names)
  cut = groups[BUCKETS[0]]  # The cut portrait (its header reads) is replaced by another portrait.
  assert len(cut['index']) == 4 and cut['bad'].sum() == 1


@pytest.mark.full  # The trainer and 3 validation programs, on 1 and on 2 devices: ~3 min.
def test_validation_loss_at_the_bucket_shapes_of_its_examples(tmp_path):
  root = tmp_path / 'mixed'
  make_mixed_folder(str(root), counts=(3, 2, 3), broken=False)
  config = bucket_config(root)
  config.text.vocab = 'shapes'  # (No tokenizer to train.)
  config.logging.val_examples = 8
  config.mesh.data, config.mesh.fsdp = -1, 1
  one = _validation(config, jax.devices()[:1], str(tmp_path))
  shapes = {f'val_loss/{h}x{w}': n for (h, w), n in zip(BUCKETS, (3, 2, 3))}
  assert set(shapes) < set(one) and all(np.isfinite(list(one.values())))
  assert one['val_loss'] == pytest.approx(
      sum(one[k] * n for k, n in shapes.items()) / 8, rel=1e-9)
  two = _validation(config, jax.devices()[:2], str(tmp_path))  # Groups of 3: a padded chunk.
  assert two.keys() == one.keys()
  for key, value in one.items():
    assert two[key] == pytest.approx(value, rel=1e-6), key


def test_the_eval_grid_samples_the_most_common_other_bucket_too(tmp_path):
  root = tmp_path / 'mixed'
  make_mixed_folder(str(root), counts=(2, 6, 3), broken=False)  # Mostly square, then landscape.
  config = bucket_config(root)
  config.logging.eval_prompts = 'data'
  assert sample_grid.SampleGridEvaluator(specs.build(config))._sizes(None) == {  # pylint: disable=protected-access
      'grid': 16, 'grid_12x20': (12, 20)}
  config.data.buckets = ((16, 16),)
  assert sample_grid.SampleGridEvaluator(specs.build(config))._sizes(None) == {'grid': 16}  # pylint: disable=protected-access


@pytest.mark.full  # Two runs compiling the tiny latent U-Net at one shape: ~1 min on 2 cores.
def test_cached_latents_at_buckets_give_the_on_the_fly_loss(tmp_path):
  """tools.prepare --buckets --autoencoder stores each record's moments at its bucket; a run on
  them takes step 1 as the run encoding the same bucket's crops on the fly does. Portrait images
  only, so each run compiles one train step (every bucket's latents: test_bucket_sources.py)."""
  root = tmp_path / 'mixed'
  make_mixed_folder(str(root), counts=(4, 0, 0), broken=False)
  vae = write_vae(str(tmp_path / 'vae'))  # Factor 2: the sides' step is 4.
  output = str(tmp_path / 'shards' / 'tr')
  prepare.prepare(prepare.open_source('folder', path=str(root)), output, num_shards=2,
                  options=prepare.Options(buckets=BUCKETS, latent=dict(path=vae, image_size=0,
                                                                       dtype='float32')),
                  progress=False)
  config = bucket_config(output + '-*.array_record')
  config.data.update(dataset='array_record', crop='center', flip=False)
  config.autoencoder.path = vae
  cached = _train(config, str(tmp_path / 'cached'), stop_at=1)[0]
  config.autoencoder.cached_latents = False
  fly = _train(config, str(tmp_path / 'fly'), stop_at=1)[0]
  np.testing.assert_allclose(cached.history[0][1], fly.history[0][1], rtol=1e-4)


@pytest.mark.full  # Compiles the tiny U-Net's first bucket program: ~1 min on 2 cores.
def test_a_bucket_over_data_bucket_max_gib_stops_the_run_before_step_one(tmp_path):
  root = tmp_path / 'mixed'
  make_mixed_folder(str(root), counts=(8, 4, 8), broken=False)
  config = bucket_config(root)
  config.data.bucket_max_gib = 1e-4
  with pytest.raises(ValueError, match=r'bucket needs .* GiB a device for its train step, more '
                     r'than data\.bucket_max_gib=0\.0001'):
    _train(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints' / '1')
