"""Per-device memory of a Stable Diffusion 1.5 fine-tune step, from XLA's compiled memory analysis.

  # The table of BENCHMARKS.md (issue 25): 512 px (64 x 64 latents), bfloat16 compute with float32
  # master weights, on simulated CPU devices (no accelerator, no arrays: abstract shapes only).
  # Each cell is one compile: 2-8 minutes on a 2-core CPU (longer at higher fsdp).
  python -m benchmarks.sd_memory --fsdp=1,4,8 --remat=none,dots --batch=1,4,8
  python -m benchmarks.sd_memory --fsdp=8 --remat=full --batch=8 --out=/tmp/sd_memory.json
  # LoRA (the default attention targets) at ranks 4, 16 and 64: only the adapters train.
  python -m benchmarks.sd_memory --fsdp=1 --remat=none --batch=1,4,8 --lora_rank=4,16,64
  # The CPU's own attention program (chunked; see below), e.g. to check a fix of its sharding:
  python -m benchmarks.sd_memory --fsdp=8 --remat=none --batch=1 --cpu_attention

The step is the run's own: `configs/sd.py:finetune` pointed at a folder holding only the config
files of runwayml/stable-diffusion-v1-5 (written to a temporary folder here, no weights), filled by
configs/pipeline.py as train.py fills it, and jitted by `training.builder.jit_train_step` with the
state shardings of `runtime.state.create_sharded_state`, i.e. the U-Net's forward and backward,
global-norm clipping, AdamW, the EMA copy and the non-finite guard. The batch is what the finetune
config trains on: cached VAE posterior moments [b, 64, 64, 4] x 2 and precomputed CLIP ViT-L/14
embeddings [b, 77, 768] (the text encoder is frozen, `text.cache_embeddings`), so neither the VAE
nor the text encoder runs in the step, and nothing of theirs is an argument.

`--batch` is the batch PER DEVICE: the mesh is data=1, fsdp=F (FSDP also splits the batch), so the
global batch is b x F and each cell is one device's view of that run. (A global batch of 1 cannot
split over 4 or 8 devices.) Every figure is per device: arguments (the train state's shard and the
batch's), outputs, XLA's temporaries, and their total (arguments + outputs - aliased + temporaries;
the state is donated, so its outputs alias its arguments).

Attention: on a CPU, models/attention.py splits each attention over the batch into cache-sized
chunks (`lax.map`, one example per device at a time at 64 x 64 latents); an accelerator runs the
whole batch at once. By default the table compiles the accelerator's program, the whole batch's
einsum attention (what a TPU, or a GPU in float32, runs; a GPU in bfloat16 uses cuDNN's flash
attention, which never writes the [heads, 4096, 4096] scores, so its figures are lower still);
`--cpu_attention` compiles the CPU's chunked one. The CPU compiler also drops remat's barriers
(BENCHMARKS.md, issue 17), so 'dots' and 'full' save nothing here; their savings need a device.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Any, NamedTuple

# runwayml/stable-diffusion-v1-5 unet/config.json, as the hub holds it (diffusers 0.6.0's keys).
SD15_UNET = {
    '_class_name': 'UNet2DConditionModel', '_diffusers_version': '0.6.0', 'act_fn': 'silu',
    'attention_head_dim': 8, 'block_out_channels': [320, 640, 1280, 1280],
    'center_input_sample': False, 'cross_attention_dim': 768,
    'down_block_types': ['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'], 'downsample_padding': 1,
    'flip_sin_to_cos': True, 'freq_shift': 0, 'in_channels': 4, 'layers_per_block': 2,
    'mid_block_scale_factor': 1, 'norm_eps': 1e-05, 'norm_num_groups': 32, 'out_channels': 4,
    'sample_size': 64, 'up_block_types': ['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3,
}
SD15_UNET_PARAMS = 859_520_964  # sum(p.numel()) of diffusers' UNet2DConditionModel(**SD15_UNET).
# Its scheduler/scheduler_config.json (the noise schedule the loss uses).
SD15_SCHEDULER = {
    '_class_name': 'PNDMScheduler', '_diffusers_version': '0.6.0', 'beta_end': 0.012,
    'beta_schedule': 'scaled_linear', 'beta_start': 0.00085, 'num_train_timesteps': 1000,
    'set_alpha_to_one': False, 'skip_prk_steps': True, 'steps_offset': 1, 'clip_sample': False,
}
CLIP_LEN, CLIP_DIM = 77, 768  # CLIP ViT-L/14's text: 77 tokens of 768 (and pooled [768]).


def write_config_folder(folder: str) -> str:
  """The SD 1.5 pipeline folder's config files, without weights: what configs/pipeline.py and the
  'sd' family read to fill a config (model_index.json, unet/, scheduler/, tokenizer/, vae/)."""
  from benchmarks import vae as vae_bench  # pylint: disable=import-outside-toplevel
  from models import vae_loading  # pylint: disable=import-outside-toplevel
  files = {
      'model_index.json': {'_class_name': 'StableDiffusionPipeline'},
      'unet/config.json': SD15_UNET,
      'scheduler/scheduler_config.json': SD15_SCHEDULER,
      'tokenizer/tokenizer_config.json': {'model_max_length': CLIP_LEN},
      'text_encoder/config.json': {'hidden_size': CLIP_DIM, 'max_position_embeddings': CLIP_LEN},
      'vae/config.json': vae_loading.diffusers_config(vae_bench.SD_VAE),
  }
  for name, content in files.items():
    os.makedirs(os.path.join(folder, os.path.dirname(name)), exist_ok=True)
    with open(os.path.join(folder, name), 'w') as f:
      json.dump(content, f, indent=1)
  return folder


def finetune_config(folder: str, *, image_size: int = 512, dtype: str = 'bfloat16',
                    remat: str = 'dots', fsdp: int = 1, batch_per_device: int = 1,
                    lora_rank: int = 0):
  """`configs/sd.py:finetune` on the folder (mesh data=1, fsdp=F, global batch =
  batch_per_device x F; `lora_rank` > 0: LoRA on the default targets), filled from the folder as
  train.py fills it."""
  from configs import pipeline, sd  # pylint: disable=import-outside-toplevel
  config = sd.get_config('finetune')
  config.model.pretrained = folder
  config.data.path = folder  # Never read: the batch is synthetic.
  config.data.image_size = image_size
  config.data.global_batch_size = batch_per_device * fsdp
  config.model.dtype, config.model.remat = dtype, remat
  config.mesh.data, config.mesh.fsdp = 1, fsdp
  config.model.lora.rank = lora_rank
  return pipeline.fill(config)


def finetune_settings(folder: str, **kwargs):
  """The settings of `finetune_config(folder, **kwargs)`, checked as train.py checks them."""
  from configs import validation  # pylint: disable=import-outside-toplevel
  return validation.validate(finetune_config(folder, **kwargs))


class SDStep(NamedTuple):
  """The pieces of `training.builder.build_trainer` a cached-latent, cached-text SD step needs."""
  settings: Any
  mesh: Any
  unet: Any
  text_encoder: Any  # `cached_text_encoder()`.
  autoencoder: Any  # `cached_latents_vae(settings)`.
  null_inputs: dict  # The empty caption's embeddings (the step's null condition).
  step: Any  # runtime.trace_cache.Program of the jitted train step.
  abstract: Any  # The TrainState's ShapeDtypeStructs, with the run's shardings.
  init: Any  # rng -> the sharded random initial state (jitted).
  batch_shapes: dict[str, tuple[tuple[int, ...], Any]]  # Batch key -> (global shape, dtype).
  frozen: dict  # The step's frozen_weights as ShapeDtypeStructs (LoRA: the base U-Net's).

  def abstract_args(self) -> tuple:
    """(state, batch, rng, frozen_weights, vae_params) as ShapeDtypeStructs, nothing allocated."""
    import jax  # pylint: disable=import-outside-toplevel
    from runtime import sharding  # pylint: disable=import-outside-toplevel
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(self.mesh, len(s)))
             for k, (s, d) in self.batch_shapes.items()}
    return self.abstract, batch, jax.ShapeDtypeStruct((2,), 'uint32'), self.frozen, None

  def contexts(self):
    """The mesh and logical-axis rules the step is traced and run under (as training/loop.py)."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.settings.mesh.logical_axis_rules))
    return stack


