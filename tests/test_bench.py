"""``lstm-multi bench`` keeps working: it runs at a tiny size, writes well-formed results,
and rejects bad options with a clear message. Nothing here asserts a timing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lstm_multi
from lstm_multi.bench import cli, config, timing

ROOT = Path(__file__).resolve().parent.parent


def _load_targets():
    """benchmarks/targets.py (the project's targets: a script beside the benchmark)."""
    name = "lstm_multi_benchmark_targets"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "targets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


targets = _load_targets()

TINY = "6,2,3,4"
ROW_KEYS = {
    "runner",
    "framework",
    "role",
    "variant",
    "size",
    "dims",
    "mode",
    "median_s",
    "times_s",
    "spread",
    "first_call_s",
    "setup_s",
    "reference",
    "ratio_to_reference",
    "ratios",
    "noisy",
    "attempts",
    "others_cpu",
    "flops",
    "limit_s",
    "pct_of_limit",
    "error",
}


def check_results(results, modes, sizes):
    assert set(results) >= {"meta", "runners", "results", "skipped"}
    assert "targets" not in results  # the project's targets are not the user's report
    for row in results["results"]:
        if row["pct_of_limit"] is not None:
            assert 0 < row["pct_of_limit"] <= 100.0 + 1e-9, row
    meta = results["meta"]
    assert meta["config"]["modes"] == list(modes)
    assert [s["T"] for s in meta["config"]["sizes"]] == [s.steps for s in sizes]
    assert "lscpu" in meta["machine"] and "versions" in meta["machine"]
    assert meta["gemm_rate_flops"] is None or meta["gemm_rate_flops"] > 0
    assert results["results"], "no case was measured"
    for row in results["results"]:
        assert set(row) == ROW_KEYS
        assert row["mode"] in modes
        assert row["error"] is None, row
        assert row["median_s"] > 0
        reference = meta["references"][row["framework"]]
        if row["runner"] == reference:  # measured around every case of every round
            assert len(row["times_s"]) >= meta["config"]["repeats"]
        else:
            assert len(row["times_s"]) == meta["config"]["repeats"]
        assert row["runner"] in results["runners"]
        if row["reference"] is not None:  # a ratio only to its own framework's reference
            assert row["reference"] == reference
            assert row["ratio_to_reference"] > 0
        assert row["noisy"] == (row["spread"] > meta["config"]["max_spread"])
    for skip in results["skipped"]:
        assert skip["reason"]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "lstm_multi.bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_console_script_runs_everything_at_a_tiny_size(tmp_path, thorough):
    """The README's command via the script, both modes, the default variants: every
    backend and peer (the JAX process's Flax, Equinox and Keras rows too) under
    --thorough; otherwise the torch and numpy processes, the report and the plot (the JAX
    process, which compiles each of its cases, took half of this test's time). With
    --threads: the torch and NumPy processes' thread probes (a T50 B64 I128 H256 LSTM
    each, at 1 thread and at the cores, three rounds: 2-3 s of this test's 8 s) are
    test_the_thread_probes_choose_and_the_report_says_what_they_measured's, in process."""
    chosen = [] if thorough else ["--backend", "torch,numpy"]
    exe = shutil.which("lstm-multi") or os.path.join(os.path.dirname(sys.executable), "lstm-multi")
    command = [exe] if os.path.exists(exe) else [sys.executable, "-m", "lstm_multi.bench"]
    if command[0] == exe:
        command.append("bench")
    proc = subprocess.run(
        [
            *command,
            "--size",
            TINY,
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-progress",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
            *chosen,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GEMM rate" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    check_results(results, config.MODES, [config.parse_size(TINY)])
    import lstm_multi

    measured = {(r["runner"], r["variant"]) for r in results["results"]}
    for backend in lstm_multi.available_backends():
        if backend == "cupy" or not (thorough or backend in ("torch", "numpy")):
            continue  # CPU run: CuPy needs --device cuda
        for variant in ("lstm", "peephole", "peephole_full"):  # the default variants
            assert (backend, variant) in measured
    md = (tmp_path / "results.md").read_text()
    assert "# lstm-multi bench results" in md and "## Machine" in md
    assert "forward + backward" in md and "| runner | variant |" in md
    if importlib_util_has("matplotlib"):
        assert (tmp_path / "results.png").stat().st_size > 0


def importlib_util_has(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_module_entry_point_help():
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "--size" in proc.stdout and "--out" in proc.stdout


def test_in_process_run_subset(tmp_path, capsys):
    environment = dict(os.environ)
    code = cli.run(
        [
            "bench",
            "--backend",
            "numpy",
            "--variant",
            "lstm,peephole",
            "--peer",
            "numpy.matmuls",
            "--size",
            TINY,
            "--size",
            "3,1,2,2",
            "--mode",
            "forward",
            "--repeats",
            "2",
            "--retries",
            "0",
            "--threads",
            "1",  # the thread probe: test_the_thread_probes_choose_and_the_report_says...
            "--warmup",
            "0",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert dict(os.environ) == environment  # run from Python: the caller's, unchanged
    out = capsys.readouterr().out
    assert "numpy / lstm" in out and "numpy.matmuls" in out
    results = json.loads((tmp_path / "results.json").read_text())
    check_results(results, ("forward",), [config.parse_size(TINY), config.parse_size("3,1,2,2")])
    runners = {r["runner"] for r in results["results"]}
    assert {"numpy", "numpy.matmuls"} <= runners
    assert not runners & {"flax", "equinox", "keras", "article", "jax", "torch"}
    variants = {r["variant"] for r in results["results"] if r["runner"] == "numpy"}
    assert variants == {"lstm", "peephole"}


def test_step_mode_times_one_step_per_call(tmp_path, capsys):
    """--mode step: each backend's ``cell.step`` T times and nn.LSTM on one-step slices;
    peers that run whole sequences only are skipped with a reason."""
    pytest.importorskip("torch")
    arguments = ["bench", "--backend", "numpy", "--backend", "torch", "--variant", "lstm"]
    arguments += ["--peer", "article", "--size", "4,2,3,5", "--mode", "step", "--repeats", "2"]
    arguments += [
        "--retries",
        "0",
        "--threads",
        "1",
        "--warmup",
        "0",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert cli.run(arguments) == 0
    assert "one step per call" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    check_results(results, ("step",), [config.parse_size("4,2,3,5")])
    runners = {r["runner"] for r in results["results"]}
    assert {"numpy", "torch", "torch.nn.LSTM"} <= runners
    assert any("no step mode" in skip["reason"] for skip in results["skipped"])


def test_default_run_is_short_and_says_where_and_how_long(tmp_path, capsys, monkeypatch):
    parser = cli.build_parser()
    default = cli.config_from_args(parser.parse_args(["bench"]), parser)
    assert [s.name for s in default.sizes] == ["medium"]
    full = cli.config_from_args(parser.parse_args(["bench", "--full"]), parser)
    assert [s.name for s in full.sizes] == ["small", "medium", "large"]
    every = cli.config_from_args(parser.parse_args(["bench", "--variant", "all"]), parser)
    assert set(every.variants) == set(lstm_multi.VARIANTS)
    monkeypatch.chdir(tmp_path)
    arguments = ["bench", "--backend", "numpy", "--no-peers", "--size", TINY, "--mode", "forward"]
    arguments += ["--threads", "1"]  # no thread probe: a test of its own measures it
    assert cli.run([*arguments, "--repeats", "1", "--warmup", "0", "--no-progress"]) == 0
    captured = capsys.readouterr()
    first = captured.err.splitlines()[0]  # how long it will take comes first
    assert first.startswith("lstm-multi bench: about ") and "a rough estimate" in first
    assert "lstm-multi-bench/" in first
    assert "(estimated " in captured.out
    assert "took " in captured.out
    assert (tmp_path / "lstm-multi-bench" / "results.json").exists()


def test_list_runners(capsys):
    assert cli.run(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("torch.nn.LSTM", "article", "flax", "equinox", "keras", "numpy.matmuls"):
        assert name in out


def test_gpu_paths_join_cuda_runs_only():
    """The GPU paths (Triton gates, CUDA graphs, persistent kernels) are measured beside
    their backend's default with --device cuda and left out of a CPU run."""
    from lstm_multi.bench import suite

    pytest.importorskip("torch")
    on = {
        device: config.BenchConfig(backends=["torch"], device=device) for device in ("cpu", "cuda")
    }
    names = {d: {r.name for r in suite.select_runners(c)} for d, c in on.items()}
    assert {"torch", "torch[native]"} <= names["cpu"]
    assert not any(n in names["cpu"] for n in ("torch[triton]", "torch[graphed_triton]"))
    assert {"torch[triton]", "torch[graphed_triton]", "torch[triton_persistent]"} <= names["cuda"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--size", "1,2,3"], "T,B,I,H"),
        (["--size", "0,1,1,1"], "at least 1"),
        (["--size", "huge"], "preset"),
        (["--backend", "nosuch"], "unknown backend 'nosuch'"),
        (["--variant", "gru"], "unknown variant 'gru'"),
        (["--peer", "tensorflow"], "unknown peer 'tensorflow'"),
        (["--mode", "sideways"], "--mode"),
        (["--repeats", "0"], "--repeats"),
        (["--dtype", "int8"], "invalid choice"),
        (["--device", "tpu"], "invalid choice"),
    ],
)
def test_option_errors_are_clear(args, message, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.run(["bench", *args])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_unavailable_backend_is_a_clear_error(capsys):
    import lstm_multi

    missing = [b for b in lstm_multi.known_backends() if b not in lstm_multi.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(SystemExit):
        cli.run(["bench", "--backend", missing[0]])
    assert "cannot run here" in capsys.readouterr().err


def test_parse_size():
    assert config.parse_size("medium") == config.PRESETS["medium"]
    size = config.parse_size(" 10, 2,3 ,4 ")
    assert (size.steps, size.batch, size.input_size, size.hidden_size) == (10, 2, 3, 4)
    assert config.PRESETS["large"].label == "large (T50 B128 I512 H512)"


def test_alternate_ratios_use_the_neighbouring_reference_times(monkeypatch):
    """ref, a, ref, b, ref: each ratio is the case over the smaller ref around it."""
    clock = iter([1.0, 3.0, 3.0, 8.0, 5.0])  # ref, a, ref, b, ref
    monkeypatch.setattr(timing, "timed", lambda fn: next(clock))
    calls = []
    ref, a, b = timing.Measured(), timing.Measured(), timing.Measured()
    timing.alternate(
        (lambda: calls.append("ref"), ref),
        [(lambda: calls.append("a"), a), (lambda: calls.append("b"), b)],
        repeats=1,
    )
    # each timed call comes right after one untimed call of the same function
    assert calls == ["ref", "a", "ref", "b", "ref"]
    assert ref.times == [1.0, 3.0, 5.0]
    assert a.ratios == [3.0 / 1.0] and b.ratios == [8.0 / 3.0]
    assert a.median_s == 3.0


def test_targets_compare_ratios_to_the_reference():
    def row(runner, variant, mode, ratio, median=1.0, size="medium", role="peer"):
        return {
            "runner": runner,
            "variant": variant,
            "size": size,
            "mode": mode,
            "role": role,
            "ratio_to_reference": ratio,
            "median_s": median,
        }

    results = {
        "meta": {"config": {"dtype": "float32", "device": "cpu"}},
        "results": [
            row("jax", "lstm", "forward", 0.8, role="backend"),
            row("flax", "lstm", "forward", 1.0),
            row("numpy", "peephole", "forward", 1.2, role="backend"),
            row("numpy.matmuls", "*", "forward", 1.0, role="floor"),
        ],
    }
    for r in results["results"]:
        r["reference"] = {"jax": "flax", "flax": "flax"}.get(r["runner"], "numpy.matmuls")
    found = {(t["runner"], t["variant"]): t for t in targets.evaluate(results)}
    assert found[("jax", "lstm")]["ratio"] == pytest.approx(0.8)
    assert found[("jax", "lstm")]["met"] is True
    assert found[("numpy", "peephole")]["ratio"] == pytest.approx(1.2)
    assert found[("numpy", "peephole")]["met"] is True
    results["meta"]["config"]["dtype"] = "float64"
    assert targets.evaluate(results) == []


def test_importing_the_bench_imports_no_framework():
    code = (
        "import sys, lstm_multi.bench, lstm_multi.bench.cli, lstm_multi.bench.report; "
        "bad = [m for m in ('torch', 'jax', 'flax', 'equinox', 'keras', 'cupy', 'matplotlib') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_engine_runners_measure_only_an_engine_that_runs_and_is_not_the_default():
    """torch[cpu_kernels] runs "lstm" (auto picks PyTorch's kernel there) and is left out,
    with the reason, for "peephole", where auto runs the kernels already; torch[native] is
    left out for a variant PyTorch's kernel cannot compute."""
    torch = pytest.importorskip("torch")
    from lstm_multi.bench import runners
    from lstm_multi.bench.frameworks import Unavailable

    by_name = {r.name: r for r in runners.backend_runners()}
    kernels, native = by_name["torch[cpu_kernels]"], by_name["torch[native]"]
    size = config.parse_size("4,2,3,5")

    def case(variant):
        return runners.Case(size, variant, "forward", "float32", "cpu")

    if lstm_multi.get_cell("torch")(3, 5, "peephole").explain(torch.zeros(2, 4, 3)).engine != (
        "cpu_kernels"
    ):
        pytest.skip("no C++ compiler here: the CPU kernels fall back")
    kernels.build(kernels, case("lstm"))()
    with pytest.raises(Unavailable, match="the default runner runs engine 'cpu_kernels'"):
        kernels.build(kernels, case("peephole"))
    with pytest.raises(Unavailable, match="engine 'native' falls back to .*plain 'lstm' math"):
        native.build(native, case("peephole"))


def test_engines_command_prints_the_table(capsys):
    from lstm_multi import engine

    assert cli.run(["engines"]) == 0
    assert capsys.readouterr().out.strip() == engine.engine_table()
    assert cli.run(["engines", "--backend", "jax"]) == 0
    out = capsys.readouterr().out
    assert "`scan`" in out and "`native`" not in out


KERAS_CHECK = """
import os, sys
from lstm_multi.bench import peers
from lstm_multi.bench.frameworks import Unavailable
try:
    peers.require_keras_on_jax()
    print("ok")
except Unavailable as error:
    print("unavailable:", error)
print("keras imported:", "keras" in sys.modules)
print("KERAS_BACKEND:", os.environ.get("KERAS_BACKEND"))
"""


@pytest.mark.parametrize("value", [None, "torch", "jax"])
def test_the_keras_peer_leaves_the_callers_environment_alone(value):
    """In a caller's process the benchmark sets no KERAS_BACKEND: the Keras peer runs only
    where Keras will load on JAX, and is refused with the reason otherwise, before Keras
    is imported (which would fix its backend for the process)."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    if value is not None:
        env["KERAS_BACKEND"] = value
    proc = subprocess.run(
        [sys.executable, "-c", KERAS_CHECK], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[1:] == ["keras imported: False", f"KERAS_BACKEND: {value}"], lines
    if value == "jax":
        assert lines[0] == "ok"
    else:
        found = "unset" if value is None else f"'{value}'"
        assert lines[0].startswith(f"unavailable: the Keras peer runs on Keras's 'jax' backend, "
                                   f"and KERAS_BACKEND is {found}"), lines[0]  # fmt: skip


def test_keras_loaded_on_another_backend_is_refused_with_the_reason():
    """Keras already imported on another backend: the peer says so instead of running."""
    if not all(importlib.util.find_spec(m) for m in ("keras", "torch")):
        pytest.skip("needs keras and torch")  # not imported here: keras would fix its backend
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    code = "import keras; import os; os.environ['KERAS_BACKEND'] = 'jax'\n" + KERAS_CHECK
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("unavailable: Keras was already loaded with the 'torch'"), (
        proc.stdout
    )


def test_keras_backend_is_set_in_the_jax_process_only():
    """The JAX rows' process gets KERAS_BACKEND=jax (the Keras peer runs on JAX); the
    others keep the caller's value, and the caller's own environment is never changed."""
    from lstm_multi.bench import isolation

    before = dict(os.environ)
    base = {"KERAS_BACKEND": "torch", "PATH": "/bin"}
    assert isolation.child_environment("jax", base=base)["KERAS_BACKEND"] == "jax"
    assert isolation.child_environment("torch", base=base)["KERAS_BACKEND"] == "torch"
    assert base == {"KERAS_BACKEND": "torch", "PATH": "/bin"}
    assert dict(os.environ) == before


def test_each_framework_process_wakes_only_its_own_thread_pools():
    """In a framework's process the other libraries' pools get one thread (no spinning
    beside the one measured), its own the cores, torch's the --threads value when given."""
    from lstm_multi.bench import isolation

    cores = str(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    numpy_env = isolation.child_environment("numpy", base={})
    assert numpy_env["OPENBLAS_NUM_THREADS"] == cores and numpy_env["OMP_NUM_THREADS"] == cores
    torch_env = isolation.child_environment("torch", threads=3, base={})
    assert torch_env["OMP_NUM_THREADS"] == "3" and torch_env["OPENBLAS_NUM_THREADS"] == "1"
    assert isolation.child_environment("numpy", threads=3, base={})["OPENBLAS_NUM_THREADS"] == "3"
    jax_env = isolation.child_environment("jax", base={})
    assert jax_env["OPENBLAS_NUM_THREADS"] == "1" and jax_env["OMP_NUM_THREADS"] == "1"
    assert torch_env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lstm-multi {lstm_multi.__version__}"


def test_backend_choice_restricts_the_peers_too():
    """-b torch leaves out the peers of other frameworks (numpy.matmuls, flax, ...) unless
    named with --peer; torch.nn.LSTM, the reference, always runs."""
    from lstm_multi.bench import suite

    pytest.importorskip("torch")
    names = {r.name for r in suite.select_runners(config.BenchConfig(backends=["torch"]))}
    assert "torch.nn.LSTM" in names
    assert not names & {"numpy.matmuls", "flax", "equinox", "keras"}
    named = config.BenchConfig(backends=["torch"], peers=["numpy.matmuls"])
    assert "numpy.matmuls" in {r.name for r in suite.select_runners(named)}


def test_the_articles_module_runs_only_when_named_or_in_full_runs():
    """The default run leaves the article's module out (its rows took minutes of a default
    run that must end in about two); ``--peer article`` and ``--full`` measure it."""
    from lstm_multi.bench import cli, suite

    pytest.importorskip("torch")

    def chosen(argv):
        parser = cli.build_parser()
        return {
            r.name
            for r in suite.select_runners(cli.config_from_args(parser.parse_args(argv), parser))
        }

    assert "article" not in chosen(["bench"]) and "torch.nn.LSTM" in chosen(["bench"])
    assert "article" in chosen(["bench", "--full"])
    assert "article" in chosen(["bench", "--peer", "article"])
    assert "article" not in chosen(["bench", "--full", "--no-peers"])


def test_the_layer_norm_baselines_run_with_the_layernorm_variant_only():
    """The framework-ops layer norm LSTM has "layernorm" cases only, so the default run
    (lstm, peephole, peephole_full) measures nothing more; ``-v layernorm`` adds its eager
    form, and its torch.compile form (a compile per size and mode) is named or in --full."""
    from lstm_multi.bench import cli, suite

    pytest.importorskip("torch")

    def cases(argv):
        parser = cli.build_parser()
        chosen = cli.config_from_args(parser.parse_args(argv), parser)
        variants = chosen.variants or config.DEFAULT_VARIANTS
        return {(r.name, v) for r, v in suite._cases(suite.select_runners(chosen), variants)}

    assert not {name for name, _ in cases(["bench"])} & {
        "layernorm.torch_ops",
        "layernorm.torch_compile",
    }
    layernorm = cases(["bench", "-b", "torch", "-v", "layernorm"])
    assert {("torch", "layernorm"), ("layernorm.torch_ops", "layernorm")} <= layernorm
    assert "layernorm.torch_compile" not in {name for name, _ in layernorm}
    named = cases(["bench", "-b", "torch", "-v", "layernorm", "--peer", "layernorm.torch_compile"])
    assert ("layernorm.torch_compile", "layernorm") in named
    assert ("layernorm.torch_compile", "layernorm") in cases(["bench", "-v", "layernorm", "--full"])


def test_the_framework_ops_layer_norm_lstm_agrees_with_the_oracle():
    """The baseline the "layernorm" rows are compared with (``peers.layernorm_lstm_module``,
    written by hand in plain torch as a user would) computes the oracle's function, outputs
    and every gradient, float64: the comparison is like for like."""
    torch = pytest.importorskip("torch")
    from reference import Config, make_problem, reference

    from lstm_multi.bench import peers

    shape = dict(batch=3, steps=5, input_size=4, hidden_size=6, num_layers=1)
    problem_config = Config("layernorm", **shape, bidirectional=False, with_state=True,
                            with_lengths=False, batch_first=False, seed=3)  # fmt: skip
    problem = make_problem(problem_config)
    expected = reference(problem_config, problem)
    p = problem.params[0][0]
    module = peers.layernorm_lstm_module()(4, 6).double()
    norms = {"x": module.ln_x, "h": module.ln_h, "c": module.ln_c}
    with torch.no_grad():
        for name in ("W", "U", "b"):
            getattr(module, name).copy_(torch.tensor(p[name]))
        for key, norm in norms.items():
            norm.weight.copy_(torch.tensor(p[f"gamma_{key}"].reshape(-1)))
            norm.bias.copy_(torch.tensor(p[f"beta_{key}"].reshape(-1)))
    x = torch.tensor(problem.x.swapaxes(0, 1), requires_grad=True)  # batch-first
    h0 = torch.tensor(problem.h0[0], requires_grad=True)
    c0 = torch.tensor(problem.c0[0], requires_grad=True)
    y, (h_n, c_n) = module(x, (h0, c0))
    loss = (y * torch.tensor(problem.dy.swapaxes(0, 1))).sum()
    loss = loss + (h_n * torch.tensor(problem.dh_n[0])).sum()
    (loss + (c_n * torch.tensor(problem.dc_n[0])).sum()).backward()
    got = {"y": y.detach().numpy().swapaxes(0, 1), "h_n": h_n.detach().numpy()[None],
           "c_n": c_n.detach().numpy()[None], "dx": x.grad.numpy().swapaxes(0, 1),
           "dh0": h0.grad.numpy()[None], "dc0": c0.grad.numpy()[None]}  # fmt: skip
    for key, value in got.items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-10, atol=1e-12, err_msg=key)
    want = expected["grads"][0][0]
    grads = {name: getattr(module, name).grad.numpy() for name in ("W", "U", "b")}
    for key, norm in norms.items():
        grads[f"gamma_{key}"] = norm.weight.grad.numpy().reshape(want[f"gamma_{key}"].shape)
        grads[f"beta_{key}"] = norm.bias.grad.numpy().reshape(want[f"beta_{key}"].shape)
    assert set(grads) == set(want)
    for key, value in grads.items():
        np.testing.assert_allclose(value, want[key], rtol=1e-10, atol=1e-12, err_msg=f"d{key}")


def test_backend_choice_restricts_every_row():
    """-b numpy: the numpy backend and its reference (its GEMM floor) only - not nn.LSTM,
    which was measured in every run before; -b jax: its rows against Flax."""
    from lstm_multi.bench import suite

    names = {r.name for r in suite.select_runners(config.BenchConfig(backends=["numpy"]))}
    assert names == {"numpy", "numpy.matmuls"}
    bare = config.BenchConfig(backends=["numpy"], peers=())
    assert {r.name for r in suite.select_runners(bare)} == {"numpy", "numpy.matmuls"}
    jax = {r.name for r in suite.select_runners(config.BenchConfig(backends=["jax"]))}
    assert "flax" in jax and "jax" in jax
    assert not jax & {"torch.nn.LSTM", "numpy.matmuls", "article", "numpy", "torch"}


# spread, retries, busy machine ------------------------------------------------


def _fake_clock(monkeypatch, times_by_name):
    """timing.timed returns the next time listed for the function's ``name``."""
    queues = {name: iter(times) for name, times in times_by_name.items()}
    monkeypatch.setattr(timing, "timed", lambda fn: next(queues[fn.name]))


class _Named:
    def __init__(self, name):
        self.name = name

    def __call__(self):
        pass


def test_a_row_spreading_over_the_limit_is_retried_and_the_calmest_attempt_kept(monkeypatch):
    """Fake times: "calm" spreads 10% (no retry); "shaky" spreads 100%, then 50%, then 10%
    (two retries, the last kept, not noisy); "noisy" spreads 100% every time (marked)."""
    _fake_clock(
        monkeypatch,
        {
            "ref": [1.0] * 100,
            "calm": [1.0, 1.1, 1.05],
            "shaky": [1.0, 2.0, 1.5, 1.0, 1.5, 1.0, 1.0, 1.1, 1.05],
            "noisy": [1.0, 2.0, 1.5] * 3,
        },
    )
    ref = (_Named("ref"), timing.Measured())
    cases = {name: (_Named(name), timing.Measured()) for name in ("calm", "shaky", "noisy")}
    taken = timing.measure(ref, list(cases.values()), 3, max_spread=0.2, retries=2)
    calm, shaky, noisy = (cases[n][1] for n in ("calm", "shaky", "noisy"))
    assert taken == 2
    assert calm.attempts == 1 and not calm.noisy(0.2)
    assert shaky.attempts == 3 and shaky.times == [1.0, 1.1, 1.05] and not shaky.noisy(0.2)
    assert shaky.ratios == [1.0, 1.1, 1.05]  # the kept attempt's ratios go with its times
    assert noisy.attempts == 3 and noisy.noisy(0.2)


def test_retries_stop_at_the_limit_and_at_the_deadline(monkeypatch):
    _fake_clock(monkeypatch, {"ref": [1.0] * 100, "noisy": [1.0, 3.0] * 10})
    measured = timing.Measured()
    timing.measure(None, [(_Named("noisy"), measured)], 2, max_spread=0.2, retries=0)
    assert measured.attempts == 1 and measured.noisy(0.2)
    late = timing.Measured()
    past = (lambda: 10.0, 5.0)  # now, deadline: the run's time budget is spent
    assert timing.measure(None, [(_Named("noisy"), late)], 2, 0.2, 5, clock=past) == 0
    assert late.attempts == 1


def test_a_busy_machine_is_said():
    from lstm_multi.bench import machine

    assert machine.busy_at_start([0.1, 0.1, 0.1], 2) is None
    assert "machine busy: load average 2.40 on 2 core" in machine.busy_at_start([2.4, 1, 1], 2)
    assert machine.slowdown([0.1, 0, 0], 2) == 1.0 and machine.slowdown([9.0, 0, 0], 2) == 5.0
    assert machine.busy_during(0.1, "torch: medium forward") is None
    assert "60% of the cores during torch" in machine.busy_during(0.6, "torch: medium forward")
    share = machine.CpuSampler().others_share()
    assert share is None or 0.0 <= share <= 1.0


def test_the_thread_probes_choose_and_the_report_says_what_they_measured(monkeypatch):
    """What the torch and NumPy processes of a run without --threads do first (the other
    tests that run the benchmark pass --threads, which skips it): each times its own
    framework's LSTM at 1 thread and at the cores, keeps the faster and says so; the
    report shows what was measured. Here in this process, at a tiny probe shape (the
    shape is not what is tested: it was 2-3 s of the script's test at T50 B64 I128 H256)
    and with two cores whatever this machine has, so that the probe runs; this process's
    thread settings are put back."""
    torch = pytest.importorskip("torch")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from lstm_multi.bench import report, threads

    monkeypatch.setattr(threads, "PROBE_SHAPE", (4, 2, 3, 5))
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    said, before = [], torch.get_num_threads()
    chosen = config.BenchConfig()  # threads=None: measured
    assert chosen.threads is None
    try:
        with threadpoolctl.threadpool_limits(limits=None):  # restored on leaving
            info = {**threads.set_torch_threads(chosen, said.append)}
            info.update(threads.set_numpy_threads(chosen, said.append))
    finally:
        torch.set_num_threads(before)
    assert info["torch_threads"] in (1, 2) and info["numpy_threads"] in (1, 2)
    for name in ("torch", "numpy"):
        probe = info[f"{name}_thread_probe_s"]
        assert set(probe) == {"1", "2"} and all(s > 0 for s in probe.values()), probe
    assert said[0].startswith(f"torch threads: {info['torch_threads']} (measured: 1 -> ")
    assert said[1].startswith(f"numpy threads: {info['numpy_threads']} (measured: 1 -> ")
    results = _results([])
    results["meta"]["machine"].update(info)
    md = report.markdown(results)
    assert f"- torch intra-op threads: {info['torch_threads']} (measured: 1 -> " in md
    assert f"- NumPy's BLAS threads: {info['numpy_threads']} (measured: 1 -> " in md


def test_torch_threads_are_the_faster_measured_setting():
    from lstm_multi.bench import threads

    fake = {1: [5.0, 5.2, 5.1], 2: [3.0, 9.0, 3.1]}  # 2 threads: median 3.1 ms, one spike
    calls = {n: iter(t) for n, t in fake.items()}
    chosen, medians = threads.choose(lambda n: next(calls[n]) / 1e3, [1, 2])
    assert chosen == 2 and medians == pytest.approx({1: 5.1e-3, 2: 3.1e-3})
    line = threads.describe(chosen, medians)
    assert line.startswith("torch threads: 2 (measured: 1 -> 5.1 ms, 2 -> 3.1 ms")
    assert threads.describe(4, {}) == "torch threads: 4 (set by --threads)"


# the table's columns and the plot --------------------------------------------


def _row(runner, framework, median, reference, ratio, variant="lstm", role="peer", noisy=False):
    return {
        "runner": runner,
        "framework": framework,
        "role": role,
        "variant": variant,
        "size": "medium",
        "dims": {"T": 100, "B": 64, "I": 128, "H": 256},
        "mode": "forward",
        "median_s": median,
        "times_s": [median],
        "spread": 0.5 if noisy else 0.05,
        "noisy": noisy,
        "attempts": 3 if noisy else 1,
        "first_call_s": median,
        "setup_s": 0.0,
        "reference": reference,
        "ratio_to_reference": ratio,
        "ratios": [ratio],
        "flops": 1e9,
        "limit_s": 1e-3,
        "pct_of_limit": 50.0,
        "error": None,
        "others_cpu": 0.0,
    }


def _results(rows):
    return {
        "meta": {
            "machine": {"platform": "test", "python": "3", "versions": {}, "lscpu": {}},
            "config": {
                "dtype": "float32",
                "device": "cpu",
                "repeats": 5,
                "warmup": 1,
                "max_spread": 0.2,
                "retries": 2,
                "retry_budget": 1.5,
            },
            "references": {"torch": "torch.nn.LSTM", "jax": "flax"},
            "gemm_rate_flops": 1e11,
            "gemm_rates_by_framework": {"torch": 1e11},
            "gemm_probe": "test",
            "started": "now",
            "duration_s": 1.0,
            "estimate_s": 1.0,
        },
        "runners": {},
        "results": rows,
        "skipped": [],
    }


def _table_line(table, label):
    return next(line for line in table.splitlines() if line.strip().startswith(label))


def test_a_ratio_is_shown_only_in_its_references_column_beside_that_time():
    """A JAX row shows x Flax (from the Flax time of its process), a torch row x nn.LSTM;
    each leaves the other column blank; with Flax's time missing, the JAX row shows none."""
    from lstm_multi.bench import report

    rows = [
        _row("torch.nn.LSTM", "torch", 0.010, "torch.nn.LSTM", 1.0, role="reference"),
        _row("torch", "torch", 0.012, "torch.nn.LSTM", 1.2, role="backend"),
        _row("flax", "jax", 0.020, "flax", 1.0),
        _row("jax", "jax", 0.015, "flax", 0.75, role="backend", noisy=True),
    ]
    table = report.text_table(_results(rows))
    header = _table_line(table, "runner / variant")
    assert "x nn.LSTM" in header and "x Flax" in header and "x GEMM floor" not in header
    columns = report.ratio_columns(rows)
    assert columns == ["x nn.LSTM", "x Flax"]
    assert report.ratio_cells(rows[1], rows) == {"x nn.LSTM": 1.2}
    assert report.ratio_cells(rows[3], rows) == {"x Flax": 0.75}
    jax_line = _table_line(table, "jax / lstm")
    assert "0.75" in jax_line and "1.20" not in jax_line and "noisy" in jax_line
    # the number sits under its own column: x Flax starts where the header's does
    start = header.index("x Flax") - (13 - len("x Flax"))
    assert jax_line[start : start + 13].strip() == "0.75"
    assert _table_line(table, "torch / lstm")[start : start + 13].strip() == ""
    without_flax = [r for r in rows if r["runner"] != "flax"]
    assert report.ratio_cells(rows[3], without_flax) == {}
    assert report.ratio_columns(without_flax) == ["x nn.LSTM"]
    assert "0.75" not in _table_line(report.text_table(_results(without_flax)), "jax / lstm")
    md = report.markdown(_results(rows))
    assert "| x nn.LSTM | x Flax | % of limit |" in md and "*noisy*" in md
    assert "| jax | lstm | 15.00 |  | 0.750 |" in md


def test_the_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from lstm_multi.bench import report

    rows = [
        _row("torch.nn.LSTM", "torch", 0.010, "torch.nn.LSTM", 1.0, role="reference"),
        _row("torch", "torch", 0.012, "torch.nn.LSTM", 1.2, role="backend"),
        _row("torch", "torch", 0.02, "torch.nn.LSTM", 2.0, "peephole", "backend", noisy=True),
        _row("flax", "jax", 0.020, "flax", 1.0),
        _row("jax", "jax", 0.015, "flax", 0.75, role="backend"),
    ]
    paths = report.write(_results(rows), tmp_path)
    assert paths["png"] and os.path.getsize(paths["png"]) > 1000
    assert report.plot(_results([]), tmp_path / "empty.png") is False  # nothing to draw


# process isolation ------------------------------------------------------------

STUB_REGISTRY = """
import os, sys
from lstm_multi.bench.runners import Runner


def build(runner, case):
    import bench_stub_marker  # noqa: F401 - only the child imports it

    with open(os.environ["BENCH_STUB_LOG"], "a") as f:
        f.write(f"{os.getpid()} {os.environ.get('OPENBLAS_NUM_THREADS')} "
                f"{os.environ.get('OMP_NUM_THREADS')} {'torch' in sys.modules}\\n")
    return lambda: sum(range(100))


def runners():
    return [
        Runner("numpy.matmuls", "numpy", "floor", build, None, "stub reference",
               per_variant=False),
        Runner("stub", "numpy", "backend", build, None, "stub backend", backend="numpy",
               per_variant=False),
    ]
"""

ISOLATION_CHECK = """
import os, sys
from lstm_multi.bench import config, machine, suite
# threads: the cores, the value a run without --threads gives the child's pools, but
# without the NumPy thread probe (a test of its own measures it)
cfg = config.BenchConfig(
    sizes=(config.parse_size("3,1,2,2"),), backends=("numpy",), modes=("forward",),
    repeats=2, warmup=0, progress=False, registry="bench_stub_registry:runners",
    threads=machine.usable_cores(),
)
results = suite.run_benchmark(cfg)
print(sorted(r["runner"] for r in results["results"]))
print([m for m in ("torch", "jax", "flax", "keras", "bench_stub_marker") if m in sys.modules])
print(os.getpid(), results["meta"]["processes"]["numpy"]["pid"])
"""


def test_each_framework_runs_in_a_child_process(tmp_path):
    """A run with a stub runner: its rows are measured in a child process (which imports
    the stub's module and sees the framework's thread settings); the parent imports no
    framework and not the stub's module."""
    (tmp_path / "bench_stub_registry.py").write_text(STUB_REGISTRY)
    (tmp_path / "bench_stub_marker.py").write_text("")
    log = tmp_path / "log.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "BENCH_STUB_LOG": str(log),
        "OPENBLAS_NUM_THREADS": "7",
    }
    proc = subprocess.run(
        [sys.executable, "-c", ISOLATION_CHECK],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runners, imported, pids = proc.stdout.strip().splitlines()[-3:]
    assert runners == "['numpy.matmuls', 'stub']"
    assert imported == "[]"
    parent, child = pids.split()
    assert parent != child
    cores = str(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    for line in log.read_text().splitlines():
        pid, openblas, omp, torch_loaded = line.split()
        assert (pid, openblas, omp, torch_loaded) == (child, cores, cores, "False")
