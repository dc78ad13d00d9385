"""Where a program's time goes: each XLA:CPU thunk's time from the JAX profiler, by HLO kind.

  # The train step of BENCHMARKS.md's profile (issue 17): base architecture, batch 32.
  python -m benchmarks.profile --config=configs/base.py --batch=32
  # Classifier-free guided DPM-Solver++(2M), 20 steps, 16 images (the sampler ratio's program).
  python -m benchmarks.profile --config=configs/base.py --sampler --batch=16

It builds the program as `benchmarks/throughput.py` does, runs it twice, then `--runs` times
under `jax.profiler.trace`. It reads the trace back (`jax.profiler.ProfileData`), sums the time of
every thunk on XLA's intra-op threads (events that name an instruction of the compiled program),
and sorts each thunk into a kind by the HLO instructions of its fusion: a 3x3 convolution (forward or input gradient), a kernel
gradient (a convolution whose window is the image), other convolutions, dots, reductions,
transposes, copies and the remaining elementwise fusions. It prints a markdown table of
milliseconds per run and shares, then the `--top` slowest thunks with their HLO.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

KINDS = ('3x3 convolutions, forward and input gradient',
         'kernel gradients (convolutions whose window is the image)',
         '1x1, strided and other convolutions', 'dots', 'reductions', 'transposes', 'copies',
         'elementwise and other fusions')


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='configs/base.py', help='Config file[:variant].')
  p.add_argument('--batch', type=int, default=32, help='Global batch (images per sampling call).')
  p.add_argument('--sampler', action='store_true', help='Profile guided sampling instead.')
  p.add_argument('--sample_steps', type=int, default=20, help='DPM-Solver++(2M) steps.')
  p.add_argument('--runs', type=int, default=3, help='Profiled steps (or sampling calls).')
  p.add_argument('--top', type=int, default=10, help='Slowest thunks to list.')
  return p.parse_known_args(argv)


def hlo_index(hlo_text: str) -> tuple[dict, dict, dict]:
  """(instruction -> its text, instruction -> called computation, computation -> its lines)."""
  insts, calls, comps, current = {}, {}, {}, None
  for line in hlo_text.split('\n'):
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      words = line.split()
      current = (words[1] if words[0] == 'ENTRY' else words[0]).lstrip('%')
      comps[current] = []
      continue
    line = re.sub(r', metadata=\{[^}]*\}', '', line)
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (.*)', line)
    if m and current is not None:
      comps[current].append(m.group(2))
      insts[m.group(1)] = m.group(2)
      if c := re.search(r'calls=%?([\w.\-]+)', m.group(2)):
        calls[m.group(1)] = c.group(1)
  return insts, calls, comps


def kind_of(name: str, index) -> str:
  """The kind (one of KINDS) of the thunk running instruction `name`."""
  insts, calls, comps = index
  text = insts.get(name, '') + '\n' + '\n'.join(comps.get(calls.get(name, ''), []))
  if 'convolution(' in text:
    window = re.search(r'window=\{size=(\d+)x(\d+)([^}]*)\}', text)
    if window is None:
      return KINDS[2]
    h, w, rest = int(window.group(1)), int(window.group(2)), window.group(3)
    if (h, w) == (3, 3) and 'stride' not in rest and 'rhs_dilate' not in rest:
      return KINDS[0]
    return KINDS[1] if min(h, w) >= 8 else KINDS[2]
  if re.search(r'\bdot\(', text):
    return KINDS[3]
  if re.search(r'\breduce\(', text):
    return KINDS[4]
  if re.search(r'\btranspose\(', text):
    return KINDS[5]
  if name.startswith('copy') or re.search(r'\bcopy\(', text):
    return KINDS[6]
  return KINDS[7]


def thunk_times(trace_dir: str) -> collections.Counter:
  """Nanoseconds per thunk name on XLA's intra-op threads, summed over the trace."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  if not files:
    raise SystemExit(f'error: the profiler wrote no trace under {trace_dir}.')
  times = collections.Counter()
  for plane in ProfileData.from_file(files[0]).planes:
    for line in plane.lines:
      if 'XLAEigen' not in line.name:
        continue
      for event in line.events:
        if not event.name.startswith(('ThunkExecutor', 'Slinky')):
          times[event.name] += event.duration_ns
  return times


def program_thunks(times: collections.Counter, index) -> collections.Counter:
  """The events that name an instruction of the program (the profiler also records others, such
  as 'end: NAME' markers, which would count a thunk twice)."""
  return collections.Counter({name: ns for name, ns in times.items() if name in index[0]})


def table(times: collections.Counter, index, runs: int, wall_s: float) -> str:
  by_kind = collections.Counter()
  for name, ns in times.items():
    by_kind[kind_of(name, index)] += ns
  total = sum(by_kind.values())
  out = [f'Thunk time on the intra-op threads: {total / runs / 1e6:.0f} ms per run, in a wall '
         f'time of {wall_s / runs * 1e3:.0f} ms per run.', '', '| HLO kind | ms / run | share |',
         '|---|---|---|']
  for kind, ns in by_kind.most_common():
    out.append(f'| {kind} | {ns / runs / 1e6:.0f} | {100 * ns / total:.1f}% |')
  return '\n'.join(out)


def main(argv=None):
  args, overrides = _parse(sys.argv[1:] if argv is None else argv)
  from benchmarks import throughput  # pylint: disable=g-import-not-at-top
  config = throughput._config(args.config, overrides)  # pylint: disable=protected-access
  host_note = throughput.setup_host(config, args.batch)
  import jax  # pylint: disable=g-import-not-at-top
  if args.sampler:
    program = throughput.OursSampler(config, args.batch, args.sample_steps,
                                     throughput.initial_params(config))
    hlo = program.gen.lower(*program.params, program.prompts, seed=0,
                            settings=program.settings).compile().as_text()
  else:
    program = throughput.OursTrain(config, args.batch)
    hlo = program.compiled.as_text()
  program.run(2)
  with tempfile.TemporaryDirectory(prefix='jaxdiff-profile-') as trace_dir:
    with jax.profiler.trace(trace_dir):
      t0 = time.perf_counter()
      program.run(args.runs)
      wall_s = time.perf_counter() - t0
    events = thunk_times(trace_dir)
  index = hlo_index(hlo)
  times = program_thunks(events, index)
  what = (f'guided DPM-Solver++(2M), {args.sample_steps} steps, {args.batch} images'
          if args.sampler else f'train step, batch {args.batch}')
  print(f'# {args.config} {" ".join(overrides)}: {what}, {args.runs} profiled runs, '
        f'{os.cpu_count()} cores, {time.strftime("%Y-%m-%d")}; host: {host_note or "as it is"}')
  print(table(times, index, args.runs, wall_s))
  other = sum(events.values()) - sum(times.values())
  print(f'(Other profiler events on those threads, not counted: {other / args.runs / 1e6:.0f} ms '
        'per run.)')
  print(f'\nThe {args.top} slowest thunks (ms per run):')
  for name, ns in times.most_common(args.top):
    print(f'  {ns / args.runs / 1e6:8.1f}  {name}  [{kind_of(name, index)}]  '
          f'{index[0].get(name, "")[:140]}')


if __name__ == '__main__':
  try:
    main()
  except ValueError as e:  # A bad config value or batch size: one line, not a traceback.
    raise SystemExit(f'error: {e}') from None
