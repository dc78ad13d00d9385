"""Random FID Inception weights under pytorch-fid's exact tensor names and shapes, for tests.

Writes what `evaluation.inception.load` reads in place of pt_inception-2015-12-05-6726825d.pth,
so the extractor runs without a download: a `.pth` in torch.save's zip format (written without
torch, `models.pth.write_pth`; torch.load and pytorch-fid's `load_state_dict` read it) or a
`.safetensors`, by the file name's extension. The values are scaled so that activations neither
vanish nor explode through the 94 convolutions (He-normal kernels, BatchNorm near identity), so
features differ between images as a trained network's do, though they mean nothing.

  python -m tools.random_inception OUT.pth [--seed=0]   # or OUT.safetensors
"""
from __future__ import annotations

import argparse

import numpy as np

from evaluation import inception
from models import pth


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """{name: array} with every tensor of pytorch-fid's `fid_inception_v3().state_dict()`."""
  rng = np.random.default_rng(seed)
  normal = lambda shape, std: rng.standard_normal(shape, np.float32) * np.float32(std)
  uniform = lambda shape, lo, hi: rng.uniform(lo, hi, shape).astype(np.float32)
  out = {}
  for name, shape in inception.torch_shapes().items():
    if name.endswith('num_batches_tracked'):
      out[name] = np.zeros(shape, np.int64)
    elif name.endswith('conv.weight'):  # (out, in, kh, kw): He-normal over fan-in.
      out[name] = normal(shape, np.sqrt(2.0 / np.prod(shape[1:])))
    elif name.endswith('bn.weight'):
      out[name] = uniform(shape, 0.8, 1.2)
    elif name.endswith('bn.running_var'):
      out[name] = uniform(shape, 0.5, 1.5)
    elif name.endswith(('bn.bias', 'bn.running_mean')):
      out[name] = normal(shape, 0.1)
    else:  # fc.weight, fc.bias (after pool3: unused by the features).
      out[name] = normal(shape, 0.01)
  return out


def write_random_inception(path: str, seed: int = 0) -> str:
  """Writes random weights to `path` (.pth or .safetensors); returns `path`."""
  tensors = random_state_dict(seed)
  if path.endswith('.safetensors'):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(tensors, path)
    return path
  return pth.write_pth(path, tensors)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('out', help='file to write (.pth or .safetensors)')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  print(f'Wrote {write_random_inception(args.out, args.seed)}')


if __name__ == '__main__':
  main()
