"""Train-step and sampler throughput of any config; with --peer, the same U-Net in diffusers.

  # The CPU table of BENCHMARKS.md (issue 17): the base architecture (32 px, channels
  # 64/128/128, 2 res blocks, attention at 16 and 8 px, 4 heads of 32, context 16 x 128).
  python -m benchmarks.throughput --config=configs/base.py --batch=8,32,64 --peer --sampler
  # An accelerator: the GPU config in bfloat16 at batch 256, MFU against the chip's dense peak.
  python -m benchmarks.throughput --config=configs/shapes.py:gpu --batch=256 --sampler \
      --peak_tflops=989 --peer --peer_compile

For each batch size it builds the real train step (`training.builder.build_trainer`: loss, backward,
AdamW, EMA, the divergence metrics) on synthetic data, compiles it once (compile seconds), reads
XLA's cost analysis (FLOPs per image: forward + backward of the U-Net and text encoder, and the
update) and its memory analysis, then times `--steps` steps per round. With `--peer` each round
also times the same number of steps of diffusers' UNet2DConditionModel configured to the same
architecture (benchmarks/peer_diffusers.py; torch + diffusers are optional extras, never product
dependencies) in a process of its own (`PeerProcess`: glibc's and torch's own defaults, not what
runtime/host.py set up here), A and B in turn, and prints the per-round ratio ours / peer: its median, min and max.
`--sampler` does the same for classifier-free guided DPM-Solver++(2M) sampling.

Figures are printed as a markdown table and written to `--out` (JSON) if given. MFU is reported
when `--peak_tflops` (the device's dense peak for the compute dtype) is given.
"""

import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # (TFDS, when a config reads it: no notice.)


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='configs/base.py', help='Config file[:variant].')
  p.add_argument('--batch', default='32', help='Comma-separated global batch sizes.')
  p.add_argument('--rounds', type=int, default=5, help='Timed rounds (A then B in each).')
  p.add_argument('--steps', type=int, default=3, help='Steps per round and side.')
  p.add_argument('--peer', action='store_true', help='Time diffusers on the same architecture.')
  p.add_argument('--peer_compile', action='store_true', help='torch.compile the peer (GPU run).')
  p.add_argument('--sampler', action='store_true', help='Also time guided sampling.')
  p.add_argument('--sample_batch', type=int, default=16, help='Images per sampling call.')
  p.add_argument('--sample_steps', type=int, default=20, help='DPM-Solver++(2M) steps.')
  p.add_argument('--no_train', action='store_true', help='Only the sampler.')
  p.add_argument('--threads', type=int, default=0,
                 help="The peer's intra-op threads (0: every core, as XLA uses).")
  p.add_argument('--peak_tflops', type=float, default=0.0, help='Device peak for MFU (0: none).')
  p.add_argument('--out', default='', help='Write the figures here as JSON.')
  args, overrides = p.parse_known_args(argv)
  return args, overrides


def _config(spec: str, overrides: list[str]):
  from configs import loading  # pylint: disable=g-import-not-at-top
  config = loading.load(spec, overrides)
  if config.text.encoder == 'scratch' and config.text.vocab == 'bpe':
    # The tokenizer lives in a run's workdir; the step only sees token ids, so a word vocabulary
    # of the same length gives the same program up to the embedding table's rows.
    config.text.vocab = 'shapes'
  config.logging.eval_every_steps = 0
  return config


def _round(xs) -> dict:
  xs = np.asarray(xs, float)
  return {'median': float(np.median(xs)), 'min': float(xs.min()), 'max': float(xs.max())}


