"""What one benchmark run measures: sizes, variants, modes, dtype, device, repeats."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Size:
    """One problem size: T steps, B sequences, I input features, H hidden units."""

    steps: int
    batch: int
    input_size: int
    hidden_size: int
    name: str = ""

    @property
    def label(self):
        text = f"T{self.steps} B{self.batch} I{self.input_size} H{self.hidden_size}"
        return f"{self.name} ({text})" if self.name else text

    @property
    def key(self):
        return self.name or f"T{self.steps}_B{self.batch}_I{self.input_size}_H{self.hidden_size}"

    def as_dict(self):
        return {
            "name": self.name,
            "T": self.steps,
            "B": self.batch,
            "I": self.input_size,
            "H": self.hidden_size,
        }


PRESETS = {
    "small": Size(200, 4, 32, 64, "small"),
    "medium": Size(100, 64, 128, 256, "medium"),
    "large": Size(50, 128, 512, 512, "large"),
}
#: what ``lstm-multi bench`` measures by default (under 2 minutes on 2 cores); ``--full``
#: measures every preset
DEFAULT_SIZES = ("medium",)
FULL_SIZES = ("small", "medium", "large")
#: the variants a run measures unless told (``--variant all``: every variant in spec.VARIANTS)
DEFAULT_VARIANTS = ("lstm", "peephole", "peephole_full")

#: "forward": inference (no autograd graph); "forward_backward": outputs, then the
#: gradients of every parameter and of x for a given output gradient dy.
MODES = ("forward", "forward_backward")
#: "step" (only when asked for): inference one time step per call, T calls feeding the
#: state back (``cell.step``; ``nn.LSTM`` on one-step slices): the per-token latency
STEP_MODE = "step"
MODE_ALIASES = {
    "step": STEP_MODE,
    "forward": "forward",
    "fwd": "forward",
    "forward_backward": "forward_backward",
    "forward+backward": "forward_backward",
    "fwd+bwd": "forward_backward",
    "train": "forward_backward",
}
DTYPES = ("float32", "float64", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*$")


def parse_size(text) -> Size:
    """A preset name (small, medium, large) or ``T,B,I,H`` -> Size; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"--size: expected a preset {sorted(PRESETS)} or T,B,I,H, got {text!r}")
    if text.strip() in PRESETS:
        return PRESETS[text.strip()]
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(
            f"--size: expected a preset {sorted(PRESETS)} or four positive integers T,B,I,H "
            f"(such as 100,64,128,256), got {text!r}"
        )
    values = [int(v) for v in match.groups()]
    if min(values) < 1:
        raise ValueError(f"--size: T, B, I and H must all be at least 1, got {text!r}")
    return Size(*values)


@dataclass
class BenchConfig:
    """Everything a run needs; ``run_benchmark(config)`` measures it."""

    sizes: tuple = field(default_factory=lambda: tuple(PRESETS[n] for n in DEFAULT_SIZES))
    backends: tuple | None = None  # None: every available lstm_multi backend
    variants: tuple | None = None  # None: DEFAULT_VARIANTS
    peers: tuple | None = None  # None: every installed default peer; () for none
    #: with ``peers`` None, also the peers left out by default (``Runner.in_default``)
    every_peer: bool = False
    modes: tuple = MODES
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    progress: bool = True
    #: torch's intra-op threads; None: the faster of 1 and the core count, measured at the start
    threads: int | None = None
    #: a row whose times spread more than this ((max - min) / median) is measured again...
    max_spread: float = 0.2
    #: ...up to this many more times, and marked noisy if it still does
    retries: int = 2
    #: no retry starts once a framework's process has taken this many times its estimate
    retry_budget: float = 1.1
    #: "module:function" returning the runners (tests name a stub one)
    registry: str = "lstm_multi.bench.runners:all_runners"

    def as_dict(self):
        """JSON-ready, for a child process (``from_dict`` reverses it) and results.json."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["sizes"] = [s.as_dict() for s in self.sizes]
        for key in ("backends", "variants", "peers", "modes"):
            out[key] = None if out[key] is None else list(out[key])
        return out

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data["sizes"] = tuple(
            Size(s["T"], s["B"], s["I"], s["H"], s.get("name", "")) for s in data["sizes"]
        )
        for key in ("backends", "variants", "peers", "modes"):
            if data[key] is not None:
                data[key] = tuple(data[key])
        return cls(**data)
