"""Bad input gets a clear error naming the argument, the expected and the received value."""

from __future__ import annotations

import numpy as np
import pytest

import lstm_multi


def make(backend, **kwargs):
    args = {"input_size": 3, "hidden_size": 4, "num_layers": 2, "bidirectional": True, **kwargs}
    cell = lstm_multi.get_cell(backend)(**args)
    return cell, cell.init(seed=0, dtype="float32")


def x_of(shape=(2, 5, 3), dtype="float32"):
    return np.zeros(shape, dtype=dtype)


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"backend: expected one of \['cupy', 'jax', 'numpy', 'torch'\], got 'tensorflow'",
    ):
        lstm_multi.get_cell("tensorflow")


def test_unknown_variant_lists_them(backend):
    with pytest.raises(
        ValueError,
        match=r"variant: expected one of \['cifg', 'layernorm', .*'peephole_full'\], got 'gru'",
    ):
        lstm_multi.get_cell(backend)(3, 4, variant="gru")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_size": 0}, ValueError, "input_size: expected a positive integer, got 0"),
        ({"hidden_size": "8"}, ValueError, "hidden_size: expected a positive integer, got '8'"),
        ({"num_layers": 1.0}, ValueError, "num_layers: expected a positive integer, got 1.0"),
        ({"bidirectional": "yes"}, TypeError, "bidirectional: expected True or False, got 'yes'"),
        ({"batch_first": None}, TypeError, "batch_first: expected True or False, got None"),
    ],
)
def test_bad_constructor_arguments(backend, kwargs, error, match):
    with pytest.raises(error, match=match):
        make(backend, **kwargs)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((5, 3), r"x: expected a 3-d array \(batch, time, input_size\), got shape \(5, 3\)"),
        (
            (2, 5, 7),
            r"x: expected input_size 3 on the last axis \(batch, time, input_size\), got shape \(2, 5, 7\)",
        ),
        ((2, 0, 3), r"x: expected at least one time step \(batch, time, input_size\)"),
    ],
)
def test_bad_x_shape(backend, shape, match):
    cell, params = make(backend)
    with pytest.raises(ValueError, match=match):
        cell(params, x_of(shape))


def test_x_must_be_floating(backend):
    cell, params = make(backend)
    with pytest.raises(TypeError, match=r"x: expected a floating dtype .* got int32"):
        cell(params, x_of(dtype="int32"))


def test_x_must_be_an_array(backend):
    cell, params = make(backend)
    with pytest.raises(TypeError, match="x: expected an array, got list"):
        cell(params, [[[0.0, 0.0, 0.0]]])


def test_time_major_layout_is_named(backend):
    cell, params = make(backend, batch_first=False)
    with pytest.raises(ValueError, match=r"\(time, batch, input_size\)"):
        cell(params, x_of((5, 2)))


def test_mixed_dtypes(backend):
    cell, params = make(backend)
    # every parameter float32, x float64: the error names x
    with pytest.raises(
        TypeError,
        match=r"x: expected the parameters' dtype float32, got float64 \(cast x to float32, "
        r"or draw the parameters in float64: cell.init\(seed, dtype='float64'\)\)",
    ):
        cell(params, x_of(dtype="float64"))
    # the parameters disagree among themselves: the one that differs from x is named
    mixed = [[dict(p) for p in layer] for layer in params]
    mixed[0][0]["W"] = cell.ops.astype(mixed[0][0]["W"], "float64")
    with pytest.raises(
        TypeError,
        match=r"params\[0\]\[0\]\['W'\]: expected dtype float32 \(the dtype of x\), got float64",
    ):
        cell(params=mixed, x=x_of())
    state = (np.zeros((4, 2, 4), "float64"), np.zeros((4, 2, 4), "float32"))
    with pytest.raises(
        TypeError, match=r"state h0: expected dtype float32 \(the dtype of x\), got float64"
    ):
        cell(params, x_of(), state=state)


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        (
            (np.zeros((2, 2, 4), "float32"), np.zeros((4, 2, 4), "float32")),
            ValueError,
            r"state h0: expected shape \(4, 2, 4\), got \(2, 2, 4\)",
        ),
        (
            (np.zeros((4, 2, 4), "float32"), np.zeros((4, 3, 4), "float32")),
            ValueError,
            r"state c0: expected shape \(4, 2, 4\), got \(4, 3, 4\)",
        ),
        (
            np.zeros((4, 2, 4), "float32"),
            TypeError,
            r"state: expected a pair \(h0, c0\), got ndarray",
        ),
        (
            (np.zeros((4, 2, 4), "float32"),),
            TypeError,
            r"state: expected a pair \(h0, c0\), got tuple",
        ),
        (
            ([1.0], np.zeros((4, 2, 4), "float32")),
            TypeError,
            "state h0: expected an array, got list",
        ),
    ],
)
def test_bad_state(backend, state, error, match):
    cell, params = make(backend)
    with pytest.raises(error, match=match):
        cell(params, x_of(), state=state)


