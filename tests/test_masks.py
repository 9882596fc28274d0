"""Per-step masks (``mask=``, (B, T) booleans, True at a real step) on every engine.

Every pattern (right padding, left padding as ``pad_sequences`` gives it, gaps, a row
with no real step, no padding at all) against the oracle, which runs each sequence
over its real steps only (the README's "held": h and c carried over a masked step,
its output zero; the reverse direction reads the real steps backwards): outputs,
final states and every gradient, 2 layers, both directions, an initial state and
final-state cotangents. Then: garbage (NaN, inf) at masked steps of x and dy changes
nothing and gets a zero gradient; ``gradcheck`` through the torch module; the engine
table passes PyTorch's kernel over for a mask it cannot run, and keeps it for right
padding; the argument checks.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, to_numpy
from oracle import oracle

import lstm_multi

STEPS, BATCH, INPUT, HIDDEN, LAYERS = 5, 3, 2, 3, 2

#: (B, T) masks, 1 at a real step
PATTERNS = {
    "right": [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]],
    "left": [[0, 1, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]],
    "gaps": [[1, 0, 1, 1, 0], [0, 1, 0, 1, 1], [1, 1, 0, 0, 1]],
    "empty_row": [[0, 0, 0, 0, 0], [1, 0, 1, 1, 1], [0, 1, 1, 0, 0]],
    "full": [[1] * STEPS] * BATCH,
}
#: left padding, a gap and a row with no real step in one batch
MIXED = [[0, 0, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]]


def _mask(pattern):
    """A pattern's name, or rows of 0 and 1 -> the (B, T) boolean mask."""
    return np.array(PATTERNS[pattern] if isinstance(pattern, str) else pattern, dtype=bool)


def _available(backend):
    try:
        lstm_multi.registry.load_backend(backend)
    except (ImportError, RuntimeError) as error:
        pytest.skip(str(error))


def _problem(variant, mask, seed=0, dtype="float64", num_layers=LAYERS):
    """params (NumPy, canonical), batch-first x and dy, state and final-state cotangents."""
    cell = lstm_multi.get_cell("numpy")(
        INPUT, HIDDEN, variant=variant, num_layers=num_layers, bidirectional=True
    )
    rng = np.random.default_rng(seed)
    layers = num_layers * 2
    return {
        "params": cell.init(seed=seed, dtype=dtype),
        "x": rng.standard_normal((BATCH, STEPS, INPUT)).astype(dtype),
        "dy": rng.standard_normal((BATCH, STEPS, 2 * HIDDEN)).astype(dtype),
        "state": tuple(rng.standard_normal((layers, BATCH, HIDDEN)).astype(dtype) for _ in "hc"),
        "dh_n": rng.standard_normal((layers, BATCH, HIDDEN)).astype(dtype),
        "dc_n": rng.standard_normal((layers, BATCH, HIDDEN)).astype(dtype),
        "mask": mask,
    }


def _expected(variant, p):
    """The oracle's outputs and gradients, batch-first like the cell's."""
    swap = (1, 0, 2)
    params = [[{k: np.float64(v) for k, v in d.items()} for d in layer] for layer in p["params"]]
    out = oracle(
        variant, params, p["x"].transpose(swap).astype(np.float64), *p["state"], None,
        p["dy"].transpose(swap), p["dh_n"], p["dc_n"], mask=p["mask"],
    )  # fmt: skip
    out["y"], out["dx"] = out["y"].transpose(swap), out["dx"].transpose(swap)
    return out


def _run(cell, p, convert=lambda a: a, mask=None):
    """The cell's forward and vjp on problem ``p`` -> results keyed as the oracle's."""
    params = cell.from_numpy(p["params"]) if hasattr(cell, "from_numpy") else p["params"]
    x, dy, dh_n, dc_n = (convert(p[k]) for k in ("x", "dy", "dh_n", "dc_n"))
    state = tuple(convert(s) for s in p["state"])
    mask = convert(p["mask"]) if mask is None else mask
    y, (h_n, c_n) = cell(params, x, state, mask=mask)
    grads, dx, (dh0, dc0) = cell.vjp(params, x, dy, state, dh_n=dh_n, dc_n=dc_n, mask=mask)
    return {
        "y": y, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0, "grads": grads,
    }  # fmt: skip


