"""Every benchmark in ``simulations/bench/`` run end to end at toy size, so none can rot.

Each test calls the script's own ``main(argv)`` (the command ``BENCHMARKS.md`` names) on
the tiny random-init model and a miniature play, with one repetition and the fewest
clients the script allows, then parses what it prints (or the JSON it writes) and checks
that the columns ``BENCHMARKS.md`` quotes are there with finite numbers. Nothing here
bounds a speed or a memory figure: those are the benchmarks' business, as ratios measured
in their own runs (``docs/testing.md``).

``proc_memory`` is a library (no ``main``): its sampler is exercised end to end by the
``deploy_load`` run here, and its parsing and tree walk in ``test_deploy_load.py``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import mini_play

#: A number as the benchmarks print it (``1,234.5``, ``0.003``, ``1.13x``, ``+1.2%``), and
#: ``nan`` / ``inf``, so that :func:`assert_finite` sees them rather than skipping the cell.
_NUMBER = re.compile(r"^[+-]?(?:\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?|nan|inf)[x%]?$")


def _number(token: str) -> float:
    return float(token.rstrip("x%").replace(",", ""))


def _has_columns(line: str, columns: Sequence[str]) -> bool:
    """Whether ``line`` names every column, each after the one before (names may repeat)."""
    at = 0
    for column in columns:
        at = line.find(column, at)
        if at < 0:
            return False
        at += len(column)
    return True


def table(text: str, columns: Sequence[str]) -> list[list[str]]:
    """The rows under the printed header that holds every one of ``columns`` (in order),
    up to the next rule, blank line or prose line (``goal: ...``, ``a / b = 1.05``);
    the header must exist."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _has_columns(line, columns)), None)
    if start is None:
        raise AssertionError(f"no header with columns {list(columns)} in:\n{text}")
    rows = []
    for line in lines[start + 1:]:
        if set(line.strip()) == {"-"}:
            if rows:
                break
            continue
        if not line.strip() or ": " in line or " = " in line:
            break
        rows.append(line.split())
    assert rows, f"no rows under the header {lines[start]!r} in:\n{text}"
    return rows


def numbers(row: Sequence[str]) -> list[float]:
    """The numeric cells of a printed row."""
    return [_number(t) for t in row if _NUMBER.match(t)]


def assert_finite(values: Sequence[float], *, positive: bool = False,
                  nonnegative: bool = False) -> None:
    """Every value finite (and > 0, or >= 0). Printed times and sizes of a toy run may round
    to zero; the ratios next to them come from unrounded values."""
    assert values, "no numbers"
    for value in values:
        assert math.isfinite(value), values
        if positive:
            assert value > 0, values
        if nonnegative:
            assert value >= 0, values


@pytest.fixture(scope="module")
def play_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache whose corpus is a miniature play with enough speeches per role for the
    default ``data.min_examples`` (the benchmarks that build their split with the defaults)."""
    cache = tmp_path_factory.mktemp("bench-cache")
    texts = cache / "data" / "shakespeare" / "texts"
    texts.mkdir(parents=True)
    (texts / "miniature_gut.txt").write_text(mini_play(speeches_per_role=30))
    return cache


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """Benchmarks configure the root logger; leave it as it was."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


# --- in-process protocol and kernels ---------------------------------------------------------