class OursTrain:
  """Our jitted train step at one global batch size, on synthetic images and token ids."""

  def __init__(self, config, batch_size: int):
    import jax  # pylint: disable=g-import-not-at-top
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    from configs import validation  # pylint: disable=g-import-not-at-top
    from training import builder  # pylint: disable=g-import-not-at-top
    from runtime import compile_cache, sharding  # pylint: disable=g-import-not-at-top
    config = config.copy_and_resolve_references()
    config.data.global_batch_size = batch_size
    settings = validation.validate(config)
    self.config, self.settings = config, settings
    mesh = sharding.make_mesh(settings.mesh)
    validation.check_mesh(settings, mesh, jax.process_count())  # --batch must split over the mesh.
    # The run's own builder; no records, so a frozen encoder with text.cache_embeddings gets the
    # embeddings of the captions, as cached ones would be.
    trainer = builder.build_trainer(settings, mesh)
    self.unet, self.text = trainer.unet, trainer.text_encoder
    rng = np.random.default_rng(0)
    size = config.data.image_size
    local = {'bad': np.zeros((batch_size,), np.int32),
             **trainer.text_inputs.from_captions(['a red circle'] * batch_size),
             'image': rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32)}
    self.step = trainer.step
    init_fn, frozen, vae = trainer.init, trainer.frozen_weights, trainer.vae_params
    self.mesh, self.rules = mesh, settings.mesh.logical_axis_rules
    # As training/loop.py calls them: the collector paused while a program is traced.
    with jax.set_mesh(mesh), nn.logical_axis_rules(self.rules), compile_cache.gc_paused():
      self.state = init_fn(jax.random.PRNGKey(0))
      self.batch = sharding.global_batch(mesh, local)
      self.args = (self.batch, jax.random.PRNGKey(1), frozen, vae)
      # Tracing the model in Python (or loading its trace), then XLA (or the compilation cache).
      self.step.compile(self.state, *self.args)
    self.compiled = self.step.compiled
    self.trace_s, self.xla_s = self.step.trace_seconds, self.step.xla_seconds
    self.compile_s = self.trace_s + self.xla_s
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float(cost.get('flops', 0.0)) if cost else 0.0
    mem = self.compiled.memory_analysis()
    self.memory_bytes = (int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                             + mem.output_size_in_bytes - mem.alias_size_in_bytes)
                         if mem is not None else 0)
    self.batch_size = batch_size
    self.steps, self.faults, self.system_s = 0, 0, 0.0
    self.run(2)  # The first runs allocate; not timed, nor counted.
    self.steps, self.faults, self.system_s = 0, 0, 0.0

  def param_count(self) -> int:
    import jax  # pylint: disable=g-import-not-at-top
    return sum(x.size for x in jax.tree.leaves(self.state.params['unet']))

  def run(self, n: int) -> float:
    """Seconds for `n` steps; adds their minor page faults and system seconds (the whole
    process's, the kernel's own count) to self.faults and self.system_s."""
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for _ in range(n):
        self.state, metrics = self.step(self.state, *self.args)
    jax.block_until_ready((self.state, metrics))
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    self.steps += n
    self.faults += after.ru_minflt - before.ru_minflt
    self.system_s += after.ru_stime - before.ru_stime
    return seconds


