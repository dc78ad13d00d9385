"""Quality metrics on your data, end to end without downloads: a reference file of a folder
(random-weight Inception and CLIP in their real layouts), a tiny run that reports the validation
loss, KID, CLIP score and CMMD (and FID: the full tier), evaluate.py on a samples folder, and
refused mismatches."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import images, specs
from data import pipeline, sources
from evaluation import quality, reference
from launch import sweep_report
from tests import image_folders
from tools.random_clip_model import write_random_clip_model
from tools.random_inception import write_random_inception
from training import loop

import evaluate

# The full tier: Inception and CLIP extractors compiled, a reference and runs scored (~2.5 min of
# the default tier on 2 cores); the metrics themselves: tests/test_evaluation_fid.py and
# tests/test_evaluation_clip.py.
pytestmark = pytest.mark.full


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('quality')
  captions = image_folders.make_folder(root / 'images', broken=False)
  inception = write_random_inception(str(root / 'inception.safetensors'), seed=0)
  clip = str(root / 'clip')
  write_random_clip_model(clip)
  config = images.get_config('tiny')
  config.data.path = str(root / 'images')
  config.text.vocab = 'shapes'  # (No tokenizer to train.)
  extractors = quality.load_extractors(inception, clip, batch=8)
  stats = str(root / 'stats.npz')
  reference.compute(specs.build(config), extractors, stats, split='train')
  return root, config, extractors, stats, captions


def test_the_reference_is_stamped_and_a_mismatch_is_refused(setup):
  _, config, extractors, stats, captions = setup
  stamp = quality.read_stamp(stats)
  size = config.data.image_size
  assert stamp['count'] == len(captions) and stamp['image_size'] == size and stamp['split'] == 'train'
  assert stamp['inception'] == extractors.inception.fingerprint
  assert stamp['clip'] == extractors.clip.fingerprint
  with pytest.raises(ValueError, match=r'logging\.reference_stats=.*image_size=16'):
    quality.load_reference(stats, extractors.stamp(size * 2), extractors,
                           field='logging.reference_stats')
  other = quality.Extractors(extractors.inception, None)
  with pytest.raises(ValueError, match=r"clip="):
    quality.load_reference(stats, dict(other.stamp(size), clip='clip:another'), other)


def test_evaluate_scores_a_samples_folder_against_the_reference(setup, tmp_path):
  root, config, extractors, stats, captions = setup
  # The very images the reference was made of (as the data pipeline gives them): FID, CMMD ~ 0.
  data = specs.build(config).data
  loader = pipeline.BatchLoader(sources.make(data, 'train'), pipeline.Transform(
      data.image_size, 'center', False, data.upscale), seed=0, global_batch_size=1,
                                on_bad_record='skip')
  manifest = []
  for i in range(len(captions)):
    example = loader.example(0, i)
    Image.fromarray(np.asarray(example['image'], np.uint8)).save(tmp_path / f'{i}.png')
    manifest.append({'file': f'{i}.png', 'prompt': example['caption']})
  (tmp_path / 'manifest.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in manifest))
  results = evaluate.main(['--samples', str(tmp_path), '--reference', stats, '--inception',
                           extractors.inception.path, '--clip', extractors.clip.path])
  assert results['images'] == len(captions)
  assert abs(results['fid']) < 1e-2 and abs(results['cmmd']) < 1e-4, results
  assert np.isfinite(results['kid']) and np.isfinite(results['clip_score'])
  saved = json.loads((tmp_path / 'scores.json').read_text())
  assert saved['fid'] == results['fid']


def _run_with_quality_metrics(setup, sweep, metrics):
  """eval/* of member_a of a `sweep` folder: a 1-step run of `setup`'s config whose evaluation at
  the end reports the validation loss and `metrics` of 8 samples (scored at batch 8, as the
  reference was: extractor programs this file has compiled)."""
  _, config, extractors, stats, _ = setup
  config = config.copy_and_resolve_references()
  config.optim.num_steps = 1
  config.logging.update(eval_every_steps=0, eval_at_end=True, val_examples=4, val_bins=2,
                        quality_samples=8, quality_batch=8, quality_metrics=metrics,
                        eval_max_prompts=1, inception_path=extractors.inception.path,
                        clip_path=extractors.clip.path, reference_stats=stats)
  config.sampler.num_steps = 2
  workdir = str(sweep / 'member_a')
  from evaluation import quality_eval
  settings = specs.build(config)
  loop.train(settings, workdir, evaluator=quality_eval.evaluator_of(settings),
             devices=jax.devices()[:1])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evals = [r for r in map(json.loads, f) if 'eval/val_loss' in r]
  assert len(evals) == 1
  for name in ('val_loss',) + tuple('clip_score' if m == 'clip' else m for m in metrics):
    assert np.isfinite(evals[0][f'eval/{name}']), name
  return evals[0], workdir


def test_a_run_reports_validation_loss_and_quality_metrics(setup, tmp_path):
  """KID, CLIP score and CMMD (FID: the full-tier test below; evaluate.py's test above scores it
  with the same function)."""
  sweep = tmp_path / 'sweep'
  scores, workdir = _run_with_quality_metrics(setup, sweep, ('kid', 'clip', 'cmmd'))
  assert 'eval/fid' not in scores
  events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert events and b'eval/cmmd' in open(os.path.join(workdir, events[0]), 'rb').read()
  member = sweep_report.collect(str(sweep)).members[0]
  assert member.value('eval/kid') == scores['eval/kid']


# FID's sqrtm of a 2048 x 2048 product in scipy: 20-60 s on 2 cores.
def test_a_run_reports_fid_with_the_other_quality_metrics(setup, tmp_path):
  sweep = tmp_path / 'sweep'
  scores, workdir = _run_with_quality_metrics(setup, sweep, ('fid', 'kid', 'clip', 'cmmd'))
  events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert events and b'eval/fid' in open(os.path.join(workdir, events[0]), 'rb').read()
  member = sweep_report.collect(str(sweep)).members[0]
  assert member.value('eval/fid') == scores['eval/fid']


# Two launches of the reference command (~2 min).
def test_one_and_two_processes_make_the_same_reference(setup, tmp_path):
  import subprocess
  import sys
  from tests.test_multihost_training import REPO, _clean_env
  root, config, extractors, _, _ = setup
  files = {}
  for n in (1, 2):
    out = str(tmp_path / f'{n}.npz')
    cmd = [sys.executable, '-m', 'launch.local', '--num_processes', str(n),
           '--devices_per_process', '1', '--', sys.executable, '-m', 'tools.reference',
           '--config=configs/images.py:tiny', f'--config.data.path={root / "images"}',
           '--config.text.vocab=shapes', f'--inception={extractors.inception.path}',
           f'--clip={extractors.clip.path}', '--split=train', f'--out={out}']
    run = subprocess.run(cmd, cwd=REPO, env=_clean_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files[n] = np.load(out)
  one, two = files[1], files[2]
  assert int(one['fid_count']) == int(two['fid_count']) == 8
  np.testing.assert_allclose(two['fid_total'], one['fid_total'], rtol=1e-12)
  np.testing.assert_allclose(two['fid_outer'], one['fid_outer'], rtol=1e-10, atol=1e-9)
  rows = lambda a: a[np.lexsort(a.T)]
  np.testing.assert_allclose(rows(two['clip_images']), rows(one['clip_images']), atol=1e-6)


# Extractors compiled at another batch size (~60 s).
def test_a_killed_reference_run_resumes_where_it_stopped(setup, tmp_path, monkeypatch):
  _, config, extractors, stats, captions = setup
  settings = specs.build(config)
  small = quality.Extractors(extractors.inception, extractors.clip, batch=2)
  out = str(tmp_path / 'stats.npz')
  monkeypatch.setattr(reference, '_SAVE_EVERY', 1)
  added = []
  real_add = quality.Features.add

  def add_then_die(self, images, prompts=None):
    if len(added) == 2:
      raise KeyboardInterrupt  # Killed after 2 of 4 batches (both saved in the partial file).
    added.append(len(images))
    real_add(self, images, prompts)
  monkeypatch.setattr(quality.Features, 'add', add_then_die)
  with pytest.raises(KeyboardInterrupt):
    reference.compute(settings, small, out, split='train')
  assert os.path.isfile(f'{out}.partial-0.npz') and not os.path.exists(out)
  monkeypatch.setattr(quality.Features, 'add', lambda self, images, prompts=None: (
      added.append(len(images)), real_add(self, images, prompts)))
  reference.compute(settings, small, out, split='train')
  assert added == [2, 2, 2, 2]  # The rerun extracted only the last 2 batches.
  assert not os.path.exists(f'{out}.partial-0.npz')
  with np.load(out) as resumed, np.load(stats) as whole:
    assert int(resumed['fid_count']) == len(captions)
    np.testing.assert_allclose(resumed['fid_total'], whole['fid_total'], rtol=1e-6)