def cached_text_encoder():
  """CLIP ViT-L/14 as the step sees it with text.cache_embeddings: frozen, never called (its
  embeddings come in the batch), so no weights; only its width and length shape the step."""
  from text import encoders  # pylint: disable=import-outside-toplevel

  def not_loaded(*_):
    raise RuntimeError('benchmarks.sd_memory: the text encoder is not loaded; the batch carries '
                       'its cached embeddings.')
  return encoders.TextEncoder(tokenize=not_loaded, init=lambda rng: None, encode=not_loaded,
                              trainable=False, dim=CLIP_DIM, max_len=CLIP_LEN,
                              fingerprint='CLIP ViT-L/14 (cached embeddings)')


def cached_latents_vae(settings):
  """The SD VAE as the step sees it with cached latents: only its scaling (no weights)."""
  from models import layers, vae_loading  # pylint: disable=import-outside-toplevel
  from models.autoencoder import AutoencoderKL  # pylint: disable=import-outside-toplevel
  config = vae_loading.read_config(settings.autoencoder.path)
  module = AutoencoderKL(config, dtype=layers.resolve_dtype(settings.autoencoder.dtype, 'vae'))
  return vae_loading.PretrainedVAE(path=settings.autoencoder.path, config=config, module=module,
                                   params=None, fingerprint='SD VAE (cached latents)')


