"""Every environment variable lstm_multi reads, and their strict parsers.

They are for CI, tests and benchmarks: where a function argument does the same
(``gate_kernel=``, ``interpret=``), prefer the argument. A value that cannot be
read is a ``ValueError`` naming the variable, what it accepts and what it holds;
unset or empty (whitespace only) means the default.

=============================== ============================================ =================
name                            meaning                                      values (default)
=============================== ============================================ =================
``LSTM_MULTI_CPU_KERNELS``      CPU arrays run the generated C++ kernels;    switch (on)
                                off: the array code everywhere (per call:
                                ``gate_kernel="array"`` on the torch cell)
``LSTM_MULTI_CPU_THREADS``      the batch-split loops where the plan allows; switch (on)
                                off: the per-step loop. Not a thread count:
                                the split runs on torch's threads
                                (``torch.set_num_threads``)
``LSTM_MULTI_PALLAS_INTERPRET`` the Pallas kernels run in Pallas's           switch (off)
                                interpreter on accelerators too (on the CPU
                                they always are); else
                                ``jax_pallas.PallasKernels(interpret=True)``
``LSTM_MULTI_CACHE``            where compiled kernels and generated         a directory
                                modules are cached                           (~/.cache/lstm_multi)
``CXX``                         the host C++ compiler for the CPU kernels    a command (g++,
                                                                             then clang++)
``TRITON_INTERPRET``            Triton's own: Triton kernels run in its      switch (off)
                                interpreter, on CPU tensors too (the tests)
=============================== ============================================ =================

A switch is one of ``1 0 true false yes no on off`` (any case, surrounding
whitespace ignored). ``KERAS_BACKEND`` is Keras's own; the benchmark sets it to
``jax`` when unset, before Keras is imported.

Only ``os`` is imported: every layer may read these, none is above it.
"""

from __future__ import annotations

import contextlib
import os

#: what a switch accepts, in the order the error message lists them
SWITCH_VALUES = {
    "1": True,
    "0": False,
    "true": True,
    "false": False,
    "yes": True,
    "no": False,
    "on": True,
    "off": False,
}

CPU_KERNELS = "LSTM_MULTI_CPU_KERNELS"
CPU_THREADS = "LSTM_MULTI_CPU_THREADS"
PALLAS_INTERPRET = "LSTM_MULTI_PALLAS_INTERPRET"
CACHE = "LSTM_MULTI_CACHE"
COMPILER = "CXX"
TRITON_INTERPRET = "TRITON_INTERPRET"


def switch(name: str, default: bool, hint: str = "") -> bool:
    """The on/off variable ``name``: ``default`` when unset or empty, else its value.

    Raises ``ValueError("NAME: expected one of 1, 0, true, ..., got 'abc'")`` (and
    ``hint``, a further sentence) for anything else.
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = SWITCH_VALUES.get(raw.strip().lower())
    if value is None:
        expected = ", ".join(SWITCH_VALUES)
        message = f"{name}: expected one of {expected}, got {raw!r}"
        raise ValueError(f"{message}; {hint}" if hint else message)
    return value


def cpu_kernels_enabled() -> bool:
    """``LSTM_MULTI_CPU_KERNELS``: whether CPU arrays run the generated C++ kernels."""
    return switch(CPU_KERNELS, True)


def cpu_split_enabled() -> bool:
    """``LSTM_MULTI_CPU_THREADS``: whether the batch-split loops may run (an on/off switch;
    how many threads they use is torch's thread count)."""
    return switch(
        CPU_THREADS,
        True,
        hint="it is an on/off switch for the batch-split loops, not a thread count "
        "(they use torch's threads: torch.set_num_threads)",
    )


def pallas_interpret() -> bool:
    """``LSTM_MULTI_PALLAS_INTERPRET``: run the Pallas kernels interpreted on any device."""
    return switch(PALLAS_INTERPRET, False)


def triton_interpret() -> bool:
    """``TRITON_INTERPRET`` (Triton's own): whether Triton runs its kernels interpreted."""
    return switch(TRITON_INTERPRET, False)


def cache_root() -> str | None:
    """``LSTM_MULTI_CACHE``: the cache's root directory, or None (unset or empty: the
    default, ``~/.cache/lstm_multi``)."""
    raw = os.environ.get(CACHE, "")
    return raw if raw.strip() else None


def compiler() -> str | None:
    """``CXX``: the host C++ compiler asked for, or None (unset or empty: g++, then
    clang++)."""
    raw = os.environ.get(COMPILER, "")
    return raw.strip() or None


@contextlib.contextmanager
def temporarily(name: str, value: str):
    """``name`` set to ``value`` while the block runs, restored (or unset) afterwards. The
    environment is the process's: no other thread should read ``name`` meanwhile."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
