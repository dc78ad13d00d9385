"""Environment detection, settings and the watchdog's logic (fake key-value store, fake clock)."""

import threading
import time

import dataclasses

import pytest

from cluster import contract
from cluster import distributed as dist
from cluster.watchdog import Watchdog
from configs import base, specs


def _spec(**changes) -> dist.DistributedSpec:
  """The base config's distributed section, with `changes`."""
  return dataclasses.replace(specs.build(base.get_config()).distributed, **changes)


# ----------------------------------------------------------------------------- detection


def test_no_cluster_variables_means_single_process():
  assert dist.detect({}) == dist.Plan('single')
  assert not dist.detect({}).multi_process


def test_local_launcher_variables():
  env = {'JAXDIFF_COORDINATOR': '127.0.0.1:4321', 'JAXDIFF_NUM_PROCESSES': '4',
         'JAXDIFF_PROCESS_ID': '3'}
  assert dist.detect(env) == dist.Plan('explicit', 4, 3, '127.0.0.1:4321')


def test_settings_take_precedence_over_environment():
  env = {'JAXDIFF_COORDINATOR': 'a:1', 'JAXDIFF_NUM_PROCESSES': '4', 'JAXDIFF_PROCESS_ID': '3'}
  s = _spec(coordinator_address='b:2', num_processes=2, process_id=0)
  assert dist.detect(env, s) == dist.Plan('explicit', 2, 0, 'b:2')


def test_kubernetes_indexed_job_takes_process_id_from_completion_index():
  env = {'JAXDIFF_COORDINATOR': 'run-workers-0-0.run:8476', 'JAXDIFF_NUM_PROCESSES': '8',
         'JOB_COMPLETION_INDEX': '5', 'KUBERNETES_SERVICE_HOST': '10.0.0.1'}
  assert dist.detect(env) == dist.Plan('kubernetes', 8, 5, 'run-workers-0-0.run:8476')


def test_one_process_never_initializes_jax_distributed():
  plan = dist.detect({'JAXDIFF_COORDINATOR': 'h:1', 'JAXDIFF_NUM_PROCESSES': '1'})
  assert not plan.multi_process


@pytest.mark.parametrize('env, needle', [
    ({'JAXDIFF_COORDINATOR': 'h:1', 'JAXDIFF_NUM_PROCESSES': '2', 'JAXDIFF_PROCESS_ID': '2'},
     'JAXDIFF_PROCESS_ID=2'),
    ({'JAXDIFF_COORDINATOR': 'h:1', 'JAXDIFF_NUM_PROCESSES': '2'}, 'JAXDIFF_PROCESS_ID'),
    ({'JAXDIFF_COORDINATOR': 'hostonly', 'JAXDIFF_NUM_PROCESSES': '2', 'JAXDIFF_PROCESS_ID': '0'},
     'host:port'),
    ({'JAXDIFF_COORDINATOR': 'h:1', 'JAXDIFF_PROCESS_ID': '0'}, 'JAXDIFF_NUM_PROCESSES'),
    ({'JAXDIFF_COORDINATOR': 'h:1', 'JAXDIFF_NUM_PROCESSES': 'two'}, "JAXDIFF_NUM_PROCESSES='two'"),
    ({'JOB_COMPLETION_INDEX': '1'}, 'launch.k8s'),
])
def test_bad_environment_names_the_variable(env, needle):
  with pytest.raises(ValueError, match=needle.replace('(', r'\(')):
    dist.detect(env)


@pytest.mark.parametrize('nodelist, first', [
    ('node001', 'node001'),
    ('node001,host2', 'node001'),
    ('gpu[007-015],host2', 'gpu007'),
    ('gpu[003,007-015]', 'gpu003'),
    ('a-b-c[10-11]', 'a-b-c10'),
])
def test_slurm_first_host(nodelist, first):
  assert dist.slurm_first_host(nodelist) == first


def _slurm(**extra):
  env = {'SLURM_JOB_ID': '123456', 'SLURM_PROCID': '5', 'SLURM_NTASKS': '16',
         'SLURM_STEP_NODELIST': 'gpu[017-018]', 'SLURM_STEP_NUM_NODES': '2',
         'SLURM_LOCALID': '5'}
  env.update(extra)
  return env


