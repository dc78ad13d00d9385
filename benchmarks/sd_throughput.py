"""The Stable Diffusion 1.5 train step's speed, ours against diffusers' UNet2DConditionModel.

  # BENCHMARKS.md's CPU ratio: 32 x 32 latents (256 px), batch 1, float32 on both sides, 2
  # threads each. The two sides do not fit in memory together, so each round runs ours, then the
  # peer, each in its own process, and pairs their per-step times (median ratio over the rounds).
  # Our whole step needs 19.95 GiB by XLA's analysis (state 12.81 + temporaries 7.15) and the
  # peer's peaks at 17.8 GB resident, more than a 24 GiB machine spares beside other work, so
  # there the part timed is the loss and its gradients (the U-Net's forward and backward; 10.3
  # and 8.0 GB resident), on both sides:
  python -m benchmarks.sd_throughput --processes --part=grads --rounds=3 --steps=2
  # The whole step where memory allows (about 22 GB for ours):
  python -m benchmarks.sd_throughput --processes --rounds=3 --steps=2
  # One side alone (what a round runs); the last line is its figures as JSON:
  python -m benchmarks.sd_throughput --side=peer --steps=2
  # An accelerator (benchmarks/device_check.sh): configs/sd.py:finetune at 512 px, bfloat16
  # compute, remat 'dots', batch 8, img/s and MFU, A and B in turn in one process against the
  # peer under torch.compile with bfloat16 autocast:
  python -m benchmarks.sd_throughput --image_size=512 --dtype=bfloat16 --remat=dots --batch=8 \
      --rounds=5 --steps=5 --peak_tflops=989 --peer_compile

Ours is the run's own step (`benchmarks.sd_memory.build_step`: configs/sd.py:finetune over the
SD 1.5 config files, jitted by training.builder): cached VAE latents and CLIP ViT-L/14 embeddings
in, the U-Net forward and backward, clipping, AdamW, the EMA copy, the non-finite guard; random
weights made in memory (no weights are read). The peer is diffusers' UNet2DConditionModel built
from the same config.json (859,520,964 parameters, as ours), float32 weights, with
benchmarks/peer_diffusers.py's TorchTrainStep: epsilon MSE on the same noise schedule, clipping,
AdamW with the same hyper-parameters (finetune's ema_decay is 0, so it keeps no EMA; ours still
writes its EMA copy), no text mask (as SD). `--dtype` other than float32 runs the peer under
torch.autocast in that dtype. `--threads` is the peer's torch threads (0: every core, as XLA).
`--part=grads` times train_step's loss and gradients alone on both sides (no update, no
optimiser state, no EMA): the same noise, forward, epsilon MSE and backward.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import sd_memory

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Both sides in one process on a GPU: jax takes what it needs, not 75% of the memory up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--side', default='both', choices=('both', 'ours', 'peer'),
                 help='Time both in turn in this process, or one side alone.')
  p.add_argument('--processes', action='store_true',
                 help='Each round: --side=ours, then --side=peer, each in a fresh process.')
  p.add_argument('--image_size', type=int, default=256, help='Pixels; latents are 1/8 of it.')
  p.add_argument('--batch', type=int, default=1, help='Global batch size.')
  p.add_argument('--dtype', default='float32', help='Compute dtype (weights stay float32).')
  p.add_argument('--remat', default='none', help="Ours: 'none', 'dots' or 'full'.")
  p.add_argument('--part', default='step', choices=('step', 'grads'),
                 help="'step': the whole train step; 'grads': its loss and gradients alone.")
  p.add_argument('--rounds', type=int, default=3, help='Timed rounds (A then B in each).')
  p.add_argument('--steps', type=int, default=2, help='Steps per round and side.')
  p.add_argument('--threads', type=int, default=0, help="The peer's threads (0: every core).")
  p.add_argument('--peer_compile', action='store_true', help='torch.compile the peer (GPU).')
  p.add_argument('--peak_tflops', type=float, default=0.0, help='Device peak for MFU (0: none).')
  p.add_argument('--out', default='', help='Write the figures here as JSON.')
  return p.parse_args(argv)


def _summary(xs) -> dict:
  xs = np.asarray(xs, float)
  return {'median': float(np.median(xs)), 'min': float(xs.min()), 'max': float(xs.max())}


def loss_and_grads(params, batch, rng, *, sd):
  """train_step's loss and its gradients (training/step.py with k = 1 and no caption dropped,
  as text.cond_drop_prob=0 gives), without the update: the forward and backward alone."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from data import batch as keys  # pylint: disable=import-outside-toplevel
  from diffusion import losses  # pylint: disable=import-outside-toplevel
  from models import denoiser  # pylint: disable=import-outside-toplevel
  from training import step as step_lib  # pylint: disable=import-outside-toplevel
  _, rng_loss, rng_dropout = jax.random.split(rng, 3)
  x = step_lib.diffusion_input(batch, sd.autoencoder, None, jax.random.fold_in(rng, 0x1A7E))
  spec = sd.settings.diffusion

  def loss_fn(p):
    cond = step_lib.text_condition(sd.text_encoder, p, None,
                                   {k: batch[k] for k in keys.EMBEDDINGS})
    pred_fn = lambda x_t, logsnr: denoiser.apply_network(
        sd.unet, p['unet'], x_t, logsnr, cond, spec, train=True, rngs={'dropout': rng_dropout})
    per_example, _ = losses.diffusion_loss(pred_fn, x, rng_loss, spec)
    return jnp.mean(per_example)
  return jax.value_and_grad(loss_fn)(params)