def test_secagg_overhead(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """BENCHMARKS.md: clients | mode | client CPU s | coordinator CPU s | up KB/client |
    down KB/client, plus the SecAgg / plain ratios."""
    from simulations.bench import secagg_overhead

    out = tmp_path / "rows.json"
    assert secagg_overhead.main(["--clients", "3", "--dim", "1000", "--json", str(out)]) == 0

    text = capsys.readouterr().out
    rows = table(text, ["clients", "mode", "client CPU s", "coord CPU s", "up KB/cl",
                        "down KB/cl", "ratios secagg/plain"])
    assert [(r[0], r[1]) for r in rows] == [("3", "plain"), ("3", "secagg")]
    for row in rows:  # clients, mode, client CPU, coordinator CPU, up KB, down KB[, ratios]
        assert len(numbers(row[:6])) == 5
        assert_finite(numbers(row[:6]), nonnegative=True)
    ratios = re.findall(r"(client CPU|coordinator CPU|up bytes|down bytes) ([\d.]+)x", text)
    assert [name for name, _ in ratios] == ["client CPU", "coordinator CPU", "up bytes",
                                           "down bytes"]
    assert_finite([float(v) for _, v in ratios], positive=True)
    got = json.loads(out.read_text())
    assert [(r["clients"], r["secagg"]) for r in got] == [(3, False), (3, True)]
    for r in got:
        assert_finite([r["client_cpu_s_per_client"], r["coordinator_cpu_s"],
                       r["up_bytes_per_client"], r["down_bytes_per_client"]], positive=True)
    plain, secure = got
    # exact, not measured: the masked update is uint32 (as long as float32) plus keys/shares
    assert 4000 < plain["up_bytes_per_client"] < secure["up_bytes_per_client"]
    assert set(secure["stage_client_cpu_s"]) == {
        "train", "query.secagg_setup", "query.secagg_share_keys", "query.secagg_consistency",
        "query.secagg_unmask"}


def test_secagg_scaling(capsys: pytest.CaptureFixture[str]) -> None:
    """BENCHMARKS.md: clients | mode | degree | round s | x plain | client s | coord s |
    parallel s | x plain | coord peak MB, for plain, SecAgg and SecAgg+ at each cohort size
    (n = 10: SecAgg+ on a graph of degree 8)."""
    from simulations.bench import secagg_scaling

    assert secagg_scaling.main(["--clients", "4,10", "--dim", "300"]) == 0
    rows = table(capsys.readouterr().out,
                 ["clients", "mode", "degree", "round s", "x plain", "client s", "coord s",
                  "parallel s", "x plain", "coord peak MB"])
    assert [(r[0], r[1]) for r in rows] == [(str(n), m) for n in (4, 10)
                                            for m in ("plain", "secagg", "secagg+")]
    assert [r[2] for r in rows] == ["-", "3", "3", "-", "9", "8"]
    for row in rows:
        values = numbers(row[3:])
        assert len(values) == 7
        assert_finite(values, nonnegative=True)  # a toy client's seconds may print as 0.000
        assert values[1] > 0 and values[5] > 0  # the ratios, from unrounded times
    assert secagg_scaling.main(["--clients", "4", "--dim", "300", "--modes", "plain,secagg+"]) == 0
    rows = table(capsys.readouterr().out, ["clients", "mode", "degree", "round s"])
    assert [r[1] for r in rows] == ["plain", "secagg+"]
    with pytest.raises(SystemExit):
        secagg_scaling.main(["--modes", "secagg"])  # no baseline for the ratios


def test_gpu_check_refuses_unknown_parts_and_paths(capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt --parts or --paths name is an error, not a part silently left out."""
    from simulations.bench import gpu_check

    for flag, value in (("--parts", "kernel"), ("--paths", "twostage")):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.main([flag, value])
        assert exit_info.value.code == 2
        assert f"unknown name(s) {value}" in capsys.readouterr().err


def test_gpu_check(tiny_model_dir: Path, tmp_path: Path) -> None:
    """BENCHMARKS.md, GPU check: part | setting | measured | baseline | ratio | note. Here
    (no CUDA) the kernels run in Triton's interpreter against the reference and the LoRA
    step on the CPU in each precision; every GPU row says it is unmeasured."""
    import subprocess
    import sys

    import torch

    # A process of its own, as a person runs it: Triton's interpreter is chosen when
    # triton is first imported, which this test process may have done already.
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "-m", "simulations.bench.gpu_check", "--toy",
                           "--model", str(tiny_model_dir), "--threads", "1", "--json",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stdout
    rows = json.loads(out.read_text())["rows"]
    parts = {r["part"] for r in rows}
    assert {"kernels", "goal", "LoRA step"} <= parts and "part  " in text
    kernels = [r for r in rows if r["part"] == "kernels"]
    # 1 shape x 3 formats x 2 paths (fused, two-stage) x 4 ops; the toy shape's 19 rows are
    # below TWO_STAGE_MIN_ROWS, so the fused path is the one marked chosen (*)
    assert len(kernels) == 24 or kernels[0]["measured"] == "not run"
    if len(kernels) == 24:
        assert sum(" fused * " in r["setting"] for r in kernels) == 12
        assert sum(" two-stage " in r["setting"] for r in kernels) == 12
    assert all(": ok (bound" in r["note"] for r in kernels if r["measured"] != "not run")
    steps = {r["setting"]: r for r in rows if r["part"] == "LoRA step"}
    if not torch.cuda.is_available():
        assert {"cpu fp32", "cpu bf16", "cpu fp32 int8", "cpu fp32 int4"} <= set(steps)
        assert all(steps[f"cuda {s}"]["measured"] == "unmeasured"
                   for s in ("fp32", "bf16", "fp32 int8", "fp32 int4"))
        for name in ("cpu bf16", "cpu fp32 int8", "cpu fp32 int4"):
            assert_finite([float(steps[name]["ratio"].rstrip("x"))], positive=True)
    assert_finite([float(steps["cpu fp32"]["measured"].split()[0])], positive=True)


def test_dpsgd_step(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """BENCHMARKS.md: variant | wall s/step | × no-DP | CPU s/step | × no-DP."""
    from simulations.bench import dpsgd_step

    assert dpsgd_step.main(["--model", str(tiny_model_dir), "--batch", "2", "--seq", "16",
                            "--steps", "1", "--rounds", "1",
                            "--modes", "hooks,ghost,functorch"]) == 0

    rows = table(capsys.readouterr().out, ["variant", "wall s/step", "x no-DP", "CPU s/step",
                                           "x no-DP", "attach+detach s", "peak RSS MB"])
    names = [" ".join(r[:-6]) for r in rows]
    assert names == ["no DP", "DP-SGD hooks", "DP-SGD ghost", "DP-SGD functorch"]
    for row in rows:
        wall, wall_x, cpu, cpu_x, attach, rss = (_number(t) for t in row[-6:])
        assert_finite([wall, cpu, attach], nonnegative=True)
        assert_finite([wall_x, cpu_x, rss], positive=True)
    assert _number(rows[0][-5]) == 1.0, "no DP is the baseline"


def test_quant_lora_cpu(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """BENCHMARKS.md's CPU reference: per-layer time and memory ratios vs fp32 + LoRA, and the
    full training step's CPU time and frozen memory ratios. (The ``--device cuda`` rows need
    a GPU and Triton: not run here.)"""
    from simulations.bench import quant_lora

    variants = "none,int8,int4:g=32:asym,int4:g=32"
    assert quant_lora.main(["--model", str(tiny_model_dir), "--variants", variants,
                            "--shapes", "16x64x32,16x32x64", "--rank", "4", "--batch", "2",
                            "--seq", "16", "--steps", "1", "--rounds", "1"]) == 0

    text = capsys.readouterr().out
    layers = table(text, ["M x N x K", "variant", "wall ms", "x fp32", "CPU ms", "x fp32",
                          "weight MB", "x fp32"])
    assert [(r[0], r[1]) for r in layers] == [
        (shape, v) for shape in ("16x64x32", "16x32x64")
        for v in ("fp32", "int8", "int4:g=32:asym", "int4:g=32")]
    for row in layers:
        wall, wall_x, cpu, cpu_x, mb, mb_x = numbers(row[2:])
        assert_finite([wall, cpu, mb], nonnegative=True)
        assert_finite([wall_x, cpu_x, mb_x], positive=True)
    step = table(text, ["variant", "wall s", "x base", "CPU s", "x base", "frozen MB",
                        "x base"])
    assert [r[0] for r in step] == variants.split(",")
    for row in step:
        wall, wall_x, cpu, cpu_x, mb, mb_x = numbers(row[1:])
        assert_finite([wall, cpu, mb], nonnegative=True)
        assert_finite([wall_x, cpu_x, mb_x], positive=True)
    assert _number(step[0][-1]) == 1.0 and _number(step[1][-1]) < 1.0, "int8 is smaller"


def test_quant_lora_perplexity(tiny_model_dir: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """BENCHMARKS.md: format | perplexity | vs fp32 | projection weights MB."""
    from simulations.bench import quant_lora

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": t}) + "\n"
                                 for t in mini_play(4).split("\n\n") if t.strip()))
    assert quant_lora.main(["--perplexity", "--model", str(tiny_model_dir), "--eval-file",
                            str(eval_file), "--ppl-blocks", "4", "--ppl-seq", "16",
                            "--ppl-variants", "none,int8,int4:g=32:asym"]) == 0

    rows = table(capsys.readouterr().out, ["variant", "perplexity", "vs none", "weights MB",
                                           "rel. weight err"])
    assert [r[0] for r in rows] == ["none", "int8", "int4:g=32:asym"]
    for row in rows:
        ppl, vs, mb, err = (_number(t) for t in row[1:])
        assert_finite([ppl], positive=True)
        assert_finite([vs])
        assert_finite([mb, err], nonnegative=True)  # the tiny model's weights: 0.0 MB
    assert _number(rows[0][2]) == 0.0


# --- edge --------------------------------------------------------------------------------------


def test_edge_step(tiny_model_dir: Path, mini_cache: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    """BENCHMARKS.md: side | s per step | peak RSS MB | upload per round | load s, and the
    edge / torch ratios."""
    from simulations.bench import edge_step

    assert edge_step.main(["--cache-dir", str(mini_cache), "--steps", "1", "--batch", "2",
                           "--seq", "16", "--set", f"model.source={tiny_model_dir}",
                           "--set", "data.min_examples=5"]) == 0

    text = capsys.readouterr().out
    rows = table(text, ["side", "step s", "peak RSS MB", "upload bytes", "load s",
                        "torch imported"])
    assert [(r[0], r[-1]) for r in rows] == [("edge", "False"), ("torch", "True")]
    for row in rows:
        step_s, rss, upload, load_s = numbers(row[1:])
        assert_finite([step_s, load_s], nonnegative=True)  # a toy step prints as 0.00 s
        assert_finite([rss, upload], positive=True)
    ratios = re.search(r"edge / torch: step time ([\d.]+)x, peak RSS ([\d.]+)x, upload "
                       r"([\d.]+)x", text)
    assert ratios, text
    assert_finite([float(v) for v in ratios.groups()], positive=True)  # unrounded times


def test_edge_forward(tiny_model_dir: Path, play_cache: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    """BENCHMARKS.md: side | perplexity | CPU s per forward (median / min) | peak RSS MB |
    export MB | MeZO err, and the ORT / torch ratios."""
    from simulations.bench import edge_forward

    assert edge_forward.main(["--model", str(tiny_model_dir), "--cache", str(play_cache),
                              "--export-root", str(tmp_path / "edge"),
                              "--quantization", "int4-gguf", "--batch", "2", "--seq", "16",
                              "--eval-blocks", "4", "--reps", "1"]) == 0

    text = capsys.readouterr().out
    rows = table(text, ["ppl", "cpu s", "wall s", "min cpu", "load s", "RSS MB", "MB",
                        "MeZO err"])
    assert [" ".join(r[:-8] if r[0] == "ORT" else r[:3]) for r in rows] == [
        "torch fp32 eager", "ORT int4-gguf"]
    torch_row, ort_row = rows
    ppl, cpu, wall, cpu_min, load_s, rss, mezo = numbers(torch_row[3:])
    assert mezo == 0.0, "torch is the MeZO reference"
    ppl_ort, *_, rss_ort, export_mb, mezo_ort = numbers(ort_row[2:])
    assert_finite([ppl, ppl_ort, rss, rss_ort], positive=True)
    # toy forwards print as 0.000 s, the toy export as 0 MB
    assert_finite([cpu, wall, cpu_min, load_s, mezo_ort, export_mb], nonnegative=True)
    (export,) = (tmp_path / "edge").glob("*-int4-gguf/model.onnx")
    assert export.stat().st_size > 0
    assert re.search(r"ORT int4-gguf vs torch: [\d.]+x CPU time \(median\), [\d.]+x \(min\), "
                     r"[\d.]+x wall .*perplexity [+-][\d.]+% .*peak RSS [\d.]+x; MeZO "
                     r"projected-gradient error [\d.]+%", text), text
    ratios = re.search(r"vs torch: ([\d.]+)x CPU time \(median\), ([\d.]+)x \(min\), "
                       r"([\d.]+)x wall", text)
    assert ratios
    assert_finite([float(v) for v in ratios.groups()], positive=True)


# --- federated simulations ---------------------------------------------------------------------


def _tiny_run_overrides(tiny_model_dir: Path) -> list[str]:
    return [f"model.source={tiny_model_dir}", "data.min_examples=5",
            "data.heldout_fraction=0.25", "lora.r=4", "train.rounds=1",
            "train.clients_per_round=2", "train.local_steps=1", "train.batch_size=2",
            "train.seq_len=16", "eval.max_blocks=4", "eval.batch_size=4"]


@pytest.mark.slow
def test_codecs(tiny_model_dir: Path, mini_cache: Path, tmp_path: Path,
                capsys: pytest.CaptureFixture[str], quiet_logs: None) -> None:
    """BENCHMARKS.md: codec | secagg | rounds | up KB/client/round | x LoRA fp32 |
    perplexity | vs fp32 | goal, plaintext and under secure aggregation; then the same
    table from --from-runs."""
    from simulations.bench import codecs

    header = ["codec", "secagg", "rounds", "up KB/client/round", "x LoRA fp32", "perplexity",
              "vs fp32", "goal"]
    common = ["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(mini_cache),
              "--prefix", "smoke"]
    for item in _tiny_run_overrides(tiny_model_dir):
        common += ["--set", item]
    assert codecs.main(["--codecs", "fp32,sign1", "--json", str(tmp_path / "codecs.json"),
                        *common]) == 0
    rows = table(capsys.readouterr().out, header)
    assert [r[:2] for r in rows] == [["fp32", "off"], ["sign1", "off"]]
    assert rows[0][6] == "+0.00%"
    saved = json.loads((tmp_path / "codecs.json").read_text())["rows"]
    fp32, sign = saved
    # FFA-LoRA's fp32 upload is about half the plain-LoRA state; sign1 a small part of it
    assert 0.4 < fp32["bytes_vs_lora_fp32"] < 0.7
    assert sign["up_bytes_per_client"] < 0.5 * fp32["up_bytes_per_client"]
    # int2 inside secure aggregation: two devices' codes summed in 3 bits
    assert codecs.main(["--secagg", "--codecs", "int2", "--json",
                        str(tmp_path / "masked.json"), *common]) == 0
    masked = table(capsys.readouterr().out, header)
    assert [r[:2] for r in masked] == [["int2", "on"]] and masked[0][6] == "-"
    (int2,) = json.loads((tmp_path / "masked.json").read_text())["rows"]
    assert int2["up_bytes_per_client"] < 0.3 * fp32["up_bytes_per_client"]
    assert_finite([r["perplexity"] for r in [*saved, int2]], positive=True)
    runs = [tmp_path / "runs" / name for name in ("smoke-fp32", "smoke-sign1",
                                                  "smoke-secagg-int2")]
    assert codecs.main(["--from-runs", *map(str, runs)]) == 0
    assert table(capsys.readouterr().out, header) == [*rows, *masked]


@pytest.mark.slow
def test_round_timing(tiny_model_dir: Path, mini_cache: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str], quiet_logs: None) -> None:
    """BENCHMARKS.md: round | wall s | train s | aggregate s | eval s | overhead s |
    overhead / train | up KB/client | down KB/client; then the same from --from-run."""
    from simulations.bench import round_timing

    argv = ["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(mini_cache),
            "--json", str(tmp_path / "table.json")]
    for item in _tiny_run_overrides(tiny_model_dir):
        argv += ["--set", item]
    assert round_timing.main(argv) == 0

    text = capsys.readouterr().out
    columns = ["round", "wall s", "train s", "aggr s", "eval s", "overhead s",
               "overhead/train", "up KB/client", "down KB/client"]
    rows = table(text, columns)
    assert [r[0] for r in rows] == ["1"]
    values = numbers(rows[0])
    assert len(values) == 9
    assert_finite(values, nonnegative=True)  # a toy round prints 0.0 s of training
    assert "steady state (median of rounds 1-1)" in text
    (got,) = json.loads((tmp_path / "table.json").read_text())
    assert got["round"] == 1
    assert_finite([got[k] for k in ("round_s", "train_s", "aggregate_s", "eval_s",
                                    "overhead_s", "up_bytes_per_client",
                                    "down_bytes_per_client")], positive=True)
    run_dir = Path(text.split("run: ", 1)[1].splitlines()[0])

    assert round_timing.main(["--from-run", str(run_dir)]) == 0
    assert table(capsys.readouterr().out, columns) == rows


@pytest.mark.slow
def test_ffa_vs_lora_dp(tiny_model_dir: Path, mini_cache: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str], quiet_logs: None) -> None:
    """BENCHMARKS.md: round | FFA-LoRA ppl | LoRA ppl | ε | up KB per round, FFA / LoRA."""
    from simulations.bench import ffa_vs_lora_dp

    argv = ["--rounds", "1", "--clients-per-round", "2", "--local-steps", "1",
            "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(mini_cache),
            "--prefix", "smoke"]
    for item in _tiny_run_overrides(tiny_model_dir):
        argv += ["--set", item]
    assert ffa_vs_lora_dp.main(argv) == 0

    text = capsys.readouterr().out
    rows = table(text, ["round", "FFA-LoRA ppl", "LoRA ppl", "epsilon", "up KB FFA/LoRA"])
    assert [r[0] for r in rows] == ["0", "1"]
    for row in rows:
        assert_finite([_number(t) for t in row[1:3]], positive=True)
    assert rows[0][3:] == ["0", "-"]
    eps, up = rows[1][3:]
    ffa_kb, lora_kb = (_number(v) for v in up.split("/"))
    assert_finite([_number(eps), ffa_kb, lora_kb], positive=True)
    assert ffa_kb < lora_kb, "FFA-LoRA uploads B only"
    assert re.search(r"final perplexity FFA-LoRA / LoRA = [\d.]+", text)
    assert (tmp_path / "runs" / "ffa_vs_lora_dp.png").is_file()
    got = json.loads((tmp_path / "runs" / "ffa_vs_lora_dp.json").read_text())
    assert [r["round"] for r in got["rounds"]] == [0, 1]


@pytest.mark.slow
def test_chat_federation(tiny_model_dir: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str], quiet_logs: None) -> None:
    """BENCHMARKS.md: model | answer ppl | ROUGE-L for base, federated, centralized, on the
    real chatterbot corpus (the tiny model has no chat template: Alpaca-rendered)."""
    from simulations.bench import chat_federation

    argv = ["--rounds", "1", "--clients-per-round", "2", "--local-steps", "1",
            "--seq-len", "160", "--min-examples", "40", "--prompts", "2",
            "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
            "--prefix", "smoke"]
    for item in [f"model.source={tiny_model_dir}", "lora.r=4", "train.batch_size=2",
                 "eval.max_blocks=4", "eval.batch_size=4", "eval.max_new_tokens=4",
                 "security.secagg=false"]:
        argv += ["--set", item]
    assert chat_federation.main(argv) == 0

    text = capsys.readouterr().out
    rows = table(text, ["model", "answer ppl", "ROUGE-L"])
    assert [r[0] for r in rows] == ["base", "federated", "centralized"]
    for row in rows:
        assert_finite([_number(row[1])], positive=True)
        assert 0.0 <= _number(row[2]) <= 1.0
    assert re.search(r"answer perplexity federated / base = [\d.]+, federated / centralized "
                     r"= [\d.]+", text)
    assert re.search(r"ROUGE-L federated - base = [-+][\d.]+ on 2 held-out prompts", text)
    got = json.loads((tmp_path / "runs" / "chat_federation.json").read_text())
    assert [r["round"] for r in got["rounds"]] == [0, 1]


@pytest.mark.slow
def test_faults(tiny_model_dir: Path, mini_cache: Path, tmp_path: Path,
                capsys: pytest.CaptureFixture[str], quiet_logs: None) -> None:
    """BENCHMARKS.md: fault | runs | rounds lost | repeated | double-counted | privacy 2x |
    failed clients | = reference. At toy size one killed device daemon of a deployment (real
    coordinator and daemons; restarted at once). The simulation faults share one code path
    with it up to the kill, and stopping and resuming a simulation is
    test_simulate_resume's; killed workers and a killed coordinator have their own tests."""
    from simulations.bench import faults

    argv = ["--faults", "daemon", "--runs", "1", "--rounds", "2", "--jitter-s", "0",
            "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(mini_cache),
            "--prefix", "smoke", "--timeout", "600"]
    for item in _tiny_run_overrides(tiny_model_dir):
        if not item.startswith("train.rounds="):
            argv += ["--set", item]
    assert faults.main(argv) == 0

    rows = table(capsys.readouterr().out, ["fault", "runs", "rounds lost", "repeated",
                                           "double-counted", "privacy 2x", "failed clients",
                                           "= reference"])
    got = [r for r in rows if r[0] in faults.FAULTS]
    # the killed daemon's update is a failed client if it had been sampled (2 of 3 are)
    assert len(got) == 1 and got[0][:6] == ["daemon", "1", "0", "0", "0", "0"]
    assert got[0][6] in ("0", "1") and got[0][7] == "-"
    saved = json.loads((tmp_path / "runs" / "smoke.json").read_text())
    assert [r["fault"] for r in saved["runs"]] == ["daemon"]
    assert not (tmp_path / "runs" / "smoke-reference").exists()  # no simulation to compare
    assert (tmp_path / "runs" / "smoke-daemon-0" / "adapter").is_dir()


# --- deployment engine: real SuperLink / SuperNode processes ---------------------------------


@pytest.mark.slow
def test_deploy_latency(play_cache: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str], quiet_logs: None) -> None:
    """BENCHMARKS.md: configuration | phase s | device s | ClientApp start-up s | handler s."""
    from simulations.bench import deploy_latency

    out = tmp_path / "latency.json"
    assert deploy_latency.main(["--kinds", "edge", "--modes", "warm", "--nodes", "1",
                                "--rounds", "1", "--cache-dir", str(play_cache),
                                "--work-dir", str(tmp_path / "work"), "--no-launch-probe",
                                "--timeout", "120", "--json", str(out)]) == 0

    rows = table(capsys.readouterr().out, ["configuration", "phases", "clients s", "train s",
                                           "phase s", "start-up s", "handler s", "rest s",
                                           "device s", "cold", "wall s"])
    assert [r[:2] for r in rows] == [["edge", "warm"]]
    values = numbers(rows[0][2:])
    assert len(values) == 10 and values[0] == 1  # one phase
    assert_finite(values[:6] + values[7:], nonnegative=True)
    assert_finite(values[6:7])  # rest s: clients s minus the device's medians
    result = json.loads(out.read_text())["results"][0]
    medians = result["medians"]
    for key in ("phase_s", "device_s", "startup_s", "handler_s", "clients_s"):
        assert math.isfinite(medians[key]), (key, medians)
    assert medians["clients_s"] > 0 and medians["device_s"] > 0  # handler: logged as %.1f s
    assert result["cold_starts"] == 0


