"""Device mesh and shardings: mesh axes ('data', 'fsdp', 'tensor').

Parameters carry logical axis names (`nn.with_logical_partitioning`); the mesh section's
`logical_axis_rules` (`runtime.settings.MeshSpec`) maps them to mesh axes. A dimension whose size is not
divisible by its mesh axes is left replicated rather than refused.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(spec, num_devices: int) -> tuple[int, int, int]:
  """Resolves `mesh.data/fsdp/tensor` of a `MeshSpec` (one may be -1 = fill) against the device
  count."""
  sizes = [int(getattr(spec, a)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'Only one of mesh.data/fsdp/tensor may be -1; got {dict(zip(MESH_AXES, sizes))}.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh.data/fsdp/tensor must be positive or -1; got {dict(zip(MESH_AXES, sizes))}.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'{num_devices} devices cannot be split by mesh sizes '
                       f'{dict(zip(MESH_AXES, sizes))}: make the fixed axes divide the device count.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but '
                     f'{num_devices} are visible; set mesh.data=-1 to fill.')
  return tuple(sizes)


def make_mesh(spec, devices=None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh of a `MeshSpec`; with several hosts, the dcn_*
  parts span hosts."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  dcn = (int(spec.dcn_data), int(spec.dcn_fsdp), 1)
  num_slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if math.prod(dcn) > 1 and num_slices > 1:
    ici = tuple(s // d for s, d in zip(shape, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    # One slice (or CPU / GPU processes without slice ids): the process order of jax.devices()
    # already keeps each host's devices contiguous along the leading axes.
    try:
      grid = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, NotImplementedError, ValueError):
      grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _mesh_axes_for(name, rules):
  for logical, mesh_axes in rules:
    if logical == name:
      return mesh_axes
  return None


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names, shape, mesh: Mesh, rules) -> P:
  """PartitionSpec for one array from its logical names; non-divisible dims stay replicated."""
  if names is None:
    return P()
  spec, used = [], set()
  for name, size in zip(names, shape):
    axes = _mesh_axes_for(name, rules) if name is not None else None
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if (not flat or size % _axis_size(mesh, flat) or used & set(flat)
        or _axis_size(mesh, flat) == 1):
      spec.append(None)
      continue
    used |= set(flat)
    spec.append(flat[0] if len(flat) == 1 else flat)
  return P(*spec)


def tree_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a pytree whose leaves may be `nn.Partitioned` boxes (from eval_shape)."""
  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, rules))
    return NamedSharding(mesh, P())
  shardings = jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return shardings


def frozen_shardings(params: Any, mesh: Mesh, min_size: int = 1 << 14) -> Any:
  """Shardings of a frozen, unannotated parameter tree (a pretrained VAE or text encoder): like
  the trained ones under FSDP, each array of at least `min_size` elements is split over 'fsdp'
  along its last axis divisible by the fsdp size (a kernel's output channels); the rest, and
  everything when fsdp is 1, is replicated. XLA gathers a weight where it is used."""
  n = mesh.shape.get('fsdp', 1)

  def spec(x):
    shape = np.shape(x)
    if n > 1 and math.prod(shape) >= min_size:
      for axis in reversed(range(len(shape))):
        if shape[axis] % n == 0:
          return NamedSharding(mesh, P(*([None] * axis + ['fsdp'])))
    return NamedSharding(mesh, P())
  return jax.tree.map(spec, params)


def put_frozen(params: Any, mesh: Mesh) -> Any:
  """`params` placed on `mesh` with `frozen_shardings` (one process's full copy in, global out)."""
  host = jax.tree.map(np.asarray, params)
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                      host, frozen_shardings(host, mesh))


BATCH_AXES = ('data', 'fsdp')


def batch_spec(ndim: int) -> P:
  """Batch arrays: leading axis over ('data', 'fsdp'), the rest replicated."""
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_size_of(mesh: Mesh) -> int:
  """How many ways `mesh` splits a batch (its batch axes' size)."""
  return _axis_size(mesh, BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(ndim))


def global_batch(mesh: Mesh, local: dict) -> dict:
  """Assembles per-process numpy batches into global jax.Arrays sharded over the batch axes."""
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
      for k, v in local.items()
  }