def build_step(settings, devices=None) -> SDStep:
  """The run's jitted train step over a ('data', 'fsdp', 'tensor') mesh of `devices`."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from configs import validation  # pylint: disable=import-outside-toplevel
  from data import batch as keys  # pylint: disable=import-outside-toplevel
  from models import family  # pylint: disable=import-outside-toplevel
  from runtime import sharding, state as state_lib  # pylint: disable=import-outside-toplevel
  from training import builder  # pylint: disable=import-outside-toplevel
  n = settings.mesh.data * settings.mesh.fsdp * settings.mesh.tensor
  mesh = sharding.make_mesh(settings.mesh, (devices or jax.devices())[:n])
  validation.check_mesh(settings, mesh, jax.process_count())
  autoencoder = cached_latents_vae(settings)
  shape = state_lib.diffusion_shape(settings.data.image_size, autoencoder)
  unet, text = family.build(settings.model, shape[0]), cached_text_encoder()
  tx, _ = builder.make_optimizer(settings.optim)
  abstract, shardings, init = state_lib.create_sharded_state(
      mesh, settings.mesh.logical_axis_rules, unet=unet, text_encoder=text, tx=tx,
      input_shape=shape)
  b = settings.data.global_batch_size
  batch_shapes = {keys.BAD: ((b,), np.int32), 'emb': ((b, CLIP_LEN, CLIP_DIM), np.float32),
                  'mask': ((b, CLIP_LEN), np.bool_), 'pooled': ((b, CLIP_DIM), np.float32),
                  **{k: ((b,) + shape, np.float32) for k in keys.LATENTS}}
  # The empty caption's embeddings (the null condition; text.cond_drop_prob=0 never picks it).
  null = {'emb': np.zeros((1, CLIP_LEN, CLIP_DIM), np.float32),
          'mask': np.ones((1, CLIP_LEN), bool), 'pooled': np.zeros((1, CLIP_DIM), np.float32)}
  step = builder.jit_train_step(
      settings, unet=unet, text_encoder=text, null_inputs=null, tx=tx, autoencoder=autoencoder,
      state_shardings=shardings,
      batch_shardings={k: sharding.batch_sharding(mesh, len(s)) for k, (s, _) in
                       batch_shapes.items()})
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  frozen = {}
  if family.lora(settings.model):  # The base under the adapters: an argument, as in training.
    frozen['unet'] = state_lib.frozen_base(mesh, settings.mesh.logical_axis_rules, unet=unet,
                                           text_encoder=text, input_shape=shape)
  return SDStep(settings, mesh, unet, text, autoencoder, null, step, abstract, init, batch_shapes,
                frozen)


def unet_param_count(sd_step: SDStep) -> int:
  """The U-Net's parameters, without LoRA adapters (the base's, frozen or trained)."""
  import jax  # pylint: disable=import-outside-toplevel
  tree = sd_step.frozen.get('unet', sd_step.abstract.params['unet'])
  return sum(x.size for x in jax.tree.leaves(tree))


def _gib(tree) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) * 2.0 ** -30


def diffusers_param_count() -> int:
  """Parameters of diffusers' tensor list for SD15_UNET (tools/random_sd_unet.py, no torch)."""
  import math  # pylint: disable=import-outside-toplevel
  from tools import random_sd_unet  # pylint: disable=import-outside-toplevel
  cfg = {**random_sd_unet.DIFFUSERS_DEFAULTS,
         **{k: v for k, v in SD15_UNET.items() if not k.startswith('_')}}
  return sum(math.prod(s) for s in random_sd_unet.diffusers_shapes(cfg).values())


