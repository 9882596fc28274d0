"""Issue 22 (no silent wrong answers), items 5, 10-13: what a hostile user tries.

* NaN and inf in dy past each sequence's length change no gradient with a projection
  on the compiled CPU kernels (``kernel_direction._backward_projected``), nor on the
  per-step and batch-split loops without one;
* the environment switches parse strictly (``lstm_multi.environment``);
* ``gate_kernel="triton"`` and ``cuda_graphs=True`` on CPU tensors warn once;
* a batch of no sequences gives ``nn.LSTM``'s empty outputs and zero gradients;
* ``torch.jit.script`` scripts the plain native module as ``nn.LSTM`` and refuses
  the others with a message naming what to use.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from conftest import to_numpy

import lstm_multi
from lstm_multi import environment
from lstm_multi.kernels import cpu_kernels

# -- item 5: garbage in dy's padding, with a projection and on the larger loops --------

GARBAGE = [np.nan, np.inf, -np.inf]

PATHS = [
    pytest.param(("numpy", {}), id="numpy"),
    pytest.param(("torch", {"native": False}), id="torch-generic"),
]


def _padded(array, lengths, fill):
    out = array.copy()
    for n, length in enumerate(lengths):
        out[n, length:] = fill
    return out


def _results(backend, cell, params, x, dy, lengths):
    if backend == "torch":
        import torch

        x, dy = torch.as_tensor(x), torch.as_tensor(dy)
    y, (h_n, c_n) = cell(params, x, lengths=lengths)
    grads, dx, (dh0, dc0) = cell.vjp(params, x, dy, lengths=lengths)
    flat = [y, h_n, c_n, dx, dh0, dc0] + [g[k] for layer in grads for g in layer for k in sorted(g)]
    return [to_numpy(a) for a in flat]


def _check_garbage_changes_nothing(backend, kwargs, *, hidden, batch, proj_size, variant):
    try:
        lstm_multi.registry.load_backend(backend)
    except (ImportError, RuntimeError) as error:
        pytest.skip(str(error))
    steps, inputs = 5, 3
    cell = lstm_multi.get_cell(backend)(
        inputs, hidden, variant=variant, num_layers=2, bidirectional=True,
        proj_size=proj_size, batch_first=True, **kwargs,
    )  # fmt: skip
    params = cell.init(seed=1, dtype="float64")
    rng = np.random.default_rng(2)
    lengths = np.array([steps] + [int(k) for k in rng.integers(1, steps, batch - 1)])
    width = 2 * (proj_size or hidden)
    x = _padded(rng.standard_normal((batch, steps, inputs)), lengths, 0.0)
    dy = rng.standard_normal((batch, steps, width))
    clean = _results(backend, cell, params, x, _padded(dy, lengths, 0.0), lengths)
    for fill in GARBAGE:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no NaN arithmetic either
            dirty = _results(backend, cell, params, x, _padded(dy, lengths, fill), lengths)
        for k, (a, b) in enumerate(zip(dirty, clean, strict=True)):
            assert np.all(np.isfinite(a)), f"result {k} is not finite with {fill} in dy's padding"
            assert np.array_equal(a, b), f"result {k} changed with {fill} in dy's padding"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", ["lstm", "peephole", "peephole_full"])
def test_garbage_in_dy_padding_with_a_projection(path, variant):
    """dW_hr = sum_t m_t^T (dy_t + dh_t) read dy's padding: 0 * NaN = NaN."""
    backend, kwargs = path
    _check_garbage_changes_nothing(backend, kwargs, hidden=4, batch=3, proj_size=2, variant=variant)


@pytest.mark.parametrize("path", PATHS)
def test_garbage_in_dy_padding_on_the_per_step_loop(path):
    """B * H * 4H above ``SEQUENCE_LOOP_MAX_MACS``: each step one framework product."""
    backend, kwargs = path
    _check_garbage_changes_nothing(
        backend, kwargs, hidden=128, batch=3, proj_size=0, variant="peephole"
    )
    _check_garbage_changes_nothing(
        backend, kwargs, hidden=128, batch=3, proj_size=16, variant="peephole"
    )


def test_garbage_in_dy_padding_on_the_split_loops():
    """The batch-split loops (torch's BLAS), where the plan gives them the batch."""
    torch = pytest.importorskip("torch")
    batch = 8 * torch.get_num_threads()
    _check_garbage_changes_nothing(
        "torch", {"native": False}, hidden=64, batch=batch, proj_size=0, variant="lstm"
    )


# -- item 10: the environment switches parse strictly ----------------------------------

SWITCHES = [
    (environment.CPU_KERNELS, cpu_kernels.enabled, True),
    (environment.CPU_THREADS, cpu_kernels.split_enabled, True),
    (environment.PALLAS_INTERPRET, environment.pallas_interpret, False),
    (environment.TRITON_INTERPRET, environment.triton_interpret, False),
]


