"""The ``lstm-multi`` command: ``lstm-multi bench [options]`` (also ``python -m lstm_multi.bench``).

``main`` is the command; ``run`` is the same from Python. Either leaves its
process's environment alone and imports no array framework for a run: each
framework's rows run in a child process (``isolation``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from .. import registry, spec
from . import frameworks
from .config import (
    DEFAULT_SIZES,
    DEFAULT_VARIANTS,
    DEVICES,
    DTYPES,
    FULL_SIZES,
    MODE_ALIASES,
    MODES,
    PRESETS,
    BenchConfig,
    parse_size,
)


def _split(values):
    """Repeatable, comma-separated option values -> a flat tuple (None when not given)."""
    if not values:
        return None
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


#: where results go unless --out says otherwise
DEFAULT_OUT = "lstm-multi-bench"


def _version():
    """lstm_multi's version (the package's ``__version__``)."""
    from .. import __version__

    return __version__


def build_parser():
    parser = argparse.ArgumentParser(
        prog="lstm-multi",
        description="lstm_multi tools. 'lstm-multi bench' times every backend, variant and peer; "
        "'lstm-multi engines' prints the engine table.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    bench = sub.add_parser(
        "bench",
        help="benchmark the backends against torch.nn.LSTM, the article's module, Flax, Equinox, Keras",
        description=(
            "Time every available lstm_multi backend and variant, and the installed peers. "
            "Each framework runs in a process of its own; each time is also given as a ratio "
            "to its framework's reference measured alternately in that process (torch: "
            "nn.LSTM, JAX: Flax, NumPy: its matrix products alone), and as a percentage of "
            "the machine's limit (GEMM FLOPs over the GEMM rate measured in the run). See "
            "benchmarks/README.md."
        ),
    )
    engines = sub.add_parser(
        "engines",
        help="print the engine table: every way each backend can run the time loop",
        description=(
            "Print lstm_multi's engine table (lstm_multi.engine_table()): each engine, its "
            "backends, devices, dtypes and limits, its older spelling, and whether and where "
            "engine='auto' picks it."
        ),
    )
    engines.add_argument(
        "--backend",
        "-b",
        choices=registry.known_backends(),
        help="only this backend's engines",
    )
    bench.add_argument(
        "--backend",
        "-b",
        action="append",
        metavar="NAME",
        help=f"lstm_multi backend(s), repeatable or comma-separated "
        f"(default: every available one; known: {', '.join(registry.known_backends())})",
    )
    bench.add_argument(
        "--variant",
        "-v",
        action="append",
        metavar="NAME",
        help=f"variant(s), or 'all' (default: {', '.join(DEFAULT_VARIANTS)}; known: "
        f"{', '.join(spec.VARIANTS)})",
    )
    bench.add_argument(
        "--peer",
        action="append",
        metavar="NAME",
        help="peer(s) to measure besides torch.nn.LSTM (default: every installed one but the "
        "article's module, which --full adds; see --list)",
    )
    bench.add_argument(
        "--no-peers",
        action="store_true",
        help="measure no peers but the references (nn.LSTM, Flax, the GEMM floor)",
    )
    bench.add_argument(
        "--size",
        "-s",
        action="append",
        metavar="SIZE",
        help=f"a preset ({', '.join(f'{k} = {v.label}' for k, v in PRESETS.items())}) "
        f"or T,B,I,H; repeatable (default: {', '.join(DEFAULT_SIZES)}; --full: "
        f"{', '.join(FULL_SIZES)})",
    )
    bench.add_argument(
        "--mode",
        default="both",
        help="forward, forward_backward (alias fwd+bwd), both (default), or step: one time "
        "step per call, T calls (per-token latency; lstm_multi's cell.step against nn.LSTM "
        "on one-step slices)",
    )
    bench.add_argument("--forward-only", action="store_true", help="the same as --mode forward")
    bench.add_argument("--device", default="cpu", choices=DEVICES, help="cpu (default) or cuda")
    bench.add_argument("--dtype", default="float32", choices=DTYPES, help="default float32")
    bench.add_argument(
        "--repeats",
        "-r",
        type=int,
        default=5,
        help="timed rounds per case; the median is reported (default 5)",
    )
    bench.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed calls after the (separately timed) first call (default 1)",
    )
    bench.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch's intra-op threads and NumPy's BLAS threads (default: the faster of 1 and "
        "the core count, measured on a quick nn.LSTM or its products at the start, printed)",
    )
    bench.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a row whose times spread over 20%% again, up to this many times "
        "(default 2); what still spreads is marked noisy",
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--out",
        "-o",
        metavar="DIR",
        default=DEFAULT_OUT,
        help=f"write results.json, results.md and results.png into DIR (default: ./{DEFAULT_OUT})",
    )
    bench.add_argument(
        "--full",
        action="store_true",
        help=f"every preset size ({', '.join(FULL_SIZES)}) instead of the default "
        f"({', '.join(DEFAULT_SIZES)}), and every installed peer (the article's module too); "
        "several minutes",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument(
        "--list",
        action="store_true",
        help="list the runners and whether they can run here, then exit",
    )
    return parser


def config_from_args(args, parser):
    """Validate the options into a BenchConfig; parser.error (exit 2) with a clear message."""
    sizes = []
    for text in args.size or (FULL_SIZES if args.full else DEFAULT_SIZES):
        try:
            sizes.append(parse_size(text))
        except ValueError as error:
            parser.error(str(error))
    backends = _split(args.backend)
    if backends is not None:
        known = registry.known_backends()
        for name in backends:
            base = name.split("[", 1)[0]
            if base not in known:
                parser.error(f"--backend: unknown backend {name!r}; expected one of {known}")
            framework = registry.framework_of(base)
            if importlib.util.find_spec(framework) is None:
                parser.error(
                    f"--backend: {name!r} cannot run here: it needs {framework}, which is "
                    "not installed"
                )
            devices = frameworks.get(framework).devices
            if args.device not in devices:
                parser.error(
                    f"--backend: {name!r} cannot run here: {framework} computes on "
                    f"{', '.join(devices)} only, and --device is {args.device!r}"
                )
    variants = _split(args.variant)
    if variants is not None and "all" in variants:
        variants = tuple(spec.VARIANTS)
    if variants is not None:
        for name in variants:
            if name not in spec.VARIANTS:
                parser.error(
                    f"--variant: unknown variant {name!r}; expected one of {list(spec.VARIANTS)}"
                )
    peers = _split(args.peer)
    if args.no_peers:
        peers = ()
    elif peers is not None:
        from .runners import peer_names

        known_peers = peer_names()
        for name in peers:
            if name not in known_peers:
                parser.error(f"--peer: unknown peer {name!r}; expected one of {known_peers}")
    mode = "forward" if args.forward_only else args.mode
    if mode == "both":
        modes = MODES
    elif mode in MODE_ALIASES:
        modes = (MODE_ALIASES[mode],)
    else:
        parser.error(f"--mode: expected forward, forward_backward, both or step, got {mode!r}")
    if args.repeats < 1:
        parser.error(f"--repeats: expected at least 1, got {args.repeats}")
    if args.warmup < 0:
        parser.error(f"--warmup: expected 0 or more, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected at least 1, got {args.threads}")
    if args.retries < 0:
        parser.error(f"--retries: expected 0 or more, got {args.retries}")
    return BenchConfig(
        sizes=tuple(sizes),
        backends=backends,
        variants=variants,
        peers=peers,
        modes=modes,
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        progress=not args.no_progress,
        threads=args.threads,
        retries=args.retries,
        every_peer=args.full,
    )


def list_runners(config):
    from .frameworks import FRAMEWORKS, Unavailable
    from .runners import all_runners

    for r in all_runners():
        fw = FRAMEWORKS[r.framework]
        try:
            fw.check(config.device, config.dtype)
            if r.devices is not None and config.device not in r.devices:
                raise Unavailable(f"runs on {', '.join(r.devices)} only (use --device cuda)")
            state = "ok" if r.in_default else "ok (with --peer or --full)"
        except (Unavailable, ImportError) as error:
            state = f"not here: {error}"
        variants = "all variants" if r.variants is None else ", ".join(r.variants)
        print(f"{r.name:21} {r.role:10} {variants:22} {state}  - {r.description}")


def main(argv=None):
    """The ``lstm-multi`` command (and ``python -m lstm_multi.bench``)."""
    return run(argv)


def run(argv=None):
    """``lstm-multi`` with the arguments ``argv`` (default: this process's); returns the exit
    status. Each framework runs in a child process with its own environment (Keras's
    backend set to JAX in the JAX process); this process's environment is left alone."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "engines":
        from .. import engine

        print(engine.engine_table(args.backend))
        return 0
    if args.command != "bench":
        parser.print_help()
        return 0 if args.command is None else 2
    config = config_from_args(args, parser)
    if args.list:
        list_runners(config)
        return 0
    from .report import text_table, write
    from .suite import run_benchmark

    def announce(n_cases, seconds, loaded_seconds=None):
        sizes = ", ".join(size.label for size in config.sizes)
        how_long = f"about {_duration(seconds)}"
        if loaded_seconds is not None:
            how_long += (
                f" on a quiet machine, about {_duration(loaded_seconds)} at the load average now"
            )
        print(
            f"lstm-multi bench: {how_long} (a rough estimate; retries of noisy "
            f"rows may add some): {n_cases} runner/variant cases at {sizes}, "
            f"{' and '.join(config.modes)}, {config.repeats} rounds each, each framework in "
            f"its own process against its reference (nn.LSTM, Flax, the GEMM floor); "
            f"results to {args.out}/",
            file=sys.stderr,
            flush=True,
        )

    results = run_benchmark(config, announce)
    print(text_table(results))
    paths = write(results, args.out)
    meta = results["meta"]
    print(
        f"\ntook {_duration(meta['duration_s'])} (estimated {_duration(meta['estimate_s'])}"
        + (
            f" quiet, {_duration(meta['estimate_at_load_s'])} at the load"
            if meta.get("estimate_at_load_s")
            else ""
        )
        + "); wrote "
        + ", ".join(p for p in paths.values() if p)
    )
    return 0


def _duration(seconds):
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 100 else f"{seconds // 60} min {seconds % 60:02d} s"