@pytest.mark.slow
def test_deploy_load(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     quiet_logs: None) -> None:
    """BENCHMARKS.md: round | round s | accepted / sampled | up KB | down KB, the set-up
    times, and coordinator / per-device memory (sampled by ``proc_memory``)."""
    from simulations.bench import deploy_load

    out = tmp_path / "load.json"
    # Two devices under authenticated secure aggregation: each pins the organisation key
    # and signs with its identity key; the coordinator relays the signed roster (--roster).
    code = deploy_load.main(["--nodes", "2", "--rounds", "1", "--secagg", "--timeout", "300",
                             "--interval", "0.5", "--workdir", str(tmp_path / "work"),
                             "--out", str(out), "--keep"])  # the run's logs, checked below
    text = capsys.readouterr().out
    assert code == 0, text

    rows = table(text, ["round", "round s", "clients s", "aggr s", "ok/sampled", "failed",
                        "rejected", "up KB", "down KB"])
    assert len(rows) == 1 and rows[0][0] == "1" and rows[0][4] == "2/2", rows
    assert_finite(numbers(rows[0]), nonnegative=True)
    result = json.loads(out.read_text())
    assert result["outcome"] == "completed" and result["all_accepted"]
    assert result["leftover_pids"] == []
    (row,) = result["rounds"]
    assert row["bytes_up"] > 0 and row["bytes_down"] > row["bytes_up"] and row["round_s"] > 0
    for key in ("setup", "register", "nodes_online", "run"):
        assert result["times_s"][key] > 0, (key, result["times_s"])
    coord, dev = result["coordinator_mb"], result["device_mb"]
    assert result["samples"] > 0
    assert coord["rss_peak"] >= coord["rss_mean"] > 0
    assert coord["pss_peak"] >= 0  # PSS is read every 10th sample: maybe none in a toy run
    assert dev["rss_mean"] > 0 and dev["devices_sampled"] == 2
    (server_log,) = (tmp_path / "work" / "runs").glob("*/serverapp.log")  # fedtune's lines too
    assert "secure aggregation is authenticated" in server_log.read_text()
    for device in ("node-0", "node-1"):  # both signed the survivor list before unmasking
        log = (tmp_path / "work" / "devices" / device / "client.log").read_text()
        assert "query.secagg_consistency message: process start-up" in log, device
    assert re.search(r"coordinator tree RSS: peak \d+ MB, mean \d+ MB \(PSS peak \d+ MB\)",
                     text), text


