"""Optional: a LoRA run's export read by diffusers and peft themselves.

Skipped unless torch, diffusers and peft import (the project needs none of them). A LoRA run
(rank 2, alpha 4: scale 2, every target layer) on the random SD 1.x-like folder of
tests/test_sd_sampling_reference.py is exported as a LoRA file and with --merge.
`StableDiffusionPipeline.load_lora_weights(DIR)` loads the file over the folder with no warning
(no missing or unexpected keys), and samples, for the same initial latents, prompts, negative
prompt, guidance and scheduler, the images jaxdiff samples from the workdir (adapters scaled by
0.5 too, diffusers' `set_adapters(..., 0.5)`); the merged folder loaded by `from_pretrained` does
the same. The file diffusers saves back (`save_lora_weights`) reads as our adapters bit for bit.
[0, 1] images within 1e-3 (measured on CPU, float32: see the printed differences).
"""
import contextlib
import logging
import os
import warnings

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
peft = pytest.importorskip('peft')

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import sd, specs
from export import diffusers as export
from models import lora_loading
from sampling import from_checkpoint
from tests import image_folders
from tests.test_export_diffusers import _assert_bitwise
from tests.test_sd_sampling_reference import Case, _compare
from training import loop

TARGETS = ('to_q', 'to_k', 'to_v', 'to_out.0', 'ff.net.0.proj', 'ff.net.2')
ADAPTER = 'jaxdiff'


@contextlib.contextmanager
def _messages():
  """Every warning and every diffusers / peft log record (WARNING and above) made within."""
  records = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = lambda record: records.append(record.getMessage())
  loggers = [diffusers.utils.logging.get_logger('diffusers'), logging.getLogger('peft')]
  for logger in loggers:
    logger.addHandler(handler)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    try:
      yield records
    finally:
      for logger in loggers:
        logger.removeHandler(handler)
  records.extend(str(w.message) for w in caught)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(Case, workdir, the LoRA file's folder, the merged pipeline folder)."""
  root = tmp_path_factory.mktemp('sd_lora_reference')
  case = Case(root, 'sd1')
  image_folders.make_folder(root / 'images', broken=False)
  config = sd.get_config('tiny')
  config.model.pretrained = case.folder
  config.data.path = str(root / 'images')
  config.optim.num_steps = config.checkpoint.every_steps = 2
  config.optim.learning_rate = 1e-2  # Adapters well off zero: their effect is visible.
  config.model.lora.rank, config.model.lora.alpha, config.model.lora.targets = 2, 4.0, TARGETS
  config.logging.eval_at_end = False
  workdir = str(root / 'run')
  loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  lora_dir = export.export_workdir(workdir, str(root / 'lora'))['out']
  merged_dir = export.export_workdir(workdir, str(root / 'merged'), merge=True)['out']
  return case, workdir, lora_dir, merged_dir


def _loaded(workdir, lora_scale=1.0):
  return from_checkpoint.load(workdir, settings_of=specs.from_saved, lora_scale=lora_scale)


def test_diffusers_loads_the_lora_file_and_samples_what_jaxdiff_samples(
    trained, tmp_path, record_property):
  case, workdir, lora_dir, _ = trained
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      case.folder, torch_dtype=torch.float32, safety_checker=None)
  pipe.set_progress_bar_config(disable=True)
  with _messages() as messages:
    pipe.load_lora_weights(lora_dir, adapter_name=ADAPTER)
  # diffusers says the file has no text encoder adapters (it has none, as its own U-Net-only
  # trainers' files); nothing else: no missing, unexpected or mismatched keys.
  others = [m for m in messages if not m.startswith('No LoRA keys associated to CLIPTextModel')]
  assert not others, others
  config = pipe.unet.peft_config[ADAPTER]
  assert (config.r, config.lora_alpha, set(config.target_modules)) == (2, 4.0, set(TARGETS))
  loaded = _loaded(workdir)
  sampler = loaded.settings.sampler.name
  plain = case.diffusers_images(sampler)  # The folder alone.
  before, case.pipe = case.pipe, pipe
  try:
    want = case.diffusers_images(sampler)
    assert np.abs(want - plain).max() > 1e-2  # The adapters change the images.
    _compare(want, case.our_images(loaded, sampler), record_property, 'LoRA file, scale 1')
    pipe.set_adapters(ADAPTER, 0.5)
    _compare(case.diffusers_images(sampler), case.our_images(_loaded(workdir, 0.5), sampler),
             record_property, 'LoRA file, scale 0.5')
    pipe.set_adapters(ADAPTER, 1.0)
  finally:
    case.pipe = before

  # What diffusers saves back is the same file: read as our adapters bit for bit.
  saved = str(tmp_path / 'resaved')
  diffusers.StableDiffusionPipeline.save_lora_weights(
      saved, unet_lora_layers=peft.get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER),
      unet_lora_adapter_metadata=config.to_dict())
  restored = from_checkpoint.restore(workdir, settings_of=specs.from_saved)
  adapters, spec = lora_loading.read(saved, restored.settings.model.network)
  assert (spec.rank, spec.alpha, spec.targets) == (2, 4.0, TARGETS)
  _assert_bitwise(adapters, restored.params['unet'])


def test_the_merged_export_samples_what_jaxdiff_samples_with_the_adapters(
    trained, record_property):
  case, workdir, _, merged_dir = trained
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      merged_dir, torch_dtype=torch.float32, safety_checker=None)
  pipe.set_progress_bar_config(disable=True)
  before, case.pipe = case.pipe, pipe
  try:
    loaded = _loaded(workdir)
    sampler = loaded.settings.sampler.name
    want = case.diffusers_images(sampler)
  finally:
    case.pipe = before
  base = case.diffusers_images(sampler)
  assert np.abs(want - base).max() > 1e-2  # The adapters change the images.
  _compare(want, case.our_images(loaded, sampler), record_property, 'merged')
  assert os.path.isfile(os.path.join(merged_dir, export.RUN_RECORD))
