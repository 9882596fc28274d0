"""Shared test setup: hypothesis profiles, JAX float64, backend fixtures, tolerances.

Profiles (HYPOTHESIS_PROFILE=...): "ci" (the default under CI=true; keeps the
suite within minutes on 2 cores), "dev" (the default elsewhere), "thorough"
(many more examples, run on demand).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import lstm_multi

settings.register_profile(
    "ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def scaled(examples):
    """``examples`` (a test's count under the "ci" profile) scaled by the loaded profile's
    max_examples over ci's, at least 1: a test that needs fewer examples than the rest
    (each one slow) still gets more under "thorough" and fewer under "dev"."""
    ci = settings.get_profile("ci").max_examples
    return max(1, round(examples * settings().max_examples / ci))


if importlib.util.find_spec("jax") is not None:
    import jax

    # float64 agreement needs JAX's 64-bit mode; the error without it is tested in a subprocess.
    jax.config.update("jax_enable_x64", True)

CPU_BACKENDS = [b for b in lstm_multi.known_backends() if b != "cupy"]


def backend_params(names=CPU_BACKENDS):
    """pytest params over backends, each skipped with the reason when it cannot run here."""
    params = []
    for name in names:
        try:
            lstm_multi.registry.load_backend(name)
            marks = ()
        except (ImportError, RuntimeError) as error:
            marks = pytest.mark.skip(reason=str(error))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


@pytest.fixture(scope="session", params=backend_params())
def backend(request):
    return request.param


#: the agreement bound in units of the dtype's machine epsilon: K * eps is 2.2e-14 in
#: float64 and 1.2e-5 in float32. The suite's problems (T <= 6 steps, <= 3 layers, H <= 5,
#: so a few dozen roundings along any path, each of at most eps/2, plus the sigmoid's and
#: tanh's few ulp) show worst disagreements of ~6 eps (float64, 1.3e-15) and ~4 eps (float32,
#: 4.1e-7) relative to max(1, max|reference|); K = 100 leaves a margin of ~15-25x for the
#: error's growth with T and layers, and fails on any error of the size of a wrong term.
K_EPS = 100


def tolerance(dtype, k=K_EPS):
    """k machine epsilons of ``dtype`` (a dtype or its name)."""
    return k * float(np.finfo(np.dtype(dtype)).eps)


#: (rtol, atol relative to the reference's largest magnitude) by the dtype computed in
TOLERANCES = {name: (tolerance(name), tolerance(name)) for name in ("float64", "float32")}


#: the worst disagreement seen, |actual - expected| / max(1, max|expected|), by dtype and
#: by (label, dtype) for the comparisons that carry a label (such as "numpy/peephole")
WORST_DISAGREEMENT: dict = {}


def assert_close(actual, expected, dtype, what, label=None):
    """actual == expected within ``TOLERANCES[dtype]``, relative to max(1, max|expected|).

    The disagreement is recorded for the end-of-run summary unless ``label`` is
    False (comparisons that are meant to fail, such as the mutation checks).
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    if expected.size and label is not False:
        worst = float(np.max(np.abs(actual - expected))) / scale
        for key in (dtype,) if label is None else (dtype, (label, dtype)):
            WORST_DISAGREEMENT[key] = max(WORST_DISAGREEMENT.get(key, 0.0), worst)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)


def to_numpy(x):
    """Any backend's array (or a nested structure of them) as float64-capable NumPy."""
    if isinstance(x, (list, tuple)):
        return type(x)(to_numpy(v) for v in x)
    if isinstance(x, dict):
        return {k: to_numpy(v) for k, v in x.items()}
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    if hasattr(x, "get") and not isinstance(x, dict):  # cupy
        x = x.get()
    return np.asarray(x)


def pytest_terminal_summary(terminalreporter):
    if WORST_DISAGREEMENT:
        terminalreporter.section("agreement with the reference")
        overall = {k: v for k, v in WORST_DISAGREEMENT.items() if isinstance(k, str)}
        labelled = {k: v for k, v in WORST_DISAGREEMENT.items() if not isinstance(k, str)}
        for dtype, worst in sorted(overall.items()):
            terminalreporter.write_line(
                f"{dtype}: worst |actual - reference| / max(1, max|reference|) = {worst:.3e}"
            )
        for (label, dtype), worst in sorted(labelled.items()):
            terminalreporter.write_line(f"  {label} {dtype}: {worst:.3e}")
