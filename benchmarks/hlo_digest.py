"""Digest of the train step's optimised XLA program, without its source locations.

  python -m benchmarks.hlo_digest --config=configs/base.py --batch=32 [--out=step.hlo]

Builds the step as training does (`training.builder.build_trainer`, through
`benchmarks.throughput.OursTrain`), compiles it, and prints a SHA-256 of its optimised HLO text
with the per-op metadata and the stack-frame tables (file names and lines) removed. Two trees
that print the same digest run the same program, so a refactor that moves code but keeps the
digest changes neither speed nor results. Run it with JAXDIFF_TRACE_CACHE=off
JAXDIFF_CACHE_DIR=off so each tree traces and compiles its own.
"""
import argparse
import hashlib
import re
import sys


def program_text(compiled) -> str:
  """The optimised HLO of a compiled jax function, without what names source files and lines."""
  text = re.sub(r', metadata=\{[^}]*\}', '', compiled.as_text())
  text = re.sub(r'^HloModule \S+', 'HloModule m', text, flags=re.M)
  return '\n'.join(line for line in text.splitlines() if not re.match(r'^\d+ ("|\{)', line))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/base.py', help='Config file[:variant].')
  parser.add_argument('--batch', type=int, default=32, help='Global batch size.')
  parser.add_argument('--out', default='', help='Also write the program text here.')
  args, overrides = parser.parse_known_args(argv)  # --config.x=v overrides.
  from benchmarks import throughput  # pylint: disable=import-outside-toplevel
  ours = throughput.OursTrain(throughput._config(args.config, overrides), args.batch)  # pylint: disable=protected-access
  text = program_text(ours.compiled)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
  print(f'{args.config} batch {args.batch}: {hashlib.sha256(text.encode()).hexdigest()} '
        f'({len(text.splitlines())} lines)')


if __name__ == '__main__':
  main(sys.argv[1:])