def _assert_matches(result, expected, dtype, label):
    for key in ("y", "h_n", "c_n", "dx", "dh0", "dc0"):
        assert_close(to_numpy(result[key]), expected[key], dtype, key, label)
    for layer, (got, want) in enumerate(zip(result["grads"], expected["grads"], strict=True)):
        for direction, (g, w) in enumerate(zip(got, want, strict=True)):
            assert set(g) == set(w)
            for k in w:
                assert_close(
                    to_numpy(g[k]), w[k], dtype, f"grads[{layer}][{direction}][{k}]", label
                )


def _torch_tensor(a):
    import torch

    return torch.as_tensor(a)


#: (backend, cell options): each CPU engine. JAX runs one layer (two directions): its
#: compilations are most of the time, and the layers' plumbing is the network's, shared
ENGINES = {
    "numpy-array": ("numpy", {"engine": "array"}),
    "numpy-cpu_kernels": ("numpy", {"engine": "cpu_kernels"}),
    "torch-array": ("torch", {"engine": "array"}),
    "torch-cpu_kernels": ("torch", {"engine": "cpu_kernels"}),
    "torch-native": ("torch", {"engine": "native"}),
    "jax-scan": ("jax", {}),
    "jax-autodiff": ("jax", {"autodiff": True}),
}
_CELLS: dict = {}


def _layers(name):
    return 1 if name.startswith("jax") else LAYERS


def _cell(name, variant):
    backend, options = ENGINES[name]
    _available(backend)
    key = (name, variant)
    if key not in _CELLS:  # one cell per engine: JAX compiles once per shape
        _CELLS[key] = lstm_multi.get_cell(backend)(
            INPUT, HIDDEN, variant=variant, num_layers=_layers(name), bidirectional=True,
            **options,
        )  # fmt: skip
    return _CELLS[key]


def _convert(name):
    return _torch_tensor if name.startswith("torch") else (lambda a: a)


#: the patterns that run as a mask (right padding and none run as lengths and without,
#: the paths the rest of the suite checks): JAX compiles the cell once for all of them
MASK_PATTERNS = ("left", "gaps", "empty_row")


def _engine_patterns(thorough):
    """(engine, pattern) pairs: JAX's right padding and full rows (each a compilation of a
    path the rest of the suite runs) and its autodiff (the scan's forward, differentiated
    by JAX: a long compilation) only in the thorough run."""
    pairs = []
    for engine in sorted(ENGINES):
        for pattern in sorted(PATTERNS):
            slow = engine == "jax-autodiff" or (
                engine == "jax-scan" and pattern not in MASK_PATTERNS
            )
            if slow == thorough:
                pairs.append(pytest.param(engine, pattern, id=f"{engine}-{pattern}"))
    return pairs


@pytest.mark.parametrize("engine, pattern", _engine_patterns(thorough=True))
def test_masked_cell_matches_the_oracle_thorough(engine, pattern, thorough):
    if not thorough:
        pytest.skip("a long JAX compilation: --thorough")
    test_masked_cell_matches_the_oracle(engine, pattern)


@pytest.mark.parametrize("engine, pattern", _engine_patterns(thorough=False))
def test_masked_cell_matches_the_oracle(engine, pattern):
    """Outputs, final states and every gradient with the mask against the oracle's run
    over each row's real steps, in float64."""
    variant = "lstm" if engine == "torch-native" else "peephole"
    cell = _cell(engine, variant)
    p = _problem(variant, _mask(pattern), seed=len(pattern), num_layers=_layers(engine))
    result = _run(cell, p, _convert(engine))
    _assert_matches(result, _expected(variant, p), "float64", f"mask {pattern} vs {engine}")
    if engine == "torch-native":
        choice = cell.last_choice
        if pattern in ("right", "full"):  # right padding runs as lengths, on PyTorch's kernel
            assert choice.engine == "native", choice
        else:
            assert choice.engine != "native"
            assert "right-padded lengths only" in dict(choice.passed_over)["native"]


def test_garbage_at_masked_steps_changes_nothing():
    """NaN, inf at the masked steps of x and dy: the results are those of zeros there,
    every one finite, and the masked steps' dx exactly zero, on each engine."""
    mask = _mask(MIXED)
    for engine in ("numpy-array", "numpy-cpu_kernels", "torch-array", "torch-cpu_kernels",
                   "jax-scan"):  # fmt: skip
        cell = _cell(engine, "peephole")
        p = _problem("peephole", mask, seed=4, num_layers=_layers(engine))
        runs = []
        for fill in (0.0, np.nan, np.inf):
            dirty = dict(p)
            dirty["x"], dirty["dy"] = p["x"].copy(), p["dy"].copy()
            dirty["x"][~mask], dirty["dy"][~mask] = fill, fill
            runs.append({k: to_numpy(v) for k, v in _run(cell, dirty, _convert(engine)).items()})
        for run in runs[1:]:
            for key in ("y", "h_n", "c_n", "dx", "dh0", "dc0"):
                assert np.all(np.isfinite(run[key])), f"{engine}: {key} not finite"
                np.testing.assert_array_equal(run[key], runs[0][key], err_msg=f"{engine} {key}")
            for got, want in zip(run["grads"], runs[0]["grads"], strict=True):
                for g, w in zip(got, want, strict=True):
                    for k in w:
                        np.testing.assert_array_equal(g[k], w[k], err_msg=f"{engine} grad {k}")
            assert np.all(run["dx"][~mask] == 0), f"{engine}: a masked step got a gradient"
            assert np.all(run["y"][~mask] == 0), f"{engine}: a masked step has an output"


