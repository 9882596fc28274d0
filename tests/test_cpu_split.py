"""The batch-split CPU loops (``kernels/cpp/lm_split.h``: ``lm_split_forward``/``_backward``).

Each thread runs its own rows of the batch through the whole sequence, the step
products on torch's MKL called from inside the kernels. Checked here:

* every variant against the independent oracle, float64 and float32, with
  lengths, two layers, both directions, the split forced onto a tiny batch;
* their derivatives by central differences in float64;
* equal to the per-step loop (torch.mm + the fused step) for 1, 2 and 3 threads,
  including uneven splits; the parameter gradients bit-identical run to run;
* they run only where the BLAS's library is on the kernels' own OpenMP runtime
  (another runtime loaded beside it, as scikit-learn's, does not stop them), and
  not with ``LSTM_MULTI_CPU_THREADS=0``; NumPy never offers a host BLAS for them.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tolerance
from reference import make_problem, reference
from test_agreement import assert_matches_reference, run_backend
from test_cpu_kernels import _config, check_direction_by_finite_differences, needs_compiler

import lstm_multi
from lstm_multi import spec
from lstm_multi.backends import kernel_direction
from lstm_multi.kernels import cpu_kernels

torch = pytest.importorskip("torch")
from lstm_multi.backends import torch_bptt, torch_ops  # noqa: E402  (needs torch)

pytestmark = [
    needs_compiler,
    pytest.mark.skipif(
        torch_ops.TorchOps().host_blas() is None,
        reason="this torch has no MKL to call from the kernels (the split loops need it)",
    ),
]


def _split_used(monkeypatch):
    """Force the split loops on any batch size; count the directions they ran."""
    monkeypatch.setattr(kernel_direction, "SEQUENCE_LOOP_MAX_MACS", 0)
    monkeypatch.setattr(kernel_direction, "SPLIT_MIN_ROWS", 1)
    monkeypatch.setenv("LSTM_MULTI_CPU_THREADS", "1")
    used = []
    plan = kernel_direction._split_plan

    def spy(*args):
        chosen = plan(*args)
        used.append(None if chosen is None else chosen[1])
        return chosen

    monkeypatch.setattr(kernel_direction, "_split_plan", spy)
    return used


class _threads:
    """torch's thread count (which the split loops take) set for a block."""

    def __init__(self, count):
        self.count = count

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.count)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


@pytest.mark.parametrize("variant", sorted(spec.VARIANTS))
def test_split_loops_match_the_oracle(variant, monkeypatch):
    used = _split_used(monkeypatch)
    config = _config(variant)  # batch 3: rows 0 | 1, 2 over two threads
    problem = make_problem(config)
    expected = reference(config, problem)
    with _threads(2):
        for dtype in ("float64", "float32"):
            result = run_backend("torch", config, problem, dtype, native=False)
            assert_matches_reference(result, expected, dtype, f"oracle vs split/{variant}")
    assert used and all(threads == 2 for threads in used), used


@pytest.mark.parametrize("variant", ["peephole", "lstm", "peephole_full", "cifg"])
def test_split_gradients_by_finite_differences(variant, monkeypatch):
    used = _split_used(monkeypatch)
    with _threads(2):
        check_direction_by_finite_differences(torch_bptt.FAST_OPS, torch.from_numpy, variant)
    assert used and all(threads == 2 for threads in used), used


def _vjp_of(cell, params, x, dy, lengths):
    y, state = cell(params, x, lengths=lengths)
    grads, dx, (dh0, dc0) = cell.vjp(params, x, dy, lengths=lengths)
    return [y, *state, dx, dh0, dc0, *torch.utils._pytree.tree_leaves(grads)]


@pytest.mark.parametrize(
    ("variant", "threads"),
    [(v, n) for v in ("peephole", "peephole_full") for n in (1, 2, 3)] + [("layernorm", 3)],
)
def test_split_equals_the_per_step_loop(variant, threads, monkeypatch):
    """The split loops against one torch.mm and one fused step call a step (both forced
    past the whole-sequence C loop, which would otherwise take this size); "layernorm"'s
    split halves (r U in a scratch array of its own, dzr's half of dz) over 3 uneven threads."""
    used = _split_used(monkeypatch)
    cell = lstm_multi.get_cell("torch")(5, 40, variant=variant, num_layers=2,
                                        bidirectional=True, native=False)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([6, 1, 4, 6, 2, 5, 3])
    for dtype, bound in (
        (torch.float64, tolerance("float64")),
        (torch.float32, tolerance("float32")),
    ):
        params = cell.init(seed=0, dtype=str(dtype).removeprefix("torch."))
        x = torch.randn(7, 6, 5, generator=generator).to(dtype)
        dy = torch.randn(7, 6, 80, generator=generator).to(dtype)
        results = {}
        for split in ("1", "0"):
            monkeypatch.setenv("LSTM_MULTI_CPU_THREADS", split)
            with _threads(threads):
                results[split] = _vjp_of(cell, params, x, dy, lengths)
        for got, want in zip(results["1"], results["0"], strict=True):
            scale = max(1.0, want.abs().max().item())
            assert (got - want).abs().max().item() <= bound * scale
    assert used.count(None) > 0 and {n for n in used if n} == {threads}, used