def initial_params(config):
  """The initial EMA parameters of `config`'s models (the sampler's, without a train step)."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from configs import validation  # pylint: disable=g-import-not-at-top
  from runtime import sharding  # pylint: disable=g-import-not-at-top
  from training import builder  # pylint: disable=g-import-not-at-top
  settings = validation.validate(config)
  mesh = sharding.make_mesh(settings.mesh)
  trainer = builder.build_trainer(settings, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(settings.mesh.logical_axis_rules):
    return trainer.init(jax.random.PRNGKey(0)).ema_params


class OursSampler:
  """Our guided DPM-Solver++(2M) generator (sampling.generate) at one batch size, on a
  data-parallel mesh over all devices as sample.py's."""

  def __init__(self, config, batch_size: int, num_steps: int, params):
    from configs import specs  # pylint: disable=g-import-not-at-top
    from diffusion import spec as settings_lib  # pylint: disable=g-import-not-at-top
    from sampling import generate  # pylint: disable=g-import-not-at-top
    from runtime import sharding, state as state_lib  # pylint: disable=g-import-not-at-top
    from runtime.settings import MeshSpec  # pylint: disable=g-import-not-at-top
    run = specs.build(config)
    autoencoder = state_lib.build_autoencoder(run.autoencoder)
    unet, text = state_lib.build_networks(run, autoencoder=autoencoder)
    mesh = sharding.make_mesh(MeshSpec.data_parallel())
    self.gen = generate.Generator(unet, text, run.diffusion, run.data.image_size, mesh,
                                  autoencoder=autoencoder,
                                  decode_chunk=run.autoencoder.decode_chunk)
    self.params = (params['unet'], params['text'] if text.trainable else text.init(None))
    self.settings = settings_lib.overridden(run.sampler, sampler='dpmpp_2m', num_steps=num_steps)
    self.prompts = ['a red circle'] * batch_size
    t0 = time.perf_counter()
    self._call()
    self.compile_s = time.perf_counter() - t0

  def _call(self):
    return self.gen(*self.params, self.prompts, seed=0, settings=self.settings)

  def run(self, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
      self._call()
    return time.perf_counter() - t0


def _serve_peer(conn, kind: str, config, args: tuple, threads: int, compile_: bool) -> None:
  """The peer's process: builds it, then runs n steps for each n received (None: stop)."""
  peer_lib = _peer_module()
  peer_lib.set_threads(threads)
  cls = peer_lib.TorchTrainStep if kind == 'train' else peer_lib.TorchGuidedSampler
  peer = cls.from_config(config, *args, compile=compile_)
  conn.send(peer.param_count())
  while (n := conn.recv()) is not None:
    conn.send(peer.run(n))
  conn.send(peer_lib.peak_memory_bytes())


class PeerProcess:
  """diffusers' train step (kind 'train') or guided sampler ('sample') in a process of its own:
  what this process set up before jax started (malloc's settings, runtime/host.py) and XLA's
  threads do not touch it, so each side runs with its own defaults. run(n) -> seconds."""

  def __init__(self, kind: str, config, *args, threads: int, compile_: bool = False):
    import multiprocessing  # pylint: disable=g-import-not-at-top
    ctx = multiprocessing.get_context('spawn')  # A fresh interpreter: glibc's own defaults.
    self._conn, child = ctx.Pipe()
    self._process = ctx.Process(target=_serve_peer, daemon=True,
                                args=(child, kind, config, args, threads, compile_))
    self._process.start()
    self._params = self._conn.recv()
    self.peak_bytes = 0

  def run(self, n: int) -> float:
    self._conn.send(n)
    return self._conn.recv()

  def param_count(self) -> int:
    return self._params

  def close(self) -> None:
    self._conn.send(None)
    self.peak_bytes = self._conn.recv()
    self._process.join()


def _interleave(ours, peer, rounds: int, steps: int) -> tuple[list, list]:
  a, b = [], []
  for _ in range(rounds):
    a.append(ours.run(steps) / steps)
    if peer is not None:
      b.append(peer.run(steps) / steps)
  return a, b


def _peer_module():
  try:
    from benchmarks import peer_diffusers  # pylint: disable=g-import-not-at-top
    return peer_diffusers
  except ImportError as e:
    raise SystemExit(f'error: --peer needs torch and diffusers ({e}); pip install torch diffusers, '
                     'or drop --peer.') from None


def setup_host(config, batch: int) -> str:
  """As train.py, before jax starts: CPU devices for a global `batch`, and malloc's setting."""
  from runtime import host  # pylint: disable=g-import-not-at-top
  sizes = config.copy_and_resolve_references()
  sizes.data.global_batch_size = batch
  return host.setup(sizes)


def main(argv=None):
  args, overrides = _parse(sys.argv[1:] if argv is None else argv)
  config = _config(args.config, overrides)
  host_note = setup_host(config, math.gcd(*(int(b) for b in args.batch.split(','))))
  import jax  # pylint: disable=g-import-not-at-top
  from runtime import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.enable()
  if args.peer:
    _peer_module()  # torch and diffusers are there, or one error line now.
  threads = args.threads or os.cpu_count()
  device = jax.devices()[0]
  print(f'# {args.config} {" ".join(overrides)} on {jax.device_count()} x {device.device_kind} '
        f'({device.platform}), {os.cpu_count()} cores, {time.strftime("%Y-%m-%d")}; host: '
        f'{host_note or "as it is"}', flush=True)
  rows = []
  last_params = None
  for batch_size in ([] if args.no_train else [int(b) for b in args.batch.split(',')]):
    ours = OursTrain(config, batch_size)
    peer = (PeerProcess('train', config, batch_size, threads=threads,
                        compile_=args.peer_compile) if args.peer else None)
    if peer is not None:
      peer.run(1)
    a, b = _interleave(ours, peer, args.rounds, args.steps)
    row = {'what': 'train', 'batch': batch_size, 'step_s': _round(a),
           'images_per_s': batch_size / float(np.median(a)), 'compile_s': ours.compile_s,
           'trace_s': ours.trace_s, 'xla_compile_s': ours.xla_s,
           'flops_per_image': ours.flops / batch_size, 'memory_gib': ours.memory_bytes / 2**30,
           'faults_per_step': ours.faults / ours.steps, 'system_s_per_step': ours.system_s / ours.steps}
    stats = device.memory_stats() or {}
    if 'peak_bytes_in_use' in stats:  # Accelerators: the allocator's peak so far.
      row['peak_gib'] = stats['peak_bytes_in_use'] / 2**30
    if args.peak_tflops:
      row['mfu'] = ours.flops / float(np.median(a)) / (args.peak_tflops * 1e12)
    if peer is not None:
      row['peer_step_s'] = _round(b)
      row['peer_images_per_s'] = batch_size / float(np.median(b))
      row['ratio'] = _round(np.asarray(a) / np.asarray(b))
      peer.close()
      row['peer_peak_gib'] = peer.peak_bytes / 2**30
      row['params'] = {'ours': ours.param_count(), 'peer': peer.param_count()}
    rows.append(row)
    print(_line(row), flush=True)
    last_params = ours.state.ema_params
    del ours, peer
  if args.sampler:
    if last_params is None:
      last_params = initial_params(config)
    ours = OursSampler(config, args.sample_batch, args.sample_steps, last_params)
    peer = (PeerProcess('sample', config, args.sample_batch, args.sample_steps, threads=threads,
                        compile_=args.peer_compile) if args.peer else None)
    if peer is not None:
      peer.run(1)
    rounds = max(2, args.rounds)
    a, b = _interleave(ours, peer, rounds, 1)
    row = {'what': 'sample', 'batch': args.sample_batch, 'steps': args.sample_steps,
           'call_s': _round(a), 'images_per_s': args.sample_batch / float(np.median(a)),
           'compile_s': ours.compile_s}
    if peer is not None:
      row['peer_call_s'] = _round(b)
      row['peer_images_per_s'] = args.sample_batch / float(np.median(b))
      row['ratio'] = _round(np.asarray(a) / np.asarray(b))
      peer.close()
    rows.append(row)
    print(_line(row), flush=True)
  print(_table(rows))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'argv': sys.argv, 'device': str(device.device_kind), 'rows': rows}, f, indent=1)