@pytest.mark.slow
def test_ranks(tiny_model_dir: Path, mini_cache: Path, tmp_path: Path,
               capsys: pytest.CaptureFixture[str], quiet_logs: None) -> None:
    """BENCHMARKS.md: variant | device ranks | global r | secagg | rounds | trainable |
    up KB/client/round | perplexity | vs all-8."""
    from simulations.bench import ranks

    argv = ["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(mini_cache),
            "--prefix", "smoke", "--json", str(tmp_path / "ranks.json")]
    for item in _tiny_run_overrides(tiny_model_dir):
        argv += ["--set", item]
    assert ranks.main(argv) == 0
    rows = table(capsys.readouterr().out, ["variant", "device ranks", "global r", "secagg",
                                           "rounds", "trainable", "up KB/client/round",
                                           "perplexity", "vs all-8"])
    assert [r[:3] for r in rows] == [["all-8", "8", "8"], ["mixed", "4/8/16", "16"]]
    assert rows[0][8] == "+0.00%"
    base, mixed = json.loads((tmp_path / "ranks.json").read_text())["rows"]
    assert mixed["trainable"] == 2 * base["trainable"]  # the global adapter has rank 16
    assert_finite([base["perplexity"], mixed["perplexity"]], positive=True)


def test_aggregation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """BENCHMARKS.md: updates | params | memcpy GB/s | aggregation GB/s | ratio | goal |
    peak MB | peak MB (1/10)."""
    from simulations.bench import aggregation

    assert aggregation.main(["--updates", "20", "--params", "4096", "--json",
                             str(tmp_path / "agg.json")]) == 0
    rows = table(capsys.readouterr().out, ["updates", "params", "memcpy GB/s",
                                           "aggregation GB/s", "ratio", "goal", "peak MB",
                                           "peak MB (1/10)"])
    assert rows[0][:2] == ["20", "4096"]
    saved = json.loads((tmp_path / "agg.json").read_text())
    assert_finite([saved["memcpy_gb_s"], saved["aggregation_gb_s"], saved["peak_mb"]],
                  positive=True)