class Ours:
  """Our SD 1.5 train step (`part='step'`), or its loss and gradients alone (`part='grads'`),
  jitted, on one fixed synthetic batch of cached latents and text."""

  def __init__(self, config, part: str = 'step'):
    import functools  # pylint: disable=import-outside-toplevel
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    from configs import validation  # pylint: disable=import-outside-toplevel
    from runtime import compile_cache, sharding  # pylint: disable=import-outside-toplevel
    from runtime import state as state_lib  # pylint: disable=import-outside-toplevel
    self.sd = sd = sd_memory.build_step(validation.validate(config))
    rng = np.random.default_rng(0)
    shape = lambda key: sd.batch_shapes[key][0]
    # Every value is random, as the weights are: posterior moments as the SD VAE gives them
    # (means of std ~ 1 / scaling_factor, a small variance) and CLIP-like embeddings.
    local = {'bad': np.zeros(shape('bad'), np.int32),
             'latent_mean': (rng.standard_normal(shape('latent_mean')) / 0.18215).astype('f4'),
             'latent_logvar': np.full(shape('latent_logvar'), -10.0, np.float32),
             'emb': rng.standard_normal(shape('emb')).astype('f4'),
             'mask': np.ones(shape('mask'), bool),
             'pooled': rng.standard_normal(shape('pooled')).astype('f4')}
    key = jax.random.PRNGKey(1)
    with sd.contexts(), compile_cache.gc_paused():
      batch = sharding.global_batch(sd.mesh, local)
      if part == 'step':
        self.state = sd.init(jax.random.PRNGKey(0))
        sd.step.compile(self.state, batch, key, None, None)
        compiled, self.trace_s, self.xla_s = (sd.step.compiled, sd.step.trace_seconds,
                                              sd.step.xla_seconds)

        def call():
          self.state, metrics = sd.step(self.state, batch, key, None, None)
          return self.state, metrics
      else:  # Only the trained parameters (no optimiser state, no EMA), as the run's.
        shardings = jax.tree.map(lambda a: a.sharding, sd.abstract.params)
        params = jax.jit(lambda r: nn.meta.unbox(state_lib.init_params(
            r, unet=sd.unet, text_encoder=sd.text_encoder,
            input_shape=shape('latent_mean')[1:])), out_shardings=shardings)(
                jax.random.PRNGKey(0))
        t0 = time.perf_counter()
        lowered = jax.jit(functools.partial(loss_and_grads, sd=sd)).lower(params, batch, key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        self.trace_s, self.xla_s = t1 - t0, time.perf_counter() - t1
        call = lambda: compiled(params, batch, key)
    self._call = call
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    self.flops = float(cost.get('flops', 0.0)) * sd.mesh.size  # Per device -> the step's.
    m = compiled.memory_analysis()
    self.memory_gib = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                       + m.temp_size_in_bytes) / 2**30
    self.params = sd_memory.unet_param_count(sd)
    self.run(1)  # The first run allocates; not timed.

  def run(self, n: int) -> float:
    import jax  # pylint: disable=import-outside-toplevel
    t0 = time.perf_counter()
    with self.sd.contexts():
      for _ in range(n):
        out = None  # The last call's gradients are dropped before the next are made.
        out = self._call()
    jax.block_until_ready(out)
    return time.perf_counter() - t0

  def figures(self) -> dict:
    return {'params': self.params, 'trace_s': self.trace_s, 'xla_compile_s': self.xla_s,
            'flops_per_step': self.flops, 'xla_memory_gib': self.memory_gib}


