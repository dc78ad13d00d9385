"""A dataset's reference statistics for FID, KID and CMMD, computed once (the command is
tools/reference.py):

  python -m tools.reference --config=configs/images.py:gpu --config.data.path=/data/mine \
      --inception=pt_inception-2015-12-05-6726825d.pth --clip=/models/clip-vit-large-patch14 \
      --out=/data/mine_stats.npz [--split=eval] [--num=10000]

The images are the config's (data.image_size, centre-cropped, not flipped) of its validation
split (`--split=eval`, data.eval_path / data.eval_split) or its training data (`--split=train`),
the first `--num` (all by default). Each process reads its share (examples p, p + P, ...) and the
statistics are combined across processes; a partial file (OUT.partial.npz) is written as it goes,
so a killed run resumes where it stopped. The file is stamped with the extractors' fingerprints,
the image size, the resize and the count (evaluation/quality.py); training and evaluate.py refuse
a reference made otherwise.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from data import batch as batch_keys
from data import pipeline, sources
from evaluation import quality
from runtime import console

_SAVE_EVERY = 20  # Batches between partial saves.


def examples(settings, split: str):
  """The source of `split` ('eval' or 'train') of the settings' data."""
  source = sources.make(settings.data, split)
  if source is None:
    raise ValueError(f'--split={split}: data.dataset={settings.data.dataset!r} has no {split} split '
                     'configured (set data.eval_path / data.eval_split, or use --split=train).')
  return source


def compute(settings, extractors: quality.Extractors, out: str, *, split: str = 'eval',
            num: int = 0, progress: bool = False) -> dict:
  """Writes the reference of the settings' data to `out`; returns its stamp."""
  source = examples(settings, split)
  n = min(num, len(source)) if num else len(source)
  data = settings.data
  stamp = extractors.stamp(data.image_size)
  stamp.update(data=data.path or data.tfds_name, split=split)
  p, count = jax.process_index(), jax.process_count()
  mine = list(range(p, n, count))
  features = quality.Features(extractors, seed=p)
  partial = f'{out}.partial-{p}.npz'
  done = 0
  if os.path.isfile(partial):
    with np.load(partial) as f:
      if json.loads(str(f['stamp'])) == stamp:  # Same data and extractors: carry on.
        features.restore({k: f[k] for k in f.files})
        done = int(f['done'])
        logging.info('Resuming %s at %d of %d examples.', partial, done, len(mine))
  transform = pipeline.Transform(data.image_size, 'center', False, data.upscale)
  loader = pipeline.BatchLoader(source, transform, seed=data.seed, global_batch_size=1,
                                on_bad_record='skip')
  batch = extractors.batch
  with console.progress(len(mine), 'reference', 'img', initial=done, disable=not progress) as bar:
    for i, start in enumerate(range(done, len(mine), batch)):
      rows = [loader.example(0, index) for index in mine[start:start + batch]]
      features.add(np.stack([np.asarray(r[batch_keys.IMAGE], np.uint8) for r in rows]))
      bar.update(len(rows))
      if (i + 1) % _SAVE_EVERY == 0:
        tmp = f'{partial}.tmp.npz'
        np.savez(tmp, stamp=json.dumps(stamp), done=start + len(rows), **features.state())
        os.replace(tmp, partial)
  combined = features.gathered()
  if p == 0:
    quality.save_reference(out, combined, stamp)
  if os.path.isfile(partial):
    os.remove(partial)
  return dict(stamp, count=combined.count)
