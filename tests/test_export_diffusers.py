"""Exporting a fine-tuned Stable Diffusion workdir as a diffusers folder (export/diffusers.py) and
the savers it writes with (models/sd_loading.py:save_sd_unet, text/clip.py:save_clip), without
PyTorch: each saver round-trips bit for bit through its loader, and an exported run is the source
folder with the trained weights in place."""
import filecmp
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from configs import sd, shapes, specs
from export import diffusers as export
from models import sd_loading, weights
from runtime import checkpoint
from sampling import from_checkpoint, from_pipeline
from tests import sd_runs
from text import clip
from tools import random_clip, random_sd_unet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_bitwise(got, want):
  """Two parameter trees (or tensor dicts) with the same structure, shapes, dtypes and bytes."""
  got, want = jax.device_get(got), jax.device_get(want)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    a, b, name = np.asarray(a), np.asarray(b), jax.tree_util.keystr(path)
    assert (a.shape, a.dtype) == (b.shape, b.dtype), name
    assert a.tobytes() == b.tobytes(), name


def _moved(params, seed):
  """`params` moved off the loaded values, as fine-tuning moves them."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.01, np.shape(x)).astype(
      np.float32), jax.device_get(params))


def _files(folder):
  """Every file under `folder`, relative."""
  return sorted(os.path.relpath(os.path.join(d, n), folder)
                for d, _, names in os.walk(folder) for n in names)


def _export_cli(*args):
  return subprocess.run([sys.executable, '-m', 'export.diffusers', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)


# ----------------------------------------------------------------------------- the savers


@pytest.mark.parametrize('preset,shards', [('sd1', 1), ('sd2', 2)])
def test_the_unet_round_trips_bit_for_bit(tmp_path, preset, shards):
  source = random_sd_unet.write_random_sd_unet(str(tmp_path / 'source'), preset=preset, seed=5,
                                               shards=shards)
  spec, params = sd_loading.load_sd_unet(source)
  # The inverse of the loader gives back the source's tensors: the same names, shapes and bytes.
  want, _ = weights.read_safetensors(source, sd_loading.WEIGHTS)
  _assert_bitwise(sd_loading.diffusers_unet_tensors(spec, params), want)
  # Other values (fine-tuned ones) come back from the written folder as they went in.
  trained = _moved(params, 0)
  out = sd_loading.save_sd_unet(str(tmp_path / 'out'), trained, source=source)
  assert sorted(os.listdir(out)) == ['config.json', sd_loading.WEIGHTS]  # One file, no temp files.
  assert filecmp.cmp(os.path.join(source, 'config.json'), os.path.join(out, 'config.json'),
                     shallow=False)
  _assert_bitwise(sd_loading.load_sd_unet(out).params, trained)


def test_the_unet_saver_refuses_params_of_another_architecture(tmp_path):
  sd1 = random_sd_unet.write_random_sd_unet(str(tmp_path / 'sd1'), preset='sd1')
  sd2 = random_sd_unet.write_random_sd_unet(str(tmp_path / 'sd2'), preset='sd2')
  _, params = sd_loading.load_sd_unet(sd1)
  with pytest.raises(ValueError, match=r'not those of the UNet2DConditionModel that .*sd2.*'
                     r'The params differ from it: \d+ missing'):
    sd_loading.save_sd_unet(str(tmp_path / 'out'), params, source=sd2)
  assert not os.path.exists(tmp_path / 'out')


def test_the_clip_text_encoder_round_trips_bit_for_bit(tmp_path):
  source = str(tmp_path / 'text_encoder')
  random_clip.write_random_clip(source, str(tmp_path / 'tokenizer'), hidden_act='gelu', seed=3)
  params = clip.load_clip(source).params
  want, _ = weights.read_safetensors(source, clip.WEIGHTS)
  tensors = clip.hf_tensors(clip.read_config(source), params)
  buffer = 'text_model.embeddings.position_ids'  # Saved by older transformers; loaders skip it.
  _assert_bitwise(tensors, {k: v for k, v in want.items() if k != buffer})
  trained = _moved(params, 1)
  out = clip.save_clip(str(tmp_path / 'out' / 'text_encoder'), trained, source=source)
  assert sorted(os.listdir(out)) == ['config.json', clip.WEIGHTS]
  got, _ = weights.read_safetensors(out, clip.WEIGHTS)
  assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
      k: (v.shape, v.dtype) for k, v in want.items()}  # The buffer kept: the same tensors.
  np.testing.assert_array_equal(got[buffer], want[buffer])
  reloaded = clip.load_clip(out, tokenizer_folder=str(tmp_path / 'tokenizer')).params
  _assert_bitwise(reloaded, trained)


def test_only_renames_reshapes_and_transposes_are_inverted():
  kernel = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
  convert = lambda get: {'dense': {'kernel': get(('new', 'old'), (6, 4)).T.reshape(4, 3, 2)}}
  tensors = weights.invert_conversion(convert, {'dense': {'kernel': kernel}}, 'x')
  np.testing.assert_array_equal(tensors['new'], kernel.reshape(4, 6).T)  # The current name.
  with pytest.raises(ValueError, match=r'^dense 4x3x2\. The params differ from it: 1 of another '
                     r"shape \(\['dense'\]\['kernel'\] is \(4, 6\), not \(4, 3, 2\)\)"):
    weights.invert_conversion(convert, {'dense': {'kernel': kernel.reshape(4, 6)}}, 'dense 4x3x2.')
  computed = (lambda get: {'dense': {'kernel': np.concatenate([get('w', (2, 6))] * 2)}},
              lambda get: {'dense': {'kernel': 2 * get('w', (4, 6))}})
  for convert, match in zip(computed, ["computes with tensor 'w' beyond reshapes and transposes",
                                       'unsupported operand']):
    with pytest.raises(TypeError, match=match):
      weights.invert_conversion(convert, {'dense': {'kernel': kernel.reshape(4, 6)}}, 'x')


# ----------------------------------------------------------------------------- a fine-tuned run


@pytest.fixture(scope='module')
def pipeline(sd_pipeline):
  """A tiny random SD 1.x folder, with what a hub snapshot has beside the components."""
  return sd_pipeline[0]


@pytest.fixture(scope='module')
def run(sd_run):
  """(pipeline, workdir): 2 steps of configs/sd.py:tiny from it training the U-Net and the text
  encoder, with an EMA that is not the raw parameters (decay 0.5): tests/conftest.py's `sd_run`,
  shared with tests/test_sd_finetune.py."""
  assert sd_run.config.optim.ema_decay == 0.5 and sd_run.config.text.finetune
  return sd_run.pipeline, sd_run.workdir


def _restored(workdir, use_ema):
  """{'unet': ..., 'text': ...}: the run's (EMA) parameters."""
  restored = from_checkpoint.restore(workdir, settings_of=specs.from_saved, use_ema=use_ema)
  return jax.device_get(restored.params)


