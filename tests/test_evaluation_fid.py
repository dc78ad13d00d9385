"""The FID Inception extractor (random weights in pytorch-fid's layout), FID, KID and the weights'
restricted .pth reader. No torch, no download: tools/random_inception.py writes the weights."""
import io
import os
import pickle
import zipfile
from unittest import mock

import numpy as np
import pytest

from evaluation import fid, inception
from models import pth
from tools.random_inception import random_state_dict, write_random_inception

NOISE = (0.0, 0.1, 0.2, 0.4)  # Gaussian noise added to the second set's images, per level.
N, SIDE, PROJ = 4, 16, 64  # Images per level, their side (resized to 299), FID's feature size.


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory):
  return write_random_inception(str(tmp_path_factory.mktemp('inception') / 'random.pth'), seed=0)


@pytest.fixture(scope='module')
def noisy_features(weights_file):
  """{noise level: pool3 features [N, 2048]} of the same smooth images, through the .pth."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
  waves = rng.uniform(0, 2, (N, 3, 3))  # Per image and channel: a plane wave (a, b, phase).
  base = np.stack([np.stack([0.5 + 0.5 * np.sin(2 * np.pi * (a * xx + b * yy) + c)
                             for a, b, c in w], -1) for w in waves])
  images = np.concatenate([np.clip(base + s * rng.standard_normal(base.shape), 0, 1)
                           for s in NOISE]).astype(np.float32)
  feats = np.asarray(inception.features(inception.load(weights_file).params, images))
  assert feats.shape == (len(NOISE) * N, inception.DIM) and np.isfinite(feats).all()
  return {s: feats[i * N:(i + 1) * N] for i, s in enumerate(NOISE)}


def _stats(features, max_sample=10_000, seed=0):
  return fid.accumulate(fid.empty(features.shape[1], max_sample, seed), features)


def _projected(features):  # A fixed orthonormal projection 2048 -> PROJ (sqrtm of 2048^2: ~1 min).
  q = np.linalg.qr(np.random.default_rng(1).standard_normal((inception.DIM, PROJ)))[0]
  return _stats(features @ q)


# ----------------------------------------------------------------------------- extractor


def test_weights_read_alike_from_pth_and_safetensors(weights_file, tmp_path):
  want = random_state_dict(seed=0)
  got = pth.read_pth(weights_file)
  assert list(got) == list(want)
  assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)
  from_pth = inception.load(weights_file)
  from_st = inception.load(write_random_inception(str(tmp_path / 'random.safetensors'), seed=0))
  assert from_pth.fingerprint == from_st.fingerprint
  assert from_pth.fingerprint != inception.load(
      write_random_inception(str(tmp_path / 'other.safetensors'), seed=1)).fingerprint
  back = inception.to_torch(from_pth.params)  # The inverse of the conversion.
  assert back.keys() == want.keys()
  assert all(np.array_equal(back[k], want[k]) for k in want if 'fc.' not in k and 'num_b' not in k)


def test_preprocess_takes_uint8_or_floats_and_resizes_to_299():
  images = np.random.default_rng(0).integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
  as_uint8 = np.asarray(inception.preprocess(images))
  as_float = np.asarray(inception.preprocess(images.astype(np.float32) / 255))
  assert as_uint8.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(as_uint8, as_float, atol=1e-6)
  assert -1 <= as_uint8.min() and as_uint8.max() <= 1
  full = np.random.default_rng(1).random((1, 299, 299, 3), np.float32)
  np.testing.assert_allclose(inception.preprocess(full), 2 * full - 1, atol=1e-6)  # No resize.
  with pytest.raises(ValueError, match=r'NHWC \[N, H, W, 3\].*\(2, 3, 16, 16\)'):
    inception.preprocess(np.zeros((2, 3, 16, 16), np.float32))


def test_fid_of_a_set_against_itself_is_zero(noisy_features):
  clean = _projected(noisy_features[0.0])
  assert abs(fid.frechet_distance(*fid.mean_cov(clean), *fid.mean_cov(clean))) < 1e-5
  x = np.random.default_rng(0).standard_normal((500, 32)) * np.linspace(0.1, 3, 32)
  assert abs(fid.fid(_stats(x), _stats(x))) < 1e-8


def test_fid_grows_with_the_noise_added_to_one_set(noisy_features):
  clean = fid.mean_cov(_projected(noisy_features[0.0]))
  scores = [fid.frechet_distance(*clean, *fid.mean_cov(_projected(noisy_features[s])))
            for s in NOISE]
  assert abs(scores[0]) < 1e-5 and all(np.diff(scores) > 0), scores


# ----------------------------------------------------------------------------- FID and KID


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
  rng = np.random.default_rng(0)
  mu1, mu2, v1, v2 = rng.normal(size=8), rng.normal(size=8), rng.uniform(0.1, 2, 8), rng.uniform(
      0.1, 2, 8)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
  assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)


def test_fid_warns_below_10000_images():
  x = np.random.default_rng(0).standard_normal((50, 4))
  with mock.patch.object(fid.logging, 'warning') as warning:
    fid.fid(_stats(x), _stats(x + 1))
  assert 'biased' in warning.call_args[0][0] and warning.call_args[0][1:3] == (50, 50)


def test_statistics_combined_from_two_halves_equal_one_pass():
  x = np.random.default_rng(0).standard_normal((301, 16)).astype(np.float32) + 3
  one = _stats(x, max_sample=40)
  both = fid.combine([_stats(x[:120], max_sample=40), _stats(x[120:], max_sample=40)])
  assert both.count == one.count == 301
  np.testing.assert_allclose(both.total, one.total, rtol=1e-13)
  np.testing.assert_allclose(both.outer, one.outer, rtol=1e-13)
  mu, sigma = fid.mean_cov(both)
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10,
                             atol=1e-12)
  assert both.sample.shape == (40, 16)  # A bounded sample of the rows, for KID.
  assert {r.tobytes() for r in both.sample} <= {r.tobytes() for r in x}
  with pytest.raises(ValueError, match='max_sample'):
    fid.combine([one, _stats(x, max_sample=10)])


def test_kept_sample_is_uniform_over_hosts_and_rows():
  counts = np.zeros(40)
  for seed in range(400):  # Two hosts, 30 and 10 rows; 8 kept: each row with p = 8/40.
    hosts = [_stats(np.arange(30.0)[:, None], 8, seed),
             fid.accumulate(fid.empty(1, 8, seed), np.arange(30.0, 40.0)[:, None])]
    counts[fid.combine(hosts).sample[:, 0].astype(int)] += 1
  np.testing.assert_allclose(counts / 400, 0.2, atol=0.07)
  assert abs(counts[:30].sum() / counts.sum() - 0.75) < 0.02


def test_kid_equals_the_unbiased_mmd_and_is_unbiased():
  rng = np.random.default_rng(0)
  a, b = rng.normal(0.5, 1, (60, 8)), rng.normal(0.5, 1, (60, 8))
  k = lambda x, y: (x @ y.T / 8 + 1) ** 3  # The full sets as the one subset, in float64.
  n = len(a)
  want = ((k(a, a).sum() - np.trace(k(a, a)) + k(b, b).sum() - np.trace(k(b, b))) / (n * (n - 1))
          - 2 * k(a, b).mean())
  assert fid.kid(a, b, num_subsets=1)[0] == pytest.approx(want, rel=1e-4, abs=1e-6)

  same = rng.normal(0.3, 1, (4000, 16)).astype(np.float32)  # Disjoint halves of one distribution.
  mean, std = fid.kid(same[:2000], same[2000:], num_subsets=50, max_subset_size=200)
  assert std > 0 and abs(mean) < std, (mean, std)
  shifted, _ = fid.kid(same[:2000], same[2000:] + 0.3, num_subsets=50, max_subset_size=200)
  assert shifted > 5 * std


def test_gather_is_the_identity_on_one_host_and_packing_keeps_every_bit():
  s = _stats(np.random.default_rng(0).standard_normal((7, 5)), max_sample=4)
  assert fid.gather(s) == [s]
  back = fid._unpack(fid._pack(s), s)  # pylint: disable=protected-access
  assert back.count == 7 and np.array_equal(back.sample, s.sample)
  assert np.array_equal(back.total, s.total) and np.array_equal(back.outer, s.outer)


# ----------------------------------------------------------------------------- weights files


def _zip_pth(path, payload: bytes):
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', payload)
    z.writestr('archive/version', '3\n')
  return str(path)


class _Runs:  # Pickles as a call of os.system: what loading an untrusted pickle can do.
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_pth_reader_refuses_a_pickle_that_names_another_global(tmp_path):
  marker = tmp_path / 'ran'
  payload = pickle.dumps({'conv.weight': _Runs(f'touch {marker}')}, protocol=2)
  for path in (_zip_pth(tmp_path / 'evil.pth', payload), str(tmp_path / 'evil_stream.pth')):
    if path.endswith('stream.pth'):  # The older stream format: 3 header pickles, then the dict.
      with open(path, 'wb') as f:
        for header in (0x1950a86a20f9469cfc6c, 1001, {'little_endian': True}):
          pickle.dump(header, f, protocol=2)
        f.write(payload)
    with pytest.raises(ValueError) as e:
      inception.load(path)
    message = str(e.value)
    assert message.startswith(path) and 'posix.system' in message and 'refused' in message
    assert '\n' not in message and not marker.exists()


def test_pth_reader_refuses_what_is_not_a_state_dict(tmp_path):
  with pytest.raises(ValueError, match='not a state dict'):
    pth.read_pth(_zip_pth(tmp_path / 'list.pth', pickle.dumps([1, 2], protocol=2)))
  (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='junk.pth'):
    pth.read_pth(str(tmp_path / 'junk.pth'))
  buf = io.BytesIO()
  pth.write_pth(str(tmp_path / 'ok.pth'), {'a': np.arange(6, dtype=np.float32).reshape(2, 3)})
  with zipfile.ZipFile(tmp_path / 'ok.pth') as z:  # Cut the storage short: refused, not read past.
    entries = {n: z.read(n) for n in z.namelist()}
  with zipfile.ZipFile(buf, 'w') as z:
    for n, data in entries.items():
      z.writestr(n, data[:8] if n.endswith('data/0') else data)
  (tmp_path / 'short.pth').write_bytes(buf.getvalue())
  with pytest.raises(ValueError, match=r"'a' .*reaches past its storage of 2 elements"):
    pth.read_pth(str(tmp_path / 'short.pth'))


def test_conversion_errors_name_the_tensor():
  good = random_state_dict(seed=0)
  missing = {k: v for k, v in good.items() if k != 'Mixed_6b.branch7x7_2.conv.weight'}
  with pytest.raises(ValueError, match=r"src: tensor 'Mixed_6b.branch7x7_2.conv.weight' \(shape "
                     r'\(128, 128, 1, 7\)\) is missing'):
    inception.convert(missing, 'src')
  wrong = {**good, 'Mixed_7c.branch_pool.bn.running_var': np.ones(3, np.float32)}
  with pytest.raises(ValueError, match=r"'Mixed_7c.branch_pool.bn.running_var' has shape \(3,\), "
                     r'but the FID Inception-v3 needs \(192,\)'):
    inception.convert(wrong, 'src')
  with pytest.raises(ValueError, match=r"tensor 'AuxLogits.fc.weight' is not in the FID"):
    inception.convert({**good, 'AuxLogits.fc.weight': np.ones(2)}, 'src')
  no_extras = {k: v for k, v in good.items() if not k.startswith('fc.') and 'num_batches' not in k}
  assert inception.convert(no_extras, 'src').keys() == inception.convert(good, 'src').keys()


def test_convert_command_writes_safetensors_with_the_same_tensors(weights_file, tmp_path, capsys):
  out = str(tmp_path / 'w.safetensors')
  assert inception.main([f'--convert={weights_file}', f'--out={out}']) == out
  assert inception.load(out).fingerprint in capsys.readouterr().out
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  assert load_file(out).keys() == random_state_dict(seed=0).keys()
  with pytest.raises(SystemExit) as e:
    inception.main([f'--convert={tmp_path / "absent.pth"}', f'--out={out}'])
  assert str(e.value).startswith('error: ') and 'absent.pth not found' in str(e.value)
