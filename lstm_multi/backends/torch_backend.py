"""PyTorch backend: the spec in a Python time loop, differentiable with autograd.

Paths, chosen per call:

* native: for the plain variant, PyTorch's own LSTM kernel (``torch._VF.lstm``,
  what ``torch.nn.LSTM`` calls, cuDNN on CUDA), an optional capability tested
  equal to the generic path;
* generic: the spec's loop with each direction one autograd node
  (``torch_bptt``);
* under ``torch.func`` transforms: the spec's loop as plain autograd ops,
  which every transform understands (``torch_bptt.run_direction``).

PyTorch machinery: under ``torch.autocast`` the generic path casts its inputs
and parameters to the autocast dtype once and runs the half-precision policy
of ``lstm_multi.ops`` (float32 cell state and gate math) with autocast off
inside, so a bfloat16/float16 autocast region gives outputs in that dtype and
float32 parameter gradients, as ``nn.LSTM`` does. ``torch.compile`` does not
trace into the cell (``torch.compiler.disable``, applied when TorchDynamo is
imported: ``torch_compile_break``): the call is one graph break that runs
eagerly, as ``torch.compile`` treats ``nn.LSTM``.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from contextlib import nullcontext

import torch

from .. import engine as engines
from .. import network, regularize, validation
from ..cell import FunctionalCell
from ..spec import Variant
from . import torch_bptt, torch_library, torch_native  # noqa: F401 (torch_library registers the op)
from .torch_compile_break import break_graph_at
from .torch_graphs import GraphOwner
from .torch_ops import OPS, TorchOps

__all__ = ["OPS", "Cell", "TorchOps", "generic_forward", "unavailable_reason"]


def unavailable_reason():
    return None


def autocast_dtype(x):
    """The dtype ``torch.autocast`` would compute x's products in, or None.

    None outside an autocast region and for float64 inputs, which autocast
    leaves alone.
    """
    device = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if dtype == x.dtype else dtype


def generic_forward(
    variant,
    params,
    x,
    h0,
    c0,
    lengths,
    run_direction=None,
    between_layers=None,
    layer_masks=None,
    step_masks=None,
):
    """The spec's network on the generic path, autocast honoured (see the module doc).

    Time-major x (T, B, in); returns (y, h_n, c_n). ``run_direction`` defaults
    to ``torch_bptt.run_direction``; ``between_layers``, ``layer_masks`` and
    ``step_masks`` (with ``regularized_direction``) as in ``network.forward``.
    """
    run_direction = run_direction or torch_bptt.run_direction
    dtype = autocast_dtype(x)
    if dtype is not None:
        params = [[{k: v.to(dtype) for k, v in p.items()} for p in layer] for layer in params]
        x, h0, c0 = x.to(dtype), h0.to(dtype), c0.to(dtype)
        if layer_masks is not None:
            layer_masks = [None if m is None else m.to(dtype) for m in layer_masks]
    if x.shape[1] == 0:
        return empty_batch(params, x, h0, c0)
    # autocast off inside, entered only where it is on: the context would be one more
    # region (a higher-order op) in what torch.export records
    autocasting = torch.is_autocast_enabled(x.device.type)
    off = torch.autocast(x.device.type, enabled=False) if autocasting else nullcontext()
    with off:
        y, h_n, c_n, _, _ = network.forward(
            OPS, variant, params, x, h0, c0, lengths, run_direction, between_layers, layer_masks,
            step_masks,
        )  # fmt: skip
    return y, h_n, c_n


def regularized_direction(ops, variant, p, xs, h0, c0, valid, step_masks):
    """A direction with zoneout / recurrent dropout (``regularize.loop_direction``): the
    array code as plain torch ops, differentiated by autograd step by step (the "array"
    engine's reference loop; no fused BPTT node yet)."""
    ys, h, c, _ = regularize.loop_direction(
        torch_bptt.REFERENCE_OPS, variant, p, xs, h0, c0, valid, step_masks
    )
    return ys, h, c, None


def empty_batch(params, x, h0, c0):
    """What ``nn.LSTM`` returns for no sequences (x of shape (T, 0, in)): y (T, 0, D * P or
    D * H), h_n = (L * D, 0, P or H) and c_n = (L * D, 0, H), all empty.

    Differentiable as the loop would be: each output is zeros plus one scalar that sums
    every parameter, x, h0 and c0, so that backward reaches each of them with a zero
    gradient (the sum of an empty cotangent), as ``nn.LSTM``'s does; the scalar's value
    is never seen, every output being empty. (The loop itself cannot run: oneDNN's
    products refuse an empty batch.)
    """
    leaves = [a for layer in params for p in layer for a in p.values()] + [x, h0, c0]
    anchor = torch.stack([a.sum().to(x.dtype) for a in leaves]).sum()
    width = h0.shape[-1] * len(params[-1])
    return (
        x.new_zeros((x.shape[0], 0, width)) + anchor,
        h0.new_zeros(h0.shape) + anchor.to(h0.dtype),
        c0.new_zeros(c0.shape) + anchor.to(c0.dtype),
    )


GATE_KERNELS = (None, "array", "triton", "triton_persistent")


def check_gate_kernel(gate_kernel):
    """``gate_kernel`` checked: one of ``GATE_KERNELS``, and triton installed for its kernels."""
    if gate_kernel not in GATE_KERNELS:
        raise ValueError(
            "gate_kernel: expected None, 'array', 'triton' or 'triton_persistent', "
            f"got {gate_kernel!r}"
        )
    if gate_kernel in ("triton", "triton_persistent") and (
        importlib.util.find_spec("triton") is None
    ):
        raise ImportError(
            f"gate_kernel={gate_kernel!r} needs triton, which is not installed: "
            "pip install 'lstm_multi[triton]'"
        )
    return gate_kernel


#: (gate_kernel, cuda_graphs) -> the engine they spell (``engine_from_options``)
_SPELLED_ENGINES = {
    ("array", False): "array",
    ("triton", False): "triton",
    ("triton_persistent", False): "triton_persistent",
    (None, True): "graphed_array",
    ("array", True): "graphed_array",
    ("triton", True): "graphed_triton",
    ("triton_persistent", True): "graphed_triton_persistent",
}


def engine_from_options(engine, native, gate_kernel, cuda_graphs):
    """The engine a torch cell asks for, from ``engine=`` and the older spellings.

    ``gate_kernel`` / ``cuda_graphs`` name engines (``_SPELLED_ENGINES``); giving them
    beside an ``engine`` other than "auto" is a ValueError, as is ``native=False`` with
    ``engine="native"``. ``native=True`` asks for "native" where ``engine`` is "auto"
    (an engine named explicitly wins over it). Returns (requested engine, excluded
    engines).
    """
    engine = engines.check_engine("torch", engine)
    check_gate_kernel(gate_kernel)
    spelled = _SPELLED_ENGINES.get((gate_kernel, cuda_graphs))
    if spelled is not None:
        if engine != engines.AUTO:
            raise ValueError(
                f"engine: {engine!r} and gate_kernel={gate_kernel!r}, "
                f"cuda_graphs={cuda_graphs!r} both choose the engine; give engine={spelled!r} "
                "alone (gate_kernel and cuda_graphs are its older spellings)"
            )
        engine = spelled
    if native is False:
        if engine == "native":
            raise ValueError("native: False contradicts engine='native'")
        return engine, ("native",)
    if native and engine == engines.AUTO:
        return "native", ()
    return engine, ()


def export_engine(name, x):
    """The engine that runs a call on x chosen as ``name``: "cpu_kernels" in place of
    "native" where x is traced by ``torch.export`` (``torch_bptt.exporting``), so the call
    becomes the custom op ``lstm_multi::direction``, whose sequence length stays
    symbolic (``nn.LSTM``'s kernel exports with the traced length only); ``name``
    otherwise."""
    if name == "native" and torch_bptt.exporting([x]):
        return "cpu_kernels"
    return name


def engine_runner(name, graphs=None):
    """The generic path's ``run_direction`` for the torch engine ``name`` (not "native").

    cpu_kernels / array: ``torch_bptt``'s runner with or without the CPU kernels;
    triton / triton_persistent: the Triton ops (``torch_triton``), with the persistent
    engine for the latter; graphed_*: the same loops captured and replayed from the
    graphs of ``graphs`` (the calling cell's ``torch_graphs.CellGraphs``: graphs belong
    to a cell, not the process).
    """
    graphed = name.startswith("graphed_")
    if not graphed:
        return _engine_runner(name)
    if graphs is None:
        raise ValueError(
            f"engine {name!r}: a graphed engine replays the graphs of a cell; pass its "
            "graphs (torch_graphs.CellGraphs)"
        )
    return graphs.runner(name, *_engine_parts(name.removeprefix("graphed_")))


@functools.cache
def _engine_parts(name):
    """(ops, cpu_kernels, engine_for) of the ungraphed torch engine ``name``."""
    if name in ("cpu_kernels", "array"):
        return torch_bptt.FAST_OPS, name == "cpu_kernels", None
    from . import torch_triton

    engine_for = torch_triton.persistent_engine if name == "triton_persistent" else None
    return torch_triton.TRITON_OPS, False, engine_for


@functools.cache
def _engine_runner(name):
    return torch_bptt.direction_runner_for(*_engine_parts(name))


#: the engines ``warn_device_fallback`` has warned about in this process
_WARNED_OPTIONS = set()


def warn_device_fallback(choice, spelled, x):
    """One ``UserWarning`` per process and engine where an engine the user named runs
    CUDA tensors only and x is elsewhere: the engine the table fell back to runs instead.
    Not an error: a module made for a GPU keeps working when moved to the CPU.
    ``spelled``: how the user named it ("gate_kernel='triton'", "engine='triton'").
    """
    if x.is_cuda or choice.engine == choice.requested or not choice.passed_over:
        return
    name, why = choice.passed_over[0]
    if name != choice.requested or not why.startswith("needs CUDA tensors"):
        return
    if spelled in _WARNED_OPTIONS:
        return
    _WARNED_OPTIONS.add(spelled)
    what = (
        "CUDA graphs replay CUDA work only"
        if name.startswith("graphed_")
        else "Triton runs CUDA tensors, or any under TRITON_INTERPRET=1"
    )
    warnings.warn(
        f"lstm_multi: {spelled} has no effect on {x.device.type} tensors ({what}): engine "
        f"{choice.engine!r} runs instead. Warned once per process.",
        UserWarning,
        stacklevel=4,
    )


def spelled_as(engine, gate_kernel, cuda_graphs):
    """How the user named ``engine``, for messages: the older options where they did."""
    if gate_kernel is not None and cuda_graphs:
        return f"gate_kernel={gate_kernel!r} with cuda_graphs=True"
    if cuda_graphs:
        return "cuda_graphs=True"
    if gate_kernel is not None:
        return f"gate_kernel={gate_kernel!r}"
    return f"engine={engine!r}"


def choose_engine(
    variant, hidden_size, proj_size, requested, exclude, x, layer_masks=False, step_mask=False,
    step_masks=False,
):  # fmt: skip
    """``engines.select_engine`` for a torch call on x (its device, its compute dtype: the
    autocast dtype inside ``torch.autocast``; inside ``torch.func`` transforms or not)."""
    dtype = autocast_dtype(x) or x.dtype
    case = engines.Case(
        "torch",
        x.device.type,
        str(dtype).removeprefix("torch."),
        variant,
        hidden_size,
        proj_size,
        transform=torch_bptt.functorch_active(),
        layer_masks=layer_masks,
        tracing=torch.jit.is_tracing(),
        step_mask=step_mask,
        step_masks=step_masks,
    )
    return engines.select_engine(case, requested, exclude)


class Cell(GraphOwner, FunctionalCell):
    __doc__ = (
        (FunctionalCell.__doc__ or "")
        + """
    Torch only: ``engine`` (``lstm_multi.engines``) chooses what runs each direction:
    "auto" (the default) the engine table's choice for each call's device, dtype and
    shape (``cell.explain(x)`` says which and why); or one of "native" (PyTorch's own
    LSTM kernel, cuDNN on CUDA: the plain variant only), "cpu_kernels" (the variant's
    generated C++, built with the host compiler on first use and cached), "array" (the
    generated array code in a Python loop), "triton", "triton_persistent" (generated
    Triton kernels, per step or the whole loop in one launch for H <= 64),
    "graphed_array", "graphed_triton", "graphed_triton_persistent" (those loops replayed
    from CUDA graphs captured on the second call of each shape, ``torch_graphs``: the
    graphs are the cell's own; ``cell.graph_stats()`` counts their captures and
    replays, ``cell.free_graphs()`` drops them).
    A named engine that cannot run a call falls back (``engines.Engine.fallback``);
    one that needs CUDA tensors, given others, warns once per process (a
    ``UserWarning`` naming the engine that runs instead), so a cell made for a GPU
    still runs on the CPU. ``native``: None (the default) leaves the choice to
    ``engine``; True asks for PyTorch's kernel where ``engine`` is "auto"; False keeps
    auto from picking it. ``gate_kernel`` ("array", "triton", "triton_persistent") and
    ``cuda_graphs=True`` are the older spellings of those engines.
    Outputs are differentiable with autograd (repeated backward, double
    backward, ``torch.func`` transforms, under which the array loop runs);
    tensors may live on any device. ``device`` (such as "cuda") is where the
    tensors the cell makes from NumPy go (``init``, ``from_numpy``, NumPy
    inputs); tensors passed in stay where they are, and states and gradients
    the cell creates follow x.
    ``torch.export.export`` of a module calling the cell records each direction as the
    custom op ``lstm_multi::direction`` (``torch_library``; "native" included), the
    sequence length symbolic; ``lengths`` are then an input of the program, taken
    unchecked (docs/deployment.md).
    """
    )

    backend = "torch"
    ops = OPS

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        variant: str | Variant = "lstm",
        num_layers: int = 1,
        bidirectional: bool = False,
        batch_first: bool = True,
        proj_size: int = 0,
        dropout: float = 0.0,
        *,
        engine: str = "auto",
        native: bool | None = None,
        device=None,
        gate_kernel: str | None = None,
        cuda_graphs: bool = False,
        zoneout: float | tuple[float, float] = 0.0,
        recurrent_dropout: float = 0.0,
        dropconnect: float = 0.0,
        input_dropout: float = 0.0,
    ):
        super().__init__(
            input_size, hidden_size, variant, num_layers, bidirectional, batch_first,
            proj_size, dropout, zoneout=zoneout, recurrent_dropout=recurrent_dropout,
            dropconnect=dropconnect, input_dropout=input_dropout,
        )  # fmt: skip
        if native is not None and not isinstance(native, bool):
            raise TypeError(f"native: expected True, False or None, got {native!r}")
        self.native = native
        self.cuda_graphs = validation.check_bool("cuda_graphs", cuda_graphs)
        self.device = None if device is None else torch.device(device)
        self.gate_kernel = check_gate_kernel(gate_kernel)
        self.engine, self._excluded = engine_from_options(
            engine, native, gate_kernel, self.cuda_graphs
        )
        self._spelled = spelled_as(self.engine, gate_kernel, self.cuda_graphs)
        #: the ``engines.Choice`` of the most recent call (None before the first)
        self.last_choice = None

    def _choose(self, x, layer_masks=False, step_mask=False, step_masks=False):
        return choose_engine(
            self.variant, self.hidden_size, self.proj_size, self.engine, self._excluded, x,
            layer_masks, step_mask, step_masks,
        )  # fmt: skip

    @property
    def uses_native(self):
        """Whether a float32 call on the CPU runs PyTorch's own kernel (``explain`` says
        it for a given input)."""
        return self._choose(torch.empty(0)).engine == "native"

    # torch.compile: one graph break around each of these calls, which run eagerly
    # (torch.compiler.disable, applied once TorchDynamo is imported: break_graph_at below)
    def __call__(self, params, x, state=None, lengths=None, *, mask=None, dropout_key=None):
        return super().__call__(params, x, state, lengths, mask=mask, dropout_key=dropout_key)

    __call__.__doc__ = FunctionalCell.__call__.__doc__

    def step(self, params, x_t, state=None):
        return super().step(params, x_t, state)

    step.__doc__ = FunctionalCell.step.__doc__

    def vjp(
        self,
        params,
        x,
        dy,
        state=None,
        lengths=None,
        dh_n=None,
        dc_n=None,
        *,
        mask=None,
        dropout_key=None,
    ):
        return super().vjp(
            params, x, dy, state, lengths, dh_n, dc_n, mask=mask, dropout_key=dropout_key
        )

    vjp.__doc__ = FunctionalCell.vjp.__doc__

    def _traced_lengths(self, lengths, steps):
        """lengths traced by ``torch.export`` / ``torch.compile`` (values known at run time
        only): taken as they are, unchecked (an exported program trusts its caller, as
        ``nn.LSTM``'s packed sequences do)."""
        return lengths.to(torch.int64)

    def _to_backend(self, array, name):
        if isinstance(array, torch.Tensor):
            return array
        try:
            return torch.as_tensor(array, device=self.device)
        except (TypeError, RuntimeError) as error:
            raise TypeError(f"{name}: expected a torch tensor or numpy array ({error})") from None

    #: a subclass's own generic time loop, run in place of every engine but "native"
    #: (the tests' reference path); None: the chosen engine's (``engine_runner``)
    generic_direction = None

    def _forward(self, params, x, h0, c0, lengths, layer_masks=None, step_masks=None):
        choice = self._choose(
            x, layer_masks is not None, network.is_step_mask(lengths), step_masks is not None
        )
        self.last_choice = choice
        warn_device_fallback(choice, self._spelled, x)
        engine = export_engine(choice.engine, x)
        if engine == "native":
            return torch_native.forward(params, x, h0, c0, lengths)
        if step_masks is not None:
            return generic_forward(
                self.variant, params, x, h0, c0, lengths, regularized_direction,
                layer_masks=layer_masks, step_masks=step_masks,
            )  # fmt: skip
        runner = type(self).generic_direction or engine_runner(engine, self._graphs_for(engine))
        return generic_forward(
            self.variant, params, x, h0, c0, lengths, runner, layer_masks=layer_masks
        )

    def _vjp(self, params, x, h0, c0, lengths, dy, dh_n, dc_n, layer_masks=None, step_masks=None):
        with torch.enable_grad():
            params = self._map(lambda name, a: a.detach().requires_grad_(True), params)
            x, h0, c0 = (a.detach().requires_grad_(True) for a in (x, h0, c0))
            y, h_n, c_n = self._forward(params, x, h0, c0, lengths, layer_masks, step_masks)
            leaves = [v for layer in params for p in layer for v in p.values()]
            grads = torch.autograd.grad(
                (y, h_n, c_n), [*leaves, x, h0, c0], (dy, dh_n, dc_n), allow_unused=True
            )
        grads = [
            torch.zeros_like(a) if g is None else g
            for a, g in zip([*leaves, x, h0, c0], grads, strict=True)
        ]
        it = iter(grads)
        param_grads = self._map(lambda name, a: next(it), params)
        return param_grads, next(it), next(it), next(it)


break_graph_at(Cell, ("__call__", "step", "vjp"))
