"""The layering of docs/architecture.md, checked against the code's own import statements."""
import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom to top: a package imports only packages of its own floor or below (docs/architecture.md).
FLOORS = (
    ('diffusion', 'cluster'),
    ('models',),
    ('text',),
    ('data',),
    ('runtime',),
    ('sampling',),
    ('evaluation',),
    ('configs',),
    ('training',),
    ('tools', 'launch', 'benchmarks', 'export', 'train', 'sample', 'evaluate'),  # Entry points.
)
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}
# Below the config's last stop (configs.specs): no ConfigDict, so no ml_collections.
NO_CONFIG_DICT = ('diffusion', 'cluster', 'models', 'text', 'data', 'runtime', 'sampling',
                  'evaluation')


def _sources():
  """(package or entry-point name, path) of every .py file of the project but the tests."""
  for top in sorted(os.listdir(REPO)):
    path = os.path.join(REPO, top)
    if top.endswith('.py') and top[:-3] in FLOOR:
      yield top[:-3], path
    elif os.path.isdir(path) and top in FLOOR:
      for root, _, files in os.walk(path):
        yield from ((top, os.path.join(root, f)) for f in sorted(files) if f.endswith('.py'))


def _imported_packages(path):
  """The top-level names every import statement of a file names (function bodies too)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name.split('.')[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node.module.split('.')[0]


def test_no_import_runs_back_up_a_floor():
  upward = sorted({(os.path.relpath(path, REPO), other)
                   for package, path in _sources() for other in _imported_packages(path)
                   if other in FLOOR and FLOOR[other] > FLOOR[package]})
  assert not upward, f'imports that run back up: {upward}'


def test_the_library_below_configs_never_sees_a_config_dict():
  """A fresh interpreter imports every library module below configs/ and no ml_collections."""
  modules = sorted({os.path.relpath(path, REPO)[:-3].replace(os.sep, '.').removesuffix('.__init__')
                    for package, path in _sources() if package in NO_CONFIG_DICT})
  code = ('import importlib, sys\n'
          f'for m in {modules!r}:\n'
          '  importlib.import_module(m)\n'
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ml_collections'))")
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == '[]', out.stdout
  assert len(modules) > 40  # The walk found the library.


@pytest.mark.parametrize('package', NO_CONFIG_DICT)
def test_no_library_module_names_ml_collections(package):
  named = [os.path.relpath(path, REPO) for p, path in _sources()
           if p == package and 'ml_collections' in set(_imported_packages(path))]
  assert not named