def memory_row(sd_step: SDStep) -> dict:
  """Lowers and compiles the step on abstract arguments; XLA's per-device memory and seconds."""
  import jax  # pylint: disable=import-outside-toplevel
  from runtime import compile_cache  # pylint: disable=import-outside-toplevel
  args = sd_step.abstract_args()
  t0 = time.perf_counter()
  with sd_step.contexts(), compile_cache.gc_paused():
    lowered = sd_step.step.jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  s = sd_step.settings
  gib = 2.0 ** -30
  return {
      'fsdp': s.mesh.fsdp, 'remat': s.model.network.remat, 'dtype': s.model.network.dtype,
      'lora_rank': s.model.network.lora.rank if s.model.network.lora else 0,
      'trained_params': sum(x.size for x in jax.tree.leaves(sd_step.abstract.params)),
      'state_gib': _gib(sd_step.abstract),  # What a checkpoint holds (all processes together).
      'batch_per_device': s.data.global_batch_size // s.mesh.fsdp,
      'global_batch': s.data.global_batch_size, 'image_size': s.data.image_size,
      'argument_gib': m.argument_size_in_bytes * gib, 'output_gib': m.output_size_in_bytes * gib,
      'alias_gib': m.alias_size_in_bytes * gib, 'temp_gib': m.temp_size_in_bytes * gib,
      'total_gib': (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                    + m.temp_size_in_bytes) * gib,
      'flops_per_device': float(cost.get('flops', 0.0)),
      'trace_s': t1 - t0, 'xla_compile_s': t2 - t1,
  }


def table(rows: list[dict]) -> str:
  out = ['| LoRA rank | fsdp | remat | batch / device (global) | trained parameters | state GiB '
         '| arguments GiB | outputs GiB | temporaries GiB | total GiB | trace s | XLA compile s |',
         '|' + '---|' * 12]
  for r in rows:
    out.append(f"| {r.get('lora_rank') or '-'} | {r['fsdp']} | {r['remat']} | "
               f"{r['batch_per_device']} ({r['global_batch']}) | {r.get('trained_params', 0):,} | "
               f"{r.get('state_gib', 0):.3f} | "
               f"{r['argument_gib']:.2f} | {r['output_gib']:.2f} | {r['temp_gib']:.2f} | "
               f"**{r['total_gib']:.2f}** | {r['trace_s']:.1f} | {r['xla_compile_s']:.1f} |")
  return '\n'.join(out)


