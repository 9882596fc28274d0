"""Test doubles: stand-ins for a GPU, so that the plumbing around the device code runs on the
CPU in the tests. They live here, not in the library.

* ``ProgramKernels``: the CuPy backend's kernel runner (``cupy_kernels.CudaKernels``'s
  interface) with each kernel's program evaluated node by node by NumPy
  (``lstm_multi.compile.evaluate``);
* ``EagerCapturer``: a device graph capturer (``device_graphs.Capturer``) that runs the
  captured function again on every replay, writing into the captured outputs.
"""

from __future__ import annotations

import numpy as np

from lstm_multi.backends.device_graphs import Capturer, flatten
from lstm_multi.compile import evaluate


def _blocks(z, hidden):
    return [z[:, k * hidden : (k + 1) * hidden] for k in range(z.shape[-1] // hidden)]


def _rows(variant, extra):
    """Input name -> parameter row, for the gate math's parameters (split halves: the
    bias ``b`` (4H,) as its four rows)."""
    found = {}
    for name, rows in variant.programs.params.items():
        value = np.reshape(extra[name], (len(rows), -1))
        found.update((f"{name}_{row}", value[r]) for r, row in enumerate(rows))
    return found


class ProgramKernels:
    """The kernels' programs evaluated by NumPy (for tests on machines without a GPU)."""

    xp = np

    def forward(self, variant, z, c_prev, extra):
        programs = variant.programs
        state = c_prev.dtype
        blocks = (b.astype(state) for b in _blocks(z, c_prev.shape[-1]))
        inputs = dict(zip(programs.z_inputs, blocks, strict=True))
        inputs["c_prev"] = c_prev
        inputs.update((k, v.astype(state)) for k, v in _rows(variant, extra).items())
        h, c, saved = evaluate.evaluate_forward(programs, inputs)
        return h.astype(z.dtype), c, tuple(np.asarray(a, dtype=state) for a in saved)

    def backward(self, variant, dh, dc, saved, extra):
        programs = variant.programs
        state = dc.dtype
        inputs = {"dh": dh.astype(state), "dc": dc}
        inputs.update((k, v.astype(state)) for k, v in _rows(variant, extra).items())
        out = evaluate.evaluate_backward(programs, inputs, saved)
        dz = np.concatenate([out[f"d{z}"] for z in programs.z_inputs], -1)
        terms = {
            name: np.stack([out[f"d{name}_{row}"] for row in rows], 1)
            for name, rows in programs.params.items()
        }
        return dz, out["dc_prev"], terms

    def gemm_accumulate(self, z, a, b):
        """z += a @ b in place; returns z."""
        z += a @ b
        return z


class EagerCapturer(Capturer):
    """A stand-in for a device graph on any array module (the tests' CPU capturer).

    ``capture`` runs the thunk once and keeps its outputs; ``replay`` runs it
    again and writes the results into those same arrays, which is what a
    graph does: it reads the static inputs and rewrites the static outputs in
    place. So the plumbing around a graph (copying in, copying out, the cache)
    is exercised without a GPU. ``context``, ``on_device`` and
    ``is_out_of_memory``, where given, replace ``Capturer``'s; ``around(real)``
    takes everything but the capture from a real capturer. The functions given are
    instance attributes: a test breaks one (``copy_into``, say) by assigning it on
    the instance, not by overriding it in a subclass.
    """

    def __init__(
        self,
        is_array,
        clone,
        copy_into,
        leaf_signature,
        context=None,
        on_device=None,
        is_out_of_memory=None,
    ):
        self.is_array, self.clone = is_array, clone
        self.copy_into, self.leaf_signature = copy_into, leaf_signature
        for name, given in (
            ("context", context),
            ("on_device", on_device),
            ("is_out_of_memory", is_out_of_memory),
        ):
            if given is not None:
                setattr(self, name, given)
        self.captures = 0

    @classmethod
    def around(cls, real):
        """An eager capturer with ``real``'s signatures, copies, context, device guard
        and out-of-memory test: only the capture and replay are the double's."""
        return cls(
            real.is_array,
            real.clone,
            real.copy_into,
            real.leaf_signature,
            real.context,
            real.on_device,
            real.is_out_of_memory,
        )

    def capture(self, thunk):
        outputs = thunk()
        self.captures += 1
        out_leaves, _ = flatten(outputs)

        def replay():
            fresh, _ = flatten(thunk())
            for dst, src in zip(out_leaves, fresh, strict=True):
                if self.is_array(dst):
                    self.copy_into(dst, src)

        return replay, outputs
