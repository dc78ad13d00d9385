"""AutoencoderKL in Flax: a tiny random VAE in diffusers layout, posterior math, loader errors.

The tiny folder is written by `write_vae` from an enumeration of diffusers' tensor names and
PyTorch shapes made here, independently of the loader's converter. `test_matches_diffusers`
compares against diffusers' PyTorch AutoencoderKL and is skipped unless torch and diffusers import.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import autoencoder
from models import vae_loading

TINY = {
    '_class_name': 'AutoencoderKL', 'in_channels': 3, 'out_channels': 3,
    'block_out_channels': [8, 16], 'layers_per_block': 1, 'latent_channels': 4,
    'norm_num_groups': 4, 'act_fn': 'silu', 'sample_size': 16, 'scaling_factor': 0.18215,
    'shift_factor': None, 'down_block_types': ['DownEncoderBlock2D'] * 2,
    'up_block_types': ['UpDecoderBlock2D'] * 2, 'mid_block_add_attention': True,
    'force_upcast': True,
}


def diffusers_shapes(cfg, old_attention=False):
  """{diffusers tensor name: PyTorch shape} of an AutoencoderKL config (SD layout)."""
  shapes = {}

  def conv(p, c_in, c_out, k=3):
    shapes.update({f'{p}.weight': (c_out, c_in, k, k), f'{p}.bias': (c_out,)})

  def norm(p, c):
    shapes.update({f'{p}.weight': (c,), f'{p}.bias': (c,)})

  def resnet(p, c_in, c_out):
    norm(f'{p}.norm1', c_in)
    conv(f'{p}.conv1', c_in, c_out)
    norm(f'{p}.norm2', c_out)
    conv(f'{p}.conv2', c_out, c_out)
    if c_in != c_out:
      conv(f'{p}.conv_shortcut', c_in, c_out, k=1)

  def mid(p, c):
    resnet(f'{p}.resnets.0', c, c)
    if cfg.get('mid_block_add_attention', True):
      a = f'{p}.attentions.0'
      norm(f'{a}.group_norm', c)
      names = ('query', 'key', 'value', 'proj_attn') if old_attention else (
          'to_q', 'to_k', 'to_v', 'to_out.0')
      for n in names:
        shapes.update({f'{a}.{n}.weight': (c, c), f'{a}.{n}.bias': (c,)})
    resnet(f'{p}.resnets.1', c, c)

  chans, n, lat = cfg['block_out_channels'], cfg['layers_per_block'], cfg['latent_channels']
  conv('encoder.conv_in', cfg['in_channels'], chans[0])
  prev = chans[0]
  for i, c in enumerate(chans):
    for j in range(n):
      resnet(f'encoder.down_blocks.{i}.resnets.{j}', prev, c)
      prev = c
    if i < len(chans) - 1:
      conv(f'encoder.down_blocks.{i}.downsamplers.0.conv', c, c)
  mid('encoder.mid_block', chans[-1])
  norm('encoder.conv_norm_out', chans[-1])
  conv('encoder.conv_out', chans[-1], 2 * lat)
  conv('quant_conv', 2 * lat, 2 * lat, k=1)
  conv('post_quant_conv', lat, lat, k=1)
  rev = chans[::-1]
  conv('decoder.conv_in', lat, rev[0])
  mid('decoder.mid_block', rev[0])
  prev = rev[0]
  for i, c in enumerate(rev):
    for j in range(n + 1):
      resnet(f'decoder.up_blocks.{i}.resnets.{j}', prev, c)
      prev = c
    if i < len(rev) - 1:
      conv(f'decoder.up_blocks.{i}.upsamplers.0.conv', c, c)
  norm('decoder.conv_norm_out', chans[0])
  conv('decoder.conv_out', chans[0], cfg['out_channels'])
  return shapes


def random_tensors(shapes, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in shapes.items():
    if len(shape) == 1 and 'norm' in name and name.endswith('.weight'):
      out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
      out[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
  return out


def write_vae(folder, cfg=None, tensors=None, old_attention=False, seed=0):
  """A diffusers-layout VAE folder (config.json + safetensors) with random weights."""
  cfg = dict(TINY if cfg is None else cfg)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  if tensors is None:
    tensors = random_tensors(diffusers_shapes(cfg, old_attention), seed)
  save_file(tensors, os.path.join(folder, vae_loading.WEIGHTS))
  return str(folder)


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  return write_vae(tmp_path_factory.mktemp('vae') / 'tiny')


@pytest.fixture(scope='module')
def vae(tiny_dir):
  return vae_loading.load_vae(tiny_dir)


@pytest.fixture(scope='module')
def images():
  return jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), jnp.float32, -1.0, 1.0)


# ----------------------------------------------------------------------------- shapes, config


def test_config_and_shapes(vae, images):
  cfg = vae.config
  assert cfg.downsample_factor == 2 and cfg.latent_channels == 4
  assert cfg.scaling_factor == pytest.approx(0.18215) and cfg.shift_factor == 0.0
  assert cfg.force_upcast is True and cfg.block_out_channels == (8, 16)
  mean, logvar = jax.jit(vae.encode)(vae.params, images)
  assert mean.shape == logvar.shape == (3, 8, 8, 4)
  assert mean.dtype == logvar.dtype == jnp.float32
  out = jax.jit(vae.decode)(vae.params, mean)
  assert out.shape == (3, 16, 16, 3) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 1e-3
  # The encoder is not translation-trivial: different images, different latents.
  assert float(jnp.max(jnp.abs(mean[0] - mean[1]))) > 1e-3


def test_params_are_the_checkpoint_tensors(vae, tiny_dir):
  """OIHW -> HWIO for convs, (out, in) -> (in, out) for the attention projections."""
  t = load_file(os.path.join(tiny_dir, vae_loading.WEIGHTS))
  enc = vae.params['encoder']
  np.testing.assert_array_equal(enc['conv_in']['kernel'],
                                t['encoder.conv_in.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(enc['mid']['attn']['to_out']['kernel'],
                                t['encoder.mid_block.attentions.0.to_out.0.weight'].T)
  np.testing.assert_array_equal(vae.params['decoder']['up_1_res_0']['norm1']['scale'],
                                t['decoder.up_blocks.1.resnets.0.norm1.weight'])
  np.testing.assert_array_equal(vae.params['decoder']['up_0_upsample']['bias'],
                                t['decoder.up_blocks.0.upsamplers.0.conv.bias'])


def test_jit_and_chunked_decode(vae, images):
  mean, logvar = vae.encode(vae.params, images)
  jmean, jlogvar = jax.jit(vae.encode)(vae.params, images)
  np.testing.assert_allclose(jmean, mean, atol=1e-5)
  np.testing.assert_allclose(jlogvar, logvar, atol=1e-5)
  full = jax.jit(vae.decode)(vae.params, mean)
  chunked = jax.jit(vae.decode_chunked, static_argnums=2)(vae.params, mean, 2)  # 3 = 2 + 1 pad
  assert chunked.shape == full.shape
  np.testing.assert_allclose(chunked, full, atol=1e-5)
  with pytest.raises(ValueError, match='chunk=0'):
    vae.decode_chunked(vae.params, mean, 0)


@pytest.mark.full  # A dtype variant (float32: the tests above).
def test_bfloat16_compute(tiny_dir, vae, images):
  vae16 = vae_loading.load_vae(tiny_dir, dtype='bfloat16')
  mean, logvar = jax.jit(vae16.encode)(vae16.params, images)
  out = jax.jit(vae16.decode)(vae16.params, mean)
  assert mean.dtype == logvar.dtype == out.dtype == jnp.float32
  ref_mean, _ = jax.jit(vae.encode)(vae.params, images)
  assert float(jnp.max(jnp.abs(mean - ref_mean))) < 0.1
  assert vae16.fingerprint != vae.fingerprint and 'bfloat16' in vae16.fingerprint


def test_input_shape_errors(vae):
  with pytest.raises(ValueError, match=r'images must be NHWC.*\(2, 15, 16, 3\)'):
    vae.encode(vae.params, jnp.zeros((2, 15, 16, 3)))
  with pytest.raises(ValueError, match=r'latents must be NHWC \[B, H, W, 4\]'):
    vae.decode(vae.params, jnp.zeros((2, 8, 8, 3)))


# ----------------------------------------------------------------------------- posterior


def test_posterior_closed_forms():
  mean = jnp.full((2, 4, 4, 2), 0.5)
  logvar = jnp.full((2, 4, 4, 2), np.log(0.25))
  post = autoencoder.DiagonalGaussian(mean, logvar)
  z = jax.vmap(post.sample)(jax.random.split(jax.random.key(0), 2000))
  assert abs(float(z.mean()) - 0.5) < 0.01 and abs(float(z.std()) - 0.5) < 0.01
  # KL(N(m, s^2) || N(0, 1)) = 0.5 (m^2 + s^2 - 1 - log s^2) per element, summed per example.
  per_elem = 0.5 * (0.25 + 0.25 - 1 - np.log(0.25))
  np.testing.assert_allclose(post.kl(), [32 * per_elem] * 2, rtol=1e-6)
  zero = autoencoder.DiagonalGaussian(jnp.zeros((3, 2, 2, 4)), jnp.zeros((3, 2, 2, 4)))
  np.testing.assert_array_equal(zero.kl(), np.zeros(3))
  rand = autoencoder.DiagonalGaussian(*jax.random.normal(jax.random.key(2), (2, 3, 2, 2, 4)))
  assert np.all(np.asarray(rand.kl()) > 0)


def test_moments_split_and_clip():
  moments = jnp.concatenate([jnp.ones((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 50.0)], axis=-1)
  moments = moments.at[..., -1].set(-100.0)
  post = autoencoder.DiagonalGaussian.from_moments(moments)
  np.testing.assert_array_equal(post.mean, np.ones((1, 2, 2, 4)))
  assert float(post.logvar.max()) == 20.0 and float(post.logvar.min()) == -30.0


def test_latent_scaling_round_trip(tmp_path, images):
  cfg = dict(TINY, scaling_factor=0.5, shift_factor=0.1)
  vae = vae_loading.load_vae(write_vae(tmp_path / 'shifted', cfg))
  assert vae.config.shift_factor == pytest.approx(0.1)
  mean, _ = vae.encode(vae.params, images)
  deterministic = jnp.full_like(mean, -30.0)  # std = exp(-15): the sample is the mean.
  z = vae.to_latents(mean, deterministic, jax.random.key(0))
  np.testing.assert_allclose(z, (mean - 0.1) * 0.5, atol=1e-5)
  np.testing.assert_allclose(vae.from_latents(z), mean, atol=1e-5)


def test_per_channel_latent_statistics(tmp_path, images):
  """config.json's latents_mean/latents_std: (z - mean) * scaling_factor / std per channel, as
  diffusers' pipelines apply them; save_vae writes them back."""
  mu, sd = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 4.0]
  vae = vae_loading.load_vae(write_vae(tmp_path / 'stats', dict(TINY, scaling_factor=0.5,
                                                                latents_mean=mu, latents_std=sd)))
  assert vae.config.latents_mean == tuple(mu) and vae.config.latents_std == tuple(sd)
  mean, _ = vae.encode(vae.params, images)
  z = vae.to_latents(mean, jnp.full_like(mean, -30.0), jax.random.key(0))
  np.testing.assert_allclose(z, (mean - np.array(mu)) * 0.5 / np.array(sd), atol=1e-5)
  np.testing.assert_allclose(vae.from_latents(z), mean, atol=1e-5)
  saved = vae_loading.save_vae(tmp_path / 'saved', vae.config, vae.params)
  with open(os.path.join(saved, 'config.json')) as f:
    written = json.load(f)
  assert written['latents_mean'] == mu and written['latents_std'] == sd