class Peer:
  """diffusers' UNet2DConditionModel of the same config.json, with TorchTrainStep (`part='step'`)
  or its loss and gradients alone (`part='grads'`: the same noise, forward, MSE and backward)."""

  def __init__(self, config, batch_size: int, latent_side: int, compile_model: bool,
               part: str = 'step'):
    import diffusers  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    from benchmarks import peer_diffusers  # pylint: disable=import-outside-toplevel
    config = config.copy_and_resolve_references()
    config.model.coord_channels = False  # (Read by TorchTrainStep; SD's U-Net has none.)
    torch.manual_seed(0)
    device = peer_diffusers.default_device()
    t0 = time.perf_counter()
    model = diffusers.UNet2DConditionModel(
        **{k: v for k, v in sd_memory.SD15_UNET.items() if not k.startswith('_')}).to(device)
    gen = torch.Generator().manual_seed(0)
    inputs = {'x': torch.randn(batch_size, 4, latent_side, latent_side, generator=gen),
              'context': torch.randn(batch_size, sd_memory.CLIP_LEN, sd_memory.CLIP_DIM,
                                     generator=gen)}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs['mask'] = None  # SD's pipelines pass no text mask.
    # (AdamW's moments are made at its first update: none in part='grads'.)
    self.step = peer_diffusers.TorchTrainStep(model, config, inputs, compile_model)
    if part == 'grads':
      self._call = self._grads
    else:
      self._call = lambda: self.step(self.step.inputs)
    self.params = peer_diffusers.param_count(model)
    self.build_s = time.perf_counter() - t0
    self.peak = peer_diffusers.peak_memory_bytes
    self.synchronize = peer_diffusers._synchronize  # pylint: disable=protected-access
    t0 = time.perf_counter()
    self.run(1)  # Allocation (and torch.compile's compile); not timed.
    self.first_s = time.perf_counter() - t0

  def _grads(self):
    """TorchTrainStep.__call__ up to loss.backward()."""
    import torch  # pylint: disable=import-outside-toplevel
    s = self.step
    x0 = s.inputs['x']
    b = x0.shape[0]
    noise = torch.randn_like(x0)
    t = torch.randint(0, s.num_timesteps, (b,), device=x0.device)
    x_t = s.sqrt_abar[t].view(b, 1, 1, 1) * x0 + s.sqrt_1m_abar[t].view(b, 1, 1, 1) * noise
    loss = torch.nn.functional.mse_loss(s.forward(x_t, t, s.inputs['context'], None), noise)
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach()

  def run(self, n: int) -> float:
    """Seconds for `n` calls (the loss is read once, at the end)."""
    t0 = time.perf_counter()
    losses = [self._call() for _ in range(n)]
    float(losses[-1])
    self.synchronize()
    return time.perf_counter() - t0

  def figures(self) -> dict:
    return {'params': self.params, 'build_s': self.build_s, 'first_step_s': self.first_s,
            'peak_gib': self.peak() / 2**30}


def _config(args, folder: str):
  return sd_memory.finetune_config(folder, image_size=args.image_size, dtype=args.dtype,
                                   remat=args.remat, batch_per_device=args.batch)


def one_process(args) -> dict:
  """Builds the side(s) asked for and times `rounds` x `steps` steps, A then B in each round."""
  sides = ('ours', 'peer') if args.side == 'both' else (args.side,)
  if 'peer' in sides:
    from benchmarks import peer_diffusers  # pylint: disable=import-outside-toplevel
    peer_diffusers.set_threads(args.threads or os.cpu_count())
  with tempfile.TemporaryDirectory() as tmp:
    config = _config(args, sd_memory.write_config_folder(os.path.join(tmp, 'sd15')))
    built = {}
    if 'ours' in sides:
      built['ours'] = Ours(config, args.part)
    if 'peer' in sides:
      built['peer'] = Peer(config, args.batch, args.image_size // 8, args.peer_compile,
                          args.part)
  times = {side: [] for side in sides}
  for _ in range(args.rounds):
    for side in sides:
      times[side].append(built[side].run(args.steps) / args.steps)
  return {side: {'step_s': times[side], **built[side].figures()} for side in sides}


