"""Scores a folder of generated samples: on the Shapes benchmark (docs/shapes.md), or against a
dataset's reference statistics with FID, KID, CLIP score and CMMD (docs/evaluation.md).

  python evaluate.py --samples DIR [--out results.json]
  python evaluate.py --samples DIR --reference stats.npz --metrics fid,kid,clip,cmmd \
      --inception pt_inception-2015-12-05-6726825d.pth --clip /models/clip-vit-large-patch14

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
  parser.add_argument('--reference', default='', help='a dataset\'s statistics '
                      '(python -m tools.reference); without it: the Shapes benchmark')
  parser.add_argument('--metrics', default='fid,kid,clip,cmmd', help='with --reference: which')
  parser.add_argument('--inception', default='', help='the FID Inception weights (FID, KID)')
  parser.add_argument('--clip', default='', help='a CLIPModel folder (CLIP score, CMMD)')
  parser.add_argument('--verbose', action='store_true', help='on an error, print the traceback')
  args = parser.parse_args(argv)
  from runtime import host  # pylint: disable=g-import-not-at-top
  host.setup()  # Before jax starts: malloc keeps freed memory on a CPU run.
  from runtime import console  # pylint: disable=g-import-not-at-top
  return console.run_or_exit(lambda: _evaluate(args), verbose=args.verbose)


def _evaluate(args) -> dict:
  if args.reference:
    results = _quality(args)
    print('\n'.join(f'{k:>12}  {v:.6g}' for k, v in results.items() if not isinstance(v, str)))
  else:
    results = shapes_scorer.score_folder(args.samples)
    print(shapes_scorer.format_table(results))
  out = args.out or os.path.join(args.samples, 'scores.json')
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'Wrote {out}')
  return results


def _quality(args) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from evaluation import quality  # pylint: disable=g-import-not-at-top
  from runtime import console  # pylint: disable=g-import-not-at-top
  metrics = tuple(m for m in args.metrics.split(',') if m)
  extractors = quality.load_extractors(args.inception, args.clip)
  quality.available(extractors, metrics, field='--metrics')
  entries = shapes_scorer.read_manifest(args.samples)
  first = np.asarray(Image.open(os.path.join(args.samples, entries[0]['file'])).convert('RGB'))
  reference = quality.load_reference(args.reference, extractors.stamp(first.shape[0]), extractors,
                                     field='--reference')
  features = quality.Features(extractors)
  with console.progress(len(entries), 'features', 'img') as bar:
    for start in range(0, len(entries), extractors.batch):
      chunk = entries[start:start + extractors.batch]
      pixels = np.stack([np.asarray(Image.open(os.path.join(args.samples, e['file']))
                                    .convert('RGB')) for e in chunk])
      features.add(pixels, [e['prompt'] for e in chunk])
      bar.update(len(chunk))
  results = quality.scores(reference, features, metrics)
  return dict(results, reference=args.reference, inception=reference.stamp.get('inception', ''),
              clip=reference.stamp.get('clip', ''))


if __name__ == '__main__':
  main()
