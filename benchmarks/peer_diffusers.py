"""The PyTorch peer of our U-Net for the throughput benchmark (issue 17): diffusers, same shape.

torch and diffusers are optional peers, imported only here (and by tests that skip without them);
the product never needs them. benchmarks/throughput.py times these against our jitted steps:

  from benchmarks import peer_diffusers as peer
  peer.set_threads(2)
  shapes = peer.peer_shapes(config)                 # our U-Net's sizes for this config
  model = peer.build_unet(*shapes)                  # diffusers UNet2DConditionModel, same layout
  print(peer.compare_params(*shapes, model=model))  # {'ours': ..., 'peer': ..., 'ratio': ...}
  inputs = peer.make_inputs(shapes, batch_size=32)  # fixed tensors, made once outside the timing
  step = peer.TorchTrainStep(model, config)
  loss = step(inputs)                               # one AdamW step, as our train_step
  sampler = peer.TorchGuidedSampler(model, config)  # CFG DPM-Solver++(2M), sampler.num_steps
  x = sampler(inputs)                               # [B, C, h, w] in the peer's working space
  flops = peer.train_step_flops(step, inputs)       # {'total', 'ff', 'proj', 'core'} FLOPs, fwd+bwd
  # Or all in one (throughput.py): a fresh model and fixed inputs, run(n) -> seconds for n calls.
  step = peer.TorchTrainStep.from_config(config, batch_size=32)   # compile=True: torch.compile
  seconds = step.run(10); step.param_count()
  sampler = peer.TorchGuidedSampler.from_config(config, batch_size=8, num_steps=25)

What matches ours (models/unet.py): conv_in 3x3; per level `num_res_blocks` ResBlocks
(GN-SiLU-conv3x3, FiLM scale/shift from the 4*ch noise embedding: diffusers'
resnet_time_scale_shift='scale_shift', GN-SiLU-conv3x3, 1x1 skip when channels change); at our
attention levels a self- and a cross-attention after each ResBlock, with our (heads, head_dim)
and bias-free q/k/v; stride-2 conv downsampling; mid block res/attn/res; up path with
num_res_blocks + 1 ResBlocks on concatenated skips, nearest upsampling + conv; GN-SiLU-conv_out;
noise embedding sinusoid -> Dense(4ch)-SiLU-Dense(4ch). Our patch_size folds p x p patches into
channels, so the peer works at (H/p, W/p) with p*p*C channels; coord_channels adds two input
channels (concatenated in the step, as ours does).

What diffusers adds: each attention is a Transformer2DModel, i.e. GN + proj_in + [LN, self-attn,
LN, cross-attn, LN, GEGLU feed-forward (inner 4c: 12c^2 + 9c parameters)] + proj_out, where ours
is GN + self-attn + GN + cross-attn with no feed-forward and no projections. No config option
removes them, so `build_unet` replaces them by identities (`strip_extras`; `extras=True` keeps
them): the peer then runs our layers, 8.006M parameters against our 8.003M on configs/base.py
(the difference is norms). only_cross_attention/attention_type would change the attention itself
(drop self-attention, add GLIGEN fusers), so they stay at their defaults. Ours also has one
LayerNorm on the text context (2D parameters) that diffusers lacks.
GroupNorm: ours clamps groups per layer (`models.layers.group_count`); diffusers uses one value,
so the peer takes `model.norm_groups` when it divides every GroupNorm's channels (true of base,
shapes:cpu/gpu/tiny), else the largest divisor of them all below it. A fully masked context
(our empty caption has one valid token, so not in practice) gives uniform attention in diffusers
and none in ours; the cost is the same.
"""
from __future__ import annotations

import math
import time
from typing import NamedTuple

import diffusers
import jax
import torch
from diffusers.models.attention_processor import AttnProcessor
from flax import linen as nn
from jax import numpy as jnp
from torch.utils.flop_counter import FlopCounterMode

from configs import specs
from models import layers
from models.unet import UNet, UNetSpec, _heads

