"""The run's operational sections as typed, frozen, checked values: optim, mesh, checkpoint,
logging and autoencoder.

Like `diffusion.spec.DiffusionSpec` and `models.unet.UNetSpec`, each class is one config
section; `configs.specs.build` makes them once from the validated config. None has a default
of its own (configs/base.py holds every default) and each refuses a bad value of its own
section naming `section.field`; checks that span sections are in `configs.validation`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

# logging.eval_prompts values that are not a file: the Shapes benchmark prompts, or the data's
# validation captions (evaluation/sample_grid.py reads them).
EVAL_PROMPT_SOURCES = ('shapes_benchmark', 'data')


def check_range(section: str, name: str, value: Any, low: float, high: float = math.inf, *,
                open_low: bool = False, open_high: bool = False, what: str = '') -> None:
  """Raises ValueError naming `section.name` unless low <= value <= high (strictly where open)."""
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and (value > low if open_low else value >= low)
        and (value < high if open_high else value <= high))
  if not ok:
    if not what:
      what = f'must be in {"(" if open_low else "["}{low}, {high}{")" if open_high else "]"}'
    raise ValueError(f'{section}.{name}={value!r} {what}.')


def check_positive_int(section: str, name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{section}.{name}={value!r} must be positive (an integer).')


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  """`config.optim`: AdamW, its schedule, clipping, accumulation and the EMA."""
  num_steps: int
  learning_rate: float
  warmup_steps: int
  end_lr_factor: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip: float
  grad_accum_steps: int
  ema_decay: float
  ema_warmup: bool

  def __post_init__(self):
    s = 'optim'
    check_positive_int(s, 'num_steps', self.num_steps)
    check_range(s, 'learning_rate', self.learning_rate, 0.0, open_low=True,
                what='must be positive (a negative rate is gradient ascent)')
    check_range(s, 'warmup_steps', self.warmup_steps, 0, what='must be >= 0')
    check_range(s, 'end_lr_factor', self.end_lr_factor, 0.0,
                what='must be >= 0 (the final rate is learning_rate x it)')
    check_range(s, 'b1', self.b1, 0.0, 1.0, open_high=True,
                what='must be in [0, 1) (AdamW beta1, e.g. 0.9)')
    check_range(s, 'b2', self.b2, 0.0, 1.0, open_high=True,
                what='must be in [0, 1) (AdamW beta2, e.g. 0.99)')
    check_range(s, 'eps', self.eps, 0.0, open_low=True,
                what='must be positive (AdamW epsilon, e.g. 1e-8)')
    check_range(s, 'weight_decay', self.weight_decay, 0.0, what='must be >= 0')
    check_range(s, 'grad_clip', self.grad_clip, 0.0, what='must be >= 0 (0 = no clipping)')
    check_range(s, 'ema_decay', self.ema_decay, 0.0, 1.0, open_high=True, what='must be in [0, 1)')
    k = self.grad_accum_steps
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ValueError(f'optim.grad_accum_steps={k!r} must be a positive integer (1 = no '
                       'accumulation; k: each step sums the gradients of k micro-batches).')


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """`config.mesh`: the ('data', 'fsdp', 'tensor') device mesh and the logical axis rules."""
  data: int
  fsdp: int
  tensor: int
  dcn_data: int
  dcn_fsdp: int
  logical_axis_rules: tuple[tuple[str, Any], ...]

  @classmethod
  def data_parallel(cls, rules: tuple = ()) -> MeshSpec:
    """All devices on the data axis (sampling, whatever mesh trained the parameters)."""
    return cls(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, logical_axis_rules=rules)


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  """`config.checkpoint`: when and how to save, and the divergence guard."""
  every_steps: int
  keep: int
  async_save: bool
  divergence_factor: float
  divergence_window: int

  def __post_init__(self):
    check_positive_int('checkpoint', 'every_steps', self.every_steps)
    check_positive_int('checkpoint', 'keep', self.keep)
    check_range('checkpoint', 'divergence_factor', self.divergence_factor, 0.0,
                what='must be >= 0 (0 = guard off; e.g. 100)')
    check_range('checkpoint', 'divergence_window', self.divergence_window, 1,
                what='must be a positive number of steps')


@dataclasses.dataclass(frozen=True)
class LoggingSpec:
  """`config.logging`: metric writing, the eval grid's prompts and schedule, profiling."""
  every_steps: int
  eval_every_steps: int
  eval_at_end: bool
  eval_prompts: str  # One of EVAL_PROMPT_SOURCES, or a file with one prompt per line.
  eval_prompt_list: tuple[str, ...]
  eval_samples_per_prompt: int
  eval_max_prompts: int
  profile_steps: int
  val_examples: int  # Held-out examples of the validation loss (0: none).
  val_bins: int  # Its fixed noise levels.
  quality_samples: int  # Images sampled and scored at each evaluation (0: none).
  quality_metrics: tuple[str, ...]  # evaluation.quality.METRICS.
  quality_batch: int
  inception_path: str
  clip_path: str
  reference_stats: str

  def __post_init__(self):
    check_positive_int('logging', 'every_steps', self.every_steps)
    check_range('logging', 'val_examples', self.val_examples, 0,
                what='must be >= 0 (0 = no validation loss)')
    check_positive_int('logging', 'val_bins', self.val_bins)
    check_range('logging', 'quality_samples', self.quality_samples, 0,
                what='must be >= 0 (0 = no quality metrics)')
    check_positive_int('logging', 'quality_batch', self.quality_batch)
    check_range('logging', 'eval_every_steps', self.eval_every_steps, 0,
                what='must be >= 0 (0 = never during training)')
    check_positive_int('logging', 'eval_samples_per_prompt', self.eval_samples_per_prompt)
    check_positive_int('logging', 'eval_max_prompts', self.eval_max_prompts)

  @property
  def evaluates(self) -> bool:
    """Whether the run samples the eval grid at all (during training or at its end)."""
    return bool(self.eval_every_steps or self.eval_at_end)


@dataclasses.dataclass(frozen=True)
class AutoencoderSpec:
  """`config.autoencoder`: the frozen VAE of latent diffusion ('' path: pixel space)."""
  path: str
  dtype: str
  decode_chunk: int
  cached_latents: bool

  def __post_init__(self):
    if isinstance(self.decode_chunk, bool) or not isinstance(self.decode_chunk, int) or (
        self.decode_chunk < 1):
      raise ValueError(f'autoencoder.decode_chunk={self.decode_chunk!r} must be >= 1.')
