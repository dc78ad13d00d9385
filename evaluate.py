"""Scores a folder of generated samples on the Shapes benchmark (docs/shapes.md).

  python evaluate.py --samples DIR [--out results.json]

DIR holds manifest.jsonl (one JSON object per line with "file", a PNG path relative
to DIR, and "prompt") and the PNGs. Prints a table; writes JSON (default DIR/scores.json).
"""
import argparse
import json
import os

from evaluation import shapes_scorer


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--samples', required=True, help='folder with manifest.jsonl and PNGs')
  parser.add_argument('--out', default=None, help='results JSON (default: SAMPLES/scores.json)')
  parser.add_argument('--verbose', action='store_true', help='on an error, print the traceback')
  args = parser.parse_args(argv)
  from runtime import console  # pylint: disable=g-import-not-at-top
  return console.run_or_exit(lambda: _evaluate(args), verbose=args.verbose)


def _evaluate(args) -> dict:
  results = shapes_scorer.score_folder(args.samples)
  print(shapes_scorer.format_table(results))
  out = args.out or os.path.join(args.samples, 'scores.json')
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'Wrote {out}')
  return results


if __name__ == '__main__':
  main()