# Our `diffusion.schedule` -> the diffusers beta schedule whose alpha-bar it is (the cost of a
# step does not depend on it; 'sigmoid' and 'edm' have no diffusers twin and use the cosine).
BETA_SCHEDULES = {'cosine': 'squaredcos_cap_v2', 'linear': 'linear',
                  'scaled_linear': 'scaled_linear'}


class PeerShapes(NamedTuple):
  """What `build_unet` takes, read from a config as our trainer reads it."""
  spec: UNetSpec
  image_shape: tuple[int, int, int]  # (H, W, C) our U-Net denoises (state.diffusion_shape).
  context_len: int  # L = text.max_len.
  context_dim: int  # D = the text encoder's width.
  attn_levels: tuple[int, ...]  # Levels with attention (0 = full resolution), as training fixes.


def peer_shapes(config, workdir=None) -> PeerShapes:
  """Our U-Net's spec, input shape, text shape and attention levels for `config`.

  Builds our models the way training does (`runtime.state.build_networks`), so the attention
  levels and the text width are the trainer's own (a pretrained text encoder is loaded for its
  width; text.vocab='bpe' needs the run's `workdir`).
  """
  from runtime import state  # pylint: disable=import-outside-toplevel
  settings = specs.build(config)
  autoencoder = state.build_autoencoder(settings.autoencoder)
  unet, text_encoder = state.build_networks(settings, autoencoder=autoencoder, workdir=workdir)
  return PeerShapes(settings.model,
                    tuple(state.diffusion_shape(settings.data.image_size, autoencoder)),
                    text_encoder.max_len, text_encoder.dim, tuple(unet.attn_levels))


def working_shape(spec: UNetSpec, image_shape) -> tuple[int, int, int, int]:
  """(in_channels, out_channels, h, w) of the peer: after patching and coordinate channels."""
  height, width, channels = image_shape
  p = spec.patch_size
  if height % p or width % p:
    raise ValueError(f'model.patch_size={p} must divide the image size {height}x{width}.')
  out_channels = channels * p * p
  return out_channels + 2 * spec.coord_channels, out_channels, height // p, width // p


def shared_norm_groups(spec: UNetSpec, image_shape, attn_levels=()) -> int:
  """The one GroupNorm group count the peer uses (diffusers has no per-layer clamping).

  `model.norm_groups` when it divides every GroupNorm's channel count (then every layer has the
  same groups as ours), else the largest divisor of all of them that is below it.
  """
  del image_shape, attn_levels  # The channel counts depend only on the widths.
  widths = [spec.channels * m for m in spec.channel_mult]
  counts = set(widths)
  skips = [widths[0]]
  for level, width in enumerate(widths):
    skips += [width] * (spec.num_res_blocks + (level != len(widths) - 1))
  h = widths[-1]
  for level in reversed(range(len(widths))):
    for _ in range(spec.num_res_blocks + 1):
      counts.add(h + skips.pop())
      h = widths[level]
  return layers.group_count(math.gcd(*counts), spec.norm_groups)


def level_heads(spec: UNetSpec, attn_levels) -> tuple[tuple[int, int], ...]:
  """Our (heads, head_dim) per level (`models.unet._heads`); (1, width) where there is none.

  The mid block always attends, at the last level's width.
  """
  last = len(spec.channel_mult) - 1
  out = []
  for level, mult in enumerate(spec.channel_mult):
    width = spec.channels * mult
    attends = level in attn_levels or level == last
    out.append(_heads(spec, width) if attends else (1, width))
  return tuple(out)


