"""Parity of evaluation.inception and evaluation.fid with pytorch-fid (and clean-fid's KID).

Skipped unless torch and pytorch_fid import (the project needs neither). Random weights in
pytorch-fid's layout (tools/random_inception.py) are loaded by both sides: pytorch-fid's
`InceptionV3([3])` (use_fid_inception=True, its download replaced by the same state dict) and
`evaluation.inception`. Measured on CPU (torch 2.14.1, pytorch-fid 0.3.0, clean-fid 0.1.35):
features within 2.3e-5 of pytorch-fid's (values up to ~37) at 64, 299 and 400 px; FID within
4e-8 relative of `calculate_frechet_distance` on the same features (7e-7 on pytorch-fid's own);
KID within 5e-5 relative of clean-fid's `kernel_distance` (float32 kernel sums on both sides).
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytorch_fid_inception = pytest.importorskip('pytorch_fid.inception')

# pylint: disable=g-import-not-at-top,wrong-import-position
from pytorch_fid.fid_score import calculate_frechet_distance

from evaluation import fid, inception
from models import pth
from tools.random_inception import random_state_dict, write_random_inception

TOLERANCE = 1e-4
SIZES = (64, 299, 400)  # Upsampled, as is, downsampled (no antialiasing on either side).


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory):
  return write_random_inception(str(tmp_path_factory.mktemp('ref') / 'random.pth'), seed=3)


@pytest.fixture(scope='module')
def reference(weights_file, monkeypatch_module):
  state = torch.load(weights_file, weights_only=True)  # torch reads our torch-free .pth.
  monkeypatch_module.setattr(pytorch_fid_inception, 'load_state_dict_from_url',
                             lambda *args, **kwargs: state)
  return pytorch_fid_inception.InceptionV3([3]).eval()


@pytest.fixture(scope='module')
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as m:
    yield m


@pytest.fixture(scope='module')
def both_features(weights_file, reference):
  """{size: (ours, pytorch-fid's)} pool3 features of the same 5 random images per size."""
  params = inception.load(weights_file).params
  rng = np.random.default_rng(0)
  out = {}
  for size in SIZES:
    x = rng.random((5, size, size, 3), np.float32)
    with torch.no_grad():
      want = reference(torch.from_numpy(x).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
    out[size] = np.asarray(inception.features(params, x)), want
  return out


def test_tensor_names_and_shapes_are_pytorch_fids(reference):
  del reference  # Its fid_inception_v3() loaded our random file with load_state_dict(strict=True).
  model = pytorch_fid_inception.fid_inception_v3()
  assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == inception.torch_shapes()


def test_reads_what_torch_saves_in_both_formats(tmp_path):
  state = {k: torch.from_numpy(v) for k, v in random_state_dict(seed=5).items()}
  fingerprints = set()
  for zipped in (True, False):
    path = str(tmp_path / f'saved_{zipped}.pth')
    torch.save(state, path, _use_new_zipfile_serialization=zipped)
    got = pth.read_pth(path)
    assert list(got) == list(state)
    assert all(np.array_equal(got[k], v.numpy()) and got[k].dtype == v.numpy().dtype
               for k, v in state.items())
    fingerprints.add(inception.load(path).fingerprint)
  assert len(fingerprints) == 1
  views = {'a': torch.arange(10.0)[2:8].view(2, 3).t(), 'b': torch.arange(4, dtype=torch.int64)}
  torch.save(views, str(tmp_path / 'views.pth'))  # Offsets and strides into one storage.
  got = pth.read_pth(str(tmp_path / 'views.pth'))
  assert np.array_equal(got['a'], views['a'].numpy()) and np.array_equal(got['b'], [0, 1, 2, 3])


@pytest.mark.parametrize('size', SIZES)
def test_features_match_pytorch_fid(both_features, size, record_property):
  ours, want = both_features[size]
  err = float(np.abs(ours - want).max())
  record_property('max_abs_diff', err)
  print(f'{size} px: max |ours - pytorch-fid| = {err:.3g} (features up to {np.abs(want).max():.3g}'
        f', spread across images {want.std(0).mean():.3g})')
  assert want.std(0).mean() > 1e-3  # The images give different features.
  assert err <= TOLERANCE, err


def test_fid_matches_pytorch_fid(both_features):
  # 2048-d sqrtm takes about a minute on a CPU: both sides get the same fixed 128-d projection.
  q = np.linalg.qr(np.random.default_rng(0).standard_normal((inception.DIM, 128)))[0]
  (a, a_ref), (b, b_ref) = both_features[64], both_features[400]
  a, b, a_ref, b_ref = (np.asarray(f, np.float64) @ q for f in (a, b, a_ref, b_ref))
  s1 = fid.accumulate(fid.empty(128), a)
  s2 = fid.accumulate(fid.empty(128), b)
  ours = fid.fid(s1, s2)
  want = calculate_frechet_distance(a_ref.mean(0), np.cov(a_ref, rowvar=False),
                                    b_ref.mean(0), np.cov(b_ref, rowvar=False))
  same = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False),
                                    b.mean(0), np.cov(b, rowvar=False))
  print(f'FID ours {ours:.9g}, pytorch-fid on our features {same:.9g}, on its own {want:.9g}')
  assert ours == pytest.approx(same, rel=1e-6)
  assert ours == pytest.approx(want, rel=1e-3)


def test_kid_matches_clean_fid():
  clean_fid = pytest.importorskip('cleanfid.fid')
  rng = np.random.default_rng(0)
  f1 = rng.random((1100, inception.DIM), np.float32)
  f2 = (rng.random((1200, inception.DIM)) * 1.05).astype(np.float32)
  ours, _ = fid.kid(f1, f2, num_subsets=5, seed=7)
  np.random.seed(7)
  want = clean_fid.kernel_distance(f1, f2, num_subsets=5)
  print(f'KID ours {ours:.9g}, clean-fid {want:.9g}, relative {abs(ours - want) / abs(want):.3g}')
  assert ours == pytest.approx(want, rel=1e-3)