@pytest.mark.full  # Trains the shared SD run (~80 s, most of it compiling its step).
def test_an_exported_run_is_its_pipeline_with_the_ema_weights(run, tmp_path):
  pipeline, workdir = run
  out = str(tmp_path / 'exported')
  record = export.export_workdir(workdir, out)
  assert os.listdir(tmp_path) == ['exported']  # No temporary folder left beside it.
  ema = _restored(workdir, use_ema=True)
  _assert_bitwise(sd_loading.load_sd_unet(os.path.join(out, 'unet')).params, ema['unet'])
  # The trained text encoder (text.finetune) in place of the source's.
  _assert_bitwise(clip.load_clip(os.path.join(out, 'text_encoder')).params, ema['text'])
  # Everything else is the source's, byte for byte.
  trained = f'text_encoder/{clip.WEIGHTS}'
  source_files = [f for f in _files(pipeline) if not f.startswith(('unet/', '.cache/'))]
  assert _files(out) == sorted(source_files + ['unet/config.json', f'unet/{sd_loading.WEIGHTS}',
                                               export.RUN_RECORD])
  for name in source_files + ['unet/config.json']:
    assert filecmp.cmp(os.path.join(pipeline, name), os.path.join(out, name),
                       shallow=False) == (name != trained), name
  assert 'model_index.json' in source_files and trained in source_files
  with open(os.path.join(out, export.RUN_RECORD)) as f:
    written = json.load(f)
  assert written == {k: v for k, v in record.items() if k != 'out'}
  assert written['step'] == 2 and written['ema'] is True and written['workdir'] == workdir
  assert written['text_encoder'] == 'trained' and written['source'] == pipeline
  assert len(written['config_digest']) == 16 and written['exported_at'].endswith('+00:00')
  # It loads as a pipeline folder, as sample.py --pretrained and model.pretrained load one.
  config = sd.get_config('sample')
  config.model.pretrained = out
  loaded = from_pipeline.load(specs.build(config))
  _assert_bitwise(loaded.unet_params, ema['unet'])
  _assert_bitwise(loaded.text_params, ema['text'])