@pytest.mark.parametrize("name, read, default", SWITCHES)
@pytest.mark.parametrize(
    "text, value",
    [("1", True), ("0", False), ("true", True), ("FALSE", False), (" Yes ", True),
     ("no", False), ("on", True), ("Off", False)],
)  # fmt: skip
def test_switch_values(monkeypatch, name, read, default, text, value):
    monkeypatch.setenv(name, text)
    assert read() is value


@pytest.mark.parametrize("name, read, default", SWITCHES)
def test_switch_unset_or_empty_is_the_default(monkeypatch, name, read, default):
    monkeypatch.delenv(name, raising=False)
    assert read() is default
    monkeypatch.setenv(name, "  ")
    assert read() is default


@pytest.mark.parametrize("name, read, default", SWITCHES)
@pytest.mark.parametrize("text", ["abc", "-1", "1000", "2", "y", "enabled"])
def test_switch_refuses_what_it_cannot_read(monkeypatch, name, read, default, text):
    monkeypatch.setenv(name, text)
    expected = f"{name}: expected one of 1, 0, true, false, yes, no, on, off, got '{text}'"
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        read()


def test_cpu_threads_says_it_is_not_a_thread_count(monkeypatch):
    monkeypatch.setenv(environment.CPU_THREADS, "4")
    with pytest.raises(ValueError, match="on/off switch .* not a thread count .*set_num_threads"):
        cpu_kernels.split_enabled()


@pytest.mark.parametrize("text", ["false", "off", "no"])
def test_cpu_kernels_off_in_words_turns_them_off(monkeypatch, text):
    monkeypatch.setenv(environment.CPU_KERNELS, text)
    assert cpu_kernels.cpu_kernels(lstm_multi.spec.get_variant("lstm"), "float") is None


def test_a_bad_switch_reaches_the_caller(monkeypatch):
    """A numpy call on the CPU reads LSTM_MULTI_CPU_KERNELS and refuses a bad value."""
    monkeypatch.setenv(environment.CPU_KERNELS, "abc")
    cell = lstm_multi.get_cell("numpy")(2, 3)
    with pytest.raises(ValueError, match="LSTM_MULTI_CPU_KERNELS: expected one of"):
        cell(cell.init(seed=0), np.zeros((1, 2, 2), np.float32))


def test_every_environment_variable_is_read_in_one_place_and_documented():
    """Only ``environment`` reads the environment (the ``lstm-multi`` command sets Keras's
    KERAS_BACKEND in its own process; check_variant sets TRITON_INTERPRET around its Triton
    check), and each variable it names is in its docstring's table and on the docs page
    ``docs/environment.md``."""
    import pathlib
    import re

    package = pathlib.Path(lstm_multi.__file__).parent
    for path in package.rglob("*.py"):
        if path.name == "environment.py" or "bench" in path.parts:
            continue
        reads = re.findall(r"environ\.get\(|getenv\(|environ\[[^\]]+\](?!\s*=)", path.read_text())
        assert reads == [], f"{path.relative_to(package)} reads the environment: {reads}"
    names = {
        value
        for key, value in vars(environment).items()
        if key.isupper() and isinstance(value, str)
    }
    assert {"LSTM_MULTI_CPU_KERNELS", "LSTM_MULTI_CACHE", "CXX", "TRITON_INTERPRET"} <= names
    assert "KERAS_BACKEND" in names
    page = (package.parent / "docs" / "environment.md").read_text()
    for name in names:
        assert f"``{name}``" in environment.__doc__, name
        assert f"| `{name}` |" in page, name


def test_a_compiler_asked_for_that_is_not_here_is_named(monkeypatch):
    """CXX naming no command is not silently replaced by g++: the build says so."""
    from lstm_multi.kernels import build

    monkeypatch.setenv("CXX", "no-such-compiler++")
    assert build.host_compiler() is None
    with pytest.raises(
        build.CompilerMissing, match="CXX: expected a C\\+\\+ compiler .*'no-such-compiler\\+\\+'"
    ):
        build.compile_library("int lm_unused;")
    monkeypatch.setenv("CXX", " ")
    assert build.host_compiler() is not None or shutil.which("g++") is None


# -- item 11: GPU options on CPU tensors warn once ----------------------------------------


@pytest.fixture
def fresh_warnings(monkeypatch):
    from lstm_multi.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_WARNED_OPTIONS", set())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _module_call(torch, **options):
    from lstm_multi.torch import LSTM

    module = LSTM(3, 4, variant="peephole", **options)
    x = torch.randn(5, 2, 3)
    return module, x


