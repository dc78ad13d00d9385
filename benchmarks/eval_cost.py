"""What the validation loss costs a run at the default settings: one evaluation's seconds against
the training steps between two evaluations.

  python -m benchmarks.eval_cost [--config=configs/images.py:cpu] [--steps=10] [--repeats=2]

Builds the run as training does (`training.builder.build_trainer`) on a synthetic folder of
random captioned images at the config's size, times warm train steps and warm validation-loss
evaluations (`training.validation`, logging.val_examples examples at logging.val_bins levels), and
prints the share of training time the evaluation takes at logging.eval_every_steps. (The scratch
tokenizer is the fixed 'shapes' vocabulary here instead of a BPE one trained on the captions:
the same encoder size.)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _folder(root: str, n: int, size: int) -> str:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  with open(os.path.join(root, 'metadata.jsonl'), 'w') as f:
    for i in range(n):
      Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(
          os.path.join(root, f'{i}.png'))
      f.write(json.dumps({'file_name': f'{i}.png', 'text': f'a picture number {i}'}) + '\n')
  return root


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='configs/images.py:cpu')
  p.add_argument('--steps', type=int, default=10, help='Warm train steps timed.')
  p.add_argument('--repeats', type=int, default=2, help='Warm evaluations timed.')
  args = p.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from configs import loading, specs  # pylint: disable=import-outside-toplevel
  from data import pipeline, sources  # pylint: disable=import-outside-toplevel
  from models import lora  # pylint: disable=import-outside-toplevel
  from runtime import sharding  # pylint: disable=import-outside-toplevel
  from training import builder, validation  # pylint: disable=import-outside-toplevel
  config = loading.load(args.config)
  with tempfile.TemporaryDirectory() as tmp:
    config.data.path = _folder(tmp, 128, config.data.image_size)
    config.text.vocab = 'shapes'
    settings = specs.build(config)
    mesh = sharding.make_mesh(settings.mesh)
    source = sources.make(settings.data, 'train')
    trainer = builder.build_trainer(settings, mesh, source=source, workdir=tmp)
    state = trainer.init(jax.random.PRNGKey(0))
    loader = pipeline.make_loader(settings.data, source)
    rng = jax.random.PRNGKey(1)
    rules = settings.mesh.logical_axis_rules

    def step(state, i):
      local = loader(i)
      local = {'bad': local['bad'], **trainer.text_inputs(local),
               **{k: local[k] for k in trainer.image_keys}}
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, m = trainer.step(state, sharding.global_batch(mesh, local), rng,
                                trainer.frozen_weights, trainer.vae_params)
      jax.block_until_ready(m['loss'])
      return state

    state = step(state, 0)  # Compiles.
    t = time.perf_counter()
    for i in range(args.steps):
      state = step(state, i + 1)
    step_s = (time.perf_counter() - t) / args.steps
    val = validation.ValidationLoss(settings, trainer, mesh, source)
    weights = lora.combine(state.ema_params, trainer.frozen_weights)
    t = time.perf_counter()
    val(weights)
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.repeats):
      val(weights)
    eval_s = (time.perf_counter() - t) / args.repeats
  every = settings.logging.eval_every_steps
  share = eval_s / (every * step_s + eval_s)
  print(json.dumps({
      'config': args.config, 'device': jax.devices()[0].device_kind, 'cores': os.cpu_count(),
      'batch': settings.data.global_batch_size, 'step_s': round(step_s, 4),
      'val_examples': val.n, 'val_bins': settings.logging.val_bins,
      'eval_first_s': round(first_s, 2), 'eval_s': round(eval_s, 3), 'eval_every_steps': every,
      'share_of_training_time': round(share, 5)}))


if __name__ == '__main__':
  main()
