"""Sampling from a trained tiny workdir: files, manifest, determinism, no retrace, CFG at w=1."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import specs
from diffusion import guidance, samplers, schedules
from diffusion import spec as settings
from evaluation import shapes_scorer as scoring
from models import denoiser
from sampling import from_checkpoint
from runtime import checkpoint, sharding
from runtime import state as state_lib
from runtime.settings import MeshSpec
from training import builder


@pytest.fixture(scope='module')
def workdir(tiny_run):
  return tiny_run.workdir  # The shared 4-step tiny run (tests/conftest.py), with its eval grid.


@pytest.fixture(scope='module')
def loaded(workdir):
  return from_checkpoint.load(workdir, settings_of=specs.from_saved)


def sample_to_folder(loaded, out, prompts, *, seed=0, samples_per_prompt=1, **changes):
  """What sample.py does with its flags (`changes`, as settings.overridden takes them)."""
  recipe = settings.overridden(loaded.settings.sampler, **changes)
  return from_checkpoint.sample_to_folder(loaded, out, prompts, recipe, seed=seed,
                                          samples_per_prompt=samples_per_prompt)


@pytest.mark.full  # Reads the shared tiny Shapes run (4 steps and an eval grid: ~100 s, 2 cores).
def test_training_writes_an_eval_grid(workdir):
  grids = glob.glob(os.path.join(workdir, 'samples', 'grid_*.png'))
  assert [os.path.basename(g) for g in grids] == ['grid_0000004.png']
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents*'))


@pytest.mark.full  # Reads the shared tiny Shapes run (4 steps and an eval grid: ~100 s, 2 cores).
def test_parameters_only_restore_reads_one_copy_of_the_weights(workdir, loaded):
  """Sampling restores the EMA (or raw) parameters alone, equal to those of the full state."""
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  run = specs.from_saved(ckpt.saved_config())
  mesh = sharding.make_mesh(MeshSpec.data_parallel())
  trainer = builder.build_trainer(run, mesh)
  full, _ = ckpt.restore(checkpoint.abstract_with_shardings(trainer.abstract, trainer.shardings))
  raw, step = ckpt.restore_params(
      state_lib.abstract_params(mesh, run.mesh.logical_axis_rules, unet=trainer.unet,
                                text_encoder=trainer.text_encoder,
                                input_shape=state_lib.diffusion_shape(run.data.image_size, None)),
      use_ema=False)
  ckpt.close()
  assert step == loaded.step == 4
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                  jax.tree.leaves(b)))
  assert same(loaded.unet_params, full.ema_params['unet'])
  assert same(raw, full.params) and not same(raw['unet'], full.ema_params['unet'])


@pytest.mark.full  # Reads the shared tiny Shapes run (4 steps and an eval grid: ~100 s, 2 cores).
def test_sample_to_folder_writes_pngs_grid_and_manifest(loaded, tmp_path):
  out = str(tmp_path / 'samples')
  prompts = ['a red square', 'a blue circle to the left of a green square']
  summary = sample_to_folder(loaded, out, prompts, sampler='ddim', num_steps=3,
                             guidance_scale=2.0, seed=7, samples_per_prompt=2)
  assert summary['num_images'] == 4 and summary['checkpoint_step'] == 4
  rows = [json.loads(line) for line in open(os.path.join(out, 'manifest.jsonl'))]
  assert [r['prompt'] for r in rows] == [prompts[0]] * 2 + [prompts[1]] * 2
  assert [r['seed'] for r in rows] == [7, 8, 9, 10]
  assert {(r['sampler'], r['steps'], r['guidance'], r['checkpoint_step'], r['grid']) for r in rows
          } == {('ddim', 3, 2.0, 4, 'uniform_t')}
  assert all(r['options'] == {'eta': 0.0} for r in rows)  # The config's DDIM eta.
  for r in rows:
    assert os.path.getsize(os.path.join(out, r['file'])) > 0
  assert os.path.exists(os.path.join(out, 'grid.png'))
  scores = scoring.score_folder(out)  # The evaluation command reads this folder as it is.
  assert scores['all']['n'] == 4
  # Same seeds -> same images, on any batch composition (deterministic sampler).
  again = str(tmp_path / 'again')
  sample_to_folder(loaded, again, prompts[:1], sampler='ddim', num_steps=3, guidance_scale=2.0,
                   seed=7, samples_per_prompt=2)
  a = open(os.path.join(out, '00001.png'), 'rb').read()
  b = open(os.path.join(again, '00001.png'), 'rb').read()
  assert a == b


@pytest.mark.full  # Compiles three samplers (~20 s); refusals are unit-tested in test_specs.
def test_sampler_options_reach_the_sampler_or_are_refused(loaded, tmp_path):
  prompts = ['a red square', 'a white circle']
  kw = dict(num_steps=3, guidance_scale=2.0, seed=5)

  def sample(name, sampler, **opts):
    out = str(tmp_path / name)
    sample_to_folder(loaded, out, prompts, sampler=sampler, options=opts, **kw)
    rows = [json.loads(line) for line in open(os.path.join(out, 'manifest.jsonl'))]
    return [open(os.path.join(out, r['file']), 'rb').read() for r in rows], rows[0]

  sde, row = sample('sde', 'dpmpp_2m_sde')
  assert row['options'] == {}  # Its own default, eta = 1.
  sde_eta0, row = sample('sde_eta0', 'dpmpp_2m_sde', eta=0.0)
  assert row['options'] == {'eta': 0.0}
  ode, _ = sample('ode', 'dpmpp_2m')
  assert sde_eta0 == ode and sde != ode  # eta = 0 reached the sampler: it is dpmpp_2m.
  _, row = sample('heun', 'heun', s_churn=5.0, s_noise=None)
  assert row['options'] == {'s_churn': 5.0} and row['grid'] == 'karras'
  for sampler, opts in [('ddim', {'s_churn': 1.0}), ('heun', {'eta': 0.5}),
                        ('dpmpp_2m', {'s_noise': 1.0})]:
    with pytest.raises(ValueError, match=f"sampler '{sampler}' takes no option"):
      sample('refused', sampler, **opts)
    assert not os.path.exists(tmp_path / 'refused')  # Refused before anything was written.


@pytest.mark.full  # Reads the shared tiny Shapes run (4 steps and an eval grid: ~100 s, 2 cores).
def test_guidance_scale_and_seed_do_not_recompile(loaded):
  gen, unet_params, text_params = loaded.generator, loaded.unet_params, loaded.text_params
  prompts = ['a red square', 'a cyan triangle']
  ddim = settings.overridden(loaded.settings.sampler, sampler='ddim', num_steps=3,
                             guidance_scale=1.0)
  x1 = gen(unet_params, text_params, prompts, seed=0, settings=ddim)
  count = gen.compiled_count()
  changed = ddim.replace(guidance_scale=5.0, guidance_rescale=0.3,
                         guidance_interval=(-3.0, 3.0)).with_options(eta=0.5)
  x2 = gen(unet_params, text_params, prompts, seed=1, settings=changed)
  assert gen.compiled_count() == count
  assert not np.allclose(x1, x2)
  gen(unet_params, text_params, prompts, seed=0, settings=ddim.replace(num_steps=4))
  assert gen.compiled_count() == count + 1  # The step count is a shape: it does compile.


@pytest.mark.full  # Two more sampler programs; guidance's algebra: tests/test_diffusion_guidance.py.
def test_guidance_scale_one_is_the_conditional_model(loaded):
  gen, unet_params, text_params = loaded.generator, loaded.unet_params, loaded.text_params
  unet, text, spec = gen.unet, gen.text, gen.spec
  prompts = ['a red square', 'a white circle']
  recipe = settings.overridden(loaded.settings.sampler, sampler='ddim', num_steps=3,
                               guidance_scale=1.0)
  guided = gen(unet_params, text_params, prompts, seed=3, settings=recipe)
  # Reference: the sampler driven by the conditional denoiser alone, same noise.
  ids = np.asarray(text.tokenize(prompts))
  emb, mask, pooled = text.encode(text_params, ids)
  cond = {'emb': emb, 'mask': mask, 'pooled': pooled}
  model_fn = denoiser.x0_model(unet, unet_params, spec)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.array([3, 4], jnp.int32))
  noise = jax.vmap(lambda k: jax.random.normal(k, (16, 16, 3)))(keys)
  logsnrs = schedules.sampling_logsnrs(spec, 3)
  ref = samplers.get_sampler('ddim')(lambda x, l: model_fn(x, l, cond), noise, logsnrs,
                                     jax.random.fold_in(keys[0], 1), eta=jnp.float32(0.0))
  np.testing.assert_allclose(guided, np.clip(ref, -1, 1), atol=2e-5)


def test_sample_cli_choices_match_the_library():
  import sample  # pylint: disable=import-outside-toplevel
  del sample
  from absl import flags  # pylint: disable=import-outside-toplevel
  assert flags.FLAGS['sampler'].parser.enum_values == list(samplers.SAMPLERS)
  assert flags.FLAGS['grid'].parser.enum_values == list(schedules.SAMPLING_GRIDS)
  options = {o for opts in samplers.SAMPLER_OPTIONS.values() for o in opts}
  assert options <= set(flags.FLAGS)  # Every sampler option has its flag (--churn: s_churn).


@pytest.mark.full
def test_sampler_benchmark_runs_on_a_workdir(workdir, tmp_path, monkeypatch):
  from benchmarks import samplers as bench  # pylint: disable=import-outside-toplevel
  assert [bench.steps_for_nfe('heun', n) for n in (5, 10, 20)] == [3, 5, 10]  # 2N-1 NFE
  assert bench.steps_for_nfe('ddpm', 20) == 20
  out = str(tmp_path / 'bench')
  bench.main([f'--workdir={workdir}', f'--out={out}', '--nfe=2', '--guidance=2',
              '--extra=ddpm:3,ddim:2:eta=1,dpmpp_2m_sde:2:eta=0',
              '--samplers=ddim,heun', '--guidance_sweep=1', '--sweep_sampler=ddim',
              '--sweep_nfe=2', '--samples_per_prompt=1', '--ode_reference=ddim:2'])
  with open(os.path.join(out, 'results.json')) as f:
    rows = json.load(f)['rows']
  assert [(r['sampler'], r['options'], r['steps'], r['nfe'], r['w']) for r in rows] == [
      ('ddim', {}, 2, 2, 2.0), ('heun', {}, 1, 1, 2.0), ('ddpm', {}, 3, 3, 2.0),
      ('ddim', {'eta': 1.0}, 2, 2, 2.0), ('dpmpp_2m_sde', {'eta': 0.0}, 2, 2, 2.0),
      ('ddim', {}, 2, 2, 1.0)]
  assert [r['grid'] for r in rows] == ['uniform_t', 'karras', 'uniform_t', 'uniform_t',
                                       'uniform_t', 'uniform_t']
  for r in rows:
    assert r['n'] == len(scoring.benchmark_prompts()) and 0 <= r['full'] <= 1
    np.testing.assert_allclose(r['se'], np.sqrt(r['full'] * (1 - r['full']) / r['n']))
  with pytest.raises(ValueError, match='threshold_percentile=150'):
    bench.main([f'--workdir={workdir}', f'--out={out}', '--threshold=150'])
  for bad, message in [('plms:20', 'sampler.name'), ('ddim:x', 'expected sampler:NFE'),
                       ('euler:5:eta=1', "'euler' takes no option eta")]:
    with pytest.raises(ValueError, match=message):
      bench.main([f'--workdir={workdir}', f'--out={out}', f'--extra={bad}'])
  # Deterministic cells get their distance to the ODE reference (ddim at 2 NFE here: itself).
  assert rows[0]['ode_ref_mad'] == 0.0 and rows[1]['ode_ref_mad'] > 0.0
  assert 'ode_ref_mad' not in rows[2] and 'ode_ref_mad' not in rows[3]  # Noise injected.
  # 2M-SDE at eta = 0 is 2M, an ODE solver; at 2 steps (a DDIM step, then x0) it is the reference.
  assert rows[4]['ode_ref_mad'] == 0.0
  assert rows[5]['ode_ref_mad'] == 0.0  # ddim at w = 1 is the reference for w = 1
  table = bench.markdown(rows, [2, 3], 'ddim', 2)
  assert '| distance to the ODE reference' in table and '| heun | ' in table
  assert '| ddim (eta=1) | ' in table and '| dpmpp_2m_sde (eta=0) | ' in table
  assert f"| ddim | {100 * rows[0]['full']:.1f} ({100 * rows[0]['se']:.1f}) |" in table
  assert '| w (ddim, 2 NFE) |' in table and table.count('\n| 1.0 |') == 1
  # The raw weights and a guidance interval, recorded in results.json.
  loaded = []
  real_load = from_checkpoint.load
  monkeypatch.setattr(from_checkpoint, 'load',
                      lambda *a, **kw: loaded.append(kw) or real_load(*a, **kw))
  thresholded = []
  real_threshold = guidance.dynamic_threshold
  def spy(x0, pct):  # Records the percentile each evaluation runs with.
    jax.debug.callback(lambda v: thresholded.append(float(v)), pct)
    return real_threshold(x0, pct)
  monkeypatch.setattr(guidance, 'dynamic_threshold', spy)
  out2 = str(tmp_path / 'bench_raw')
  bench.main([f'--workdir={workdir}', f'--out={out2}', '--nfe=2', '--extra=', '--samplers=ddim',
              '--guidance_sweep=', '--samples_per_prompt=1', '--noema', '--guidance_interval=-5,5',
              '--guidance_rescale=0.5', '--threshold=0', '--ode_reference='])
  with open(os.path.join(out2, 'results.json')) as f:
    raw = json.load(f)
  assert raw['ema'] is False and raw['guidance_interval'] == [-5.0, 5.0]
  assert raw['guidance_rescale'] == 0.5 and raw['threshold'] == 0.0
  assert thresholded and set(thresholded) == {0.0}  # 0 is static clipping, not 'off' or 99.5.
  assert loaded == [{'settings_of': specs.from_saved, 'use_ema': False, 'sampling_grid': None}]


@pytest.mark.full  # Reads the shared tiny Shapes run (4 steps and an eval grid: ~100 s, 2 cores).
def test_another_resolution_is_refused_unless_allowed(workdir, tmp_path):
  """The tiny model trained at 16 px (attention at 8 px, level 1): --image_size=32 is refused with
  the trained size named, and when allowed, samples 32 px images with attention at the same level
  (8 px at training, 16 px here) from the same parameters."""
  with pytest.raises(ValueError, match=r'--image_size=32: this model was trained at 16 px '
                                       r'\(data.image_size\).*--allow_other_resolution'):
    from_checkpoint.load(workdir, settings_of=specs.from_saved, image_size=32)
  with pytest.raises(ValueError, match='--image_size=17 must be divisible by'):
    from_checkpoint.load(workdir, settings_of=specs.from_saved, image_size=17,
                         allow_other_resolution=True)
  big = from_checkpoint.load(workdir, settings_of=specs.from_saved, image_size=32,
                            allow_other_resolution=True)
  assert big.generator.unet.attn_levels == (1,)
  out = str(tmp_path / 'big')
  sample_to_folder(big, out, ['a red square'], num_steps=2)
  from PIL import Image
  assert Image.open(os.path.join(out, '00000.png')).size == (32, 32)
  assert json.loads(open(os.path.join(out, 'manifest.jsonl')).readline())['image_size'] == 32
  loaded16 = from_checkpoint.load(workdir, settings_of=specs.from_saved, image_size=16)
  assert loaded16.generator.image_size == 16  # As trained.
