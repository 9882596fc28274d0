"""``check_variant`` exercises every target it reports (issue 22, items 7 and 8).

* variants whose h or c is a constant, or whose backward does not read a gate
  or a state, get CPU C++ and host CUDA C that compile (``-Wall -Werror``) and
  agree with the array code, and ``check_variant`` reports and checks the C++
  (``cpu``), the array code (``array``) and Triton (``triton``) on lines of their own;
* C++ the compiler refuses is reported FAILED with the compiler's message, not passed;
* an unusable kernel cache is reported (skipped, with why), never raised;
* a wrong array-code time loop fails the ``array`` line.
"""

from __future__ import annotations

import importlib.util

import pytest

from lstm_multi import Variant, bptt, sigmoid, tanh, testing
from lstm_multi.compile import emit_cpu
from lstm_multi.kernels import build
from lstm_multi.kernels.cpu_kernels import CpuKernels
from lstm_multi.kernels.host_kernels import HostKernels

needs_compiler = pytest.mark.skipif(
    build.host_compiler() is None, reason="no host C++ compiler (g++, clang++ or $CXX)"
)

#: degenerate variants: what the -Werror builds used to refuse (unused v_dh, v_dc, lm_row)
DEGENERATE = {
    "constant_h": lambda z, c_prev: (0.5 + 0 * z.i, sigmoid(z.f) * c_prev),
    "constant_c": lambda z, c_prev: (sigmoid(z.o), c_prev * 0 + 1),
    "both_constant": lambda z, c_prev: (0.25, -3.0),
    "h_independent_of_c": lambda z, c_prev: (tanh(z.o), sigmoid(z.f) * c_prev + tanh(z.g)),
    "c_independent_of_c_prev": lambda z, c_prev: (
        sigmoid(z.o) * tanh(sigmoid(z.i) * tanh(z.g)),
        sigmoid(z.i) * tanh(z.g),
    ),
    "linear_backward": lambda z, c_prev: (z.o + z.i, z.g + c_prev),
}


def _statuses(report):
    return {r.name: r for r in report.results}


@needs_compiler
@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_degenerate_variants_compile_and_are_checked(name):
    variant = Variant(f"degenerate_{name}", DEGENERATE[name])
    for scalar in ("double", "float"):
        CpuKernels(variant, scalar)  # raised RuntimeError (-Werror: unused variable) before
    HostKernels(variant, "float", "float")
    report = testing.check_variant(variant, backends=["numpy"])
    results = _statuses(report)
    for target in ("cpu", "kernels", "array"):
        assert results[target].status == "passed", report
    assert "the CPU kernels" in results["network"].note, report


@needs_compiler
def test_refused_cpu_code_is_reported_failed(monkeypatch):
    original = emit_cpu.cpu_source

    def broken(*args, **kwargs):
        return original(*args, **kwargs) + "\nstatic int lm_broken = not_declared;\n"

    monkeypatch.setattr(emit_cpu, "cpu_source", broken)
    variant = Variant("broken_cpu_probe", lambda z, c_prev: (sigmoid(z.o), c_prev + tanh(z.g)))
    with pytest.raises(AssertionError, match=r"cpu +FAILED"):
        testing.check_variant(variant, backends=["numpy"])
    report = testing.check_variant(variant, backends=["numpy"], raise_on_failure=False)
    cpu = _statuses(report)["cpu"]
    assert cpu.status == "FAILED" and "not_declared" in cpu.note, report
    assert {r.name for r in report.failed} == {"cpu"}, report


def test_an_unusable_cache_is_reported_not_raised(monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LSTM_MULTI_CACHE", str(blocker / "cache"))  # mkdir fails, even as root
    variant = Variant("uncached_probe", lambda z, c_prev: (tanh(z.o) * 0.75, c_prev * sigmoid(z.f)))
    report = testing.check_variant(variant, backends=["numpy"], raise_on_failure=False)
    results = _statuses(report)
    for target in ("cpu", "kernels"):
        # skipped with why, or passed where the library falls back to another directory
        assert results[target].status in ("passed", "skipped"), report
        if results[target].status == "skipped":
            assert results[target].note, report
    assert not report.failed, report


def test_a_wrong_array_code_loop_fails_the_array_check(monkeypatch):
    original = bptt.backward_direction

    def wrong(*args, **kwargs):
        grads, dxs, dh0, dc0 = original(*args, **kwargs)
        return grads, dxs * 1.001, dh0, dc0

    monkeypatch.setattr(bptt, "backward_direction", wrong)
    variant = Variant("array_probe", lambda z, c_prev: (sigmoid(z.o) * tanh(c_prev), c_prev))
    report = testing.check_variant(variant, backends=["numpy"], raise_on_failure=False)
    assert "array" in {r.name for r in report.failed}, report


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None,
    reason="the Triton check needs torch and triton",
)
def test_triton_is_checked_in_its_interpreter(monkeypatch, tmp_path):
    monkeypatch.setenv("LSTM_MULTI_CACHE", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    variant = Variant("triton_probe", lambda z, c_prev: (sigmoid(z.o) * tanh(c_prev), c_prev))
    report = testing.check_variant(variant, backends=["numpy"])
    assert _statuses(report)["triton"].status == "passed", report
    import os

    assert "TRITON_INTERPRET" not in os.environ  # restored


def test_targets_not_installed_are_skipped_with_the_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        testing.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "triton" else real(name, *a),
    )
    report = testing.check_variant(
        Variant("no_triton_probe", lambda z, c_prev: (sigmoid(z.o), c_prev)), backends=["numpy"]
    )
    triton = _statuses(report)["triton"]
    assert triton.status == "skipped" and "triton not installed" in triton.note, report
