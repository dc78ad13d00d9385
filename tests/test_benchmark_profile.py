"""benchmarks/profile.py: thunks sorted into HLO kinds by their fusion's instructions (checked on
hand-written HLO), and a profile of the tiny config's train step and sampler whose shares add up."""
import collections
import re

import pytest

from benchmarks import profile

_HLO = """HloModule step

%fused_computation.1 (p0: f32[8,16,16,64], p1: f32[3,3,64,64]) -> f32[8,16,16,64] {
  %p0 = f32[8,16,16,64]{3,2,1,0} parameter(0)
  %convolution.3 = f32[8,16,16,64]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

%fused_computation.2 (p0: f32[64,16,16,8], p1: f32[16,16,8,64]) -> f32[3,3,64,64] {
  %convolution.4 = f32[3,3,64,64]{3,2,1,0} convolution(%p0, %p1), window={size=16x16 pad=1_1x1_1}, dim_labels=f01b_i01o->01bf
}

%fused_computation.3 (p0: f32[8,16,16,64]) -> f32[8,8,8,64] {
  %convolution.5 = f32[8,8,8,64]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 stride=2x2 pad=0_1x0_1}, dim_labels=b01f_01io->b01f
}

%fused_computation.4 (p0: f32[8,64]) -> f32[8] {
  %reduce.1 = f32[8]{0} reduce(%p0, %c), dimensions={1}, to_apply=%add
}

ENTRY %main (a: f32[8,16,16,64]) -> f32[8] {
  %conv_fusion = f32[8,16,16,64]{3,2,1,0} fusion(%a, %w), kind=kCustom, calls=%fused_computation.1
  %kgrad_fusion = f32[3,3,64,64]{3,2,1,0} fusion(%t, %a), kind=kCustom, calls=%fused_computation.2
  %down_fusion = f32[8,8,8,64]{3,2,1,0} fusion(%a), kind=kCustom, calls=%fused_computation.3
  %ynn_fusion.2 = f32[8]{0} fusion(%b), kind=kCustom, calls=%fused_computation.4
  %dot.7 = f32[8,64]{1,0} dot(%x, %y), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %transpose.2 = f32[64,16,16,8]{3,2,1,0} transpose(%a), dimensions={3,1,2,0}
  %copy.1 = f32[8,64]{1,0} copy(%x)
  ROOT %add_fusion = f32[8]{0} fusion(%r, %s), kind=kLoop, calls=%fused_add
}
"""


def test_thunks_are_sorted_by_the_instructions_of_their_fusion():
  index = profile.hlo_index(_HLO)
  kinds = {name: profile.kind_of(name, index) for name in
           ('conv_fusion', 'kgrad_fusion', 'down_fusion', 'ynn_fusion.2', 'dot.7', 'transpose.2',
            'copy.1', 'add_fusion')}
  assert kinds == {'conv_fusion': profile.KINDS[0], 'kgrad_fusion': profile.KINDS[1],
                   'down_fusion': profile.KINDS[2], 'ynn_fusion.2': 'reductions',
                   'dot.7': 'dots', 'transpose.2': 'transposes', 'copy.1': 'copies',
                   'add_fusion': profile.KINDS[-1]}


def test_only_events_that_name_an_instruction_are_counted():
  """The profiler also records 'end: NAME' markers; counting them would count a thunk twice."""
  events = collections.Counter({'conv_fusion': 5, 'end: conv_fusion': 5, 'dot.7': 2})
  assert profile.program_thunks(events, profile.hlo_index(_HLO)) == {'conv_fusion': 5, 'dot.7': 2}


@pytest.mark.full  # Two profiled programs (about a minute on 2 shared cores).
@pytest.mark.parametrize('sampler', [False, True])
def test_profile_of_the_tiny_config_adds_up(capsys, monkeypatch, sampler):
  monkeypatch.setenv('JAXDIFF_KEEP_MEMORY', 'off')  # main's host setup; not in a test worker.
  profile.main(['--config=configs/shapes.py:tiny', '--runs=1', '--top=3']
               + (['--sampler', '--batch=2', '--sample_steps=2'] if sampler else ['--batch=8']))
  out = capsys.readouterr().out
  rows = re.findall(r'^\| ([^|]+) \| (\d+) \| ([\d.]+)% \|$', out, re.M)
  assert rows and {kind for kind, _, _ in rows} <= set(profile.KINDS), out
  assert sum(float(share) for _, _, share in rows) == pytest.approx(100, abs=0.5)
  assert ('guided DPM-Solver' if sampler else 'train step') in out.splitlines()[0], out
  assert len(re.findall(r'^  +[\d.]+  \S+  \[', out, re.M)) == 3, out