def build_unet(spec: UNetSpec, image_shape, context_len: int, context_dim: int,
               attn_levels, extras: bool = False) -> diffusers.UNet2DConditionModel:
  """A diffusers UNet2DConditionModel laid out as our `UNet(spec, attn_levels)` (float32, CPU).

  Args:
    spec: our `configs.specs.build(config).model`.
    image_shape: (H, W, C) our U-Net takes (before patching).
    context_len: L, the text length (checked only: attention takes any length).
    context_dim: D, the text encoder's width (cross_attention_dim).
    attn_levels: the levels with attention (`UNet.attn_levels`, as `peer_shapes` gives).
    extras: keep the layers diffusers has and ours does not (the feed-forward, its LayerNorm and
      proj_in/proj_out of every attention). False (the default, the benchmark's): they are
      replaced by identities (`strip_extras`), so both sides run the same layers.
  """
  if context_len < 1 or context_dim < 1:
    raise ValueError(f'context_len={context_len} and context_dim={context_dim} must be >= 1.')
  in_channels, out_channels, h, _ = working_shape(spec, image_shape)
  levels = range(len(spec.channel_mult))
  attends = [lv in attn_levels for lv in levels]
  # UNet2DConditionModel reads `attention_head_dim` as the number of heads (diffusers issue
  # 2011; passing num_attention_heads raises) and each Transformer2DModel then uses
  # head_dim = width // heads: so our heads per level give our (heads, head_dim) exactly.
  heads = tuple(n for n, _ in level_heads(spec, attn_levels))
  model = diffusers.UNet2DConditionModel(
      sample_size=h,
      in_channels=in_channels,
      out_channels=out_channels,
      flip_sin_to_cos=True,  # [cos | sin] features, as layers.sinusoidal_embedding.
      freq_shift=0,
      down_block_types=tuple('CrossAttnDownBlock2D' if a else 'DownBlock2D' for a in attends),
      mid_block_type='UNetMidBlock2DCrossAttn',
      up_block_types=tuple('CrossAttnUpBlock2D' if a else 'UpBlock2D'
                           for a in reversed(attends)),
      block_out_channels=tuple(spec.channels * m for m in spec.channel_mult),
      layers_per_block=spec.num_res_blocks,
      downsample_padding=1,
      dropout=spec.dropout,
      act_fn='silu',
      norm_num_groups=shared_norm_groups(spec, image_shape, attn_levels),
      norm_eps=1e-5,
      cross_attention_dim=context_dim,
      attention_head_dim=heads,
      use_linear_projection=True,
      resnet_time_scale_shift='scale_shift',  # FiLM: norm(h) * (1 + scale) + shift.
  )
  return model if extras else strip_extras(model)


class _NoFeedForward(torch.nn.Module):
  """Stands for a BasicTransformerBlock's feed-forward: adds nothing to the residual stream."""

  def forward(self, x):  # pylint: disable=unused-argument
    return 0.0


def strip_extras(model: diffusers.UNet2DConditionModel) -> diffusers.UNet2DConditionModel:
  """Removes what each attention of diffusers has and ours lacks: proj_in/proj_out become
  identities (the width is unchanged: heads * head_dim = channels) and the feed-forward with its
  LayerNorm adds nothing. What is left is our layer list, up to the norms (module docstring)."""
  for module in model.modules():
    if isinstance(module, diffusers.models.attention.BasicTransformerBlock):
      module.ff, module.norm3 = _NoFeedForward(), torch.nn.Identity()
    elif isinstance(module, diffusers.models.transformers.transformer_2d.Transformer2DModel):
      module.proj_in, module.proj_out = torch.nn.Identity(), torch.nn.Identity()
  return model


def param_count(model: torch.nn.Module) -> int:
  """Parameters of a torch module."""
  return sum(p.numel() for p in model.parameters())


def our_param_count(spec: UNetSpec, image_shape, context_len: int, context_dim: int,
                    attn_levels) -> int:
  """sum(x.size for x in jax.tree.leaves(params['unet'])) of our U-Net, from shapes only."""
  unet = UNet(spec, attn_levels=tuple(attn_levels))
  init = lambda: unet.init(
      {'params': jax.random.key(0)}, jnp.zeros((1,) + tuple(image_shape)), jnp.zeros((1,)),
      jnp.zeros((1, context_len, context_dim)), jnp.ones((1, context_len), bool),
      jnp.zeros((1, context_dim)), train=False)['params']
  return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(jax.eval_shape(init))))


