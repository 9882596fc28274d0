"""``device_graphs.GraphedFunction``, the framework-free part of graph replay, on NumPy arrays.

A ``doubles.EagerCapturer`` stands in for the device graph (a replay reruns the
captured function on the static inputs and rewrites the static outputs in
place, as a CUDA graph does), so what a training loop relies on is checked on
the CPU: the counters, freeing, the limit on graphs with varying shapes, the
device guard, the lock around a replay, and out-of-memory raised. The torch
and CuPy capturers and cells are tested in tests/test_torch_graphs.py and
tests/test_cupy_graphs.py.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import threading
import time
import warnings

import numpy as np
import pytest
from doubles import EagerCapturer

from lstm_multi.backends import device_graphs
from lstm_multi.backends.device_graphs import GraphedFunction


def _capturer(kind=EagerCapturer, **hooks):
    return kind(
        is_array=lambda x: isinstance(x, np.ndarray),
        clone=lambda x: np.array(x, order="C", copy=True),
        copy_into=np.copyto,
        leaf_signature=lambda x: (x.shape, x.dtype.str),
        **hooks,
    )


def _affine(x, scale):
    """The function the tests replay: a tree of outputs from a tree of inputs."""
    return {"y": x * scale + 1.0, "total": np.array(x.sum())}


def _check(out, x, scale):
    want = _affine(x, scale)
    np.testing.assert_array_equal(out["y"], want["y"])
    np.testing.assert_array_equal(out["total"], want["total"])


def test_stats_count_each_kind_of_call():
    """First call direct (warm-up), second captured and replayed, third replayed; a new
    shape is a new signature; graphs held and failed captures are counted."""
    graphed = GraphedFunction(_affine, _capturer())
    assert graphed.stats == device_graphs.empty_stats()
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.normal(size=(4, 3))
        _check(graphed(x, 2.0), x, 2.0)
    assert graphed.stats == {
        "captures": 1,
        "replays": 2,
        "direct_calls": 1,
        "failed_captures": 0,
        "signatures": 1,
        "graphs": 1,
    }
    x = rng.normal(size=(5, 3))
    _check(graphed(x, 2.0), x, 2.0)
    _check(graphed(x, 3.0), x, 3.0)  # a non-array argument is part of the signature
    stats = graphed.stats
    assert (stats["signatures"], stats["direct_calls"], stats["replays"]) == (3, 3, 2)
    total = device_graphs.sum_stats([graphed, graphed])
    assert total == {k: 2 * v for k, v in stats.items()}


def test_free_drops_the_graphs_and_later_calls_capture_again():
    capturer = _capturer()
    graphed = GraphedFunction(_affine, capturer)
    x = np.arange(6.0).reshape(2, 3)
    for _ in range(2):
        graphed(x, 1.0)
    assert graphed.stats["graphs"] == 1 and capturer.captures == 1
    graphed.free()
    assert graphed.graphs == {} and graphed.stats["graphs"] == 0
    y = x + 10
    _check(graphed(y, 1.0), y, 1.0)  # captured again at once: the kernels are warm
    assert capturer.captures == 2 and graphed.stats["captures"] == 2
    assert graphed.stats["replays"] == 2  # counters survive a free


def test_varying_shapes_stop_capturing_past_the_limit_with_one_warning():
    """20 sequence lengths, each called twice (so each would be captured): at most
    ``max_graphs`` captures, one warning that says what to do, every result right, and
    the captured lengths still replayed afterwards."""
    capturer = _capturer()
    graphed = GraphedFunction(_affine, capturer, max_graphs=8)
    rng = np.random.default_rng(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for steps in range(1, 21):
            for _ in range(2):
                x = rng.normal(size=(steps, 3))
                _check(graphed(x, 0.5), x, 0.5)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "max_graphs=8" in messages[0] and "pad or bucket" in messages[0]
    assert capturer.captures == 8
    assert graphed.stats["graphs"] == 8 and graphed.stats["signatures"] == 20
    replays = graphed.replays
    x = rng.normal(size=(3, 3))  # a length captured before the limit: still replayed
    _check(graphed(x, 0.5), x, 0.5)
    assert graphed.replays == replays + 1
    graphed.free()  # frees the limit too: the next lengths are captured, warned again later
    for _ in range(2):
        x = rng.normal(size=(30, 3))
        _check(graphed(x, 0.5), x, 0.5)
    assert capturer.captures == 9


def test_functions_sharing_notices_warn_once_between_them():
    notices = set()
    forward, backward = (
        GraphedFunction(_affine, _capturer(), max_graphs=1, notices=notices) for _ in range(2)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for steps in (2, 3):
            for _ in range(2):
                for graphed in (forward, backward):
                    graphed(np.ones((steps, 1)), 1.0)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert forward.stats["graphs"] == backward.stats["graphs"] == 1


def test_the_warm_up_capture_and_replays_run_on_the_arguments_device():
    """``capturer.on_device(leaves)`` is current around every run of ``fn``: here the
    double's device guard makes the device the arguments name current."""
    current = {"device": "gpu:0"}
    seen = []

    @contextlib.contextmanager
    def on_device(leaves):
        before, current["device"] = current["device"], next(x for x in leaves if isinstance(x, str))
        try:
            yield
        finally:
            current["device"] = before

    class Recording(EagerCapturer):
        def capture(self, thunk):
            seen.append(("capture", current["device"]))
            return super().capture(thunk)

    def fn(x, device):
        seen.append(("run", current["device"]))
        return x + 1

    graphed = GraphedFunction(fn, _capturer(Recording, on_device=on_device))
    for _ in range(3):
        np.testing.assert_array_equal(graphed(np.zeros(2), "gpu:1"), np.ones(2))
    assert graphed.stats["replays"] == 2
    # warm-up, capture (the double runs fn once), replay, replay: all on gpu:1
    assert seen == [("run", "gpu:1"), ("capture", "gpu:1"), *[("run", "gpu:1")] * 3]
    assert current["device"] == "gpu:0"


