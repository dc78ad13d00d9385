"""The layout of a training workdir and of a sweep root: every file and folder name, in one place.

  WORKDIR/checkpoints/STEP/         orbax's step folders; a finished one holds CHECKPOINT_MARKER
  WORKDIR/checkpoints.corrupt/STEP  set aside by runtime/checkpoint.py (never deleted): failed to
  WORKDIR/checkpoints.ignored/STEP    restore, or not written by orbax
  WORKDIR/metrics.jsonl             scalars, one JSON object per line (training/metrics.py)
  WORKDIR/train.log, error.log      the full log; tracebacks of errors (runtime/console.py)
  WORKDIR/samples/NAME_STEP.png     evaluation images, the step as 7 digits
  WORKDIR/text_cache/               cached caption embeddings (training/text_inputs.py)
  WORKDIR/tokenizer.json            text.vocab='bpe' (text/subword.py's TOKENIZER_FILE: text/ is a
                                      lower layer than runtime/, so that name stays there)
  WORKDIR/console.log, sweep_member.json       a sweep member's console and runner state
  ROOT/sweep.json, ROOT/<member>/, ROOT/report.*, ROOT/sweep.sbatch|sweep.yaml   a sweep root
                                      (launch/member.py names the members' folders)

The names are the ones workdirs have always had, so old workdirs still read. Free of jax: the
launchers (launch/) read workdirs on hosts without the training stack, so this imports only os, re.
"""

import os
import re

CHECKPOINTS = 'checkpoints'
CHECKPOINT_MARKER = '_CHECKPOINT_METADATA'  # Orbax writes it into a step folder it finished.
CORRUPT, IGNORED = 'corrupt', 'ignored'  # Kinds of set-aside step folders: checkpoints.KIND/.
METRICS = 'metrics.jsonl'
TRAIN_LOG = 'train.log'
ERROR_LOG = 'error.log'
SAMPLES = 'samples'
TEXT_CACHE = 'text_cache'
CONSOLE_LOG = 'console.log'  # A sweep member's stdout and stderr (the local runner's).
MEMBER_FILE = 'sweep_member.json'  # In a member's workdir: status, pid, return code, times.
SWEEP_FILE = 'sweep.json'  # In a sweep root: the config, the shared overrides and the members.
SLURM_SCRIPT, SLURM_OUTPUT = 'sweep.sbatch', 'slurm-%A_%a.out'  # %A_%a: SLURM's job_task ids.
K8S_MANIFEST = 'sweep.yaml'
REPORT_MD, REPORT_CSV, REPORT_LOSS = 'report.md', 'report.csv', 'report_loss.png'


# ----------------------------------------------------------------------------- checkpoints


def checkpoints(workdir: str) -> str:
  """WORKDIR/checkpoints: orbax's step folders."""
  return os.path.join(workdir, CHECKPOINTS)


def set_aside(workdir: str, kind: str) -> str:
  """WORKDIR/checkpoints.KIND (CORRUPT or IGNORED): where unusable step folders are moved."""
  return f'{checkpoints(workdir)}.{kind}'


def is_checkpoint(step_folder: str, items=()) -> bool:
  """Whether orbax wrote STEP_FOLDER: it holds CHECKPOINT_MARKER or, given `items`, every item."""
  return (os.path.isfile(os.path.join(step_folder, CHECKPOINT_MARKER))
          or (bool(items) and all(os.path.isdir(os.path.join(step_folder, i)) for i in items)))


def last_finished_checkpoint(workdir: str) -> int | None:
  """The highest step under checkpoints/ that orbax finished (saves under way are skipped)."""
  folder = checkpoints(workdir)
  names = os.listdir(folder) if os.path.isdir(folder) else ()
  return max((int(n) for n in names if n.isdigit() and is_checkpoint(os.path.join(folder, n))),
             default=None)


def saved_config(workdir: str, step: int) -> str:
  """The config a run saved with checkpoint STEP: orbax's JSON file of the `config` item."""
  return os.path.join(checkpoints(workdir), str(step), 'config', 'metadata')


# ----------------------------------------------------------------------------- logs and outputs


def metrics(workdir: str) -> str:
  """WORKDIR/metrics.jsonl."""
  return os.path.join(workdir, METRICS)


def train_log(workdir: str) -> str:
  """WORKDIR/train.log."""
  return os.path.join(workdir, TRAIN_LOG)


def error_log(workdir: str) -> str:
  """WORKDIR/error.log."""
  return os.path.join(workdir, ERROR_LOG)


def samples(workdir: str) -> str:
  """WORKDIR/samples: the evaluations' PNGs."""
  return os.path.join(workdir, SAMPLES)


def sample_png(workdir: str, name: str, step: int) -> str:
  """WORKDIR/samples/NAME_STEP.png, the step zero-padded to 7 digits (so names sort by step)."""
  return os.path.join(samples(workdir), f'{name}_{step:07d}.png')


def sample_pngs(workdir: str, name: str) -> list[str]:
  """Every WORKDIR/samples/NAME_STEP.png, oldest step first."""
  folder, pattern = samples(workdir), re.compile(rf'{re.escape(name)}_(\d+)\.png')
  found = [(m, f) for f in (os.listdir(folder) if os.path.isdir(folder) else ())
           for m in [pattern.fullmatch(f)] if m]
  return [os.path.join(folder, f) for m, f in sorted(found, key=lambda p: int(p[0][1]))]


def text_cache(workdir: str) -> str:
  """WORKDIR/text_cache: the captions' embeddings, built once and reused on resume."""
  return os.path.join(workdir, TEXT_CACHE)


# ----------------------------------------------------------------------------- sweeps


def console_log(workdir: str) -> str:
  """WORKDIR/console.log: a sweep member's console, as the local runner captures it."""
  return os.path.join(workdir, CONSOLE_LOG)


def member_file(workdir: str) -> str:
  """WORKDIR/sweep_member.json: the local runner's record of a member."""
  return os.path.join(workdir, MEMBER_FILE)


def sweep_file(root: str) -> str:
  """ROOT/sweep.json: what launch/sweep.py ran."""
  return os.path.join(root, SWEEP_FILE)


def report_plot(field: str) -> str:
  """The report's chart of a swept field (a file name: characters unsafe in one become '_')."""
  return f'report_{re.sub(r"[^A-Za-z0-9_.=-]", "_", field)}.png'
