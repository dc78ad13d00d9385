"""The FID Inception-v3 (pool3, 2048-d) in Flax, as pytorch-fid and clean-fid compute it.

`features(params, images) -> [N, 2048]` is pure and jitted: NHWC images in [0, 1] (float) or
uint8, resized to 299 x 299 bilinearly as pytorch-fid does (`F.interpolate(..., 'bilinear',
align_corners=False)`, no antialiasing), scaled to [-1, 1], then torchvision's Inception-v3 with
pytorch-fid's FID blocks (`FIDInceptionA/C/E_1/E_2`: average pools that leave the padding out of
the count, and a max pool in the last block) up to the global average pool. Every convolution is
torchvision's BasicConv2d: no bias, BatchNorm (eps 1e-3, running statistics), ReLU; float32 at
the highest matmul precision.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (WEIGHTS_URL: TensorFlow's FID
Inception ported to PyTorch), read without executing its pickle (`models.pth`), or a
`.safetensors` with the same tensor names (docs/evaluation.md):

  python -m evaluation.inception --convert=pt_inception-2015-12-05-6726825d.pth \
      --out=pt_inception-2015-12-05-6726825d.safetensors
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import pth, weights

WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}'
SIZE = 299  # Input side after the resize.
DIM = 2048  # Feature size (pool3).
FC_SHAPES = {'fc.weight': (1008, DIM), 'fc.bias': (1008,)}  # In the file; after pool3, unused.
BN_EPS = 1e-3  # torchvision's BasicConv2d.
# Our leaf -> the suffix of its tensor under the BasicConv2d's name (e.g. 'Mixed_5b.branch1x1').
_TENSORS = {'kernel': 'conv.weight', 'scale': 'bn.weight', 'bias': 'bn.bias',
            'mean': 'bn.running_mean', 'var': 'bn.running_var'}
_COUNTER = 'bn.num_batches_tracked'  # In the file (int64, training bookkeeping); unused.
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- the network


class BasicConv(nn.Module):
  """torchvision's BasicConv2d: convolution without bias, BatchNorm in inference form, ReLU."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    c = self.features
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], c))
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    mean = self.param('mean', nn.initializers.zeros, (c,))
    var = self.param('var', nn.initializers.ones, (c,))
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), [(p, p) for p in self.padding],
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HIGHEST)
    a = scale * jax.lax.rsqrt(var + BN_EPS)  # y * a + b, as PyTorch's inference BatchNorm.
    return nn.relu(y * a + (bias - mean * a))


def _avg_pool(x):  # TensorFlow's average pool: the padding is not counted (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):  # pytorch-fid's FIDInceptionA.
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name='branch1x1')(x)
    b5 = BasicConv(48, name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, name='branch_pool')(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):  # torchvision's InceptionB (Mixed_6a).

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), 2, name='branch3x3')(x)
    bd = BasicConv(64, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), 2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], -1)


class InceptionC(nn.Module):  # pytorch-fid's FIDInceptionC.
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7, row, col = self.channels_7x7, ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b1 = BasicConv(192, name='branch1x1')(x)
    b7 = BasicConv(c7, name='branch7x7_1')(x)
    b7 = BasicConv(c7, *row[:1], padding=row[1], name='branch7x7_2')(b7)
    b7 = BasicConv(192, *col[:1], padding=col[1], name='branch7x7_3')(b7)
    bd = BasicConv(c7, name='branch7x7dbl_1')(x)
    for i, (k, p) in enumerate((col, row, col, row)):
      bd = BasicConv(192 if i == 3 else c7, k, padding=p, name=f'branch7x7dbl_{i + 2}')(bd)
    bp = BasicConv(192, name='branch_pool')(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):  # torchvision's InceptionD (Mixed_7a).

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), 2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), 2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], -1)


class InceptionE(nn.Module):  # pytorch-fid's FIDInceptionE_1 (avg pool) and FIDInceptionE_2 (max).
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    def split(y, prefix):  # A 1x3 and a 3x1 convolution side by side.
      return [BasicConv(384, (1, 3), padding=(0, 1), name=f'{prefix}a')(y),
              BasicConv(384, (3, 1), padding=(1, 0), name=f'{prefix}b')(y)]
    b1 = BasicConv(320, name='branch1x1')(x)
    b3 = split(BasicConv(384, name='branch3x3_1')(x), 'branch3x3_2')
    bd = BasicConv(448, name='branch3x3dbl_1')(x)
    bd = split(BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd), 'branch3x3dbl_3')
    pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool(x)
    bp = BasicConv(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], -1)


def preprocess(images: jax.Array) -> jax.Array:
  """[N, H, W, 3] uint8 or float in [0, 1] -> [N, 299, 299, 3] float32 in [-1, 1] (pytorch-fid's
  bilinear resize with half-pixel centres and no antialiasing, then 2x - 1)."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'inception features: images must be NHWC [N, H, W, 3], got shape '
                     f'{tuple(images.shape)}.')
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  if x.shape[1:3] != (SIZE, SIZE):
    x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, 3), 'bilinear', antialias=False)
  return 2.0 * x - 1.0


class InceptionV3(nn.Module):
  """images [N, H, W, 3] (see `preprocess`) -> pool3 features [N, 2048] float32."""

  @nn.compact
  def __call__(self, images):
    x = preprocess(images)
    x = BasicConv(32, (3, 3), 2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = _max_pool(BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x))
    x = BasicConv(80, name='Conv2d_3b_1x1')(x)
    x = _max_pool(BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x))
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = InceptionA(pool_features, name=name)(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))


@jax.jit
def features(params: Any, images: jax.Array) -> jax.Array:
  """Pool3 features [N, 2048] float32 of `images` ([N, H, W, 3], uint8 or float in [0, 1])."""
  return InceptionV3().apply({'params': params}, images)


# ----------------------------------------------------------------------------- weights


@functools.lru_cache(maxsize=None)
def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path of a BasicConv in the params: kernel shape HWIO} (from the module, never restated)."""
  images = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
  abstract = jax.eval_shape(lambda x: InceptionV3().init(jax.random.key(0), x), images)['params']
  flat = flax.traverse_util.flatten_dict(abstract)
  return {path[:-1]: tuple(leaf.shape) for path, leaf in flat.items() if path[-1] == 'kernel'}