def accelerator_attention():
  """Within it, attention runs over the whole batch on a CPU too, as on an accelerator (see the
  module docstring): models/attention.py's CPU chunk size is made unbounded."""
  from unittest import mock  # pylint: disable=import-outside-toplevel
  from models import attention  # pylint: disable=import-outside-toplevel
  return mock.patch.object(attention, '_CPU_SCORES_BYTES', 1 << 62)


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(',') if v]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--fsdp', default='1,4,8', help='Comma-separated fsdp sizes (mesh data=1).')
  p.add_argument('--remat', default='none,dots', help="Comma-separated: 'none', 'dots', 'full'.")
  p.add_argument('--batch', default='1,4,8', help='Comma-separated batch sizes PER DEVICE.')
  p.add_argument('--image_size', type=int, default=512, help='Pixels (latents are 1/8 of it).')
  p.add_argument('--dtype', default='bfloat16', help='Compute dtype (weights stay float32).')
  p.add_argument('--lora_rank', default='0', help='Comma-separated LoRA ranks (0: full fine-tune).')
  p.add_argument('--cpu_attention', action='store_true',
                 help="Compile the CPU's chunked attention, not the accelerator's (see above).")
  p.add_argument('--out', default='', help='Write the rows here as JSON.')
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  import jax  # pylint: disable=import-outside-toplevel
  fsdps = _ints(args.fsdp)
  # Simulated CPU devices for the fsdp meshes (set before the backend starts; an accelerator's
  # own devices are used where there is one).
  jax.config.update('jax_num_cpu_devices', max(fsdps))
  device = jax.devices()[0]
  print(f'# SD 1.5 fine-tune step memory, {args.image_size} px, {args.dtype} compute, float32 '
        f'weights; jax {jax.__version__}, {jax.device_count()} x {device.device_kind} '
        f'({device.platform}), {os.cpu_count()} cores, {time.strftime("%Y-%m-%d")}; attention: '
        f'{"the CPU chunks" if args.cpu_attention else "whole batch"}', flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp, (
      contextlib.nullcontext() if args.cpu_attention else accelerator_attention()):
    folder = write_config_folder(os.path.join(tmp, 'sd15'))
    for fsdp in fsdps:
      for remat in args.remat.split(','):
        for b, rank in [(b, r) for r in _ints(args.lora_rank) for b in _ints(args.batch)]:
          settings = finetune_settings(folder, image_size=args.image_size, dtype=args.dtype,
                                       remat=remat, fsdp=fsdp, batch_per_device=b, lora_rank=rank)
          sd_step = build_step(settings)
          if not rows:
            ours, theirs = unet_param_count(sd_step), diffusers_param_count()
            print(f'U-Net parameters: {ours:,} (diffusers layout: {theirs:,}; SD 1.5: '
                  f'{SD15_UNET_PARAMS:,})', flush=True)
            if ours != SD15_UNET_PARAMS:
              raise SystemExit(f'error: {ours:,} U-Net parameters, not SD 1.5\'s '
                               f'{SD15_UNET_PARAMS:,}.')
          row = memory_row(sd_step)
          rows.append(row)
          print(f"LoRA rank {rank}, fsdp {fsdp}, remat {remat}, batch {b}/device: total {row['total_gib']:.2f} "
                f"GiB (arguments {row['argument_gib']:.2f}, temporaries {row['temp_gib']:.2f}); "
                f"trace {row['trace_s']:.1f} s, XLA {row['xla_compile_s']:.1f} s", flush=True)
  print(table(rows))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'argv': sys.argv, 'jax': jax.__version__, 'device': str(device.device_kind),
                 'cpu_attention': args.cpu_attention, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
