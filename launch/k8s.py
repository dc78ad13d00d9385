"""Kubernetes launcher: a JobSet manifest running train.py on `--num_hosts` pods.

  python -m launch.k8s --name shapes-4x8 --image ghcr.io/me/jaxdiff:latest --num_hosts 4 \
      --accelerator gpu --gpus_per_host 8 --config configs/shapes.py \
      --workdir gs://my-bucket/runs/shapes_4x8 --dry_run -- --config.optim.num_steps=20000

The JobSet (jobset.x-k8s.io/v1alpha2) holds one replicated Indexed Job with
parallelism = completions = num_hosts. JobSet's headless service (`network.subdomain`) gives pod i
the name `<name>-workers-0-<i>.<name>`, so every pod gets JAXDIFF_COORDINATOR=
`<name>-workers-0-0.<name>:<port>`, JAXDIFF_NUM_PROCESSES and JAXDIFF_PROCESS_ID (the pod's
job-completion index), which `cluster.distributed.initialize` reads. One pod failing fails the
JobSet (or restarts all of it, `--max_restarts`). `--dry_run` prints the YAML; otherwise it goes
to `kubectl apply -f -`. The YAML is written without PyYAML: every string is a double-quoted
(JSON) scalar, which YAML reads as is.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from typing import Any, Sequence

from cluster import contract
from launch import command

JOB_NAME = 'workers'  # The replicated job's name, part of every pod's host name.
_COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def coordinator_address(name: str, port: int) -> str:
  """Host:port of pod 0 through JobSet's headless service."""
  return f'{name}-{JOB_NAME}-0-0.{name}:{port}'


def _check(args: argparse.Namespace) -> None:
  if not re.fullmatch(r'[a-z0-9]([-a-z0-9]*[a-z0-9])?', args.name):
    raise ValueError(f'--name {args.name!r} must be a DNS label: lower-case letters, digits, -.')
  longest = f'{args.name}-{JOB_NAME}-0-{args.num_hosts - 1}'
  if len(longest) > 63:
    raise ValueError(f'--name {args.name!r} is too long: pod host name {longest!r} exceeds 63 '
                     f'characters.')
  if not args.image:
    raise ValueError('--image (the container image holding this repo) is required.')
  if args.num_hosts < 1:
    raise ValueError(f'--num_hosts must be >= 1, got {args.num_hosts}.')
  if args.accelerator == 'gpu' and args.gpus_per_host < 1:
    raise ValueError('--accelerator gpu needs --gpus_per_host >= 1.')
  if args.accelerator == 'tpu' and not (args.tpu_type and args.tpu_topology and
                                        args.tpu_chips_per_host >= 1):
    raise ValueError('--accelerator tpu needs --tpu_type (e.g. tpu-v5-lite-podslice), '
                     '--tpu_topology (e.g. 4x4) and --tpu_chips_per_host (e.g. 4).')
  for item in args.env:
    if not re.fullmatch(r'[A-Za-z_]\w*=.*', item):
      raise ValueError(f'--env {item!r} must look like NAME=value.')


def manifest(args: argparse.Namespace, overrides: Sequence[str]) -> dict[str, Any]:
  """The JobSet as a dict."""
  _check(args)
  env = [
      {'name': contract.ENV_COORDINATOR, 'value': coordinator_address(args.name, args.port)},
      {'name': contract.ENV_NUM_PROCESSES, 'value': str(args.num_hosts)},
      {'name': contract.ENV_PROCESS_ID,
       'valueFrom': {'fieldRef': {'fieldPath': _COMPLETION_INDEX}}},
      {'name': 'PYTHONUNBUFFERED', 'value': '1'},
  ]
  if args.heartbeat_timeout_s:
    env.append({'name': contract.ENV_HEARTBEAT_TIMEOUT,
                'value': f'{args.heartbeat_timeout_s:g}'})
  env += [{'name': k, 'value': v} for k, _, v in (e.partition('=') for e in args.env)]
  limits: dict[str, Any] = {}
  requests: dict[str, Any] = {}
  pod: dict[str, Any] = {'restartPolicy': 'Never'}
  if args.accelerator == 'gpu':
    limits['nvidia.com/gpu'] = args.gpus_per_host
  elif args.accelerator == 'tpu':
    limits['google.com/tpu'] = requests['google.com/tpu'] = args.tpu_chips_per_host
    pod['nodeSelector'] = {'cloud.google.com/gke-tpu-accelerator': args.tpu_type,
                           'cloud.google.com/gke-tpu-topology': args.tpu_topology}
  if args.cpu:
    requests['cpu'] = args.cpu
  if args.memory:
    requests['memory'] = args.memory
  container: dict[str, Any] = {
      'name': 'train',
      'image': args.image,
      'command': command.train_argv(args, overrides),
      'ports': [{'name': 'coordinator', 'containerPort': args.port}],
      'env': env,
      'resources': {k: v for k, v in (('limits', limits), ('requests', requests)) if v},
  }
  if args.working_dir:
    container['workingDir'] = args.working_dir
  pod['containers'] = [container]
  if args.service_account:
    pod['serviceAccountName'] = args.service_account
  metadata: dict[str, Any] = {'name': args.name, 'labels': {'app': 'jaxdiff'}}
  if args.namespace:
    metadata['namespace'] = args.namespace
  return {
      'apiVersion': 'jobset.x-k8s.io/v1alpha2',
      'kind': 'JobSet',
      'metadata': metadata,
      'spec': {
          'failurePolicy': {'maxRestarts': args.max_restarts},
          'network': {'enableDNSHostnames': True, 'subdomain': args.name},
          'replicatedJobs': [{
              'name': JOB_NAME,
              'replicas': 1,
              'template': {'spec': {
                  'parallelism': args.num_hosts,
                  'completions': args.num_hosts,
                  'completionMode': 'Indexed',
                  'backoffLimit': 0,
                  'template': {'metadata': {'labels': {'app': 'jaxdiff'}}, 'spec': pod},
              }},
          }],
      },
  }