def test_slurm_one_task_per_node_uses_all_devices():
  plan = dist.detect(_slurm(SLURM_NTASKS='2', SLURM_PROCID='1', SLURM_LOCALID='0',
                            CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7'))
  port = 49152 + 123456 % 16384
  assert plan == dist.Plan('slurm', 2, 1, f'gpu017:{port}', None)


def test_slurm_task_per_gpu_sharing_the_node_takes_its_local_gpu():
  plan = dist.detect(_slurm(CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7'))
  assert plan.local_device_ids == (5,) and plan.num_processes == 16 and plan.process_id == 5


def test_slurm_gpus_per_task_binding_leaves_visible_devices_alone():
  assert dist.detect(_slurm(CUDA_VISIBLE_DEVICES='5')).local_device_ids is None
  plan = dist.detect(_slurm(CUDA_VISIBLE_DEVICES='2,3', SLURM_GPUS_PER_TASK='2'))
  assert plan.local_device_ids is None


def test_slurm_port_override_and_single_task():
  plan = dist.detect(_slurm(JAXDIFF_COORDINATOR_PORT='7777'))
  assert plan.coordinator_address == 'gpu017:7777'
  assert not dist.detect(_slurm(SLURM_NTASKS='1')).multi_process


def test_tpu_pod_is_left_to_jax_auto_detection():
  assert dist.detect({}, tpu_present=True) == dist.Plan('tpu', None, None)
  assert dist.detect({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}).num_processes is None
  assert not dist.detect({'TPU_WORKER_HOSTNAMES': 'w0'}).multi_process


# ----------------------------------------------------------------------------- settings


def test_the_section_comes_from_the_config_and_the_environment_overrides_it():
  config = base.get_config()
  config.distributed.heartbeat_timeout_s = 12.0
  spec = specs.build(config).distributed
  assert dist.with_environment(spec, env={}) == spec and spec.heartbeat_timeout_s == 12.0
  s = dist.with_environment(spec, env={'JAXDIFF_HEARTBEAT_TIMEOUT_S': '7', 'JAXDIFF_WATCHDOG': '0'})
  assert (s.heartbeat_timeout_s, s.watchdog) == (7.0, False)
  # The defaults are configs/base.py's alone: the spec class has none of its own.
  assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(dist.DistributedSpec))


def test_bad_values_are_refused_naming_the_field_or_variable():
  with pytest.raises(ValueError, match='distributed.heartbeat_timeout_s'):
    _spec(heartbeat_timeout_s=0.0)
  with pytest.raises(ValueError, match='watchdog_interval_s'):
    _spec(heartbeat_timeout_s=2.0, watchdog_interval_s=5.0)
  with pytest.raises(ValueError, match='JAXDIFF_HEARTBEAT_TIMEOUT_S'):
    dist.with_environment(_spec(), env={'JAXDIFF_HEARTBEAT_TIMEOUT_S': 'soon'})
  with pytest.raises(ValueError, match='distributed.heartbeat_timeout_s'):
    dist.with_environment(_spec(), env={'JAXDIFF_HEARTBEAT_TIMEOUT_S': '-1'})


def test_initialize_single_process_does_not_start_jax_distributed(monkeypatch):
  for var in ('JAXDIFF_COORDINATOR', 'JAXDIFF_NUM_PROCESSES', 'JAXDIFF_PROCESS_ID',
              'SLURM_JOB_ID', 'JOB_COMPLETION_INDEX', 'TPU_WORKER_HOSTNAMES', 'TPU_WORKER_ID',
              'TPU_PROCESS_ADDRESSES', 'MEGASCALE_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(dist, 'tpu_present', lambda: False)
  import jax
  info = dist.initialize(_spec())
  assert (info.process_index, info.process_count, info.environment) == (0, 1, 'single')
  assert info.local_device_count == jax.local_device_count() == info.device_count
  assert info.is_main
  assert not jax.distributed.is_initialized()


# ----------------------------------------------------------------------------- watchdog


class FakeKV:
  """The two key-value calls the watchdog makes, in memory."""

  def __init__(self):
    self.store, self.down = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError('UNAVAILABLE: Socket closed')
    if key in self.store and not allow_overwrite:
      raise RuntimeError(f'ALREADY_EXISTS: {key}')
    self.store[key] = value

  def key_value_dir_get(self, prefix):
    if self.down:
      raise RuntimeError('UNAVAILABLE: Socket closed')
    return sorted((k, v) for k, v in self.store.items() if k.startswith(prefix))


class Clock:

  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def _dogs(n=3, timeout=10.0):
  kv, clock = FakeKV(), Clock()
  return kv, clock, [Watchdog(kv, i, n, timeout, 1.0, 'h:1', exit_fn=None, clock=clock)
                     for i in range(n)]


def test_watchdog_quiet_while_everyone_beats():
  _, clock, dogs = _dogs()
  for _ in range(30):
    clock.t += 1.0
    assert [d.check() for d in dogs] == [None, None, None]


def test_watchdog_names_the_process_that_stopped_beating_after_the_timeout():
  _, clock, dogs = _dogs(timeout=10.0)
  for d in dogs:
    d.check()
  lost_at = clock.t
  while clock.t - lost_at <= 10.0:  # Process 2 is gone: only 0 and 1 keep beating.
    assert dogs[0].check() is None and dogs[1].check() is None
    clock.t += 1.0
  reason = dogs[0].check()
  assert reason is not None and reason.startswith('process 2 (host ')
  assert 'stopped heartbeating 11 s ago' in reason
  assert dogs[1].check().startswith('process 2 ')


def test_watchdog_reports_a_published_failure_at_once():
  _, clock, dogs = _dogs()
  for d in dogs:
    d.check()
  dogs[1].publish_failure('ValueError: loss is NaN')
  clock.t += 1.0
  assert dogs[0].check().startswith('process 1 failed: ValueError: loss is NaN (host ')
  assert dogs[2].check().startswith('process 1 failed')
  assert dogs[1].check() is None  # Its own failure is not news to process 1.


def test_watchdog_ignores_processes_that_finished_cleanly():
  _, clock, dogs = _dogs()
  for d in dogs:
    d.check()
  dogs[2].stop(done=True)
  for _ in range(40):
    clock.t += 1.0
    assert dogs[0].check() is None and dogs[1].check() is None


def test_watchdog_gives_up_on_an_unreachable_coordinator_after_the_timeout():
  kv, clock, dogs = _dogs(timeout=5.0)
  dogs[0].check()
  kv.down = True
  clock.t += 5.0
  assert dogs[0].check() is None  # Transient errors are tolerated up to the timeout.
  clock.t += 1.0
  assert 'lost contact with the coordination service' in dogs[0].check()


def test_watchdog_thread_exits_with_peer_failed_status():
  kv = FakeKV()
  exited = threading.Event()
  codes = []
  dog = Watchdog(kv, 0, 2, timeout_s=0.3, interval_s=0.05,
                      exit_fn=lambda code: (codes.append(code), exited.set()))
  dog.start()
  assert exited.wait(10.0), 'the watchdog never noticed that process 1 never beat'
  assert codes == [contract.EXIT_PEER_FAILED]
  assert dog.check().startswith('process 1 sent no heartbeat in ')
  dog.stop()
  time.sleep(0.1)
  assert kv.store['jaxdiff_watchdog/done/0'] == '1'


def test_a_collective_broken_by_a_lost_peer_is_told_from_a_failure_of_this_process():
  """The survivor of a SIGKILLed peer can see gloo fail before the heartbeat is overdue; it then
  waits for the watchdog to name the peer (EXIT_PEER_FAILED) rather than report itself failed."""
  gloo = RuntimeError('UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/'
                      'pair.cc:538] Read error [127.0.0.1]:418: Connection reset by peer')
  assert dist.lost_connection(gloo)
  assert not dist.lost_connection(ValueError('loss is NaN at step 12'))