# ----------------------------------------------------------------------------- loader


def test_old_attention_names_load_the_same(tmp_path, vae, tiny_dir, images):
  new = load_file(os.path.join(tiny_dir, vae_loading.WEIGHTS))
  renames = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  old = {}
  for name, value in new.items():
    for a, b in renames.items():
      name = name.replace(f'attentions.0.{a}.', f'attentions.0.{b}.')
    old[name] = value
  assert any('proj_attn' in n for n in old)
  vae_old = vae_loading.load_vae(write_vae(tmp_path / 'old', tensors=old))
  jax.tree.map(np.testing.assert_array_equal, vae_old.params, vae.params)
  assert vae_old.fingerprint.split(':')[-1] == vae.fingerprint.split(':')[-1]


def test_variant_without_mid_attention_or_quant_convs(tmp_path, images):
  cfg = dict(TINY, mid_block_add_attention=False, use_quant_conv=False,
             use_post_quant_conv=False, block_out_channels=[8, 8, 16], layers_per_block=2,
             down_block_types=['DownEncoderBlock2D'] * 3, up_block_types=['UpDecoderBlock2D'] * 3)
  tensors = {n: v for n, v in random_tensors(diffusers_shapes(cfg)).items()
             if 'quant_conv' not in n}
  vae = vae_loading.load_vae(write_vae(tmp_path / 'plain', cfg, tensors=tensors))
  assert 'quant_conv' not in vae.params and 'attn' not in vae.params['encoder']['mid']
  mean, _ = vae.encode(vae.params, images)
  assert mean.shape == (3, 4, 4, 4) and vae.config.downsample_factor == 4
  assert vae.decode(vae.params, mean).shape == (3, 16, 16, 3)