@pytest.mark.parametrize(
    ("lengths", "error", "match"),
    [
        (np.array([5, 0]), ValueError, r"lengths: expected every value in 1..5 \(T\), got \[0\]"),
        (np.array([6, 2]), ValueError, r"lengths: expected every value in 1..5 \(T\), got \[6\]"),
        (
            np.array([5, 2, 1]),
            ValueError,
            r"lengths: expected shape \(2,\) \(one per sequence\), got \(3,\)",
        ),
        (
            np.array([[5, 2]]),
            ValueError,
            r"lengths: expected shape \(2,\) \(one per sequence\), got \(1, 2\)",
        ),
        (np.array([5.0, 2.0]), TypeError, "lengths: expected integers, got dtype float64"),
        ([5, -1], ValueError, r"lengths: expected every value in 1..5 \(T\), got \[-1\]"),
        ("5", TypeError, "lengths: expected an array of integers, got str"),
    ],
)
def test_bad_lengths(backend, lengths, error, match):
    cell, params = make(backend)
    with pytest.raises(error, match=match):
        cell(params, x_of(), lengths=lengths)


def test_lengths_as_a_list_work(backend):
    cell, params = make(backend)
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype("float32")
    y, _ = cell(params, x, lengths=[5, 2])
    assert np.all(np.asarray(y)[1, 2:] == 0)
    # the list means what the same lengths as an array mean: bit for bit that call's output
    y_array, _ = cell(params, x, lengths=np.array([5, 2]))
    assert np.array_equal(np.asarray(y), np.asarray(y_array))
    assert np.any(np.asarray(y)[1, :2] != 0) and np.any(np.asarray(y)[0, 2:] != 0)


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (
            lambda p: p[:1],
            ValueError,
            r"params: expected a list of 2 layer\(s\), got list of length 1",
        ),
        (
            lambda p: [p[0], p[1][:1]],
            ValueError,
            r"params\[1\]: expected a list of 2 direction\(s\), got list of length 1",
        ),
        (
            lambda p: [p[0], [p[1][0], {**p[1][1], "p": p[1][1]["b"]}]],
            ValueError,
            r"params\[1\]\[1\]: expected a dict with keys \['U', 'W', 'b'\], got \['U', 'W', 'b', 'p'\]",
        ),
        (
            lambda p: [p[0], [p[1][0], {**p[1][1], "U": p[1][1]["W"]}]],
            ValueError,
            r"params\[1\]\[1\]\['U'\]: expected shape \(4, 16\), got \(8, 16\)",
        ),
        (
            lambda p: [[{**p[0][0], "b": 1.0}, p[0][1]], p[1]],
            TypeError,
            r"params\[0\]\[0\]\['b'\]: expected an array, got float",
        ),
        (lambda p: {"W": 1}, ValueError, r"params: expected a list of 2 layer\(s\), got dict"),
    ],
)
def test_bad_params(backend, mutate, error, match):
    cell, params = make(backend)
    with pytest.raises(error, match=match):
        cell(mutate(params), x_of())


def test_bad_numpy_params(backend):
    cell, _ = make(backend)
    np_params = lstm_multi.get_cell("numpy")(3, 4, num_layers=2, bidirectional=True).init()
    np_params[0][0]["W"] = np_params[0][0]["W"][:, :8]
    with pytest.raises(
        ValueError, match=r"params\[0\]\[0\]\['W'\]: expected shape \(3, 16\), got \(3, 8\)"
    ):
        cell.from_numpy(np_params)


def test_bad_init_dtype(backend):
    cell, _ = make(backend)
    with pytest.raises(TypeError, match=r"dtype: expected a floating dtype .* got int64"):
        cell.init(dtype="int64")


def test_bad_vjp_cotangents(backend):
    cell, params = make(backend)
    x = x_of()
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, 5, 8\), got \(2, 5, 4\)"):
        cell.vjp(params, x, np.zeros((2, 5, 4), "float32"))
    with pytest.raises(ValueError, match=r"dh_n: expected shape \(4, 2, 4\), got \(4, 4\)"):
        cell.vjp(params, x, np.zeros((2, 5, 8), "float32"), dh_n=np.zeros((4, 4), "float32"))
    with pytest.raises(
        TypeError, match=r"dc_n: expected dtype float32 \(the dtype of x\), got float64"
    ):
        cell.vjp(params, x, np.zeros((2, 5, 8), "float32"), dc_n=np.zeros((4, 2, 4)))


