"""Malformed input, fuzzed: every backend's ``__call__`` and ``vjp`` and the torch module
either give the correct result or raise ``ValueError``/``TypeError`` naming the argument.

Each example starts from one valid call and changes one argument: a wrong rank,
shape, dtype, length value, parameter structure, a Python list, or a layout the
call must accept as it is (Fortran order, strided views, tuples for lists).
Accepted outcomes: the documented exception with the argument's name in its
message, or (for the layouts that are valid) exactly the base call's result.
Anything else (another exception type, a crash, a silently different result)
fails.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import to_numpy, tolerance
from hypothesis import given
from hypothesis import strategies as st

import lstm_multi

#: exception types seen by the fuzz tests (for the closing summary)
SEEN: Counter = Counter()

BATCH, STEPS, INPUT, HIDDEN, LAYERS = 2, 5, 3, 4, 2
STATE = (LAYERS * 2, BATCH, HIDDEN)
OUT = (BATCH, STEPS, 2 * HIDDEN)


def base_call():
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((BATCH, STEPS, INPUT)).astype("float32"),
        "state": tuple(rng.standard_normal(STATE).astype("float32") for _ in range(2)),
        "lengths": np.array([5, 2]),
        "dy": rng.standard_normal(OUT).astype("float32"),
        "dh_n": rng.standard_normal(STATE).astype("float32"),
        "dc_n": rng.standard_normal(STATE).astype("float32"),
    }


def fortran(a):
    return np.asfortranarray(a)


def strided(a):
    """The same values as a non-contiguous view of a larger array."""
    big = np.zeros((*a.shape[:-1], 2 * a.shape[-1]), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


WRONG_DTYPES = ["int32", "int64", "bool", "complex64", "float64", "float16", "object", "U3"]


@st.composite
def wrong_shapes(draw, valid):
    rank = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=rank, max_size=rank)))
    if shape == tuple(valid):
        shape = (*shape, 1)
    return shape


@st.composite
def array_mutation(draw, name, valid_shape, none_valid=False, dtype="float32"):
    """(new value given the old one, exception names or None when still valid)."""
    kind = draw(st.sampled_from(["shape", "dtype", "list", "scalar", "none", "fortran", "strided"]))
    if kind == "shape":
        shape = draw(wrong_shapes(valid_shape))
        return (lambda a: np.zeros(shape, dtype)), (name,)
    if kind == "dtype":
        wrong = draw(st.sampled_from(WRONG_DTYPES))
        names = (name, "params", "x") if wrong.startswith("float") else (name,)
        return (lambda a: a.astype(wrong)), names
    if kind == "list":
        return (lambda a: a.tolist()), (name,)
    if kind == "scalar":
        return (lambda a: 1.5), (name,)
    if kind == "none":
        return (lambda a: None), None if none_valid else (name,)
    return (fortran if kind == "fortran" else strided), None


@st.composite
def lengths_mutations(draw):
    kind = draw(st.sampled_from(["values", "dtype", "shape", "list", "text"]))
    if kind == "values":
        bad = draw(st.lists(st.integers(-3, STEPS + 3), min_size=BATCH, max_size=BATCH))
        valid = all(1 <= v <= STEPS for v in bad)
        return (lambda a: np.array(bad)), None if valid else ("lengths",)
    if kind == "dtype":
        wrong = draw(st.sampled_from(["float64", "bool", "complex64", "U1", "int8", "uint16"]))
        return (lambda a: a.astype(wrong)), None if wrong.startswith(("int", "uint")) else (
            "lengths",
        )
    if kind == "shape":
        shape = draw(wrong_shapes((BATCH,)))
        return (lambda a: np.ones(shape, "int64")), ("lengths",)
    if kind == "list":
        return (lambda a: [int(v) for v in a]), None
    return (lambda a: "5, 2"), ("lengths",)


@st.composite
def state_mutations(draw):
    kind = draw(st.sampled_from(["part", "pair", "triple", "list-pair", "none"]))
    if kind == "part":
        which = draw(st.integers(0, 1))
        change, names = draw(array_mutation(f"state {('h0', 'c0')[which]}", STATE))

        def mutate(s):
            parts = list(s)
            parts[which] = change(parts[which])
            return tuple(parts)

        return mutate, names
    if kind == "pair":
        return (lambda s: s[0]), ("state",)
    if kind == "triple":
        return (lambda s: (*s, s[0])), ("state",)
    if kind == "none":
        return (lambda s: None), None
    return (lambda s: list(s)), None


@st.composite
def params_mutations(draw):
    kind = draw(
        st.sampled_from(
            ["drop-layer", "drop-direction", "drop-key", "extra-key", "shape", "dtype",
             "dict-to-list", "none", "tuples", "fortran", "strided", "list-value"]
        )
    )  # fmt: skip
    layer, direction = draw(st.integers(0, LAYERS - 1)), draw(st.integers(0, 1))
    pick = draw(st.integers(0, 3))  # which of the layer-direction's keys

    def edit(fn):
        def mutate(params):
            params = [[dict(p) for p in layer_] for layer_ in params]
            target = params[layer][direction]
            fn(target, sorted(target)[pick % len(target)])
            return params

        return mutate

    if kind == "drop-layer":
        return (lambda p: p[:-1]), ("params",)
    if kind == "drop-direction":
        return (lambda p: [p[0][:1], *p[1:]]), ("params",)
    if kind == "drop-key":
        return edit(lambda d, key: d.pop(key)), ("params",)
    if kind == "extra-key":
        return edit(lambda d, key: d.update(q=d["b"])), ("params",)
    if kind == "shape":
        shape = draw(wrong_shapes((0,)))
        return edit(lambda d, key: d.update({key: np.zeros(shape, "float32")})), ("params",)
    if kind == "dtype":
        wrong = draw(st.sampled_from(WRONG_DTYPES))
        return edit(lambda d, key: d.update({key: np.asarray(d[key]).astype(wrong)})), (
            "params",
            "x",
        )
    if kind == "dict-to-list":
        return edit(lambda d, key: d.update({key: list(d.values())})), ("params",)
    if kind == "none":
        return edit(lambda d, key: d.update({key: None})), ("params",)
    if kind == "tuples":
        return (lambda p: tuple(tuple(layer_) for layer_ in p)), None
    if kind == "list-value":
        return edit(lambda d, key: d.update({key: np.asarray(d[key]).tolist()})), ("params",)
    layout = fortran if kind == "fortran" else strided
    return edit(lambda d, key: d.update({key: layout(np.asarray(d[key]))})), None


@st.composite
def mutations(draw):
    target = draw(st.sampled_from(["x", "state", "lengths", "params", "dy", "dh_n", "dc_n"]))
    if target == "x":
        change, names = draw(array_mutation("x", (BATCH, STEPS, INPUT)))
    elif target == "state":
        change, names = draw(state_mutations())
    elif target == "lengths":
        change, names = draw(lengths_mutations())
    elif target == "params":
        change, names = draw(params_mutations())
    else:
        shape = STATE if target != "dy" else OUT
        change, names = draw(array_mutation(target, shape, none_valid=target != "dy"))
    return target, change, names


def call(cell, params, args, with_vjp):
    y, (h_n, c_n) = cell(params, args["x"], state=args["state"], lengths=args["lengths"])
    results = [y, h_n, c_n]
    if with_vjp:
        grads, dx, (dh0, dc0) = cell.vjp(
            params, args["x"], args["dy"], state=args["state"], lengths=args["lengths"],
            dh_n=args["dh_n"], dc_n=args["dc_n"],
        )  # fmt: skip
        results += [dx, dh0, dc0, *(g[k] for layer in grads for g in layer for k in sorted(g))]
    return [np.asarray(to_numpy(r), np.float64) for r in results]


def assert_documented_error(error, names):
    SEEN[type(error).__name__] += 1
    assert type(error) in (ValueError, TypeError), f"{type(error).__name__}: {error}"
    assert names is not None, f"a valid input was refused: {type(error).__name__}: {error}"
    message = str(error)
    assert any(name in message for name in names), f"message names none of {names}: {message}"


@pytest.fixture(scope="module")
def cells():
    made = {}

    def get(backend, variant):
        if (backend, variant) not in made:
            cell = lstm_multi.get_cell(backend)(
                INPUT, HIDDEN, variant=variant, num_layers=LAYERS, bidirectional=True
            )
            params = cell.init(seed=1, dtype="float32")
            made[backend, variant] = (cell, params, call(cell, params, base_call(), True))
        return made[backend, variant]

    return get


@given(
    mutation=mutations(),
    variant=st.sampled_from(["lstm", "peephole"]),
    with_vjp=st.booleans(),
)
def test_malformed_input_to_a_cell(backend, cells, mutation, variant, with_vjp):
    target, change, names = mutation
    if target in ("dy", "dh_n", "dc_n") and not with_vjp:
        return
    cell, params, expected = cells(backend, variant)
    args = base_call()  # NumPy arrays: every backend takes them as input
    if target == "params":
        params = change(cell.to_numpy(params))
    else:
        args[target] = change(args[target])
    try:
        got = call(cell, params, args, with_vjp)
    except Exception as error:  # noqa: BLE001 - the point is to see every kind
        assert_documented_error(error, names)
        return
    assert names is None, f"{target}: malformed input accepted ({names})"
    if target != "params" and args[target] is None:
        return  # a different valid call (no state, full lengths, zero cotangents)
    if target == "lengths" and not np.array_equal(np.asarray(args["lengths"]), [5, 2]):
        return  # other valid lengths: a different valid call
    want = expected if with_vjp else expected[:3]
    # the same numbers in another layout: bit for bit the base call's result, except that
    # weights in another memory layout reach the BLAS with other strides, which may sum a
    # product in another order (torch's native kernel does): float32 rounding, no more
    bound = tolerance("float32") if target == "params" else 0.0
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        worst = float(np.max(np.abs(a - b), initial=0.0))
        assert worst <= bound * max(1.0, float(np.max(np.abs(b), initial=0.0))), (
            f"result {k}: max difference {worst}"
        )


@st.composite
def module_mutations(draw):
    kind = draw(
        st.sampled_from(
            ["rank", "size", "dtype", "list", "hx-pair", "hx-shape", "hx-dtype", "hx-list"]
        )
    )
    if kind == "rank":
        shape = draw(wrong_shapes((STEPS, BATCH, INPUT)))
        shape = shape if len(shape) not in (2, 3) or 0 in shape else (*shape, 1, 1)
        return "input", (lambda torch: torch.zeros(shape)), ("input",)
    if kind == "size":
        size = draw(st.integers(1, 6).filter(lambda n: n != INPUT))
        return "input", (lambda torch: torch.zeros(STEPS, BATCH, size)), ("input",)
    if kind == "dtype":
        dtype = draw(st.sampled_from(["int32", "float64", "float16", "bool", "complex64"]))
        return (
            "input",
            (lambda torch: torch.zeros(STEPS, BATCH, INPUT, dtype=getattr(torch, dtype))),
            ("input",),
        )
    if kind == "list":
        return "input", (lambda torch: [[0.0] * INPUT] * STEPS), ("input",)
    if kind == "hx-pair":
        return "hx", (lambda torch: torch.zeros(STATE)), ("hx",)
    if kind == "hx-shape":
        shape = draw(wrong_shapes(STATE))
        return "hx", (lambda torch: (torch.zeros(shape), torch.zeros(STATE))), ("hx",)
    if kind == "hx-dtype":
        return (
            "hx",
            (lambda torch: (torch.zeros(STATE), torch.zeros(STATE, dtype=torch.float64))),
            ("hx",),
        )
    return "hx", (lambda torch: ([0.0], torch.zeros(STATE))), ("hx",)


@pytest.mark.parametrize("variant", ["lstm", "peephole"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
@given(mutation=module_mutations())
def test_malformed_input_to_the_torch_module(variant, native, mutation):
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    module = LSTM(INPUT, HIDDEN, LAYERS, bidirectional=True, variant=variant, native=native)
    target, make, names = mutation
    args = {"input": torch.zeros(STEPS, BATCH, INPUT), "hx": None}
    args[target] = make(torch)
    try:
        module(args["input"], args["hx"])
    except Exception as error:  # noqa: BLE001
        assert_documented_error(error, names)
        return
    raise AssertionError(f"{target}: malformed input accepted")


def test_fuzz_summary():
    """Runs last in this module: the exception types the fuzz tests saw."""
    assert set(SEEN) <= {"ValueError", "TypeError"}, SEEN
    print(f"\nfuzz: exception types seen {dict(SEEN)}")