def _slow_affine(x):
    time.sleep(0.001)  # another thread runs here: it must not write this graph's inputs
    return x * 2.0 + 1.0


def _threads_replaying_one_graph(graphed, threads=4, calls=10):
    """Each thread calls ``graphed`` with its own inputs (one signature, so one graph);
    returns the number of wrong results."""
    wrong = []
    start = threading.Barrier(threads)

    def work(seed):
        rng = np.random.default_rng(seed)
        start.wait()
        for _ in range(calls):
            x = rng.normal(size=(8, 4))
            if not np.array_equal(graphed(x), x * 2.0 + 1.0):
                wrong.append(seed)

    pool = [threading.Thread(target=work, args=(seed,)) for seed in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return len(wrong)


def test_threads_replaying_one_graph_each_get_their_own_results():
    graphed = GraphedFunction(_slow_affine, _capturer())
    x = np.zeros((8, 4))
    graphed(x), graphed(x)  # captured
    assert _threads_replaying_one_graph(graphed) == 0
    assert graphed.stats["replays"] == 1 + 40 and graphed.stats["graphs"] == 1


def test_without_the_lock_threads_get_each_others_results():
    """The mutation the lock guards against: with it removed, a replay reads the static
    inputs another thread wrote (the test above would fail)."""
    graphed = GraphedFunction(_slow_affine, _capturer())
    x = np.zeros((8, 4))
    graphed(x), graphed(x)
    graphed._lock = contextlib.nullcontext()
    assert _threads_replaying_one_graph(graphed) > 0


class _OutOfMemory(EagerCapturer):
    """Raises ``error`` from its capture until it is None."""

    error = None

    def capture(self, thunk):
        if self.error is not None:
            raise self.error
        return super().capture(thunk)


@pytest.mark.parametrize(
    "error",
    [
        MemoryError("host out of memory"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("cudaErrorMemoryAllocation: out of memory"),
        RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"),
    ],
    ids=["MemoryError", "cuda", "cudart", "cublas"],
)
def test_out_of_memory_in_a_capture_is_raised_not_warned(error):
    """Running out of memory is not a reason to run without a graph: it is raised, as a
    direct call would raise it, and not remembered (a later call may capture)."""
    capturer = _capturer(_OutOfMemory)
    capturer.error = error
    graphed = GraphedFunction(_affine, capturer)
    x = np.ones((2, 2))
    graphed(x, 1.0)  # warm-up: direct
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error), match=str(error)[:20]):
            graphed(x, 1.0)
    assert graphed.failures == {} and graphed.stats["failed_captures"] == 0
    capturer.error = None  # memory freed: the next call captures
    _check(graphed(x, 1.0), x, 1.0)
    assert graphed.stats["captures"] == 1


def test_other_capture_failures_are_not_out_of_memory():
    capturer = device_graphs.Capturer()
    assert capturer.is_out_of_memory(MemoryError())
    assert not capturer.is_out_of_memory(RuntimeError("operation not permitted when capturing"))


def test_a_copy_or_pickle_starts_without_graphs():
    """Graphs are device state: a deep copy (or an unpickled function) captures its own."""
    graphed = GraphedFunction(_affine, _capturer(), max_graphs=3)
    x = np.ones((2, 2))
    for _ in range(3):
        graphed(x, 1.0)
    twin = copy.deepcopy(graphed)
    assert twin.stats == device_graphs.empty_stats() and twin.max_graphs == 3
    _check(twin(x, 1.0), x, 1.0)
    assert graphed.stats["replays"] == 2  # the original keeps its own
    pickled = pickle.loads(pickle.dumps(GraphedFunction(_affine, device_graphs.Capturer())))
    assert pickled.stats == device_graphs.empty_stats()
