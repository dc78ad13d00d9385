"""Own images end to end: a mixed folder trains (BPE tokenizer, bad files counted), samples, resumes."""
import json
import os

import jax
import numpy as np
import pytest

from configs import images as images_config
from data import pipeline, sources
from evaluation import sample_grid
from sampling import from_checkpoint
from configs import specs
from training import loop
from tests import image_folders

MESH = dict(data=2, fsdp=2)


def folder_config(root, **data):
  config = images_config.get_config('tiny')
  config.data.path = str(root)
  config.mesh.data, config.mesh.fsdp = MESH['data'], MESH['fsdp']
  config.data.update(data)
  return config


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('own_images')
  image_folders.make_folder(root)
  return root


@pytest.fixture(scope='module')
def full_run(folder, tmp_path_factory):
  config = folder_config(folder)
  config.logging.eval_at_end = False  # (The eval grid is tested on the shared Shapes run.)
  workdir = str(tmp_path_factory.mktemp('own_run') / 'run')
  return config, workdir, loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4])


@pytest.mark.full  # Trains its own 4-step run (bpe tokenizer, 4 devices): ~1 min.
def test_a_mixed_folder_trains_and_reports_its_bad_files(full_run):
  config, workdir, result = full_run
  assert [s for s, _ in result.history] == [1, 2, 3, 4]
  assert all(np.isfinite(loss) for _, loss in result.history)
  assert os.path.isfile(os.path.join(workdir, 'tokenizer.json'))  # text.vocab='bpe' trained it.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  bad = [r['data/bad_records'] for r in rows if 'data/bad_records' in r]
  # 4 steps x 8 examples = 32 stream positions, 2.67 epochs of 12 files, 4 of them unusable.
  source = sources.FolderSource(config.data.path)
  loader = pipeline.make_loader(specs.build(config).data, source)
  want = sum(int(loader(s)['bad'].sum()) for s in range(4))
  assert want > 0 and bad[-1] == want


@pytest.mark.full
def test_resume_gives_the_parameters_of_an_uninterrupted_run(full_run, tmp_path):
  config, _, full = full_run
  workdir = str(tmp_path / 'resumed')
  loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4], stop_at=2)
  second = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4])
  assert [s for s, _ in second.history] == [3, 4]
  for a, b in zip(jax.tree.leaves(jax.device_get(second.state.params)),
                  jax.tree.leaves(jax.device_get(full.state.params))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.full  # Needs the run above.
def test_sampling_from_the_workdir_uses_its_tokenizer(full_run, tmp_path):
  _, workdir, _ = full_run
  loaded = from_checkpoint.load(workdir, settings_of=specs.from_saved)
  out = str(tmp_path / 'samples')
  prompts = ['a photo of a rgb', 'the grey picture']
  from_checkpoint.sample_to_folder(loaded, out, prompts, loaded.settings.sampler, seed=0,
                                   samples_per_prompt=1)
  assert sorted(n for n in os.listdir(out) if n.endswith('.png')) == [
      '00000.png', '00001.png', 'grid.png']


def test_eval_prompts_come_from_the_config_or_the_data(folder):
  config = folder_config(folder)
  prompts = sample_grid.eval_prompts(specs.build(config))
  source = sources.FolderSource(str(folder))
  want = [c[0] for c in (source.captions(i) for i in range(len(source))) if c][:4]
  assert prompts == want
  config.logging.eval_prompt_list = ('a cat', 'a dog')
  assert sample_grid.eval_prompts(specs.build(config)) == ['a cat', 'a dog']