@pytest.mark.slow
def test_dp_population(tiny_model_dir: Path, mini_cache: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str], quiet_logs: None) -> None:
    """BENCHMARKS.md: round | non-DP ppl | DP ppl | ε per round, and what the DP run keeps;
    the DP run's ledger stays within the target ε it was calibrated for."""
    from simulations.bench import dp_population

    argv = ["--levers", "non-dp,dp-r1", "--rounds", "1", "--epsilon", "8",
            "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(mini_cache),
            "--prefix", "smoke"]
    for item in [*_tiny_run_overrides(tiny_model_dir), "security.secagg_neighbours=0"]:
        argv += ["--set", item]
    assert dp_population.main(argv) == 0

    text = capsys.readouterr().out
    rows = table(text, ["round", "non-dp ppl", "dp-r1 ppl", "eps dp-r1"])
    assert [r[0] for r in rows] == ["0", "1"]
    base, after = numbers(rows[0]), numbers(rows[1])
    assert base[1] == base[2] and base[3] == 0, "round 0 is the same base model, no ε"
    assert_finite(after, positive=True)
    assert after[3] <= 8.0
    assert re.search(r"dp-r1: final [\d.]+ \([\d.]+ % (below|above) base\) at epsilon [\d.]+", text)
    got = json.loads((tmp_path / "runs" / "dp_population.json").read_text())
    assert set(got["runs"]) == {"non-dp", "dp-r1"}
    assert (tmp_path / "runs" / "dp_population.png").is_file()
    runs = [got["runs"]["non-dp"], got["runs"]["dp-r1"]]
    assert dp_population.main(["--from-runs", *runs]) == 0
    assert table(capsys.readouterr().out, ["round", "non-dp ppl", "dp-r1 ppl"]) == rows


