"""``lstm_multi.bench.hlo``: kernels per step of the JAX cell, read from optimized HLO.

On this CPU the compiled forward loop has the step's two products (XLA-CPU
keeps x_t W inside the step, as ``jax_backend`` asks) and its gate math in
elementwise fusions; the VJP has the forward with residuals and the reverse
loop. A hand-written GPU-style module checks the classification of cuBLAS
custom-calls, gate fusions and data moves.
"""

from __future__ import annotations

import pytest

from lstm_multi.bench import hlo

GPU_STYLE = """
HloModule m

%fused_gates (p0: f32[8,64], p1: f32[8,256]) -> f32[8,64] {
  %p0 = f32[8,64]{1,0} parameter(0)
  %p1 = f32[8,256]{1,0} parameter(1)
  %slice.1 = f32[8,64]{1,0} slice(%p1), slice={[0:8], [0:64]}
  %logistic.1 = f32[8,64]{1,0} logistic(%slice.1)
  ROOT %multiply.1 = f32[8,64]{1,0} multiply(%logistic.1, %p0)
}

%fused_store (p0: f32[4,8,64], p1: f32[8,64], p2: s32[]) -> f32[4,8,64] {
  %p0 = f32[4,8,64]{2,1,0} parameter(0)
  %p1 = f32[8,64]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %bitcast.1 = f32[1,8,64]{2,1,0} bitcast(%p1)
  ROOT %dynamic-update-slice.1 = f32[4,8,64]{2,1,0} dynamic-update-slice(%p0, %bitcast.1, %p2, %p2, %p2)
}

%body (arg: (s32[], f32[8,64], f32[64,256], f32[4,8,64])) -> (s32[], f32[8,64], f32[64,256], f32[4,8,64]) {
  %arg = (s32[], f32[8,64]{1,0}, f32[64,256]{1,0}, f32[4,8,64]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %h = f32[8,64]{1,0} get-tuple-element(%arg), index=1
  %U = f32[64,256]{1,0} get-tuple-element(%arg), index=2
  %ys = f32[4,8,64]{2,1,0} get-tuple-element(%arg), index=3
  %gemm = (f32[8,256]{1,0}, s8[0]{0}) custom-call(%h, %U), custom_call_target="__cublas$gemm"
  %z = f32[8,256]{1,0} get-tuple-element(%gemm), index=0
  %gates = f32[8,64]{1,0} fusion(%h, %z), kind=kLoop, calls=%fused_gates
  %store = f32[4,8,64]{2,1,0} fusion(%ys, %gates, %i), kind=kLoop, calls=%fused_store
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[8,64]{1,0}, f32[64,256]{1,0}, f32[4,8,64]{2,1,0}) tuple(%next, %gates, %U, %store)
}

%cond (arg: (s32[], f32[8,64], f32[64,256], f32[4,8,64])) -> pred[] {
  %arg = (s32[], f32[8,64]{1,0}, f32[64,256]{1,0}, f32[4,8,64]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: (s32[], f32[8,64], f32[64,256], f32[4,8,64])) -> (s32[], f32[8,64], f32[64,256], f32[4,8,64]) {
  %a = (s32[], f32[8,64]{1,0}, f32[64,256]{1,0}, f32[4,8,64]{2,1,0}) parameter(0)
  ROOT %while.1 = (s32[], f32[8,64]{1,0}, f32[64,256]{1,0}, f32[4,8,64]{2,1,0}) while(%a), condition=%cond, body=%body
}
"""


def test_a_gpu_style_step_is_one_gemm_and_one_fusion():
    (loop,) = hlo.scan_kernels(GPU_STYLE)
    assert loop == {"body": "body", "gemm": 1, "elementwise": 1, "data": 1}


def test_the_cpu_cells_loops_are_read():
    jax = pytest.importorskip("jax")
    import lstm_multi

    cell = lstm_multi.get_cell("jax")(8, 16, variant="peephole")
    report = hlo.cell_report(cell, cell.init(seed=0), jax.numpy.ones((6, 4, 8), "float32"))
    (forward,) = report["forward"]
    assert forward["gemm"] >= 1 and forward["elementwise"] >= 1
    assert len(report["vjp"]) == 2  # the forward with residuals, then the reverse loop
    assert all(loop["gemm"] >= 1 and loop["elementwise"] >= 1 for loop in report["vjp"])


@pytest.mark.parametrize("variant", ["lstm", "peephole"])
def test_projected_before_the_scan_a_forward_step_has_one_product(variant):
    """``project_in_step=False`` (the default off the CPU): x W + b is one product
    before the loop, and the loop's step has the recurrent product only."""
    jax = pytest.importorskip("jax")
    import lstm_multi

    x = jax.numpy.ones((6, 4, 8), "float32")
    loops = {}
    for in_step in (True, False):
        cell = lstm_multi.get_cell("jax")(8, 16, variant=variant, project_in_step=in_step)
        (loops[in_step],) = hlo.cell_report(cell, cell.init(seed=0), x)["forward"]
    inside, before = loops[True], loops[False]
    assert inside["gemm"] == 2 and before["gemm"] == 1


@pytest.mark.parametrize("unroll", [1, 3])
def test_scan_unroll_sets_the_steps_an_iteration_of_the_forward(unroll):
    """``scan_unroll=n``: the forward loop's body holds n steps (2n products with x_t W in
    the step), which ``cell_report`` divides back to 2 a step."""
    jax = pytest.importorskip("jax")
    import lstm_multi

    cell = lstm_multi.get_cell("jax")(8, 16, scan_unroll=unroll, project_in_step=True)
    x = jax.numpy.ones((6, 4, 8), "float32")
    (forward,) = hlo.cell_report(cell, cell.init(seed=0), x)["forward"]
    assert forward["gemm"] == 2, forward