def _scalar(value: Any) -> str:
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if value is None:
    return 'null'
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, str):
    return json.dumps(value)
  if isinstance(value, dict):
    return '{}'
  if isinstance(value, list):
    return '[]'
  raise TypeError(f'Cannot write {type(value).__name__} to YAML.')


def _key(key: str) -> str:
  return key if re.fullmatch(r'[A-Za-z_][\w.\-/]*', key) else json.dumps(key)


def _emit(value: Any, depth: int, lines: list[str]) -> None:
  pad = '  ' * depth
  if isinstance(value, dict):
    for k, v in value.items():
      if isinstance(v, (dict, list)) and v:
        lines.append(f'{pad}{_key(k)}:')
        _emit(v, depth + 1, lines)
      else:
        lines.append(f'{pad}{_key(k)}: {_scalar(v)}')
  else:
    for item in value:
      if isinstance(item, (dict, list)) and item:
        sub: list[str] = []
        _emit(item, depth + 1, sub)
        sub[0] = f'{pad}- {sub[0].lstrip()}'
        lines.extend(sub)
      else:
        lines.append(f'{pad}- {_scalar(item)}')


def to_yaml(document: dict[str, Any]) -> str:
  """Block-style YAML of dicts, lists and scalars; strings are JSON (double-quoted) scalars."""
  lines: list[str] = []
  _emit(document, 0, lines)
  return '\n'.join(lines) + '\n'


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m launch.k8s', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  command.add_train_flags(p)
  p.add_argument('--name', required=True, help='JobSet name (a DNS label).')
  p.add_argument('--image', required=True, help='Container image with this repo and its packages.')
  p.add_argument('--num_hosts', type=int, default=1, help='Pods, one JAX process each.')
  p.add_argument('--accelerator', choices=('gpu', 'tpu', 'cpu'), default='gpu')
  p.add_argument('--gpus_per_host', type=int, default=8, help='nvidia.com/gpu per pod.')
  p.add_argument('--tpu_type', default='', help='GKE TPU accelerator, e.g. tpu-v5-lite-podslice.')
  p.add_argument('--tpu_topology', default='', help='GKE TPU topology, e.g. 4x4.')
  p.add_argument('--tpu_chips_per_host', type=int, default=4, help='google.com/tpu per pod.')
  p.add_argument('--cpu', default='', help='CPU request per pod, e.g. 32.')
  p.add_argument('--memory', default='', help='Memory request per pod, e.g. 200Gi.')
  p.add_argument('--namespace', default='', help='Namespace; empty = kubectl default.')
  p.add_argument('--service_account', default='', help='Pod service account (e.g. for GCS).')
  p.add_argument('--working_dir', default='', help='Repo directory in the image; empty = WORKDIR.')
  p.add_argument('--port', type=int, default=8476, help='Coordinator port on pod 0.')
  p.add_argument('--max_restarts', type=int, default=0, help='JobSet restarts (resume) on failure.')
  p.add_argument('--heartbeat_timeout_s', type=float, default=0,
                 help='Seconds before a silent pod fails the job; 0 = the config\'s '
                      'distributed.heartbeat_timeout_s.')
  p.add_argument('--env', action='append', default=[], help='NAME=value for train.py (repeatable).')
  p.add_argument('--output', default='', help='Also write the YAML to this file.')
  p.add_argument('--kubectl', default='kubectl', help='kubectl executable.')
  p.add_argument('--dry_run', action='store_true', help='Print the YAML, apply nothing.')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  flags, overrides = command.split_argv(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(flags)
  try:
    text = to_yaml(manifest(args, overrides))
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.output:
    with open(args.output, 'w') as f:
      f.write(text)
  if args.dry_run:
    print(text, end='')
    return 0
  try:
    return subprocess.run([args.kubectl, 'apply', '-f', '-'], input=text, text=True,
                          check=False).returncode
  except FileNotFoundError:
    print(f'error: {args.kubectl!r} not found: install kubectl, or apply the --dry_run output '
          f'yourself.', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
