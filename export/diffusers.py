"""Exports a fine-tuned Stable Diffusion workdir as a diffusers pipeline folder.

  python -m export.diffusers --workdir=runs/sd15_mine --out=/models/sd15_mine
  python -m export.diffusers --workdir=runs/sd15_mine --out=/models/sd15_mine --step=4000 \
      --noema --overwrite
  python -m export.diffusers --workdir=runs/sd15_lora --out=/models/sd15_lora   # a LoRA file
  python -m export.diffusers --workdir=runs/sd15_lora --out=/models/sd15_merged --merge

The folder is what `StableDiffusionPipeline.from_pretrained` reads (and `sample.py --pretrained`,
and `model.pretrained` of the next run). It is the pipeline folder the run started from
(`model.pretrained`) with the trained weights in place:

  unet/               the source's config.json (fine-tuning changes no architecture) and the
                      trained weights, float32 diffusion_pytorch_model.safetensors (diffusers'
                      names and PyTorch layouts: models/sd_loading.py:save_sd_unet)
  text_encoder/       the trained CLIP when the run trained it (text.finetune: text/clip.py:
                      save_clip); else copied
  everything else     copied as it is: model_index.json, vae/, tokenizer/, scheduler/,
                      feature_extractor/, safety_checker/, any other file or sub-folder
  RUN_RECORD          the workdir, checkpoint step, EMA or raw weights, a digest of the run's
                      config and the export time

The weights are the EMA parameters unless --noema, as sample.py samples (with optim.ema_decay=0,
configs/sd.py's default, both are the same). The folder is written beside --out under a
temporary name and renamed at the end, so an interrupted export leaves nothing half-written.
Only the 'sd' family exports: jaxdiff's own U-Net has no diffusers pipeline.

A LoRA run (model.lora.rank > 0) exports its adapters alone: --out gets
pytorch_lora_weights.safetensors (models/lora_loading.py), which diffusers'
`pipe.load_lora_weights(OUT)` loads over the source pipeline, and RUN_RECORD. --merge instead
writes the whole pipeline folder, the adapters (their update times --lora_scale) folded into the
U-Net's kernels (`models.lora.merged`).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import sys
from typing import Any

from absl import app, flags

from configs import pipeline, specs
from models import family, lora, lora_loading, sd_family, sd_loading
from runtime import checkpoint, console
from sampling import from_checkpoint
from text import clip

RUN_RECORD = 'jaxdiff_run.json'  # Beside model_index.json: where the exported weights came from.


class ExportError(ValueError):
  """A workdir that cannot be exported, or an --out that must not be written."""


# ----------------------------------------------------------------------------- checks


def _inside(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies under it (links resolved)."""
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