def _line(row) -> str:
  key = 'step_s' if row['what'] == 'train' else 'call_s'
  s = (f"{row['what']} batch {row['batch']}: {row[key]['median'] * 1e3:.1f} ms, "
       f"{row['images_per_s']:.1f} img/s, compile {row['compile_s']:.1f} s")
  if 'trace_s' in row:
    s += f" (trace {row['trace_s']:.1f} s + XLA {row['xla_compile_s']:.1f} s)"
  if 'faults_per_step' in row:
    s += (f"; {row['faults_per_step']:,.0f} page faults and {row['system_s_per_step']:.2f} s of "
          "system time a step")
  if 'ratio' in row:
    r = row['ratio']
    s += f"; ours/peer {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"
  return s


def _table(rows) -> str:
  out = ['| what | batch | ours ms | ours img/s | compile s | GFLOP/img | memory GiB | MFU | '
         'peer ms | ours / peer (min-max) |', '|' + '---|' * 10]
  for r in rows:
    t = r['step_s'] if r['what'] == 'train' else r['call_s']
    p = r.get('peer_step_s') or r.get('peer_call_s')
    ratio = r.get('ratio')
    out.append('| ' + ' | '.join([
        r['what'] if r['what'] == 'train' else f"sample ({r['steps']} steps)", str(r['batch']),
        f"{t['median'] * 1e3:.1f}", f"{r['images_per_s']:.1f}", f"{r['compile_s']:.1f}",
        f"{r['flops_per_image'] / 1e9:.2f}" if 'flops_per_image' in r else '',
        f"{r['memory_gib']:.2f}" if 'memory_gib' in r else '',
        f"{r['mfu'] * 100:.1f}%" if 'mfu' in r else '',
        f"{p['median'] * 1e3:.1f}" if p else '',
        f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else '']) + ' |')
  return '\n'.join(out)


if __name__ == '__main__':
  try:
    main()
  except ValueError as e:  # A bad config value or batch size: one line, not a traceback.
    raise SystemExit(f'error: {e}') from None
