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
arrays. Nothing is dropped, cast or reshaped on the way: parameters these
layers cannot hold (a variant's own, such as the peepholes ``p``, or the
projection ``W_hr``) and arrays of another dtype than the layer's are refused
with a ``ValueError`` naming the key. A layer whose function differs from the
LSTM's (other activations, no bias, a Keras layer reading its sequence
backwards, ``go_backwards=True``, outside a ``Bidirectional`` wrapper's backward
direction, a ``Bidirectional`` merging its directions other than by
concatenation) is refused with a ``ValueError`` naming the setting.
"""

from __future__ import annotations

import re

import numpy as np

_FLAX_GATES = ("i", "f", "g", "o")
#: the canonical keys the other frameworks' LSTM cells hold
_LSTM_KEYS = ("W", "U", "b")


def _check_lstm_keys(p, where, holder):
    """Raise unless ``p`` is a dict of exactly W, U and b: a key beyond them (a variant's
    own parameter such as ``p``, the projection ``W_hr``) would be dropped by ``holder``."""
    if not isinstance(p, dict):
        raise ValueError(f"{where}: expected a dict of 'W', 'U', 'b', got {type(p).__name__}")
    extra = [key for key in p if key not in _LSTM_KEYS]
    if extra:
        raise ValueError(
            f"{where}[{extra[0]!r}]: {holder} hold W, U and b only, got keys {sorted(p)} "
            "(a variant's own parameters, such as the peepholes 'p', and the projection "
            "'W_hr' have no place there: refused, not dropped)"
        )
    missing = [key for key in _LSTM_KEYS if key not in p]
    if missing:
        raise ValueError(f"{where}[{missing[0]!r}]: missing; expected keys W, U and b")


def _check_nested(params):
    """``params`` is ``params[layer][direction]``: a non-empty list of layers, each a list of
    1 or 2 dicts (a ValueError naming what is not)."""
    if not isinstance(params, (list, tuple)) or not params:
        got = type(params).__name__ if not isinstance(params, (list, tuple)) else "[]"
        raise ValueError(
            "params: expected params[layer][direction], a non-empty list of layers, each a "
            f"list of 1 or 2 dicts, got {got}"
        )
    for k, layer in enumerate(params):
        if not isinstance(layer, (list, tuple)) or len(layer) not in (1, 2):
            got = len(layer) if isinstance(layer, (list, tuple)) else type(layer).__name__
            raise ValueError(f"params[{k}]: expected a list of 1 or 2 directions, got {got}")
        for d, p in enumerate(layer):
            if not isinstance(p, dict):
                raise ValueError(
                    f"params[{k}][{d}]: expected a dict of arrays, got {type(p).__name__}"
                )


def _check_dtype(where, value, dtype):
    """Raise unless the array ``value`` has ``dtype`` (nothing is cast on the way)."""
    got = np.asarray(value).dtype
    if got != np.dtype(dtype):
        raise ValueError(f"{where}: expected dtype {np.dtype(dtype)} (the layer's), got {got}")


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


def _keras_directions(layer, name, allow_go_backwards=False):
    """A Keras LSTM or Bidirectional(LSTM) -> its LSTM layers, forward first.

    Canonical direction 0 reads each sequence forwards and direction 1 reversed with its
    outputs put back in order (what ``Bidirectional``'s backward layer, whose
    ``go_backwards`` is True, computes). A lone layer with ``go_backwards=True`` returns
    its outputs reversed: no canonical network computes that, so it is refused unless
    ``allow_go_backwards``, as is a ``Bidirectional`` whose directions read otherwise or
    merge other than by concatenation.
    """
    if type(layer).__name__ == "Bidirectional":
        merge_mode = getattr(layer, "merge_mode", "concat")
        if merge_mode != "concat":
            raise ValueError(
                f"{name}: merge_mode must be 'concat' (lstm_multi concatenates the directions' "
                f"outputs), got {merge_mode!r}"
            )
        lstms = [layer.forward_layer, layer.backward_layer]
        for d, (lstm, want) in enumerate(zip(lstms, (False, True), strict=True)):
            if bool(getattr(lstm, "go_backwards", False)) != want:
                raise ValueError(
                    f"{name} direction {d}: go_backwards must be {want} (direction {d} reads "
                    f"each sequence {'reversed' if want else 'forwards'}), got {not want}"
                )
        return lstms
    if getattr(layer, "go_backwards", False) and not allow_go_backwards:
        raise ValueError(
            f"{name}: go_backwards=True reads the sequence reversed and returns the outputs "
            "reversed, which no canonical parameters compute (lstm_multi's reverse direction "
            "exists only inside a bidirectional layer, as Bidirectional's backward layer); "
            "refused rather than converted to weights that compute something else "
            "(allow_go_backwards=True takes the cell's weights, for a layer that reads "
            "backwards too, such as lstm_multi.keras.LSTM(go_backwards=True))"
        )
    return [layer]


def from_keras(layers, *, allow_go_backwards=False):
    """Keras ``LSTM`` / ``Bidirectional(LSTM)`` layers (one, or a list: a stack) ->
    canonical ``params[layer][direction]`` as NumPy arrays.

    A lone ``LSTM(go_backwards=True)`` reads its sequence reversed and returns its
    outputs reversed, which no canonical network computes: it is refused (ValueError
    naming ``go_backwards``) unless ``allow_go_backwards=True``, which returns its cell's
    weights for a layer that reads backwards too (``lstm_multi.keras.LSTM(go_backwards=
    True)``). ``Bidirectional`` layers convert as they are (its backward layer is
    canonical direction 1)."""
    layers = layers if isinstance(layers, (list, tuple)) else [layers]
    params = []
    for k, layer in enumerate(layers):
        directions = []
        lstms = _keras_directions(layer, f"layers[{k}]", allow_go_backwards)
        for d, lstm in enumerate(lstms):
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
    reads them); returns the layers. Only W, U and b of the layers' dtype are taken
    (anything else is a ValueError naming the key). A lone ``LSTM(go_backwards=True)``
    takes the weights as they are: its reading order is the caller's choice of layer."""
    _check_nested(params)
    single = not isinstance(layers, (list, tuple))
    layers = [layers] if single else list(layers)
    if len(layers) != len(params):
        raise ValueError(f"layers: expected {len(params)} Keras layers, got {len(layers)}")
    for k, (layer, layer_params) in enumerate(zip(layers, params, strict=True)):
        lstms = _keras_directions(layer, f"layers[{k}]", allow_go_backwards=True)
        if len(lstms) != len(layer_params):
            raise ValueError(
                f"layers[{k}]: expected {len(layer_params)} direction(s), got {len(lstms)}"
            )
        for d, (lstm, p) in enumerate(zip(lstms, layer_params, strict=True)):
            cell = _keras_lstm_cell(lstm, f"layers[{k}] direction {d}")
            _check_lstm_keys(p, f"params[{k}][{d}]", "Keras's LSTM layers")
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
                _check_dtype(f"params[{k}][{d}][{key!r}]", p[key], variable.dtype)
            for variable, key in (
                (cell.kernel, "W"),
                (cell.recurrent_kernel, "U"),
                (cell.bias, "b"),
            ):
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
    cell's tree and arrange them as ``params[layer][direction]``, or use
    ``from_flax_rnn``, which reads ``nn.RNN`` / ``nn.Bidirectional`` layers and stacks."""
    node = _flax_cell_params(cell_params, "cell_params")
    return {
        "W": np.concatenate([np.asarray(node[f"i{g}"]["kernel"]) for g in _FLAX_GATES], 1),
        "U": np.concatenate([np.asarray(node[f"h{g}"]["kernel"]) for g in _FLAX_GATES], 1),
        "b": np.concatenate([np.asarray(node[f"h{g}"]["bias"]) for g in _FLAX_GATES]),
    }


def to_flax(p):
    """One canonical layer-direction dict -> the Flax cell's params dict (``{ii, ..., ho}``,
    to put under ``{"params": {"cell": ...}}``), as NumPy arrays."""
    _check_lstm_keys(p, "p", "Flax's LSTM cells")
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


# Flax recurrent stacks ---------------------------------------------------------

_FLAX_DIRECTIONS = ("forward_rnn", "backward_rnn")
_FLAX_NUMBERED = re.compile(r"(.+)_(\d+)")


def _flax_unwrap(tree):
    """A variables dict ``{"params": ...}`` -> the params inside; anything else as it is."""
    if isinstance(tree, dict) and set(tree) == {"params"}:
        return tree["params"]
    return tree


def _flax_numbered(tree):
    """The ``(key, value)`` pairs of a dict keyed ``<name>_0 .. <name>_{n-1}`` (one name;
    Flax's names for a list of modules made in ``setup`` and for ``nn.Sequential``'s
    layers) in that order, or None for any other tree."""
    if not isinstance(tree, dict) or not tree:
        return None
    matches = [_FLAX_NUMBERED.fullmatch(key) for key in tree]
    if not all(matches) or len({m.group(1) for m in matches}) != 1:
        return None
    if sorted(int(m.group(2)) for m in matches) != list(range(len(tree))):
        return None
    name = matches[0].group(1)
    return [(f"{name}_{k}", tree[f"{name}_{k}"]) for k in range(len(tree))]


def _flax_layer(tree, name):
    """One Flax layer -> its canonical directions: an ``nn.RNN``'s params (``{"cell": ...}``)
    or a cell's -> [forward]; an ``nn.Bidirectional``'s (``{"forward_rnn": ...,
    "backward_rnn": ...}``) or a pair ``[forward, backward]`` of those -> [forward, backward]."""
    tree = _flax_unwrap(tree)
    if isinstance(tree, dict) and set(tree) == set(_FLAX_DIRECTIONS):
        parts = [(f"{name}[{d!r}]", tree[d]) for d in _FLAX_DIRECTIONS]
    elif isinstance(tree, (list, tuple)) and len(tree) == 2:
        parts = [(f"{name}[{d}]", part) for d, part in enumerate(tree)]
    else:
        parts = [(name, tree)]
    return [from_flax(_flax_cell_params(part, where)) for where, part in parts]


def from_flax_rnn(tree):
    """Flax recurrent layers -> canonical ``params[layer][direction]`` (NumPy).

    ``tree`` (variables ``{"params": ...}`` or params) is one layer or a stack:

    * one layer: an ``nn.RNN(cell)``'s (``{"cell": ...}``), an
      ``nn.Bidirectional(nn.RNN(cell), nn.RNN(cell))``'s (``{"forward_rnn": ...,
      "backward_rnn": ...}``), or a cell's own (``{"ii": ..., ..., "ho": ...}``);
    * a stack, first layer first: a list of layers (in it, a pair ``[forward, backward]``
      of cell or RNN trees is one bidirectional layer), or a dict of layers keyed
      ``<name>_0``, ``<name>_1``, ... (``nn.Sequential``'s layers, or a list of modules
      made in ``setup``, e.g. ``self.layers = [...]``).

    Cells are ``LSTMCell`` or ``OptimizedLSTMCell`` (the same parameters). The backward
    RNN of ``nn.Bidirectional`` (``reverse=True, keep_order=True``) is lstm_multi's
    direction 1: it reads each sequence's first ``seq_lengths[n]`` steps reversed and
    returns the outputs in the original order. Flax goes on computing over the padding,
    lstm_multi gives zeros there; the outputs on the valid steps and the final carries
    ``(c, h)`` equal lstm_multi's ``y``, ``c_n`` and ``h_n``.

    Cells made inside an ``@nn.compact`` method belong to that method's module, named
    after their class in order of creation (``LSTMCell_0``, ``LSTMCell_1``, ...): pass
    them as a list, in pairs for bidirectional layers.
    """
    tree = _flax_unwrap(tree)
    if isinstance(tree, (list, tuple)):
        layers = [(f"tree[{k}]", layer) for k, layer in enumerate(tree)]
    elif (numbered := _flax_numbered(tree)) is not None:
        layers = [(f"tree[{key!r}]", layer) for key, layer in numbered]
    else:
        layers = [("tree", tree)]
    if not layers:
        raise ValueError("tree: expected at least one layer, got an empty list")
    return [_flax_layer(layer, name) for name, layer in layers]


def to_flax_rnn(params):
    """Canonical ``params[layer][direction]`` -> a list of Flax params (NumPy), one per
    layer: ``nn.RNN(cell)``'s (one direction, ``{"cell": ...}``) or
    ``nn.Bidirectional(nn.RNN(cell), nn.RNN(cell))``'s (``{"forward_rnn": {"cell": ...},
    "backward_rnn": {"cell": ...}}``), for either cell. Place them as the model names its
    layers: ``{f"layers_{k}": tree for k, tree in enumerate(trees)}`` for ``nn.Sequential``
    and for a list ``self.layers`` made in ``setup`` (also of one layer), ``trees[0]``
    for a single top-level module. ``from_flax_rnn`` reads either back."""
    _check_nested(params)
    trees = []
    for k, layer in enumerate(params):
        for d, p in enumerate(layer):
            _check_lstm_keys(p, f"params[{k}][{d}]", "Flax's LSTM cells")
        cells = [{"cell": to_flax(p)} for p in layer]
        trees.append(
            cells[0] if len(cells) == 1 else dict(zip(_FLAX_DIRECTIONS, cells, strict=True))
        )
    return trees


# Equinox -----------------------------------------------------------------------


def _check_equinox_cell(cell):
    if type(cell).__name__ != "LSTMCell" or not hasattr(cell, "weight_ih"):
        raise TypeError(f"cell: expected an equinox.nn.LSTMCell, got {type(cell).__name__}")
    if getattr(cell, "bias", None) is None:
        raise ValueError("cell: use_bias=False has no canonical form (b is always there)")


def from_equinox(cell):
    """An ``equinox.nn.LSTMCell`` -> one canonical layer-direction dict (NumPy)."""
    _check_equinox_cell(cell)
    return {
        "W": np.array(np.asarray(cell.weight_ih).T),
        "U": np.array(np.asarray(cell.weight_hh).T),
        "b": np.array(np.asarray(cell.bias)),
    }


def to_equinox(p, cell):
    """A copy of the ``equinox.nn.LSTMCell`` ``cell`` holding the canonical weights ``p``
    (``cell`` may hold shapes only, e.g. from ``eqx.filter_eval_shape``: nothing of it is read
    but its shapes)."""
    import equinox as eqx
    import jax.numpy as jnp

    _check_equinox_cell(cell)
    _check_lstm_keys(p, "p", "Equinox's LSTMCell")
    new = (np.asarray(p["W"]).T, np.asarray(p["U"]).T, np.asarray(p["b"]))
    for old, value, key in zip(
        (cell.weight_ih, cell.weight_hh, cell.bias), new, "WUb", strict=True
    ):
        if old.shape != value.shape:
            raise ValueError(
                f"p[{key!r}]: expected the cell's shape {old.shape}, got {value.shape}"
            )
        _check_dtype(f"p[{key!r}]", value, old.dtype)
    new = tuple(jnp.asarray(value) for value in new)
    return eqx.tree_at(lambda c: (c.weight_ih, c.weight_hh, c.bias), cell, new)