def compare_params(spec: UNetSpec, image_shape, context_len: int, context_dim: int, attn_levels,
                   model: torch.nn.Module | None = None) -> dict[str, float]:
  """Our vs the peer's parameter counts, and the peer's parts that ours does not have.

  'peer_ff': the GEGLU feed-forwards; 'peer_proj': proj_in/proj_out; 'peer_core' = peer - both,
  the part comparable with ours (which still differ by norms: our 2 GN vs 1 GN + 3 LN per
  attention, and our context LayerNorm).
  """
  shapes = (spec, image_shape, context_len, context_dim, attn_levels)
  model = build_unet(*shapes) if model is None else model
  ours, peer = our_param_count(*shapes), param_count(model)
  part = lambda *keys: sum(p.numel() for n, p in model.named_parameters()
                           if any(k in n.split('.') for k in keys))
  ff, proj = part('ff'), part('proj_in', 'proj_out')
  return {'ours': ours, 'peer': peer, 'ratio': peer / ours, 'peer_ff': ff, 'peer_proj': proj,
          'peer_core': peer - ff - proj, 'core_ratio': (peer - ff - proj) / ours}


def make_inputs(shapes: PeerShapes, batch_size: int, seed: int = 0,
                device: str | torch.device = 'cpu') -> dict[str, torch.Tensor]:
  """Fixed inputs, made once outside the timing, in the peer's working space.

  x [B, C, h, w] (training images, patched), noise of the same shape (sampler start), context
  [B, L, D] with mask [B, L] (the first 1 + random tokens valid), and the null caption
  (null_context, null_mask: only the first token, as our empty caption's [BOS]).
  """
  _, channels, h, w = working_shape(shapes.spec, shapes.image_shape)
  b, length, dim = batch_size, shapes.context_len, shapes.context_dim
  gen = torch.Generator().manual_seed(seed)
  lengths = torch.randint(1, length + 1, (b, 1), generator=gen)
  tensors = {
      'x': torch.rand(b, channels, h, w, generator=gen) * 2 - 1,
      'noise': torch.randn(b, channels, h, w, generator=gen),
      'context': torch.randn(b, length, dim, generator=gen),
      'mask': (torch.arange(length)[None] < lengths).float(),
      'null_context': torch.randn(b, length, dim, generator=gen),
      'null_mask': (torch.arange(length)[None] < 1).float().expand(b, length).contiguous(),
  }
  return {k: v.to(device) for k, v in tensors.items()}


def make_scheduler(config, **overrides) -> diffusers.DPMSolverMultistepScheduler:
  """DPM-Solver++(2M) on the config's discrete schedule (its alphas_cumprod also trains)."""
  diff = config.diffusion
  return diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=diff.num_train_timesteps,
      beta_schedule=BETA_SCHEDULES.get(diff.schedule, 'squaredcos_cap_v2'),
      beta_start=diff.beta_start, beta_end=diff.beta_end, prediction_type='epsilon',
      algorithm_type='dpmsolver++', solver_order=2, **overrides)


def _coordinates(x: torch.Tensor) -> torch.Tensor:
  """[B, 2, h, w] (x, y) pixel-centre coordinates in [-1, 1] (models.unet.add_coordinates)."""
  b, _, h, w = x.shape
  ys = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5) / h * 2 - 1
  xs = (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5) / w * 2 - 1
  grid = torch.stack(torch.meshgrid(xs, ys, indexing='xy'), dim=0)
  return grid[None].expand(b, 2, h, w)


class _Forward:
  """model(x_t, t, context, mask) -> eps, with coordinate channels and the config's autocast."""

  def __init__(self, model, config, compile_model=False):
    self.model = torch.compile(model) if compile_model else model
    self.coords = bool(config.model.coord_channels)
    self.device = next(model.parameters()).device
    dtype = config.model.dtype
    layers.resolve_dtype(dtype, 'model.dtype')  # A bad name raises naming the field.
    self.autocast = None if dtype == 'float32' else getattr(torch, dtype)  # Ours: f32 params.

  def __call__(self, x, t, context, mask):
    if self.coords:
      x = torch.cat([x, _coordinates(x)], dim=1)
    with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                        enabled=self.autocast is not None):
      out = self.model(x, t, encoder_hidden_states=context,
                       encoder_attention_mask=mask).sample
    return out.float()