def test_sd_vae_layout_converts():
  """The SD 1.x/2.x/SDXL VAE config: every tensor maps onto the module (no weights needed)."""
  sd = dict(TINY, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
            norm_num_groups=32, down_block_types=['DownEncoderBlock2D'] * 4,
            up_block_types=['UpDecoderBlock2D'] * 4)
  cfg = autoencoder.VAEConfig(**{k: v for k, v in sd.items() if not k.startswith('_')
                                 and v is not None})
  shapes = diffusers_shapes(sd)
  assert sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863  # sd-vae-ft-mse's count.
  get = lambda names, shape: np.broadcast_to(np.float32(0), shape)  # No memory.
  params = vae_loading.convert_diffusers_weights(get, cfg)
  module = autoencoder.AutoencoderKL(cfg)
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  abstract = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)['params']
  shape = lambda t: jax.tree.map(lambda a: tuple(a.shape), t)
  assert shape(nn.meta.unbox(abstract)) == shape(params) and cfg.downsample_factor == 8


def test_missing_files(tmp_path, tiny_dir):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    vae_loading.load_vae(str(tmp_path / 'nowhere'))
  pipeline = tmp_path / 'pipeline'
  os.makedirs(pipeline)
  os.symlink(tiny_dir, pipeline / 'vae')
  with pytest.raises(FileNotFoundError, match=r'config\.json not found.*point at .*vae'):
    vae_loading.load_vae(str(pipeline))
  no_weights = tmp_path / 'no_weights'
  os.makedirs(no_weights)
  with open(no_weights / 'config.json', 'w') as f:
    json.dump(TINY, f)
  with pytest.raises(FileNotFoundError, match='diffusion_pytorch_model.safetensors not found'):
    vae_loading.load_vae(str(no_weights))