@pytest.mark.parametrize(
    "options, match",
    [
        ({"gate_kernel": "triton"}, r"gate_kernel='triton' has no effect on cpu tensors"),
        ({"cuda_graphs": True}, r"cuda_graphs=True has no effect on cpu tensors"),
    ],
)
def test_gpu_options_on_cpu_tensors_warn_once(fresh_warnings, options, match):
    torch = pytest.importorskip("torch")
    if "gate_kernel" in options:
        pytest.importorskip("triton")
    module, x = _module_call(torch, **options)
    reference = _module_call(torch)[0]
    reference.load_state_dict(module.state_dict())
    with pytest.warns(UserWarning, match=match):
        y = module(x)[0]
    torch.testing.assert_close(y, reference(x)[0], rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        module(x)  # the second call: no second warning
        cell = lstm_multi.get_cell("torch")(3, 4, variant="peephole", **options)
        cell(cell.init(seed=0), torch.randn(2, 5, 3))  # nor from the functional cell


def test_functional_cell_warns_too(fresh_warnings):
    torch = pytest.importorskip("torch")
    cell = lstm_multi.get_cell("torch")(3, 4, native=False, cuda_graphs=True)
    with pytest.warns(UserWarning, match="cuda_graphs=True has no effect on cpu tensors"):
        cell(cell.init(seed=0), torch.randn(2, 5, 3))


def test_triton_under_its_interpreter_does_not_warn(fresh_warnings, monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LSTM_MULTI_CACHE", str(tmp_path))
    module, x = _module_call(torch, gate_kernel="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        module(x)


# -- item 12: batch size 0 ---------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
@pytest.mark.parametrize("variant", ["lstm", "peephole"])
@pytest.mark.parametrize(
    "config",
    [{}, {"batch_first": True}, {"bidirectional": True, "num_layers": 2}, {"proj_size": 2}],
    ids=["plain", "batch_first", "bidirectional", "proj_size"],
)
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_empty_batch_matches_nn_lstm(native, variant, config, with_state):
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    reference = torch.nn.LSTM(3, 4, **config, dtype=torch.float64)
    module = LSTM(3, 4, **config, variant=variant, native=native, dtype=torch.float64)
    shape = (0, 5, 3) if config.get("batch_first") else (5, 0, 3)
    layers = reference.num_layers * (2 if reference.bidirectional else 1)
    results = []
    for m in (reference, module):
        x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        hx = None
        if with_state:
            hx = (
                torch.zeros(layers, 0, reference.proj_size or 4, dtype=torch.float64),
                torch.zeros(layers, 0, 4, dtype=torch.float64),
            )
        y, (h, c) = m(x, hx)
        (y.sum() + h.sum() + c.sum()).backward()
        grads = {n: p.grad for n, p in m.named_parameters()}
        results.append((y, h, c, x.grad, grads))
    for a, b in zip(results[0][:4], results[1][:4], strict=True):
        assert (a.shape, a.dtype, a.requires_grad) == (b.shape, b.dtype, b.requires_grad)
    for name, grad in results[1][4].items():
        parameter = dict(module.named_parameters())[name]
        assert grad is not None and grad.shape == parameter.shape, name
        assert torch.equal(grad, torch.zeros_like(parameter)), name


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("proj_size", [0, 2])
def test_functional_cells_take_an_empty_batch(backend, proj_size):
    try:
        lstm_multi.registry.load_backend(backend)
    except (ImportError, RuntimeError) as error:
        pytest.skip(str(error))
    cell = lstm_multi.get_cell(backend)(
        3, 4, variant="peephole", num_layers=2, bidirectional=True, proj_size=proj_size
    )
    params = cell.init(seed=0)
    x = np.zeros((0, 5, 3), np.float32)
    y, (h, c) = cell(params, x)
    width = proj_size or 4
    assert (tuple(y.shape), tuple(h.shape), tuple(c.shape)) == ((0, 5, 2 * width), (4, 0, width),
                                                                 (4, 0, 4))  # fmt: skip
    grads, dx, (dh0, dc0) = cell.vjp(params, x, np.zeros(tuple(y.shape), np.float32))
    assert tuple(dx.shape) == (0, 5, 3) and tuple(dh0.shape) == (4, 0, width)
    for layer, layer_grads in zip(params, grads, strict=True):
        for p, g in zip(layer, layer_grads, strict=True):
            for key in p:
                assert np.array_equal(to_numpy(g[key]), np.zeros(tuple(p[key].shape))), key


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_no_time_steps_is_still_refused(backend):
    cell = lstm_multi.get_cell(backend)(3, 4)
    with pytest.raises(ValueError, match=r"x: expected at least one time step"):
        cell(cell.init(seed=0), np.zeros((2, 0, 3), np.float32))


# -- item 13: torch.jit.script --------------------------------------------------------------


def test_jit_script_of_the_plain_native_module_is_nn_lstm():
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    module = LSTM(3, 4, 2, bidirectional=True, proj_size=2, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's own
        scripted = torch.jit.script(module)
        expected = torch.jit.script(module.to_torch())
    assert scripted._c._method_names() == expected._c._method_names()
    assert all(a is b for a, b in zip(scripted.parameters(), module.parameters(), strict=True))
    x = torch.randn(2, 5, 3)
    y, (h, c) = scripted.forward__0(x)  # TorchScript's name for nn.LSTM's tensor forward
    y_ref, (h_ref, c_ref) = module(x)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref) and torch.equal(c, c_ref)


@pytest.mark.parametrize("options", [{"variant": "peephole"}, {"native": False}])
def test_jit_script_of_the_spec_loop_is_refused(options):
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(
            RuntimeError,
            match=r"cannot be scripted.*torch\.export\.export.*lstm_multi\.onnx\.export",
        ):
            torch.jit.script(LSTM(3, 4, **options))