class TorchTrainStep:
  """One training step of the peer, doing what our `train_step` does to the U-Net.

  Epsilon-prediction MSE (Ho et al. 2020 eq. 14): t ~ U{0..T-1}, x_t = sqrt(abar) x0 +
  sqrt(1 - abar) eps on the config's alpha-bar, forward with the text and its mask, backward,
  global-norm clipping at optim.grad_clip, AdamW (optim's lr, betas, eps; weight decay only on
  matrices, as ours), then the EMA update with our warmup min(decay, (1+n)/(10+n)). The learning
  rate is the peak one (a schedule costs nothing). Ours also runs the scratch text encoder.
  `inputs` (optional): the fixed batch that `run` steps on.
  """

  def __init__(self, model: torch.nn.Module, config, inputs=None, compile_model=False):
    self.forward = _Forward(model, config, compile_model)
    self.model = model.train()
    self.inputs = inputs
    opt = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.ndim > 1], 'weight_decay': opt.weight_decay},
              {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0}]
    self.optimizer = torch.optim.AdamW(groups, lr=opt.learning_rate, betas=(opt.b1, opt.b2),
                                       eps=opt.eps, foreach=True)
    self.params = params
    self.grad_clip = opt.grad_clip
    self.ema_decay, self.ema_warmup = opt.ema_decay, opt.ema_warmup
    self.ema = [p.detach().clone() for p in params] if self.ema_decay else []
    abar = make_scheduler(config).alphas_cumprod.to(self.forward.device, torch.float32)
    self.sqrt_abar, self.sqrt_1m_abar = abar.sqrt(), (1 - abar).sqrt()
    self.num_timesteps = abar.shape[0]
    self.step_count = 0

  def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One step on batch['x'] [B,C,h,w], ['context'] [B,L,D], ['mask'] [B,L]; the loss."""
    x0 = batch['x']
    b = x0.shape[0]
    noise = torch.randn_like(x0)
    t = torch.randint(0, self.num_timesteps, (b,), device=x0.device)
    x_t = self.sqrt_abar[t].view(b, 1, 1, 1) * x0 + self.sqrt_1m_abar[t].view(b, 1, 1, 1) * noise
    eps = self.forward(x_t, t, batch['context'], batch['mask'])
    loss = torch.nn.functional.mse_loss(eps, noise)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
    self.optimizer.step()
    if self.ema:
      n = self.step_count
      decay = min(self.ema_decay, (1 + n) / (10 + n)) if self.ema_warmup else self.ema_decay
      with torch.no_grad():  # pylint: disable=protected-access
        torch._foreach_mul_(self.ema, decay)
        torch._foreach_add_(self.ema, self.params, alpha=1 - decay)
    self.step_count += 1
    return loss.detach()

  @classmethod
  def from_config(cls, config, batch_size: int,
                  compile: bool = False,  # pylint: disable=redefined-builtin
                  seed: int = 0, workdir=None) -> TorchTrainStep:
    """A fresh peer of `config`'s U-Net with fixed inputs of `batch_size` (torch.compile'd)."""
    shapes = peer_shapes(config, workdir)
    torch.manual_seed(seed)
    device = default_device()
    return cls(build_unet(*shapes).to(device), config,
               make_inputs(shapes, batch_size, seed, device), compile)

  def run(self, n: int) -> float:
    """Seconds for `n` steps on the fixed inputs (the loss is read once, at the end)."""
    t0 = time.perf_counter()
    losses = [self(self.inputs) for _ in range(n)]
    if losses:
      float(losses[-1])
    _synchronize()
    return time.perf_counter() - t0

  def param_count(self) -> int:
    return param_count(self.model)


class TorchGuidedSampler:
  """Classifier-free guided DPM-Solver++(2M) (Lu et al. 2022) with diffusers' scheduler.

  Each step is ONE forward on 2B examples, [x; x] with [context; null_context], as our
  `guidance.guided_denoiser` batches (cond first); eps = uncond + w (cond - uncond), which on
  a fixed x_t is the same combination as ours on x0. `num_steps` and `guidance_scale` default
  to sampler.num_steps and sampler.guidance_scale; `inputs` (optional) are what `run` samples.
  """

  def __init__(self, model: torch.nn.Module, config, num_steps: int | None = None,
               guidance_scale: float | None = None, inputs=None, compile_model=False):
    self.forward = _Forward(model, config, compile_model)
    self.model = model
    self.inputs = inputs
    self.scheduler = make_scheduler(config)
    self.num_steps = num_steps or config.sampler.num_steps
    self.guidance_scale = (config.sampler.guidance_scale if guidance_scale is None
                           else guidance_scale)

  @torch.inference_mode()
  def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Samples from inputs['noise'] [B,C,h,w] for inputs['context'|'mask'|'null_context'|
    'null_mask']; returns x0 [B, C, h, w] in the working space (patched if patch_size > 1)."""
    self.model.eval()
    x = inputs['noise'] * self.scheduler.init_noise_sigma
    b = x.shape[0]
    context = torch.cat([inputs['context'], inputs['null_context']])
    mask = torch.cat([inputs['mask'], inputs['null_mask']])
    self.scheduler.set_timesteps(self.num_steps, device=x.device)
    w = self.guidance_scale
    for t in self.scheduler.timesteps:
      eps = self.forward(torch.cat([x, x]), t, context, mask)
      eps = eps[b:] + w * (eps[:b] - eps[b:])
      x = self.scheduler.step(eps, t, x).prev_sample
    return x

  @classmethod
  def from_config(cls, config, batch_size: int, num_steps: int | None = None,
                  compile: bool = False, seed: int = 0,  # pylint: disable=redefined-builtin
                  workdir=None) -> TorchGuidedSampler:
    """A fresh peer of `config`'s U-Net sampling `batch_size` images (torch.compile'd)."""
    shapes = peer_shapes(config, workdir)
    torch.manual_seed(seed)
    device = default_device()
    return cls(build_unet(*shapes).to(device), config, num_steps, None,
               make_inputs(shapes, batch_size, seed, device), compile)

  def run(self, n: int) -> float:
    """Seconds for `n` sampler calls on the fixed inputs."""
    t0 = time.perf_counter()
    for _ in range(n):
      self(self.inputs)
    _synchronize()
    return time.perf_counter() - t0

  def param_count(self) -> int:
    return param_count(self.model)