@pytest.mark.parametrize('field, value, match', [
    ('act_fn', 'gelu', "act_fn='gelu' is not supported"),
    ('down_block_types', ['DownEncoderBlock2D', 'AttnDownEncoderBlock2D'], 'down_block_types='),
    ('up_block_types', ['UpDecoderBlock2D'], r"up_block_types=\['UpDecoderBlock2D'\]"),
    ('_class_name', 'AutoencoderTiny', "_class_name='AutoencoderTiny' is not supported"),
    ('norm_num_groups', 3, 'norm_num_groups=3 must divide'),
    ('block_out_channels', None, "required field 'block_out_channels'"),
    ('latents_mean', [0.0] * 4, 'latents_mean and latents_std must be given together'),
    ('latents_mean', [0.0] * 3, 'latents_mean must be a list of 4 numbers'),
])
def test_unsupported_config(tmp_path, tiny_dir, field, value, match):
  cfg = dict(TINY, **{field: value})
  if field == 'latents_mean' and len(value) == 3:
    cfg['latents_std'] = [1.0] * 4
  folder = tmp_path / 'bad'
  os.makedirs(folder)
  with open(folder / 'config.json', 'w') as f:
    json.dump(cfg, f)
  os.symlink(os.path.join(tiny_dir, vae_loading.WEIGHTS), folder / vae_loading.WEIGHTS)
  with pytest.raises(ValueError, match=match) as err:
    vae_loading.load_vae(str(folder))
  assert 'config.json' in str(err.value)


