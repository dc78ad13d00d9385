"""text.pretrained_path that is no folder: one-line errors naming the field, no silent hub lookups.

Nothing here touches the network: `huggingface_hub.snapshot_download` is replaced by a fake that
records its calls and either fails as an offline machine does or returns a folder.
"""
import os
import subprocess
import sys

import huggingface_hub
import pytest

from configs import base, specs
from text import encoders, pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _FakeHub(list):
  """The repo ids `snapshot_download` was called with; offline unless `result` is a folder."""
  result = None

  def snapshot_download(self, repo_id, **kwargs):
    self.append(repo_id)
    if self.result is not None:
      return self.result
    raise ConnectionError("Max retries exceeded with url: /api/models/org/name (Caused by "
                          "NameResolutionError: Failed to resolve 'huggingface.co')\n"
                          'second line of a long report that must not reach the user')


@pytest.fixture
def hub_calls(monkeypatch):
  fake = _FakeHub()
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake.snapshot_download)
  return fake


def _pretrained_text_cfg(path, allow_download=True):
  return specs.build(base.get_config()).text.replace(
      encoder='pretrained', pretrained_path=path, allow_download=allow_download)


def _one_line(err):
  msg = str(err.value)
  assert '\n' not in msg, msg
  return msg


def test_relative_missing_folder_names_field_value_and_absolute_path(tmp_path, monkeypatch,
                                                                     hub_calls):
  monkeypatch.chdir(tmp_path)
  for build in (lambda: pretrained.resolve_path('my_minilm'),
                lambda: encoders.build(_pretrained_text_cfg('my_minilm'))):
    with pytest.raises(FileNotFoundError) as err:
      build()
    msg = _one_line(err)
    assert "text.pretrained_path='my_minilm'" in msg
    assert str(tmp_path / 'my_minilm') in msg  # Where it was looked for.
    assert 'config.json' in msg  # What to do: the folder it needs.
  assert hub_calls == []  # A plain name is no hub id: never looked up.


def test_hub_id_without_allow_download_names_both_fields(tmp_path, monkeypatch, hub_calls):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError) as err:
    pretrained.resolve_path('org/name', allow_download=False)
  msg = _one_line(err)
  assert "text.pretrained_path='org/name'" in msg and 'text.allow_download=False' in msg
  assert 'hf download org/name' in msg and 'text.allow_download=True' in msg
  # Through the config section, as the trainer and sample.py build it.
  with pytest.raises(FileNotFoundError, match=r'text\.allow_download=False'):
    encoders.build(_pretrained_text_cfg('org/name', allow_download=False))
  assert hub_calls == []
  # Allowed: the same id is downloaded, and the snapshot folder is what resolves.
  hub_calls.result = str(tmp_path / 'snapshot')
  assert pretrained.resolve_path('org/name', allow_download=True) == str(tmp_path / 'snapshot')
  assert hub_calls == ['org/name']


def test_failed_download_is_one_line_naming_repo_field_and_reason(tmp_path, monkeypatch,
                                                                  hub_calls):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError) as err:
    pretrained.resolve_path('org/name', allow_download=True)
  msg = _one_line(err)
  assert "text.pretrained_path='org/name'" in msg and "hub repo 'org/name'" in msg
  assert 'ConnectionError: Max retries exceeded' in msg  # The reason, first line only.
  assert 'second line' not in msg and len(msg) < 600
  assert 'hf download org/name' in msg and 'text.pretrained_path=DIR' in msg
  assert err.value.__suppress_context__ and err.value.__cause__ is None  # No chained traceback.
  assert hub_calls == ['org/name']


def test_existing_relative_folders_resolve_without_download(tmp_path, monkeypatch, hub_calls):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'my_minilm').mkdir()
  (tmp_path / 'org' / 'name').mkdir(parents=True)  # A local folder shaped like a hub id wins.
  assert pretrained.resolve_path('my_minilm', allow_download=False) == str(tmp_path / 'my_minilm')
  assert pretrained.resolve_path('org/name', allow_download=False) == str(tmp_path / 'org/name')
  assert pretrained.resolve_path('./org/name') == str(tmp_path / 'org/name')
  assert hub_calls == []


@pytest.mark.parametrize('value', ['./org/name', 'org/name/sub', '/org/name', '~/org/name',
                                   'org/', '/name', 'org/na me', '.org/name', 'org/.name'])
def test_only_exact_org_name_is_a_hub_id(tmp_path, monkeypatch, hub_calls, value):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match=r'is not a folder') as err:
    pretrained.resolve_path(value, allow_download=True)
  assert 'text.pretrained_path' in _one_line(err)
  assert hub_calls == []


@pytest.mark.full  # A train.py process; the same refusal in-process: the test above.
def test_train_cli_missing_pretrained_folder_is_one_error_line_before_training(tmp_path):
  assert not os.path.exists(os.path.join(ROOT, 'my_minilm'))
  env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')  # Never the network.
  workdir = tmp_path / 'run'
  out = subprocess.run([sys.executable, 'train.py', '--config=configs/shapes.py:tiny',
                        f'--workdir={workdir}', '--config.text.encoder=pretrained',
                        '--config.text.pretrained_path=my_minilm'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  lines = out.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith('error:')]
  assert out.returncode != 0 and len(errors) == 1, out.stderr[-3000:]
  assert lines[-1] == errors[0] and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert "text.pretrained_path='my_minilm'" in errors[0]
  assert os.path.join(ROOT, 'my_minilm') in errors[0]
  assert not os.path.exists(workdir / 'checkpoints')  # Failed before any training step.