def test_numpy_backend_refuses_foreign_arrays():
    torch = pytest.importorskip("torch")
    cell, params = make("numpy")
    with pytest.raises(TypeError, match="x: expected a numpy array, got Tensor"):
        cell(params, torch.zeros(2, 5, 3))


def test_numpy_has_no_bfloat16():
    cell, _ = make("numpy")
    with pytest.raises(TypeError, match="dtype: NumPy has no bfloat16"):
        cell.init(dtype="bfloat16")


def test_init_seed_must_be_a_non_negative_integer_or_a_generator(backend):
    cell, _ = make(backend)
    with pytest.raises(ValueError, match="seed: expected a non-negative integer, got -1"):
        cell.init(seed=-1)
    expected = "seed: expected a non-negative int, a numpy.random.Generator, a torch.Generator"
    for bad in (1.5, True, "3"):
        with pytest.raises(TypeError, match=f"{expected} or a JAX PRNG key, got"):
            cell.init(seed=bad)
    with pytest.raises(
        ValueError, match=r"scheme: expected one of \('uniform', 'keras', 'flax', 'equinox'\)"
    ):
        cell.init(scheme="xavier")


def test_init_dtype_may_be_a_dtype_object(backend):
    cell, _ = make(backend)
    want = cell.to_numpy(cell.init(seed=3, dtype="float32"))
    dtypes = [np.float32, np.dtype("float32")]
    if backend == "torch":
        import torch

        dtypes.append(torch.float32)
    if backend == "jax":
        import jax.numpy as jnp

        dtypes.append(jnp.float32)
    for dtype in dtypes:
        got = cell.to_numpy(cell.init(seed=3, dtype=dtype))
        np.testing.assert_array_equal(got[1][1]["U"], want[1][1]["U"])
    with pytest.raises(TypeError, match=r"dtype: expected a floating dtype .* got int32"):
        cell.init(dtype=np.int32)


def _lengths_in_every_form(values):
    forms = {"list": list(values), "tuple": tuple(values)}
    for dtype in ("int8", "int16", "int32", "int64", "uint8", "uint32"):
        forms[f"numpy {dtype}"] = np.asarray(values, dtype=dtype)
    try:
        import torch

        for dtype in (torch.int32, torch.int64, torch.uint8):
            forms[f"torch {dtype}"] = torch.tensor(values, dtype=dtype)
    except ImportError:
        pass
    try:
        import jax.numpy as jnp

        forms["jax int32"] = jnp.asarray(values, dtype=jnp.int32)
    except ImportError:
        pass
    return forms


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lengths_of_any_integer_dtype_and_framework(backend, bidirectional):
    cell, params = make(backend, bidirectional=bidirectional)
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype("float32")
    dy = np.ones((2, 5, cell.num_directions * 4), "float32")
    want_y = np.asarray(cell(params, x, lengths=np.array([5, 2]))[0])
    want_dx = np.asarray(cell.vjp(params, x, dy, lengths=np.array([5, 2]))[1])
    for name, lengths in _lengths_in_every_form([5, 2]).items():
        y = cell(params, x, lengths=lengths)[0]
        dx = cell.vjp(params, x, dy, lengths=lengths)[1]
        np.testing.assert_array_equal(np.asarray(y), want_y, err_msg=name)
        np.testing.assert_array_equal(np.asarray(dx), want_dx, err_msg=name)
    with pytest.raises(TypeError, match="lengths: expected integers, got dtype bool"):
        cell(params, x, lengths=np.array([True, True]))


def test_shared_cells_are_one_per_configuration_and_bad_ones_still_refused():
    """``registry.shared_cell`` (the framework layers' cells): equal configurations share a
    cell, a value of another type (1.0 for 1) or another value is another cell, and a bad
    argument is the constructor's error, never a cached cell."""
    shared = lstm_multi.registry.shared_cell
    one = shared("numpy", input_size=3, hidden_size=4, variant="peephole")
    assert shared("numpy", hidden_size=4, variant="peephole", input_size=3) is one
    assert shared("numpy", input_size=3, hidden_size=5, variant="peephole") is not one
    assert shared("numpy", input_size=3, hidden_size=4, variant="lstm") is not one
    with pytest.raises(ValueError, match="hidden_size"):
        shared("numpy", input_size=3, hidden_size=0)
    with pytest.raises((TypeError, ValueError), match="hidden_size"):
        shared("numpy", input_size=3, hidden_size=4.0)
    with pytest.raises((TypeError, ValueError), match="hidden_size"):
        shared("numpy", input_size=3, hidden_size=[4])  # not a key: built, and refused
