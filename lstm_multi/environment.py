"""Every environment variable lstm_multi reads, and their strict parsers.

They are for CI, tests and benchmarks. Every behaviour a user may want is an
argument: the last column names it, and no user needs a variable. A value that
cannot be read is a ``ValueError`` naming the variable, what it accepts and what
it holds; unset or empty (whitespace only) means the default.

=============================== ========================================= ================= =================================
name                            meaning                                   values (default)  the argument instead
=============================== ========================================= ================= =================================
``LSTM_MULTI_CPU_KERNELS``      CPU arrays may run the generated C++      switch (on)       ``engine="array"`` on any cell
                                kernels; off: the engine table refuses                      (per cell, not process-wide)
                                them (CI's array-code run)
``LSTM_MULTI_CPU_THREADS``      the batch-split loops where the plan      switch (on)       none wanted: the plan takes the
                                allows; off: the per-step loop (to                          split only where it measured
                                compare the two, or to rule the split                       faster; results agree to
                                out). Not a thread count                                    rounding. Threads:
                                                                                            ``torch.set_num_threads``
``LSTM_MULTI_PALLAS_INTERPRET`` the Pallas kernels run in Pallas's        switch (off)      ``pallas_kernels=jax_pallas.
                                interpreter on accelerators too (on the                     PallasKernels(interpret=True)``
                                CPU they always are)                                        on the JAX cell
``LSTM_MULTI_CACHE``            where compiled kernels and generated      a directory       (a machine's setting)
                                modules are cached                        (~/.cache/
                                                                          lstm_multi)
``CXX``                         the host C++ compiler for the CPU kernels a command (g++,   (a machine's setting)
                                                                          then clang++)
``TRITON_INTERPRET``            Triton's own: Triton kernels run in its   switch (off)      (Triton's own; the tests)
                                interpreter, on CPU tensors too
``KERAS_BACKEND``               Keras's own: the backend Keras loads at   a name (Keras's)  (Keras's own)
                                its first import, for the whole process;
                                read only by the benchmark's Keras peer,
                                which needs "jax" and is skipped
                                otherwise. The ``lstm-multi`` command
                                sets it to "jax" in the child process
                                of its JAX rows only
=============================== ========================================= ================= =================================

A switch is one of ``1 0 true false yes no on off`` (any case, surrounding
whitespace ignored). Nothing in lstm_multi changes a caller's environment but
``temporarily``, which restores it: ``check_variant`` runs its Triton check with
``TRITON_INTERPRET=1`` (Triton reads only the variable).

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
KERAS_BACKEND = "KERAS_BACKEND"


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


def search_path() -> str | None:
    """``PATH`` (the system's): where a compiler named without a directory is looked for,
    or None where it is unset (then ``shutil.which`` uses the system's default)."""
    return os.environ.get("PATH")


def keras_backend() -> str | None:
    """``KERAS_BACKEND`` (Keras's own): the backend it names, or None (unset or empty)."""
    raw = os.environ.get(KERAS_BACKEND, "")
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