def test_a_masked_step_holds_the_state():
    """h and c after a masked step are those before it: with T = 1 masked for every row
    the final state is the initial one and the output zero, and dh0, dc0 are dh_n, dc_n."""
    _available("torch")
    cell = lstm_multi.get_cell("numpy")(INPUT, HIDDEN, variant="peephole")
    params = cell.init(seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, INPUT))
    state = tuple(rng.standard_normal((1, 2, HIDDEN)) for _ in "hc")
    mask = np.array([[1, 0, 0], [0, 0, 1]], bool)
    _, (h_one, c_one) = cell(params, x[:, :1], state)
    y, (h_n, c_n) = cell(params, x, state, mask=mask)
    np.testing.assert_array_equal(h_n[:, 0], h_one[:, 0])  # row 0: one real step, then held
    np.testing.assert_array_equal(c_n[:, 0], c_one[:, 0])
    assert np.all(y[0, 1:] == 0) and np.all(y[1, :2] == 0)
    dy = np.zeros_like(y)
    dh_n, dc_n = (rng.standard_normal(s.shape) for s in state)
    grads, dx, (dh0, dc0) = cell.vjp(params, x, dy, state, mask=np.zeros((2, 3), bool),
                                     dh_n=dh_n, dc_n=dc_n)  # fmt: skip
    np.testing.assert_array_equal(dh0, dh_n)
    np.testing.assert_array_equal(dc0, dc_n)
    assert not np.any(dx) and not any(np.any(g) for g in grads[0][0].values())


def test_triton_kernels_run_a_mask(monkeypatch, tmp_path):
    """The Triton engines (the interpreter on the CPU) with left padding, a gap and an
    empty row, both directions (one layer: the layers' plumbing is the network's, which
    the CPU engines check), against the oracle in float32."""
    pytest.importorskip("torch")
    pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LSTM_MULTI_CACHE", str(tmp_path))
    p = _problem("peephole", _mask(MIXED), seed=2, dtype="float32", num_layers=1)
    expected = _expected("peephole", p)
    for engine in ("triton", "triton_persistent"):
        cell = lstm_multi.get_cell("torch")(
            INPUT, HIDDEN, variant="peephole", bidirectional=True, engine=engine
        )
        result = _run(cell, p, _torch_tensor)
        assert cell.last_choice.engine == engine, cell.last_choice
        _assert_matches(result, expected, "float32", f"mask vs {engine}")


def test_pallas_kernels_run_a_mask():
    """The persistent Pallas kernels (the interpreter, float64 math) with left padding, a
    gap and an empty row, both directions, against the oracle."""
    _available("jax")
    pytest.importorskip("torch", reason="the oracle runs on torch")
    from test_pallas import CountedKernels

    kernels = CountedKernels()
    cell = lstm_multi.get_cell("jax")(
        INPUT, HIDDEN, variant="peephole", bidirectional=True, engine="pallas_persistent",
        pallas_kernels=kernels,
    )  # fmt: skip
    p = _problem("peephole", _mask(MIXED), seed=3, num_layers=1)
    _assert_matches(_run(cell, p), _expected("peephole", p), "float64", "mask vs pallas")
    # call, and vjp (forward with the tape, then backward), each direction
    assert kernels.launches == {"sequence_forward": 4, "sequence_backward": 2}, kernels.launches