@pytest.mark.full  # A tools.export process (~25 s); the export itself: the test above.
def test_the_command_line_exports_raw_weights_and_refuses_to_overwrite(run, tmp_path):
  _, workdir = run
  out = str(tmp_path / 'raw')
  result = _export_cli(f'--workdir={workdir}', f'--out={out}', '--noema')
  assert result.returncode == 0, result.stderr
  record = json.loads(result.stdout)
  assert record['ema'] is False and record['step'] == 2 and record['out'] == out
  assert 'Exported step 2 (raw weights; text encoder trained)' in result.stderr
  raw = _restored(workdir, use_ema=False)
  _assert_bitwise(sd_loading.load_sd_unet(os.path.join(out, 'unet')).params, raw['unet'])
  _assert_bitwise(clip.load_clip(os.path.join(out, 'text_encoder')).params, raw['text'])
  assert not np.array_equal(raw['unet']['conv_in']['kernel'], _restored(workdir, True)['unet'][
      'conv_in']['kernel'])  # (So the default export above really took the EMA.)

  again = _export_cli(f'--workdir={workdir}', f'--out={out}')
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1] == (
      f'error: --out={out} exists and is not empty: pass --overwrite to replace it, or name a new '
      'folder.')
  export.export_workdir(workdir, out, overwrite=True)  # EMA weights now, nothing else beside.
  assert sorted(os.listdir(tmp_path)) == ['raw']
  with open(os.path.join(out, export.RUN_RECORD)) as f:
    assert json.load(f)['ema'] is True


def test_a_trained_text_encoder_is_written_in_place_of_the_source_one(pipeline, tmp_path):
  trained = {'unet': _moved(sd_loading.load_sd_unet(os.path.join(pipeline, 'unet')).params, 2),
             'text': _moved(clip.load_clip(os.path.join(pipeline, 'text_encoder')).params, 3)}
  out = export.write_pipeline(pipeline, str(tmp_path / 'out'), trained, {'step': 1},
                              unet='unet', text_encoder='text_encoder')
  _assert_bitwise(clip.load_clip(os.path.join(out, 'text_encoder')).params, trained['text'])
  _assert_bitwise(sd_loading.load_sd_unet(os.path.join(out, 'unet')).params, trained['unet'])
  assert filecmp.cmp(os.path.join(pipeline, 'text_encoder', 'config.json'),
                     os.path.join(out, 'text_encoder', 'config.json'), shallow=False)
  assert filecmp.cmp(os.path.join(pipeline, 'vae', sd_loading.WEIGHTS),
                     os.path.join(out, 'vae', sd_loading.WEIGHTS), shallow=False)


# ----------------------------------------------------------------------------- errors


