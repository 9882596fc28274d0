"""Input checks shared by every backend.

Each check raises with the argument's name, what was expected and what was
received. Nothing is cast, truncated or broadcast to make an input fit. The
checks read only ``.shape`` and ``.dtype`` (through ``ops``), so they work on
every framework's arrays, including traced JAX arrays.
"""

from __future__ import annotations

import numbers

import numpy as np

from .ops import FLOAT_DTYPES


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def dtype_name(name, dtype):
    """A floating dtype given as a name, a NumPy or JAX dtype or type, or a torch.dtype
    -> its name ("float32", ...); a TypeError naming ``name`` otherwise."""
    if isinstance(dtype, str) or type(dtype).__module__ == "torch":
        text = str(dtype).removeprefix("torch.")
    else:
        try:
            text = np.dtype(dtype).name
        except TypeError:
            text = repr(dtype)
    check_float_dtype(name, text)
    return text


def check_float_dtype(name, dtype_name):
    if dtype_name not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype {FLOAT_DTYPES}, got {dtype_name}")


def check_input(ops, x, input_size, batch_first):
    """x must be (B, T, in) if batch_first else (T, B, in), of a floating dtype."""
    layout = "(batch, time, input_size)" if batch_first else "(time, batch, input_size)"
    shape = tuple(x.shape)
    if len(shape) != 3:
        raise ValueError(f"x: expected a 3-d array {layout}, got shape {shape}")
    if shape[2] != input_size:
        raise ValueError(
            f"x: expected input_size {input_size} on the last axis {layout}, got shape {shape}"
        )
    # no sequences (batch 0) is allowed, as nn.LSTM allows it: the outputs are empty
    if shape[1 if batch_first else 0] == 0:
        raise ValueError(f"x: expected at least one time step {layout}, got {shape}")
    check_float_dtype("x", ops.dtype_name(x))


def check_same_dtype(ops, name, array, dtype_name):
    got = ops.dtype_name(array)
    if got != dtype_name:
        raise TypeError(f"{name}: expected dtype {dtype_name} (the dtype of x), got {got}")


def check_state(ops, state, expected_shapes, dtype_name):
    """state must be a pair (h0, c0) of the two ``expected_shapes``."""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"state: expected a pair (h0, c0), got {type(state).__name__}")
    for part, array, shape in zip(("h0", "c0"), state, expected_shapes, strict=True):
        check_array_shape(ops, f"state {part}", array, shape, dtype_name)


def is_real_number(value) -> bool:
    """Whether ``value`` is a real number a rate may be: a Python or NumPy int or float
    (``numbers.Real``), not a bool and not an array or tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_dropout(dropout, num_layers):
    """dropout: a probability in [0, 1); warns, as nn.LSTM does, when one layer has none
    to apply to (dropout acts between layers)."""
    if not is_real_number(dropout):
        raise TypeError(f"dropout: expected a number in [0, 1), got {type(dropout).__name__}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    if dropout and num_layers == 1:
        import warnings

        warnings.warn(
            f"dropout={dropout} with num_layers=1 does nothing: dropout acts between layers",
            UserWarning,
            stacklevel=3,
        )
    return float(dropout)


def check_proj_size(proj_size, hidden_size):
    """proj_size: an integer in 0..hidden_size - 1 (0: no projection), as nn.LSTM requires."""
    if isinstance(proj_size, bool) or not isinstance(proj_size, int):
        raise TypeError(f"proj_size: expected an integer, got {type(proj_size).__name__}")
    if not 0 <= proj_size < hidden_size:
        raise ValueError(
            f"proj_size: expected 0 (no projection) or a size below hidden_size={hidden_size}, "
            f"got {proj_size}"
        )
    return proj_size


def check_array_shape(ops, name, array, expected_shape, dtype_name):
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise TypeError(f"{name}: expected an array, got {type(array).__name__}")
    if tuple(array.shape) != tuple(expected_shape):
        raise ValueError(
            f"{name}: expected shape {tuple(expected_shape)}, got {tuple(array.shape)}"
        )
    check_same_dtype(ops, name, array, dtype_name)


def check_lengths_shape(lengths_dtype_name, shape, batch):
    if tuple(shape) != (batch,):
        raise ValueError(
            f"lengths: expected shape ({batch},) (one per sequence), got {tuple(shape)}"
        )
    if not (lengths_dtype_name.startswith("int") or lengths_dtype_name.startswith("uint")):
        raise TypeError(f"lengths: expected integers, got dtype {lengths_dtype_name}")


def check_mask(mask_dtype_name, shape, batch, steps):
    """A per-step mask: (B, T) booleans, True where the step is real.

    Only booleans: a float mask is ambiguous (PyTorch's attention masks take floats as
    additive -inf/0 biases, where 0 means *keep*), and an integer one is one cast away.
    """
    if tuple(shape) != (batch, steps):
        raise ValueError(
            f"mask: expected shape ({batch}, {steps}) (batch, time: True where the step is "
            f"real, whatever batch_first), got {tuple(shape)}"
        )
    if mask_dtype_name != "bool":
        raise TypeError(
            f"mask: expected booleans (True where the step is real), got dtype "
            f"{mask_dtype_name} (pass mask.bool() or mask.astype(bool) for a 0/1 mask)"
        )


def check_lengths_or_mask(lengths, mask):
    if lengths is not None and mask is not None:
        raise ValueError(
            "lengths, mask: expected at most one of them, got both (a mask already says "
            "which steps are real: pass only the mask)"
        )


def check_lengths_values(values, steps):
    """Every length must lie in 1..T (``values`` a NumPy array)."""
    bad = [int(v) for v in values if v < 1 or v > steps]
    if bad:
        raise ValueError(f"lengths: expected every value in 1..{steps} (T), got {bad[:5]}")


def check_params(ops, params, expected_shapes, dtype_name=None, name="params"):
    """params[layer][direction] must be a dict of exactly the expected keys and shapes."""
    layers, directions = len(expected_shapes), len(expected_shapes[0])
    if not isinstance(params, (list, tuple)) or len(params) != layers:
        raise ValueError(
            f"{name}: expected a list of {layers} layer(s), "
            f"got {type(params).__name__} of length {_length(params)}"
        )
    for layer, (layer_params, layer_shapes) in enumerate(zip(params, expected_shapes, strict=True)):
        if not isinstance(layer_params, (list, tuple)) or len(layer_params) != directions:
            raise ValueError(
                f"{name}[{layer}]: expected a list of {directions} direction(s), "
                f"got {type(layer_params).__name__} of length {_length(layer_params)}"
            )
        for direction, (p, shapes) in enumerate(zip(layer_params, layer_shapes, strict=True)):
            where = f"{name}[{layer}][{direction}]"
            if not isinstance(p, dict) or set(p) != set(shapes):
                got = sorted(p) if isinstance(p, dict) else type(p).__name__
                raise ValueError(f"{where}: expected a dict with keys {sorted(shapes)}, got {got}")
            for key, shape in shapes.items():
                array = p[key]
                if not hasattr(array, "shape"):
                    raise TypeError(
                        f"{where}[{key!r}]: expected an array, got {type(array).__name__}"
                    )
                if tuple(array.shape) != shape:
                    raise ValueError(
                        f"{where}[{key!r}]: expected shape {shape}, got {tuple(array.shape)}"
                    )
                if dtype_name is not None:
                    check_same_dtype(ops, f"{where}[{key!r}]", array, dtype_name)
                else:
                    check_float_dtype(f"{where}[{key!r}]", ops.dtype_name(array))


def _length(value):
    try:
        return len(value)
    except TypeError:
        return "n/a"
