"""LoRA (Hu et al. 2021, arXiv:2106.09685): low-rank adapters on chosen dense layers.

A layer `y = x W (+ b)` whose name is a target gains two parameters beside its kernel, `lora_A`
[*in, r] and `lora_B` [r, *out], and computes

  y = x W (+ b) + (alpha / r) * dropout(x) A B

as peft's LoRA layers do (`lora_dropout` on the layer's input, A initialised like peft's
kaiming-uniform, B at zero, so an untrained adapter leaves the base network exactly as it was).
The network's `__call__` makes its `LoRASpec` active (`active`), and `models.layers.DenseGeneral`
adds the adapter where `current()` names its layer: no module between them knows about LoRA.

The adapters are the only parameters that train: `split` takes them out of a parameter tree (the
optimiser state, the EMA and the checkpoints hold them alone) and `combine` puts them back over the
frozen base; `merged` folds them into the base's kernels. Targets are named as diffusers and peft
name them ('to_q', 'to_out.0', 'ff.net.0.proj'); `TARGETS` maps them to the modules' names here.
models/lora_loading.py reads and writes the adapters as diffusers' LoRA files.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

ADAPTERS = ('lora_A', 'lora_B')  # The parameter names of an adapter, beside a layer's kernel.
# diffusers' / peft's module name -> the module name in models/sd_blocks.py.
TARGETS = {'to_q': 'to_q', 'to_k': 'to_k', 'to_v': 'to_v', 'to_out.0': 'to_out_0',
           'ff.net.0.proj': 'net_0_proj', 'ff.net.2': 'net_2'}


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """The `model.lora` section: adapters of rank `rank` (0: none) on the `targets` layers."""
  rank: int
  alpha: float  # The update is scaled by alpha / rank; 0 means alpha = rank (scale 1).
  targets: tuple[str, ...]
  dropout: float

  def __post_init__(self):
    object.__setattr__(self, 'targets', tuple(self.targets))
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
      raise ValueError(f'model.lora.rank={self.rank!r} must be an int >= 0 (0: no LoRA).')
    if not isinstance(self.alpha, (int, float)) or self.alpha < 0:
      raise ValueError(f'model.lora.alpha={self.alpha!r} must be >= 0 (0: alpha = rank).')
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or (self.rank and not self.targets):
      raise ValueError(f'model.lora.targets={self.targets!r}: {unknown or "none"} is not a layer '
                       f'LoRA can adapt; choose from {tuple(TARGETS)}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'model.lora.dropout={self.dropout!r} must be in [0, 1).')

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def effective_alpha(self) -> float:
    """alpha, 0 read as alpha = rank (peft's lora_alpha)."""
    return self.alpha or self.rank

  @property
  def scale(self) -> float:
    return self.effective_alpha / self.rank

  @property
  def module_names(self) -> frozenset[str]:
    return frozenset(TARGETS[t] for t in self.targets)


_ACTIVE: contextvars.ContextVar[tuple[LoRASpec, bool] | None] = contextvars.ContextVar(
    'lora', default=None)


@contextlib.contextmanager
def active(spec: LoRASpec | None, train: bool) -> Iterator[None]:
  """Within: layers named by `spec` carry adapters (`train`: apply its dropout)."""
  token = _ACTIVE.set((spec, train) if spec is not None and spec.enabled else None)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def adapter(module, x: jax.Array, axes: tuple[int, ...], features: tuple[int, ...],
            names: tuple[str | None, ...], dtype: Any) -> jax.Array | None:
  """The adapter's term (alpha / r) dropout(x) A B of the dense layer `module` (inside its compact
  call; contracting `axes` of x to `features`, its kernel's logical `names`), or None when no
  active LoRA targets it."""
  state = _ACTIVE.get()
  if state is None or module.name not in state[0].module_names:
    return None
  spec, train = state
  from models import layers  # pylint: disable=import-outside-toplevel  (layers imports this)
  fan_in = math.prod(x.shape[a] for a in axes)
  width = min(fan_in, math.prod(features))
  if spec.rank > width:
    raise ValueError(f'model.lora.rank={spec.rank} is larger than the layer {module.name!r} '
                     f'({fan_in} -> {math.prod(features)}); use a rank <= {width}.')
  in_names, out_names = names[:len(axes)], names[len(axes):]
  # peft: kaiming_uniform_(a=sqrt(5)) on A, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B = 0.
  bound = 1.0 / math.sqrt(fan_in)
  init_a = lambda rng, shape, dt: jax.random.uniform(rng, shape, dt, -bound, bound)
  a = module.param('lora_A', layers.partitioned(init_a, in_names + (None,)),
                   tuple(x.shape[ax] for ax in axes) + (spec.rank,), module.param_dtype)
  b = module.param('lora_B', layers.partitioned(jax.nn.initializers.zeros, (None,) + out_names),
                   (spec.rank,) + features, module.param_dtype)
  x = x.astype(dtype)
  if train and spec.dropout > 0:
    keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - spec.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(dtype)
  h = jax.lax.dot_general(x, a.astype(dtype), ((axes, tuple(range(len(axes)))), ((), ())))
  delta = jnp.tensordot(h, b.astype(dtype), axes=1)
  return delta * jnp.asarray(spec.scale, dtype)


def split(params: Mapping[str, Any]) -> tuple[dict, dict]:
  """(adapters, base): the adapter parameters and all the others, each as a nested dict of the
  same structure (a module keeps only the entries of its part)."""
  adapters, base = {}, {}
  for name, value in params.items():
    if isinstance(value, Mapping):
      a, b = split(value)
      if a:
        adapters[name] = a
      if b:
        base[name] = b
    elif name in ADAPTERS:
      adapters[name] = value
    else:
      base[name] = value
  return adapters, base


def scaled(params: Mapping[str, Any], scale: float) -> dict:
  """`params` with every adapter's update scaled by `scale` (its lora_B times scale), as
  diffusers' LoRA scale does at inference."""
  if scale == 1.0:
    return dict(params)
  return {name: scaled(value, scale) if isinstance(value, Mapping)
          else value * scale if name == ADAPTERS[1] else value for name, value in params.items()}


def combine(params: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  """The nested dicts `params` and `frozen` (disjoint leaves) as one tree: the adapters put back
  over the frozen base, or a trained part beside a frozen one."""
  out = dict(frozen)
  for name, value in params.items():
    if name in frozen and isinstance(value, Mapping):
      out[name] = combine(value, frozen[name])
    else:
      out[name] = value
  return out


def merged(params: Mapping[str, Any], spec: LoRASpec) -> dict:
  """`params` (adapters over their base, e.g. `combine`'s) with each adapter folded into its
  layer's kernel, W + (alpha / r) A B, and no adapter left: the parameters of the same network
  without LoRA. A [*in, r] and B [r, *out] are flattened to matrices as `adapter` contracts them;
  float32 arithmetic, back in the kernel's dtype."""
  if ADAPTERS[0] not in params:
    return {name: merged(value, spec) if isinstance(value, Mapping) else value
            for name, value in params.items()}
  a, b = (np.asarray(params[name], np.float32) for name in ADAPTERS)
  kernel = np.asarray(params['kernel'])
  rank = a.shape[-1]
  delta = spec.scale * (a.reshape(-1, rank) @ b.reshape(rank, -1))
  out = {name: value for name, value in params.items() if name not in ADAPTERS}
  out['kernel'] = (kernel.astype(np.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)
  return out