def separate_processes(args) -> dict:
  """Each round: this module with --side=ours, then --side=peer, each a fresh process."""
  flags = [f'--image_size={args.image_size}', f'--batch={args.batch}', f'--dtype={args.dtype}',
           f'--remat={args.remat}', f'--part={args.part}', '--rounds=1', f'--steps={args.steps}',
           f'--threads={args.threads}'] + (['--peer_compile'] if args.peer_compile else [])
  out = {'ours': [], 'peer': []}
  for r in range(args.rounds):
    for side in ('ours', 'peer'):
      done = subprocess.run([sys.executable, '-m', 'benchmarks.sd_throughput', f'--side={side}',
                             *flags], capture_output=True, text=True, check=False)
      if done.returncode:
        raise SystemExit(f'error: round {r + 1}, --side={side} exited {done.returncode}:\n'
                         f'{done.stderr[-3000:]}')
      out[side].append(json.loads(done.stdout.strip().splitlines()[-1])[side])
      print(f"round {r + 1} {side}: {out[side][-1]['step_s'][0] * 1e3:.0f} ms/step", flush=True)
  return {side: {'step_s': [run['step_s'][0] for run in runs],
                 **{k: v for k, v in runs[-1].items() if k != 'step_s'}}
          for side, runs in out.items()}


def report(args, figures: dict) -> dict:
  """Medians, images/s, MFU and the paired ratios ours / peer."""
  row = {'image_size': args.image_size, 'latents': args.image_size // 8, 'batch': args.batch,
         'dtype': args.dtype, 'remat': args.remat, 'part': args.part, **figures}
  for side in figures:
    row[side]['summary'] = _summary(figures[side]['step_s'])
    row[side]['images_per_s'] = args.batch / row[side]['summary']['median']
  ours = figures.get('ours')
  if ours and args.peak_tflops and ours['flops_per_step']:
    row['mfu'] = ours['flops_per_step'] / ours['summary']['median'] / (args.peak_tflops * 1e12)
  if len(figures) == 2:
    row['ratio'] = _summary(np.asarray(ours['step_s']) / np.asarray(figures['peer']['step_s']))
  return row


def table(row: dict) -> str:
  cell = lambda side: (f"{row[side]['summary']['median'] * 1e3:.0f} "
                       f"({row[side]['summary']['min'] * 1e3:.0f}-"
                       f"{row[side]['summary']['max'] * 1e3:.0f})" if side in row else '')
  ours = row.get('ours', {})
  ratio = row.get('ratio')
  lines = ['| what | latents | batch | dtype | ours ms (min-max) | ours img/s | GFLOP/img | XLA memory '
           'GiB | MFU | peer ms (min-max) | ours / peer, median (min-max) |', '|' + '---|' * 11,
           '| ' + ' | '.join([
               {'step': 'train step', 'grads': 'loss + gradients'}[row['part']],
               f"{row['latents']} x {row['latents']}", str(row['batch']), row['dtype'],
               cell('ours'), f"{ours['images_per_s']:.2f}" if ours else '',
               f"{ours['flops_per_step'] / row['batch'] / 1e9:.0f}" if ours else '',
               f"{ours['xla_memory_gib']:.2f}" if ours else '',
               f"{row['mfu'] * 100:.1f}%" if 'mfu' in row else '', cell('peer'),
               f"**{ratio['median']:.2f}** ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio
               else '']) + ' |']
  return '\n'.join(lines)


def main(argv=None):
  args = _parse(sys.argv[1:] if argv is None else argv)
  import jax  # pylint: disable=import-outside-toplevel
  if args.side == 'both' or args.processes:
    device = jax.devices()[0]
    print(f'# SD 1.5 {args.part}, {args.image_size} px, batch {args.batch}, {args.dtype}, on '
          f'{device.device_kind} ({device.platform}), jax {jax.__version__}, '
          f'{os.cpu_count()} cores, {time.strftime("%Y-%m-%d")}', flush=True)
  if args.processes:
    row = report(args, separate_processes(args))
  else:
    figures = one_process(args)
    if args.side != 'both':  # A round of --processes: its figures, one JSON line.
      print(json.dumps(figures))
      return
    row = report(args, figures)
  print(table(row))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'argv': sys.argv, 'row': row}, f, indent=1)


if __name__ == '__main__':
  main()