def check_out(out: str, *, overwrite: bool, keep: dict[str, str]) -> str:
  """The absolute --out, after refusing one that is a file, a non-empty folder (unless
  `overwrite`), or one whose replacement would touch a folder of `keep` ({what: folder})."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out) and not os.path.isdir(out):
    raise ExportError(f'--out={out} is a file: name a folder to write the pipeline to.')
  for what, folder in keep.items():
    folder = os.path.abspath(folder)
    if _inside(folder, out) or _inside(out, folder):
      where = 'over' if _inside(folder, out) else 'inside'
      raise ExportError(f'--out={out} would write {where} the {what} {folder}: name a folder '
                        'outside it.')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ExportError(f'--out={out} exists and is not empty: pass --overwrite to replace it, or '
                      'name a new folder.')
  return out


def _sd_settings(saved: dict, workdir: str, merge: bool = False) -> Any:
  """`settings_of` for `from_checkpoint.restore`: the run's settings, refusing before any weight
  is read a run that cannot export (or --merge, not a LoRA run) (IncompatibleCheckpoint: the same
  for every step, so the restore stops at once rather than trying older checkpoints)."""
  try:
    settings = specs.from_saved(saved)
  except pipeline.PipelineError as e:  # E.g. model.pretrained's folder is gone.
    raise checkpoint.IncompatibleCheckpoint(
        f'{workdir}: {str(e).rstrip(".")}; the export copies the folder the run started from, so '
        'it must be where the run read it.') from None
  except ValueError as e:
    raise checkpoint.IncompatibleCheckpoint(f'{workdir}: {e}') from None
  if not isinstance(settings.model, sd_family.SDSpec):
    vae = settings.autoencoder.path
    hint = (f'; its autoencoder ({vae}) is a diffusers AutoencoderKL folder already '
            '(tools/train_autoencoder.py writes VAEs trained here as such folders)' if vae else '')
    raise checkpoint.IncompatibleCheckpoint(
        f"{workdir} trained model.family={saved.get('model', {}).get('family')!r}, jaxdiff's own "
        "denoiser, which has no diffusers pipeline: only the 'sd' family (a run started from a "
        f'diffusers folder, model.pretrained; configs/sd.py) exports{hint}.')
  folder = settings.model.folder
  for field, path in (('text.pretrained_path', settings.text.pretrained_path),
                      ('autoencoder.path', settings.autoencoder.path)):
    if os.path.dirname(os.path.abspath(path)) != folder:
      raise checkpoint.IncompatibleCheckpoint(
          f'{workdir}: {field}={path!r} is not a component of model.pretrained={folder!r} '
          "(model.pretrained_changes): the export copies the pipeline folder's own components, "
          'which are not what this run used.')
  if merge and not family.lora(settings.model):
    raise checkpoint.IncompatibleCheckpoint(
        f'--merge: {workdir} is not a LoRA run (model.lora.rank=0), so there are no adapters to '
        'merge: leave out --merge (its export is the whole fine-tuned pipeline).')
  return settings


def _check_frozen(restored: from_checkpoint.Restored, workdir: str) -> None:
  """Refuses to copy a frozen component whose weights are no longer those the run trained with
  (`checkpoint.check_frozen`, the digests training/builder.py records with each checkpoint)."""
  parts = {checkpoint.FROZEN_AUTOENCODER: (lambda: restored.autoencoder.params,
                                           lambda: restored.autoencoder.path),
           checkpoint.FROZEN_TEXT: (lambda: restored.text_encoder.init(None),
                                    lambda: restored.settings.text.pretrained_path)}
  recorded = restored.saved_config.get(checkpoint.FROZEN_KEY) or {}  # Older runs: none recorded.
  for name in sorted(set(recorded) & set(parts)):
    params, folder = parts[name]
    checkpoint.check_frozen(restored.saved_config, name, params(), folder(), workdir)


# ----------------------------------------------------------------------------- writing


def _write_json(path: str, value: Any) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2)
    f.write('\n')


def _move_into_place(tmp: str, out: str) -> None:
  """Renames the finished `tmp` to `out`; a non-empty `out` is moved aside first, then deleted."""
  if not (os.path.isdir(out) and os.listdir(out)):
    os.replace(tmp, out)  # (An empty folder is replaced.)
    return
  old = f'{tmp}.replaced'
  os.replace(out, old)
  os.replace(tmp, out)
  shutil.rmtree(old)


@contextlib.contextmanager
def _staged(out: str):
  """A new folder beside `out` (hidden, temporary) to write into: renamed to `out` when the block
  completes, removed if it fails."""
  tmp = os.path.join(os.path.dirname(out), f'.{os.path.basename(out)}.export-{os.getpid()}')
  if os.path.exists(tmp):  # Left by a killed export of an earlier process with this id.
    shutil.rmtree(tmp)
  os.makedirs(tmp)  # (Not mkdtemp: the folder gets the usual permissions, not 0700.)
  try:
    yield tmp
    _move_into_place(tmp, out)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def write_lora(out: str, unet: Any, adapters: dict[str, Any], spec: lora.LoRASpec,
               record: dict[str, Any]) -> str:
  """Writes LoRA `adapters` (of `SDUNet(unet)`, rank and scale `spec`) as the folder `out`:
  lora_loading.FILE and RUN_RECORD (`out` replaced if it exists: check it first with
  `check_out`). Returns the absolute `out`."""
  out = os.path.abspath(out)
  with _staged(out) as tmp:
    lora_loading.save(tmp, unet, adapters, spec)
    _write_json(os.path.join(tmp, RUN_RECORD), record)
  return out


def write_pipeline(source: str, out: str, params: dict[str, Any], record: dict[str, Any], *,
                   unet: str, text_encoder: str, progress: bool = False) -> str:
  """Writes pipeline folder `source` with trained `params` as `out` (see the module docstring).

  Args:
    source: the diffusers pipeline folder the params were trained from.
    out: the folder to write; replaced if it exists (check it first with `check_out`).
    params: {'unet': SDUNet params, 'text': CLIPTextTransformer params (only if trained)}.
    record: what RUN_RECORD holds.
    unet, text_encoder: their sub-folders of `source`.
    progress: show a progress bar on stderr.
  Returns:
    The absolute `out`.
  """
  source, out = os.path.abspath(source), os.path.abspath(out)
  entries = sorted(n for n in os.listdir(source) if not n.startswith('.'))  # (.cache, .git...)
  missing = [n for n in (unet, text_encoder) if n not in entries]
  if missing:
    raise ExportError(f'{source} has no {" or ".join(missing)}: not a Stable Diffusion pipeline '
                      'folder.')
  with _staged(out) as tmp, console.progress(len(entries) + 1, 'export', 'part',
                                             disable=not progress) as bar:
    for name in entries:
      bar.set_postfix_str(name)
      src, dst = os.path.join(source, name), os.path.join(tmp, name)
      if name == unet:
        sd_loading.save_sd_unet(dst, params['unet'], source=src)
      elif name == text_encoder and 'text' in params:
        clip.save_clip(dst, params['text'], source=src)
      elif os.path.isdir(src):
        shutil.copytree(src, dst)  # Links (a hub cache's) are copied as the files they name.
      else:
        shutil.copy2(src, dst)
      bar.update()
    bar.set_postfix_str(RUN_RECORD)
    _write_json(os.path.join(tmp, RUN_RECORD), record)
    bar.update()
  return out


def config_digest(saved: dict) -> str:
  """sha256 (16 hex digits) of a saved config's canonical JSON."""
  text = json.dumps(saved, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def export_workdir(workdir: str, out: str, *, step: int | None = None, use_ema: bool = True,
                   overwrite: bool = False, merge: bool = False, lora_scale: float = 1.0,
                   progress: bool = False) -> dict[str, Any]:
  """Exports checkpoint `step` (default: the newest intact one) of an 'sd' family workdir as a
  diffusers pipeline folder `out` (a LoRA run: its LoRA file, or with `merge` the pipeline with
  the adapters, scaled by `lora_scale`, merged); returns what RUN_RECORD holds (and 'out')."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'--workdir={workdir}: no such folder (a training run\'s workdir).')
  if lora_scale != 1.0 and not merge:
    raise ExportError(f'--lora_scale={lora_scale} scales the adapters that --merge folds into the '
                      'U-Net; a LoRA file is scaled where it is loaded (diffusers: pipe.'
                      'set_adapters or cross_attention_kwargs={"scale": ...}): pass --merge too, '
                      'or leave the flag out.')
  out = check_out(out, overwrite=overwrite, keep={'workdir': workdir})  # Before restoring.
  restored = from_checkpoint.restore(workdir, step, use_ema=use_ema,
                                     settings_of=lambda saved: _sd_settings(saved, workdir, merge))
  model = restored.settings.model
  check_out(out, overwrite=overwrite, keep={'workdir': workdir, 'source folder': model.folder})
  _check_frozen(restored, workdir)
  trained_text, adapters = 'text' in restored.params, family.lora(model)
  record = {
      'workdir': workdir, 'step': restored.step, 'ema': use_ema,
      'config_digest': config_digest(restored.saved_config), 'source': model.folder,
      'text_encoder': 'trained' if trained_text else 'copied',
      'exported_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
  params = restored.params
  if adapters:
    record['lora'] = {'rank': adapters.rank, 'alpha': adapters.effective_alpha,
                      'targets': list(adapters.targets), 'merged': merge}
    if not merge:
      if trained_text:
        raise ExportError(f'{workdir} trained its text encoder (text.finetune) beside the LoRA '
                          'adapters, and a LoRA file holds the U-Net\'s adapters alone: pass '
                          '--merge to export the whole pipeline.')
      del record['text_encoder']
      record['lora']['file'] = lora_loading.FILE
      write_lora(out, model.network, params['unet'], adapters, record)
      return dict(record, out=out)
    record['lora']['scale'] = lora_scale
    params = restored.weights(lora_scale)
    params = dict(params, unet=lora.merged(params['unet'], adapters))
  write_pipeline(model.folder, out, params, record,
                 unet=os.path.basename(model.unet_folder),
                 text_encoder=os.path.basename(restored.settings.text.pretrained_path),
                 progress=progress)
  return dict(record, out=out)


# ----------------------------------------------------------------------------- command line


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  flag = flags.FLAGS
  if not flag.workdir or not flag.out:
    sys.exit('error: pass --workdir (a Stable Diffusion fine-tuning run) and --out (the diffusers '
             'folder to write).')
  console.quiet_library_noise()
  if not flag.verbose:
    console.quiet_info()
  record = console.run_or_exit(lambda: export_workdir(
      flag.workdir, flag.out, step=flag.step, use_ema=flag.ema, overwrite=flag.overwrite,
      merge=flag.merge, lora_scale=flag.lora_scale, progress=True), verbose=flag.verbose)
  weights_kind = 'EMA' if record['ema'] else 'raw'
  adapters = record.get('lora')
  if adapters and not adapters['merged']:
    print(f"Exported step {record['step']} ({weights_kind} LoRA adapters, rank {adapters['rank']}, "
          f"alpha {adapters['alpha']:g}) to {os.path.join(record['out'], adapters['file'])}: "
          f"pipe.load_lora_weights({record['out']!r}) applies them to a pipeline of "
          f"{record['source']}.", file=sys.stderr)
  else:
    merged = f"; LoRA merged at scale {adapters['scale']:g}" if adapters else ''
    print(f"Exported step {record['step']} ({weights_kind} weights; text encoder "
          f"{record['text_encoder']}{merged}) to {record['out']}.", file=sys.stderr)
  print(json.dumps(record))


def _define_flags():
  flags.DEFINE_string('workdir', None, 'The training workdir (model.family=\'sd\').')
  flags.DEFINE_string('out', None, 'The diffusers pipeline folder to write.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest intact one).')
  flags.DEFINE_bool('ema', True, 'Export the EMA parameters (--noema: the raw ones).')
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists and is not empty.')
  flags.DEFINE_bool('merge', False, 'A LoRA run: write the whole pipeline with the adapters merged '
                    'into the U-Net (default: the adapters alone, as a diffusers LoRA file).')
  flags.DEFINE_float('lora_scale', 1.0, 'With --merge: scale the adapters\' update (0: the base).')
  flags.DEFINE_bool('verbose', False, 'On an error, print the whole traceback.')


if __name__ == '__main__':
  # Flags only when run as a program: the tests import this module beside sample.py's flags.
  _define_flags()
  app.run(main)
