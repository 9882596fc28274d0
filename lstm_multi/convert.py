"""Weights of other frameworks' LSTMs to the canonical parameters and back.

Canonical: one dict per layer and direction, ``W (in, 4H)``, ``U (H, 4H)``,
``b (4H,)``, gate blocks in the order i, f, g, o (``lstm_multi.spec``). The
layers here compute the plain ``"lstm"`` variant; their weights map as:

============================  =====================================================
Keras 3 ``layers.LSTM``       ``kernel (in, 4H)`` = W, ``recurrent_kernel (H, 4H)``
                              = U, ``bias (4H,)`` = b (Keras's gate order is i, f,
                              c, o: the same)
Flax ``LSTMCell`` /           ``ii if ig io`` kernels (in, H) side by side = W,
``OptimizedLSTMCell``         ``hi hf hg ho`` kernels (H, H) = U, their biases = b
Equinox ``nn.LSTMCell``       ``weight_ih (4H, in)`` = W^T, ``weight_hh (4H, H)``
                              = U^T, ``bias (4H,)`` = b
============================  =====================================================

(``torch.nn.LSTM`` has ``lstm_multi.torch.LSTM.from_torch`` / ``to_torch``.)
Every function returns NumPy arrays (``from_*``) or the framework's own
objects (``to_*``) and copies values exactly: a round trip gives back the same
arrays. A layer whose function differs from the LSTM's (other activations, no
bias) is refused with a ``ValueError`` naming the setting.
"""

from __future__ import annotations

import numpy as np

_FLAX_GATES = ("i", "f", "g", "o")


# Keras -------------------------------------------------------------------------


def _keras_lstm_cell(layer, name):
    cell = getattr(layer, "cell", None)
    if cell is None or type(layer).__name__ != "LSTM":
        raise TypeError(f"{name}: expected a keras.layers.LSTM, got {type(layer).__name__}")
    if not layer.built:
        raise ValueError(f"{name}: the Keras layer is not built yet (call it once, or build it)")
    for setting, want in (("activation", "tanh"), ("recurrent_activation", "sigmoid")):
        got = getattr(getattr(cell, setting), "__name__", str(getattr(cell, setting)))
        if got != want:
            raise ValueError(f"{name}: {setting} must be {want!r} for an LSTM, got {got!r}")
    if not cell.use_bias:
        raise ValueError(f"{name}: use_bias=False has no canonical form (b is always there)")
    return cell


def _keras_directions(layer, name):
    """A Keras LSTM or Bidirectional(LSTM) -> its LSTM layers, forward first."""
    if type(layer).__name__ == "Bidirectional":
        return [layer.forward_layer, layer.backward_layer]
    return [layer]


def from_keras(layers):
    """Keras ``LSTM`` / ``Bidirectional(LSTM)`` layers (one, or a list: a stack) ->
    canonical ``params[layer][direction]`` as NumPy arrays."""
    layers = layers if isinstance(layers, (list, tuple)) else [layers]
    params = []
    for k, layer in enumerate(layers):
        directions = []
        for d, lstm in enumerate(_keras_directions(layer, f"layers[{k}]")):
            cell = _keras_lstm_cell(lstm, f"layers[{k}] direction {d}")
            directions.append(
                {
                    "W": np.array(cell.kernel.numpy()),
                    "U": np.array(cell.recurrent_kernel.numpy()),
                    "b": np.array(cell.bias.numpy()),
                }
            )
        params.append(directions)
    return params


def to_keras(params, layers):
    """Write canonical ``params[layer][direction]`` into built Keras layers (as ``from_keras``
    reads them); returns the layers."""
    single = not isinstance(layers, (list, tuple))
    layers = [layers] if single else list(layers)
    if len(layers) != len(params):
        raise ValueError(f"layers: expected {len(params)} Keras layers, got {len(layers)}")
    for k, (layer, layer_params) in enumerate(zip(layers, params, strict=True)):
        lstms = _keras_directions(layer, f"layers[{k}]")
        if len(lstms) != len(layer_params):
            raise ValueError(
                f"layers[{k}]: expected {len(layer_params)} direction(s), got {len(lstms)}"
            )
        for d, (lstm, p) in enumerate(zip(lstms, layer_params, strict=True)):
            cell = _keras_lstm_cell(lstm, f"layers[{k}] direction {d}")
            for variable, key in (
                (cell.kernel, "W"),
                (cell.recurrent_kernel, "U"),
                (cell.bias, "b"),
            ):
                if tuple(variable.shape) != tuple(np.shape(p[key])):
                    raise ValueError(
                        f"params[{k}][{d}][{key!r}]: expected shape {tuple(variable.shape)}, "
                        f"got {tuple(np.shape(p[key]))}"
                    )
                variable.assign(np.asarray(p[key]))
    return layers[0] if single else layers


