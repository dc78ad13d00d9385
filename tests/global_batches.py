"""Writes the global batches a job's processes assemble from their own parts (run per process).

  python -m tests.global_batches --data_path=DIR --out=FILE.npz [--steps=3] [--batch=8]

Each process loads only its slice of each step's batch (data/pipeline.py); the slices become
one global jax.Array per field exactly as in training (runtime/sharding.py), gathered back to
every process; process 0 writes them. Used by tests/test_data_multihost.py with launch.local.
"""
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from cluster import distributed
from configs import base, specs
from data import pipeline, sources
from runtime import sharding


def main(argv):
  args = dict(a.lstrip('-').split('=', 1) for a in argv[1:])
  config = base.get_config()
  config.data.update(dataset='folder', path=args['data_path'], image_size=16, crop='random',
                     flip=True, global_batch_size=int(args.get('batch', 8)))
  settings = specs.build(config)
  distributed.initialize(settings.distributed)
  mesh = sharding.make_mesh(settings.mesh)
  loader = pipeline.make_loader(settings.data, sources.make(settings.data),
                                jax.process_index(), jax.process_count())
  out = {}
  for step in range(int(args.get('steps', 3))):
    local = loader(step)
    for key in ('image', 'index', 'bad'):
      gathered = multihost_utils.process_allgather(
          sharding.global_batch(mesh, {key: local[key]})[key], tiled=True)
      out[f'{key}_{step}'] = np.asarray(gathered)
    # Captions are strings (not device arrays): compare each process's slice on its own.
    out[f'caption_{step}_p{jax.process_index()}'] = local['caption']
  if jax.process_index() == 0:
    np.savez(args['out'], **out)
  else:
    np.savez(args['out'] + f'.p{jax.process_index()}', **out)


if __name__ == '__main__':
  main(sys.argv)