def test_split_parameter_gradients_are_the_same_bits_every_run(monkeypatch):
    """Each thread sums its rows' peephole gradients apart; they are added in thread
    order, so two runs agree to the bit."""
    used = _split_used(monkeypatch)
    cell = lstm_multi.get_cell("torch")(3, 24, variant="peephole", native=False)
    params = cell.init(seed=1, dtype="float32")
    x, dy = torch.randn(9, 5, 3), torch.randn(9, 5, 24)
    with _threads(2):
        first, second = (cell.vjp(params, x, dy)[0] for _ in range(2))
    for a, b in zip(torch.utils._pytree.tree_leaves(first),
                    torch.utils._pytree.tree_leaves(second), strict=True):  # fmt: skip
        assert torch.equal(a, b)
    assert used and all(threads == 2 for threads in used)


def _fresh_kernels():
    """Kernels whose split-loop cache has not seen torch's library yet."""
    return cpu_kernels.CpuKernels(spec.get_variant("peephole"), "float")


def _other_openmp_runtimes():
    """OpenMP runtimes mapped into this process other than the kernels' own (e.g. the
    renamed libgomp of scikit-learn's wheel, which Keras imports)."""
    import ctypes
    import glob
    import site

    kernels = _fresh_kernels()._library
    found = []
    for root in site.getsitepackages():
        for path in glob.glob(f"{root}/*.libs/lib*omp*.so*"):
            ctypes.CDLL(path)  # loaded, idle
            if not kernels.lm_same_openmp_runtime(path.encode()):
                found.append(path)
    return found


def test_split_loops_only_on_the_blas_own_openmp_runtime():
    """Torch's MKL runs on the kernels' libgomp, so inside their region it runs one
    thread each; a library on no runtime, or on another, is refused."""
    host = torch_ops.TorchOps().host_blas()
    assert _fresh_kernels().split_loops(host) is not None
    assert _fresh_kernels().split_loops(host._replace(library="libc.so.6")) is None
    assert _fresh_kernels().split_loops(host._replace(library="/no/such/library.so")) is None
    others = _other_openmp_runtimes()
    for path in others:
        assert _fresh_kernels().split_loops(host._replace(library=path)) is None
    # another runtime merely loaded in the process does not stop torch's own
    assert _fresh_kernels().split_loops(host) is not None


def test_split_loops_can_be_turned_off(monkeypatch):
    host = torch_ops.TorchOps().host_blas()
    monkeypatch.setenv("LSTM_MULTI_CPU_THREADS", "0")
    assert _fresh_kernels().split_loops(host) is None


def test_numpy_offers_no_host_blas():
    """NumPy's OpenBLAS keeps its own thread pool: an OpenMP region beside it was 20x
    slower, so NumPy arrays keep the per-step loop."""
    from lstm_multi.backends.numpy_fast import InPlaceOps

    assert InPlaceOps(np).host_blas() is None
    assert _fresh_kernels().split_loops(None) is None


def test_split_plan_gives_each_framework_thread_enough_rows(monkeypatch):
    """Every one of torch's threads gets ``SPLIT_MIN_ROWS`` (8) rows, or the per-step loop
    runs: with fewer the split measured slower (benchmarks/NOTES.md section 12)."""
    monkeypatch.setenv("LSTM_MULTI_CPU_THREADS", "1")
    plan, kernels = kernel_direction._split_plan, _fresh_kernels()
    with _threads(2):
        assert plan(torch_bptt.FAST_OPS, kernels, 15, 64) is None
        assert plan(torch_bptt.FAST_OPS, kernels, 16, 64)[1] == 2
    with _threads(1):
        assert plan(torch_bptt.FAST_OPS, kernels, 7, 64) is None
        assert plan(torch_bptt.FAST_OPS, kernels, 8, 64)[1] == 1


def test_split_plan_leaves_a_weight_too_large_for_the_caches_to_the_per_step_loop(monkeypatch):
    """Every thread reads all of U each step; past 16 MiB (H > 1024 in float32) that
    measured slower than one product a step split by columns."""
    monkeypatch.setenv("LSTM_MULTI_CPU_THREADS", "1")
    plan, kernels = kernel_direction._split_plan, _fresh_kernels()
    with _threads(2):
        assert plan(torch_bptt.FAST_OPS, kernels, 64, 1024) is not None
        assert plan(torch_bptt.FAST_OPS, kernels, 64, 1025) is None