def test_cupy_cell_runs_a_mask():
    """The CuPy cell's plumbing (its fused kernels' programs over NumPy, as
    test_cupy_graphs runs it), direct and replayed from graphs, against the oracle."""
    pytest.importorskip("torch", reason="the oracle runs on torch")
    from test_cupy_graphs import ProgramCell

    p = _problem("peephole", _mask(MIXED), seed=5)
    expected = _expected("peephole", p)
    for graphs in (False, True):
        cell = ProgramCell(INPUT, HIDDEN, variant="peephole", num_layers=LAYERS,
                           bidirectional=True, cuda_graphs=graphs)  # fmt: skip
        for _ in range(2 if graphs else 1):  # the graphs are captured on the second call
            _assert_matches(_run(cell, p), expected, "float64", f"mask vs cupy graphs={graphs}")


# the torch module -------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("native", [True, False])
def test_module_mask_is_the_cells(batch_first, native):
    """``LSTM(...)(x, hx, mask=mask)``: mask (B, T) whatever batch_first, the functional
    cell's results on the module's canonical parameters, for every pattern (right padding runs
    on PyTorch's kernel where native is allowed)."""
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    torch.manual_seed(0)
    module = LSTM(INPUT, HIDDEN, LAYERS, batch_first=batch_first, bidirectional=True,
                  native=native, dtype=torch.float64)  # fmt: skip
    cell = lstm_multi.get_cell("torch")(
        INPUT, HIDDEN, num_layers=LAYERS, bidirectional=True, engine="array"
    )
    for pattern in sorted(PATTERNS):
        mask = torch.as_tensor(_mask(pattern))
        x = torch.randn(BATCH, STEPS, INPUT, dtype=torch.float64)
        hx = tuple(torch.randn(2 * LAYERS, BATCH, HIDDEN, dtype=torch.float64) for _ in "hc")
        y, (h_n, c_n) = module(x if batch_first else x.transpose(0, 1), hx, mask=mask)
        want, (h_want, c_want) = cell(module.canonical_params(), x, hx, mask=mask)
        y = y if batch_first else y.transpose(0, 1)
        for got, expected in ((y, want), (h_n, h_want), (c_n, c_want)):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=pattern)
        right = pattern in ("right", "full")
        assert (module.last_choice.engine == "native") == (native and right), pattern


def test_module_mask_unbatched_and_gradcheck():
    """An unbatched input takes a (T,) mask; ``gradcheck`` through a gapped mask (x, the
    initial state and every parameter)."""
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    torch.manual_seed(1)
    module = LSTM(INPUT, 2, bidirectional=True, batch_first=True, variant="peephole",
                  dtype=torch.float64)  # fmt: skip
    x = torch.randn(4, INPUT, dtype=torch.float64)
    mask = torch.tensor([False, True, False, True])
    y, (h_n, _) = module(x, mask=mask)
    want, (h_want, _) = module(x[None], mask=mask[None])
    torch.testing.assert_close(y, want[0])
    torch.testing.assert_close(h_n, h_want[:, 0])
    gapped = torch.tensor([[True, False, True, True], [False, True, True, False]])
    xb = torch.randn(2, 4, INPUT, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in module.named_parameters()]

    def run(xb, h0, c0, *weights):
        out = torch.func.functional_call(module, dict(zip(names, weights, strict=True)),
                                         (xb, (h0, c0)), {"mask": gapped})  # fmt: skip
        return out[0], *out[1]

    assert torch.autograd.gradcheck(run, (xb, h0, c0, *module.parameters()))


# choices and checks -----------------------------------------------------------------


def test_explain_says_why_native_cannot_run_a_gapped_mask():
    torch = pytest.importorskip("torch")
    cell = lstm_multi.get_cell("torch")(INPUT, HIDDEN)
    x = torch.zeros(BATCH, STEPS, INPUT)
    assert cell.explain(x, mask=torch.as_tensor(_mask("right"))).engine == "native"
    choice = cell.explain(x, mask=torch.as_tensor(_mask("left")))
    assert choice.engine != "native"
    assert "not a mask with left padding, gaps" in dict(choice.passed_over)["native"]


def test_mask_argument_checks():
    cell = lstm_multi.get_cell("numpy")(INPUT, HIDDEN)
    params = cell.init(seed=0)
    x = np.zeros((BATCH, STEPS, INPUT), np.float32)
    mask = _mask("gaps")
    with pytest.raises(ValueError, match=r"lengths, mask: expected at most one of them, got both"):
        cell(params, x, lengths=[5, 5, 5], mask=mask)
    with pytest.raises(
        ValueError, match=r"mask: expected shape \(3, 5\) \(batch, time.*got \(5, 3\)"
    ):
        cell(params, x, mask=mask.T)
    with pytest.raises(TypeError, match=r"mask: expected booleans .* got dtype float32"):
        cell(params, x, mask=mask.astype(np.float32))
    with pytest.raises(TypeError, match=r"mask: expected booleans .* got dtype int64"):
        cell.vjp(params, x, np.zeros((BATCH, STEPS, HIDDEN), np.float32), mask=mask.astype(int))
    with pytest.raises(TypeError, match=r"mask: expected an array of booleans, got str"):
        cell(params, x, mask="all")
    y, _ = cell(params, x, mask=mask.tolist())  # a list of lists of bools is an array
    assert y.shape == (BATCH, STEPS, HIDDEN)