def test_what_cannot_be_exported_is_refused_naming_it(sd_pipeline, tmp_path):
  """Refused from the folders and the saved config, before any weight is read: a workdir of
  configs/sd.py:tiny on the shared pipeline with checkpoints at steps 1 and 2 (no real weights)."""
  pipeline, images = sd_pipeline
  record = specs.build(sd_runs.tiny_config(pipeline, images)).config_record()
  workdir = _saved_run(tmp_path / 'run', record, steps=(1, 2))
  out = str(tmp_path / 'out')
  with pytest.raises(FileNotFoundError, match='--workdir=.*nope: no such folder'):
    export.export_workdir(str(tmp_path / 'nope'), out)
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='No checkpoints under .*empty/checkpoints: train'):
    export.export_workdir(str(tmp_path / 'empty'), out)
  with pytest.raises(FileNotFoundError, match=r'step 7 not in .*; available: \[1, 2\]'):
    export.export_workdir(workdir, out, step=7)
  with pytest.raises(export.ExportError, match='would write over the workdir'):
    export.export_workdir(workdir, workdir, overwrite=True)
  with pytest.raises(export.ExportError, match='would write inside the source folder'):
    export.export_workdir(workdir, os.path.join(pipeline, 'mine'))
  with open(tmp_path / 'file', 'w') as f:
    f.write('x')
  with pytest.raises(export.ExportError, match='is a file: name a folder'):
    export.export_workdir(workdir, str(tmp_path / 'file'))
  assert sorted(os.listdir(tmp_path)) == ['empty', 'file', 'run']
  assert not os.path.exists(os.path.join(pipeline, 'mine'))


def _saved_run(workdir, record, steps=(1,)):
  """A workdir whose checkpoints (at `steps`) saved `record` as their config, and no real
  weights."""
  ckpt = checkpoint.Checkpointer(str(workdir))
  for step in steps:
    ckpt.save(step, {'step': np.full((), step, np.int32)}, record, {})
  ckpt.close()
  return str(workdir)


def test_a_run_of_the_native_unet_is_refused_in_one_line(tmp_path):
  """Refused from the saved config alone, before any weight is read."""
  workdir = _saved_run(tmp_path / 'native', specs.build(shapes.get_config('tiny')).config_record())
  result = _export_cli(f'--workdir={workdir}', f'--out={tmp_path / "out"}')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {workdir} trained model.family='unet', jaxdiff's own denoiser, which has no "
      "diffusers pipeline: only the 'sd' family (a run started from a diffusers folder, "
      'model.pretrained; configs/sd.py) exports.')
  assert not os.path.exists(tmp_path / 'out')


def test_a_run_whose_pipeline_folder_is_gone_is_refused(pipeline, tmp_path):
  record = specs.build(sd_runs.tiny_config(pipeline, str(tmp_path))).config_record()
  gone = str(tmp_path / 'moved_away')
  record['model']['pretrained'] = gone
  record['text']['pretrained_path'] = os.path.join(gone, 'text_encoder')
  record['autoencoder']['path'] = os.path.join(gone, 'vae')
  workdir = _saved_run(tmp_path / 'run', record)
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match=f"{workdir}: model.pretrained='{gone}' is not a folder.*the export "
                     'copies the folder the run started from'):
    export.export_workdir(workdir, str(tmp_path / 'out'))


def test_a_frozen_component_that_changed_since_training_is_refused():
  vae = types.SimpleNamespace(params={'w': np.ones(3, np.float32)}, path='/m/vae')
  text = types.SimpleNamespace(init=lambda rng: {'w': np.zeros(3, np.float32)})
  settings = types.SimpleNamespace(text=types.SimpleNamespace(pretrained_path='/m/text_encoder'))
  frozen = {'autoencoder': [weights.digest(vae.params), '/m/vae'],
            'text encoder': [weights.digest(text.init(None)), '/m/text_encoder']}
  restored = from_checkpoint.Restored(settings, {checkpoint.FROZEN_KEY: frozen}, vae, None, text,
                                      {}, 1)
  export._check_frozen(restored, '/w')  # pylint: disable=protected-access
  vae.params = {'w': np.full(3, 2, np.float32)}
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match=r'The autoencoder differs from the one the checkpoint in /w'):
    export._check_frozen(restored, '/w')  # pylint: disable=protected-access