def test_dp_population_calibrates_sigma_to_the_target() -> None:
    """σ is the smallest noise whose ε over the run is within the target: ε(σ) ≤ target and
    ε(0.99 σ) > target (at the preset's q = 100 / 980 and 10 rounds)."""
    from protocols.privacy import epsilon_for_history
    from simulations.bench.dp_population import calibrated_sigma

    q, rounds = 100 / 980, 10
    sigma = calibrated_sigma(target_epsilon=8.0, delta=1e-5, sample_rate=q, rounds=rounds,
                             accountant="rdp")
    def eps(s: float) -> float:
        return epsilon_for_history([(s, q, rounds)], delta=1e-5, accountant="rdp")
    assert eps(sigma) <= 8.0 < eps(0.99 * sigma)


@pytest.mark.slow
def test_secagg_round(tiny_model_dir: Path, mini_cache: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str], quiet_logs: None) -> None:
    """BENCHMARKS.md: mode | rounds | clients | round s | x plain | train s | aggr s | up KB,
    plain against SecAgg+, and the goal line; then the same table from --from-runs."""
    from simulations.bench import secagg_round

    argv = ["--clients-per-round", "3", "--rounds", "2", "--runs-dir", str(tmp_path / "runs"),
            "--cache-dir", str(mini_cache), "--prefix", "smoke"]
    for item in _tiny_run_overrides(tiny_model_dir):
        if not item.startswith(("train.rounds", "train.clients_per_round")):
            argv += ["--set", item]
    assert secagg_round.main(argv) == 0
    text = capsys.readouterr().out
    header = ["mode", "rounds", "clients", "round s", "x plain", "train s", "aggr s",
              "up KB/client"]
    rows = table(text, header)
    assert [r[:3] for r in rows] == [["plain", "2", "3"], ["secagg+", "2", "3"]]
    assert rows[0][4] == "1.00x"
    for row in rows:
        assert_finite(numbers(row), nonnegative=True)
    assert re.search(r"goal secagg\+ <= 1.5x the plain round: [\d.]+x \((met|not met)\)", text)
    got = json.loads((tmp_path / "runs" / "secagg_round.json").read_text())
    assert [m["mode"] for m in got["modes"]] == ["plain", "secagg+"]
    assert secagg_round.main(["--from-runs", *(m["run"] for m in got["modes"])]) == 0
    assert table(capsys.readouterr().out, header) == rows