def test_module_mask_checks():
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence

    from lstm_multi.torch import LSTM

    module = LSTM(INPUT, HIDDEN, batch_first=True)
    x = torch.zeros(BATCH, STEPS, INPUT)
    with pytest.raises(TypeError, match=r"mask: expected booleans .* got dtype float32"):
        module(x, mask=torch.ones(BATCH, STEPS))
    with pytest.raises(ValueError, match=r"mask: expected shape \(3, 5\)"):
        module(x, mask=torch.ones(STEPS, BATCH, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask: expected shape \(5,\) \(time\) for unbatched"):
        module(x[0], mask=torch.ones(1, STEPS, dtype=torch.bool))
    packed = pack_padded_sequence(x, [5, 3, 2], batch_first=True)
    with pytest.raises(ValueError, match="mask: expected None with a PackedSequence"):
        module(packed, mask=torch.ones(BATCH, STEPS, dtype=torch.bool))


def _doc_examples():
    import pathlib
    import re

    page = pathlib.Path(__file__).parent.parent / "docs" / "masks.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert len(blocks) == 2
    return page, blocks


def test_the_docs_page_runs():
    """docs/masks.md's cell and module example runs as written."""
    pytest.importorskip("torch")
    _, (_, cell_example) = _doc_examples()
    exec(compile(cell_example, "docs/masks.md", "exec"), {})


def test_the_docs_keras_example_runs(tmp_path, thorough):
    """docs/masks.md's Keras example runs on JAX, in a subprocess (Keras's backend is fixed
    per process; a slow start, so in the thorough run: test_layer_keras trains the same
    pipeline in the default one)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if not thorough:
        pytest.skip("a Keras process: --thorough")
    if importlib.util.find_spec("keras") is None or importlib.util.find_spec("jax") is None:
        pytest.skip("needs keras and jax")
    page, (keras_example, _) = _doc_examples()
    script = tmp_path / "keras_example.py"
    script.write_text(keras_example)
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(page.parent.parent)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_trees_close(got, want):
    import jax

    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def _float32_batch():
    return np.random.default_rng(0).standard_normal((BATCH, STEPS, INPUT)).astype(np.float32)


def test_equinox_module_takes_a_mask():
    """The Equinox module passes ``mask`` to its cell: a gapped mask gives the functional
    JAX cell's results on its parameters; one sequence takes a (T,) mask, under
    ``jax.vmap`` too."""
    _available("jax")
    pytest.importorskip("equinox")
    import jax

    from lstm_multi import equinox as eqx_layers

    mask, x = _mask(MIXED), _float32_batch()
    model = eqx_layers.LSTM(INPUT, HIDDEN, key=jax.random.key(0))
    y, state = model(x, mask=mask)
    assert np.all(np.asarray(y)[~mask] == 0)
    _assert_trees_close((y, state), model.cell(model.params, x, mask=mask))
    one = jax.vmap(lambda s, m: model(s, mask=m), out_axes=(0, (1, 1)))
    _assert_trees_close(one(x, mask), (y, state))
    with pytest.raises(ValueError, match=r"mask: expected shape \(5,\) \(time\) for one"):
        model(x[0], mask=mask)


def test_flax_modules_take_a_mask():
    """The Flax NNX and Linen modules pass ``mask`` to their cell."""
    _available("jax")
    pytest.importorskip("flax")
    import jax
    from flax import nnx

    from lstm_multi import flax as flax_layers

    mask, x = _mask(MIXED), _float32_batch()
    cell = lstm_multi.get_cell("jax")(INPUT, HIDDEN)
    model = flax_layers.LSTM(INPUT, HIDDEN, rngs=nnx.Rngs(0))
    _assert_trees_close(model(x, mask=mask), cell(model.params, x, mask=mask))
    linen = flax_layers.LinenLSTM(INPUT, HIDDEN)
    variables = linen.init(jax.random.key(0), x)
    params = [[dict(p) for p in d] for d in variables["params"]["layers"]]
    _assert_trees_close(linen.apply(variables, x, mask=mask), cell(params, x, mask=mask))