def test_wrong_missing_and_extra_tensors(tmp_path, tiny_dir):
  good = load_file(os.path.join(tiny_dir, vae_loading.WEIGHTS))
  name = 'decoder.up_blocks.0.resnets.1.conv2.weight'
  wrong = dict(good, **{name: np.zeros((16, 16, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=rf"'{name}' has shape \(16, 16, 1, 1\).*\(16, 16, 3, 3\)"):
    vae_loading.load_vae(write_vae(tmp_path / 'wrong', tensors=wrong))
  missing = {n: v for n, v in good.items() if n != 'encoder.conv_out.bias'}
  with pytest.raises(ValueError, match="'encoder.conv_out.bias' is missing"):
    vae_loading.load_vae(write_vae(tmp_path / 'missing', tensors=missing))
  extra = dict(good, **{'decoder.up_blocks.1.resnets.2.norm1.weight': np.ones(8, np.float32)})
  with pytest.raises(ValueError, match=r'1 tensors are not used.*up_blocks\.1\.resnets\.2'):
    vae_loading.load_vae(write_vae(tmp_path / 'extra', tensors=extra))


# ----------------------------------------------------------------------------- vs diffusers


@pytest.mark.parametrize('overrides', [
    {},
    {'block_out_channels': [8, 16, 16], 'layers_per_block': 2, 'latent_channels': 3,
     'down_block_types': ['DownEncoderBlock2D'] * 3, 'up_block_types': ['UpDecoderBlock2D'] * 3},
])
def test_matches_diffusers(tmp_path, overrides):
  """diffusers' PyTorch AutoencoderKL with random weights vs ours, float32, <= 1e-4."""
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  torch.manual_seed(0)
  torch.set_num_threads(1)
  cfg = {k: v for k, v in dict(TINY, **overrides).items() if not k.startswith('_')}
  cfg['shift_factor'] = 0.0
  ref = diffusers.AutoencoderKL(**cfg).eval()
  with torch.no_grad():  # Non-trivial norms (diffusers initialises them to 1 and 0).
    for name, p in ref.named_parameters():
      if 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  ref.save_pretrained(str(tmp_path / 'ref'), safe_serialization=True)
  assert set(load_file(str(tmp_path / 'ref' / vae_loading.WEIGHTS))) == set(diffusers_shapes(cfg))
  ours = vae_loading.load_vae(str(tmp_path / 'ref'))

  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)  # NCHW
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(x)).latent_dist
    z = torch.randn(dist.mean.shape)
    decoded = ref.decode(z).sample
  mean, logvar = ours.encode(ours.params, jnp.asarray(x.transpose(0, 2, 3, 1)))
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  assert np.max(np.abs(np.asarray(mean) - nhwc(dist.mean))) <= 1e-4
  assert np.max(np.abs(np.asarray(logvar) - nhwc(dist.logvar))) <= 1e-4
  out = ours.decode(ours.params, jnp.asarray(nhwc(z)))
  assert np.max(np.abs(np.asarray(out) - nhwc(decoded))) <= 1e-4


def test_frozen_weights_are_split_over_fsdp(vae, images):
  """On a (data 2, fsdp 4) mesh the VAE's larger kernels are split over 'fsdp' on their output
  channels, small arrays are replicated, and the jitted encoder gives the unsharded result."""
  from runtime import sharding
  from runtime.settings import MeshSpec
  mesh = sharding.make_mesh(MeshSpec(data=2, fsdp=4, tensor=1, dcn_data=1, dcn_fsdp=1,
                                     logical_axis_rules=()))
  placed = sharding.put_frozen(vae.params, mesh)
  conv = placed['decoder']['up_0_res_0']['conv1']['kernel']  # 3x3x16x16 = 2304 elements.
  assert conv.sharding.spec == sharding.P()  # Below min_size: replicated.
  small = sharding.frozen_shardings(vae.params, mesh, min_size=1000)
  assert small['decoder']['up_0_res_0']['conv1']['kernel'].spec == sharding.P(
      None, None, None, 'fsdp')
  assert small['decoder']['up_0_res_0']['conv1']['bias'].spec == sharding.P()  # 16 elements.
  split = jax.tree.map(lambda x, s: jax.device_put(x, s), vae.params, small)
  assert len(split['decoder']['up_0_res_0']['conv1']['kernel'].addressable_shards[0].data
             .reshape(-1)) == 2304 // 4
  mean, _ = jax.jit(vae.encode)(split, images)
  np.testing.assert_allclose(mean, vae.encode(vae.params, images)[0], atol=1e-5)
