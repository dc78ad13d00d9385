"""Shared by the Stable Diffusion run tests: a tiny random pipeline folder with a folder of
captioned images, configs/sd.py:tiny pointed at them, and the two runs of it the session trains
once (tests/conftest.py's `sd_run` and `sd_lora_run`)."""
import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

from configs import sd
from tests import image_folders
from tools import make_sd_pipeline

# The full fine-tune: the U-Net and the CLIP text encoder, with an EMA that is not the raw
# parameters (decay 0.5), a checkpoint at each of its 2 steps.
FINETUNE = dict(optim__num_steps=2, checkpoint__every_steps=1, text__finetune=True,
                optim__ema_decay=0.5)
# LoRA (rank 2, alpha 4: scale 2) on the attention and feed-forward layers, with dropout, at a
# learning rate that moves the adapters well off zero.
LORA_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out.0', 'ff.net.0.proj', 'ff.net.2')
LORA = dict(optim__num_steps=2, checkpoint__every_steps=1, optim__learning_rate=1e-2,
            lora__rank=2, lora__alpha=4.0, lora__targets=LORA_TARGETS, lora__dropout=0.1)


def pipeline_and_images(root) -> tuple[str, str]:
  """(a random SD-1.x-like pipeline folder, a folder of captioned images) under `root`; the
  folder also has what a hub snapshot holds beside the components (a feature extractor, a
  README, hf download's .cache)."""
  folder, images = paths(root)
  make_sd_pipeline.write_pipeline(folder, preset='sd1')
  os.makedirs(os.path.join(folder, 'feature_extractor'))
  with open(os.path.join(folder, 'feature_extractor', 'preprocessor_config.json'), 'w') as f:
    json.dump({'crop_size': 224}, f)
  with open(os.path.join(folder, 'README.md'), 'w') as f:
    f.write('license: creativeml-openrail-m\n')
  os.makedirs(os.path.join(folder, '.cache'))  # hf download's bookkeeping: an export skips it.
  image_folders.make_folder(root / 'images', broken=False)
  return folder, images


def paths(root) -> tuple[str, str]:
  """The (pipeline, images) folders `pipeline_and_images(root)` writes."""
  return str(root / 'pipeline'), str(root / 'images')


def tiny_config(folder, data, **changes):
  """configs/sd.py:tiny on `folder` and `data`; changes as section__field=value (lora__rank=2
  sets model.lora.rank)."""
  config = sd.get_config('tiny')
  config.model.pretrained = folder
  config.data.path = data
  config.logging.eval_at_end = False
  for key, value in changes.items():
    *path, field = key.split('__')
    section = config.model.lora if path == ['lora'] else config[path[0]]
    section[field] = value
  return config


@dataclasses.dataclass
class SDRun:
  """A 2-step run of configs/sd.py:tiny on one device, trained once per session; the same run
  stopped after step 1 then resumed, trained at first use (the full tier's resume tests). Read
  only: copy a workdir before writing into it."""
  pipeline: str  # The pipeline folder it started from.
  images: str  # Its folder of captioned images.
  config: Any  # `tiny_config(pipeline, images, **FINETUNE or LORA)`.
  path: pathlib.Path  # Its folder in the session's shared tmp folder (tests/shared_runs.py).
  trained: Any = None  # What training returned, in the worker that trained it.

  @property
  def workdir(self) -> str:
    """The run's workdir: a checkpoint at each of its 2 steps."""
    return str(self.path / 'full')

  @functools.cached_property
  def full(self):
    """The run's loop.TrainResult: its final state, the losses of steps 1 and 2."""
    from tests import shared_runs  # pylint: disable=import-outside-toplevel
    return self.trained or shared_runs.read_result(self.config, self.workdir, _devices())

  @functools.cached_property
  def resumed(self) -> tuple[str, list]:
    """(The workdir of the run stopped after step 1 then resumed, the (step, loss) of its two
    launches)."""
    from tests import shared_runs  # pylint: disable=import-outside-toplevel
    from training import loop  # pylint: disable=import-outside-toplevel
    path = self.path / 'cut'
    workdir = str(path / 'run')

    def train():
      first = loop.train_and_evaluate(self.config, workdir, devices=_devices(), stop_at=1)
      second = loop.train_and_evaluate(self.config, workdir, devices=_devices())
      return first.history + second.history
    return workdir, shared_runs.once(path, train) or shared_runs.history(workdir)


def _devices():
  import jax  # pylint: disable=import-outside-toplevel
  return jax.devices()[:1]


def run(path, pipeline: str, images: str, changes: dict) -> SDRun:
  """The SDRun of `changes` in `path` (tests/conftest.py's `sd_run` and `sd_lora_run`)."""
  from tests import shared_runs  # pylint: disable=import-outside-toplevel
  from training import loop  # pylint: disable=import-outside-toplevel
  sd_run = SDRun(pipeline, images, tiny_config(pipeline, images, **changes), path)
  sd_run.trained = shared_runs.once(path, lambda: loop.train_and_evaluate(
      sd_run.config, sd_run.workdir, devices=_devices()))
  return sd_run