def train_step_flops(step: TorchTrainStep, batch: dict[str, torch.Tensor]) -> dict[str, int]:
  """Matmul and convolution FLOPs (2 per multiply-add) of one train step, forward + backward.

  Runs one real step under torch's FlopCounterMode, with diffusers' classic attention
  processor (CPU scaled_dot_product_attention kernels are not counted by FlopCounterMode).
  Returns 'total', its parts in the feed-forwards ('ff') and proj_in/proj_out ('proj') that
  ours does not have, and 'core' = total - ff - proj (the part comparable with ours).
  """
  model = step.model
  processors = model.attn_processors
  model.set_attn_processor(AttnProcessor())
  try:
    with FlopCounterMode(display=False) as counter:
      step(batch)
  finally:
    model.set_attn_processor(processors)
  by_module = counter.get_flop_counts()
  part = lambda *names: sum(sum(ops.values()) for module, ops in by_module.items()
                            if module.rsplit('.', 1)[-1] in names)
  total, ff, proj = counter.get_total_flops(), part('ff'), part('proj_in', 'proj_out')
  return {'total': total, 'ff': ff, 'proj': proj, 'core': total - ff - proj}


def default_device() -> torch.device:
  """CUDA when torch sees a GPU (the device check), else the CPU."""
  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def _synchronize() -> None:
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def peak_memory_bytes() -> int:
  """torch's peak allocated GPU memory so far (0 on the CPU)."""
  return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0


def set_threads(n: int) -> None:
  """torch's intra-op threads = n, and inter-op threads where torch still allows setting them."""
  torch.set_num_threads(n)
  try:
    torch.set_num_interop_threads(n)
  except RuntimeError:  # Only settable once, before any inter-op parallel work.
    pass
