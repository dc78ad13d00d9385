"""Writes a dataset's reference statistics for FID, KID and CMMD (evaluation/reference.py):

  python -m tools.reference --config=configs/images.py:gpu --config.data.path=/data/mine \
      --inception=pt_inception-2015-12-05-6726825d.pth --clip=/models/clip-vit-large-patch14 \
      --out=/data/mine_stats.npz [--split=eval] [--num=10000]

With several processes (launch/), each takes its share and process 0 writes the file.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from cluster import distributed
from configs import specs
from evaluation import quality, reference
from runtime import console


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  flag = flags.FLAGS
  console.quiet_library_noise()

  def run():
    if not flag.out:
      raise ValueError('--out: the reference .npz to write.')
    if not (flag.inception or flag.clip):
      raise ValueError('pass --inception (FID, KID) and/or --clip (CMMD): the extractors.')
    settings = specs.build(flag.config)
    distributed.initialize(settings.distributed)  # Several processes (launch/): each its share.
    extractors = quality.load_extractors(flag.inception, flag.clip, flag.batch)
    return reference.compute(settings, extractors, os.path.abspath(flag.out), split=flag.split,
                   num=flag.num, progress=True)
  stamp = console.run_or_exit(run, verbose=flag.verbose)
  print(f'Wrote {flag.out}: {stamp["count"]} images at {stamp["image_size"]} px.',
        file=sys.stderr)


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Config file[:variant] naming the data.')
  flags.DEFINE_string('out', None, 'The reference .npz to write.')
  flags.DEFINE_string('inception', '', 'The FID Inception weights (.pth or .safetensors).')
  flags.DEFINE_string('clip', '', 'A CLIPModel folder (CMMD).')
  flags.DEFINE_enum('split', 'eval', ['eval', 'train'], 'Which split of the data.')
  flags.DEFINE_integer('num', 0, 'The first N examples (0: all).')
  flags.DEFINE_integer('batch', 32, 'Images per extractor call.')
  flags.DEFINE_bool('verbose', False, 'On an error, print the whole traceback.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