def torch_shapes() -> dict[str, tuple[int, ...]]:
  """{name: shape} of every tensor of pytorch-fid's state dict (`fid_inception_v3()`)."""
  shapes = {}
  for path, (kh, kw, c_in, c_out) in _param_shapes().items():
    prefix = '.'.join(path)
    for leaf, suffix in _TENSORS.items():
      shapes[f'{prefix}.{suffix}'] = (c_out, c_in, kh, kw) if leaf == 'kernel' else (c_out,)
    shapes[f'{prefix}.{_COUNTER}'] = ()
  return {**shapes, **FC_SHAPES}


def convert(tensors: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
  """pytorch-fid state-dict tensors -> `InceptionV3` params (float32 numpy).

  ValueError naming `source` and the tensor: one missing, one of another shape (both shapes),
  or one the network does not have. fc.* and *.num_batches_tracked may be present or not.
  """
  shapes = torch_shapes()
  extra = sorted(set(tensors) - set(shapes))
  if extra:
    raise ValueError(f'{source}: tensor {extra[0]!r} is not in the FID Inception-v3 '
                     f'({len(extra)} such, e.g. {extra[:3]}); is this {WEIGHTS_FILE}?')
  params = {}
  for path in _param_shapes():
    leaves = {}
    for leaf, suffix in _TENSORS.items():
      name = '.'.join(path) + '.' + suffix
      if name not in tensors:
        raise ValueError(f'{source}: tensor {name!r} (shape {shapes[name]}) is missing; is this '
                         f'{WEIGHTS_FILE}?')
      value = np.asarray(tensors[name])
      if tuple(value.shape) != shapes[name]:
        raise ValueError(f'{source}: tensor {name!r} has shape {tuple(value.shape)}, but the FID '
                         f'Inception-v3 needs {shapes[name]}.')
      value = value.astype(np.float32)
      leaves[leaf] = np.transpose(value, (2, 3, 1, 0)) if leaf == 'kernel' else value
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaves
  return params


def to_torch(params: Any) -> dict[str, np.ndarray]:
  """`InceptionV3` params -> pytorch-fid's state dict (float32; num_batches_tracked 0 and fc zero,
  as neither touches the features): the inverse of `convert`."""
  flat = flax.traverse_util.flatten_dict(params)
  out = {name: np.zeros(shape, np.int64 if name.endswith(_COUNTER) else np.float32)
         for name, shape in torch_shapes().items()}
  for path in _param_shapes():
    for leaf, suffix in _TENSORS.items():
      value = np.asarray(flat[path + (leaf,)], np.float32)
      out['.'.join(path) + '.' + suffix] = np.ascontiguousarray(
          np.transpose(value, (3, 2, 0, 1)) if leaf == 'kernel' else value)
  return out


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a `.pth` (read without running its pickle) or a `.safetensors` file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: download {WEIGHTS_FILE} from {WEIGHTS_URL} '
                            '(docs/evaluation.md).')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  return pth.read_pth(path)


@dataclasses.dataclass(frozen=True, eq=False)
class InceptionWeights:
  """Loaded FID Inception weights: the params `features` takes, and what they were."""
  params: Any        # `InceptionV3` parameters (float32 numpy; place with sharding.put_frozen)
  fingerprint: str   # 'inception:<weights.digest>': the same for a .pth and its .safetensors
  path: str          # absolute path read


def load(path: str) -> InceptionWeights:
  """Reads and shape-checks the FID Inception weights at `path` (.pth or .safetensors)."""
  path = os.path.abspath(os.path.expanduser(str(path)))
  params = convert(read_tensors(path), path)
  return InceptionWeights(params=params, fingerprint=f'inception:{weights.digest(params)}',
                          path=path)


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description='Converts the FID Inception weights to '
                                   '.safetensors (same tensor names), checking every shape.')
  parser.add_argument('--convert', required=True, help=f'the .pth ({WEIGHTS_FILE})')
  parser.add_argument('--out', required=True, help='the .safetensors to write')
  args = parser.parse_args(argv)
  from runtime import console  # pylint: disable=g-import-not-at-top

  def run():
    if not args.out.endswith('.safetensors'):
      raise ValueError(f'--out={args.out}: the file name must end in .safetensors.')
    source = os.path.abspath(os.path.expanduser(args.convert))
    tensors = read_tensors(source)
    params = convert(tensors, source)  # Shape-checked before anything is written.
    out = os.path.abspath(os.path.expanduser(args.out))
    weights.write_weights(os.path.dirname(out), os.path.basename(out), tensors, None,
                          metadata={'source': os.path.basename(source)})
    print(f'Wrote {out} ({len(tensors)} tensors, fingerprint inception:'
          f'{weights.digest(params)}).')
    return out
  return console.run_or_exit(run)


if __name__ == '__main__':
  main()