def test_round_timing_reads_a_dp_run_whose_devices_report_no_timing() -> None:
    """Under client-level DP devices send no training time: the table says so instead of
    dividing by zero."""
    from simulations.bench.round_timing import analyse, render

    rows = [{"round": 0}] + [
        {"round": i, "round_s": 70.0 + i, "eval_s": 2.0, "aggregate_s": 3.0,
         "client_train_s": [], "clients": 95, "sampled": 100, "clients_s": 65.0,
         "bytes_up": 95 * 1000, "bytes_down": 100 * 2000} for i in (1, 2, 3)]
    text = render(analyse(rows))
    assert "steady state (median of rounds 2-3): round 74.5 s + eval 2.0 s" in text
    assert "no training time reported" in text


@pytest.mark.slow
def test_edge_levers(tiny_model_dir: Path, mini_cache: Path, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str], quiet_logs: None) -> None:
    """BENCHMARKS.md: run | final ppl | B up torch | B up edge | s torch | s edge | round s |
    edge upd | judges | B up judge | B down judge, then perplexity per round and the line
    search's multiple per round; the levers' edge uploads are seeds and scalars under 1 KB,
    a judge's answer is a few losses."""
    from simulations.bench import edge_levers

    argv = ["--levers", "judge-4,prompt-add", "--rounds", "1",
            "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(mini_cache),
            "--prefix", "smoke"]
    # four devices, all sampled: partitions 0 and 3 are the edge half (EdgeSection.is_edge);
    # judge-4 trains the two torch devices and finds two of its four judges
    for item in [*_tiny_run_overrides(tiny_model_dir), "train.clients_per_round=4",
                 "lora.virtual_tokens=4"]:
        argv += ["--set", item]
    assert edge_levers.main(argv) == 0
    text = capsys.readouterr().out
    rows = table(text, ["run", "final ppl", "B up torch", "B up edge", "s torch", "s edge",
                        "round s", "edge upd", "judges", "B up judge", "B down judge"])
    assert [r[0] for r in rows] == ["judge-4", "prompt-add"]
    judged, prompt = rows
    assert_finite(numbers([judged[1], judged[2], judged[4], judged[6], *judged[9:]]),
                  nonnegative=True)
    assert (judged[3], judged[5], judged[7], judged[8]) == ("-", "-", "0", "2.0")
    assert 0 < numbers([judged[9]])[0] <= 1024  # one loss per multiple, and the envelope
    assert numbers([judged[10]])[0] > numbers([judged[2]])[0]  # the adapter and the step
    assert_finite(numbers(prompt[1:9]), nonnegative=True)
    assert prompt[7] == "2" and 0 < numbers([prompt[3]])[0] <= 1024
    searched = table(text, ["line search", "1"])
    assert [r[0] for r in searched] == ["judge-4"]  # only the run with a line search
    assert float(searched[0][1]) in (0.5, 1, 1.5, 2)
    got = json.loads((tmp_path / "runs" / "edge_levers.json").read_text())
    assert set(got["runs"]) == {"judge-4", "prompt-add"}
    # edge.role = 'judge' on the real engine: the coordinator asked all four kinds
    # (query.kind), trained the two torch devices and had the two edge devices judge
    row = json.loads(Path(got["runs"]["judge-4"], "metrics.jsonl").read_text().splitlines()[1])
    assert (row["clients_by_kind"], row["kinds_asked"], row["judges_drawn"],
            row["line_search_judges"], row["failed"]) == ({"torch": 2}, 4, 2, 2, 0)
    assert (tmp_path / "runs" / "edge_levers.png").is_file()
    assert edge_levers.main(["--from-runs", *got["runs"].values()]) == 0
    assert table(capsys.readouterr().out, ["run", "final ppl"]) == rows


@pytest.mark.slow
def test_adapter_kinds(tiny_model_dir: Path, mini_cache: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str], quiet_logs: None) -> None:
    """BENCHMARKS.md: kind | final ppl | trainable | B up/client/round | round s."""
    from simulations.bench import adapter_kinds

    argv = ["--kinds", "prefix,ia3", "--rounds", "1", "--runs-dir", str(tmp_path / "runs"),
            "--cache-dir", str(mini_cache), "--prefix", "smoke"]
    for item in [*_tiny_run_overrides(tiny_model_dir), "lora.virtual_tokens=4",
                 "security.secagg_neighbours=0"]:
        argv += ["--set", item]
    assert adapter_kinds.main(argv) == 0
    rows = table(capsys.readouterr().out, ["kind", "final ppl", "trainable",
                                           "B up/client/round", "round s"])
    assert [r[0] for r in rows] == ["prefix", "ia3"]
    for row in rows:
        assert_finite(numbers(row[1:]), positive=True)
    got = json.loads((tmp_path / "runs" / "adapter_kinds.json").read_text())
    prefix, ia3 = got["summary"]
    assert prefix["trainable"] > 0 and ia3["trainable"] > 0
    assert (tmp_path / "runs" / "adapter_kinds.png").is_file()
