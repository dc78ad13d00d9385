"""`model.pretrained`: a pipeline folder fills the config; contradictions and bad folders are refused."""
import json
import subprocess
import sys
import os

import pytest

from configs import pipeline, sd


def folder_with(tmp_path, *, skip=(), index=True, scheduler=None):
  """A pipeline folder's skeleton (no weights): what configs/pipeline.py reads."""
  root = tmp_path / 'sd'
  for name in pipeline.COMPONENTS:
    if name not in skip:
      (root / name).mkdir(parents=True)
  if index:
    (root / pipeline.INDEX).write_text(json.dumps({'_class_name': 'StableDiffusionPipeline'}))
  if 'scheduler' not in skip:
    (root / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(scheduler or {
        'beta_schedule': 'scaled_linear', 'beta_start': 0.00085, 'beta_end': 0.012,
        'num_train_timesteps': 1000, 'prediction_type': 'epsilon'}))
  if 'tokenizer' not in skip:
    (root / 'tokenizer' / 'tokenizer_config.json').write_text(json.dumps(
        {'model_max_length': 77}))
  return str(root)


def test_the_folder_fills_text_vae_and_diffusion(tmp_path):
  config = sd.get_config('tiny')
  config.model.pretrained = folder_with(tmp_path)
  filled = pipeline.fill(config)
  root = config.model.pretrained
  assert filled.model.family == 'sd'
  assert filled.text.encoder == 'pretrained' and filled.text.max_len == 77
  assert filled.text.pretrained_path == os.path.join(root, 'text_encoder')
  assert filled.autoencoder.path == os.path.join(root, 'vae')
  assert (filled.diffusion.schedule, filled.diffusion.prediction) == ('scaled_linear', 'eps')
  assert (filled.diffusion.beta_start, filled.diffusion.beta_end) == (0.00085, 0.012)
  assert filled.diffusion.zero_terminal_snr is False
  assert config.diffusion.schedule != 'scaled_linear'  # The caller's config is not changed.


def test_v_prediction_and_zero_terminal_snr_come_from_the_scheduler(tmp_path):
  config = sd.get_config('tiny')
  config.model.pretrained = folder_with(tmp_path, scheduler={
      'beta_schedule': 'scaled_linear', 'prediction_type': 'v_prediction',
      'rescale_betas_zero_snr': True})
  filled = pipeline.fill(config)
  assert filled.diffusion.prediction == 'v' and filled.diffusion.zero_terminal_snr is True


@pytest.mark.parametrize('scheduler,grid', [
    ({'_class_name': 'PNDMScheduler', 'steps_offset': 1, 'set_alpha_to_one': False},
     ('leading', 1, False)),  # SD 1.5's: no timestep_spacing, diffusers' default 'leading'.
    ({'_class_name': 'EulerDiscreteScheduler'}, ('linspace', 0, True)),
    ({'_class_name': 'DDIMScheduler', 'timestep_spacing': 'trailing'}, ('trailing', 0, True)),
])
def test_the_timestep_spacing_becomes_the_sampling_grid(tmp_path, scheduler, grid):
  config = sd.get_config('tiny')
  config.model.pretrained = folder_with(tmp_path, scheduler={'beta_schedule': 'scaled_linear',
                                                             **scheduler})
  filled = pipeline.fill(config).diffusion
  assert (filled.sampling_grid, filled.steps_offset, filled.set_alpha_to_one) == grid


def test_a_configs_own_grid_is_kept_and_an_unknown_spacing_is_named(tmp_path):
  config = sd.get_config('tiny')
  config.model.pretrained = folder_with(tmp_path)
  config.diffusion.sampling_grid = 'karras'  # A sampling choice: no pretrained_changes needed.
  assert pipeline.fill(config).diffusion.sampling_grid == 'karras'
  config.diffusion.steps_offset = 3  # The folder's is 0: the model's timesteps, refused.
  with pytest.raises(pipeline.PipelineError, match='diffusion.steps_offset=3 contradicts'):
    pipeline.fill(config)
  config.model.pretrained = folder_with(tmp_path / 'other', scheduler={
      'beta_schedule': 'scaled_linear', 'timestep_spacing': 'log'})
  with pytest.raises(pipeline.PipelineError, match=r"scheduler_config.json: "
                     r"timestep_spacing='log' is not supported \(supported: leading, trailing"):
    pipeline.fill(config)


def test_a_contradicting_field_is_refused_unless_listed_as_a_change(tmp_path):
  config = sd.get_config('tiny')
  config.model.pretrained = folder_with(tmp_path)
  config.diffusion.prediction = 'x0'
  with pytest.raises(pipeline.PipelineError, match=r"diffusion.prediction='x0' contradicts the "
                     r"pipeline folder .*\('eps'\).*model.pretrained_changes"):
    pipeline.fill(config)
  config.diffusion.prediction = 'v'
  config.diffusion.zero_terminal_snr = True
  config.model.pretrained_changes = ('diffusion.prediction', 'diffusion.zero_terminal_snr')
  filled = pipeline.fill(config)
  assert filled.diffusion.prediction == 'v' and filled.diffusion.zero_terminal_snr is True


@pytest.mark.parametrize('skip,index,match', [
    ((), False, 'model_index.json not found'),
    (('vae',), True, r'vae not found: a Stable Diffusion pipeline folder needs'),
    (('tokenizer',), True, 'tokenizer not found'),
])
def test_an_incomplete_folder_is_named(tmp_path, skip, index, match):
  config = sd.get_config('tiny')
  config.model.pretrained = folder_with(tmp_path, skip=skip, index=index)
  with pytest.raises(pipeline.PipelineError, match=match):
    pipeline.fill(config)


def test_a_missing_folder_and_an_unknown_schedule_are_named(tmp_path):
  config = sd.get_config('tiny')
  config.model.pretrained = str(tmp_path / 'nowhere')
  with pytest.raises(pipeline.PipelineError, match='is not a folder'):
    pipeline.fill(config)
  config.model.pretrained = folder_with(tmp_path, scheduler={'beta_schedule': 'exp'})
  with pytest.raises(pipeline.PipelineError, match="beta_schedule='exp' is not supported"):
    pipeline.fill(config)


def test_without_a_folder_nothing_changes():
  config = sd.get_config('tiny')
  config.model.family = 'unet'
  assert pipeline.fill(config) is config


def test_train_py_names_a_folder_without_model_index_in_one_line(tmp_path):
  folder = folder_with(tmp_path, index=False)
  result = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/sd.py:tiny', f'--workdir={tmp_path / "w"}',
       f'--config.model.pretrained={folder}', f'--config.data.path={tmp_path}'],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
      text=True, timeout=300, check=False)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'model_index.json not found' in last, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