# Flax --------------------------------------------------------------------------


def _flax_cell_params(tree, name):
    """The ``{ii, if, ..., ho}`` dict inside a Flax params tree (``{"params": {"cell": ...}}``,
    ``{"cell": ...}`` or the cell's own dict)."""
    node = tree
    for key in ("params", "cell"):
        if isinstance(node, dict) and key in node and "ii" not in node:
            node = node[key]
    expected = {f"{a}{g}" for a in "ih" for g in _FLAX_GATES}
    if not isinstance(node, dict) or set(node) != expected:
        found = sorted(node) if isinstance(node, dict) else type(node).__name__
        raise ValueError(
            f"{name}: expected a Flax LSTMCell / OptimizedLSTMCell params tree with "
            f"{sorted(expected)}, got {found}"
        )
    return node


def from_flax(cell_params):
    """One Flax ``LSTMCell`` / ``OptimizedLSTMCell`` params tree -> one canonical
    layer-direction dict (NumPy). For a stack or ``nn.Bidirectional``, convert each
    cell's tree and arrange them as ``params[layer][direction]``."""
    node = _flax_cell_params(cell_params, "cell_params")
    return {
        "W": np.concatenate([np.asarray(node[f"i{g}"]["kernel"]) for g in _FLAX_GATES], 1),
        "U": np.concatenate([np.asarray(node[f"h{g}"]["kernel"]) for g in _FLAX_GATES], 1),
        "b": np.concatenate([np.asarray(node[f"h{g}"]["bias"]) for g in _FLAX_GATES]),
    }


def to_flax(p):
    """One canonical layer-direction dict -> the Flax cell's params dict (``{ii, ..., ho}``,
    to put under ``{"params": {"cell": ...}}``), as NumPy arrays."""
    hidden = np.shape(p["U"])[0]
    blocks = [slice(k * hidden, (k + 1) * hidden) for k in range(4)]
    tree = {}
    for g, block in zip(_FLAX_GATES, blocks, strict=True):
        tree[f"i{g}"] = {"kernel": np.array(np.asarray(p["W"])[:, block])}
        tree[f"h{g}"] = {
            "kernel": np.array(np.asarray(p["U"])[:, block]),
            "bias": np.array(np.asarray(p["b"])[block]),
        }
    return tree


# Equinox -----------------------------------------------------------------------


def from_equinox(cell):
    """An ``equinox.nn.LSTMCell`` -> one canonical layer-direction dict (NumPy)."""
    if type(cell).__name__ != "LSTMCell" or not hasattr(cell, "weight_ih"):
        raise TypeError(f"cell: expected an equinox.nn.LSTMCell, got {type(cell).__name__}")
    if getattr(cell, "bias", None) is None:
        raise ValueError("cell: use_bias=False has no canonical form (b is always there)")
    return {
        "W": np.array(np.asarray(cell.weight_ih).T),
        "U": np.array(np.asarray(cell.weight_hh).T),
        "b": np.array(np.asarray(cell.bias)),
    }


def to_equinox(p, cell):
    """A copy of the ``equinox.nn.LSTMCell`` ``cell`` holding the canonical weights ``p``."""
    import equinox as eqx
    import jax.numpy as jnp

    from_equinox(cell)  # the same checks
    new = (jnp.asarray(np.asarray(p["W"]).T), jnp.asarray(np.asarray(p["U"]).T))
    new += (jnp.asarray(np.asarray(p["b"])),)
    for old, value, key in zip(
        (cell.weight_ih, cell.weight_hh, cell.bias), new, "WUb", strict=True
    ):
        if old.shape != value.shape:
            raise ValueError(
                f"p[{key!r}]: expected the cell's shape {old.shape}, got {value.shape}"
            )
    return eqx.tree_at(lambda c: (c.weight_ih, c.weight_hh, c.bias), cell, new)
