"""End to end on the real Flower Simulation Engine (Ray), with a tiny random-init Llama.

Two rounds x three clients per round, federated evaluation on, and a client mod that
captures every reply exactly as Flower serialises it for the wire. The captured bytes prove
that raw data never leaves a client: only adapter tensors and numeric metrics do.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from protocols.keys import CLIENT_METRIC_KEYS
from protocols.run_config import RunConfig
from tests.measured import within

pytestmark = pytest.mark.slow


class CaptureReplies:
    """A Flower client mod that writes each reply's wire objects to a folder (picklable,
    so it reaches the Ray actors)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        reply = call_next(msg, context)
        wire = b"".join(obj.deflate() for obj in get_all_nested_objects(reply).values())
        content = {
            name: {"type": type(record).__name__, "items": {
                k: (v if isinstance(v, int | float) else repr(type(v))) for k, v in record.items()
            } if type(record).__name__ != "ArrayRecord" else sorted(record.keys())}
            for name, record in reply.content.items()
        }
        part = int(context.node_config["partition-id"])
        rnd = (msg.content["config"]["server-round"] if "config" in msg.content
               else msg.metadata.group_id)  # SecAgg stages carry no config record
        out = self.folder / f"{msg.metadata.message_type}-r{rnd}-p{part}.pkl"
        out.write_bytes(pickle.dumps({"partition": part, "wire": wire, "content": content}))
        return reply


def _config(tiny_model_dir: Path) -> RunConfig:
    return RunConfig.from_nested(
        {
            "model": {"source": str(tiny_model_dir)},
            "data": {"min_examples": 5, "heldout_fraction": 0.25},
            "lora": {"r": 4},
            "train": {"rounds": 2, "clients_per_round": 3, "local_steps": 3, "batch_size": 2,
                      "seq_len": 16, "learning_rate": 0.01},
            "eval": {"max_blocks": 6, "batch_size": 4, "fraction_clients": 1.0},
        }
    )


@pytest.mark.measured
def test_federated_simulation_end_to_end(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path
) -> None:
    from client.local_data import DeviceDataSource, load_device_data
    from kernels.base_model import load_causal_lm
    from kernels.causal_lm_data import token_blocks
    from simulations.runner import check_inputs, run_federated

    captured = tmp_path / "captured"
    captured.mkdir()
    inputs = check_inputs(_config(tiny_model_dir), mini_cache)
    assert inputs.num_clients == 4

    run_dir = run_federated(inputs, tmp_path / "runs", name="e2e",
                            client_mods=[CaptureReplies(captured)])

    # Outputs: metrics per round, a loadable PEFT adapter, a report with plots.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients"] == 3 and row["rejected"] == 0 and row["failed"] == 0
        assert row["dropped"] == 0 and row["secagg_s"] > 0  # secure aggregation is the default
        assert 0 < row["bytes_up"] < row["bytes_down"]  # FFA-LoRA (default) uploads B only
    assert all(np.isfinite(r["perplexity"]) for r in rows)
    within("round-2 / round-0 held-out perplexity", rows[-1]["perplexity"] / rows[0]["perplexity"],
           below=1.0)
    for name in ("report.html", "perplexity.png", "bytes.png", "clients.png", "config.toml"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.parent.glob("*.partial"))

    from peft import PeftModel

    PeftModel.from_pretrained(load_causal_lm(tiny_model_dir).model, run_dir / "adapter")

    # Raw data never leaves a client.
    files = sorted(captured.glob("*.pkl"))
    train_files = [f for f in files if f.name.startswith("train")]
    secagg_files = [f for f in files if f.name.startswith("query.secagg_")]
    # 3 clients x 2 rounds train, answer 4 SecAgg stages each (authenticated: the simulation
    # plays the organisation that signs the roster); 4 clients evaluate twice
    assert len(train_files) == 6 and len(secagg_files) == 24 and len(files) == 6 + 24 + 8
    assert sum("secagg_consistency" in f.name for f in secagg_files) == 6
    assert inputs.devices is not None
    clients = [load_device_data(DeviceDataSource(inputs.devices.folder(i)), str(i))
               for i in range(inputs.num_clients)]
    tokenizer = load_causal_lm(tiny_model_dir).tokenizer
    for file in files:
        got: dict[str, Any] = pickle.loads(file.read_bytes())
        content = got["content"]
        if file in secagg_files:  # public keys, sealed shares, shares: bytes only
            assert set(content) == {"secagg"} and content["secagg"]["type"] == "ConfigRecord"
        else:
            assert set(content) <= {"masked", "metrics"}, content.keys()
            assert content["metrics"]["type"] == "MetricRecord"
            assert set(content["metrics"]["items"]) <= CLIENT_METRIC_KEYS
            assert all(isinstance(v, int | float) for v in content["metrics"]["items"].values())
        if file in train_files:  # the update leaves only masked
            assert content["masked"] == {"type": "ArrayRecord", "items": ["vector"]}

        wire: bytes = got["wire"]
        client = clients[got["partition"]]
        texts = [e.text for e in client.train + client.heldout if e.text is not None]
        assert texts
        for text in texts:
            for line in text.splitlines():
                assert line.encode() not in wire, f"client text on the wire: {line!r}"
        blocks = token_blocks(tokenizer, texts, 16)
        assert len(blocks) > 0
        for block in blocks:
            for dtype in (np.int64, np.int32):
                assert block.astype(dtype).tobytes() not in wire, "token ids on the wire"


CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.measured
def test_chat_data_simulation_scores_answers_and_sends_no_text(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A user's own chat data (JSONL, one device per user via Flower Datasets' natural-id
    partitioner), rendered with the model's chat template, trained and scored on the
    answers only; the captured replies hold none of the chats' text or token ids."""
    import shutil

    from client.local_data import DeviceDataSource, load_device_data
    from kernels.data.blocks import encode_blocks
    from kernels.data.templates import PromptTemplate
    from simulations.runner import check_inputs, run_federated

    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny-chat"))
    (model_dir / "chat_template.jinja").write_text(CHATML)
    rows = [{"user": f"user{u}", "messages": [
        {"role": "user", "content": f"who speaks line {k} to user{u}?"},
        {"role": "assistant", "content": f"PROSPERO speaks it, secret{u}x{k}, my lord"}]}
        for u in range(4) for k in range(8)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = RunConfig.from_nested({
        "model": {"source": str(model_dir)},
        "data": {"source": str(data), "partition_by": "user", "min_examples": 4,
                 "heldout_fraction": 0.25},
        "lora": {"r": 4},
        "train": {"rounds": 2, "clients_per_round": 2, "local_steps": 3, "batch_size": 2,
                  "seq_len": 96, "learning_rate": 0.02},
        "eval": {"max_blocks": 8, "batch_size": 4, "fraction_clients": 1.0},
        "security": {"secagg": False},
    })
    captured = tmp_path / "captured"
    captured.mkdir()
    inputs = check_inputs(config, tmp_path / "cache")
    assert inputs.devices is not None and inputs.devices.layout == "chat"
    assert inputs.devices.names == ("user0", "user1", "user2", "user3")
    run_dir = run_federated(inputs, tmp_path / "runs", name="chat",
                            client_mods=[CaptureReplies(captured)])
    rows_out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows_out] == [0, 1, 2]
    assert all(np.isfinite(r["perplexity"]) for r in rows_out)
    assert all(r["fed_eval_devices"] == 4 for r in rows_out[1:])
    within("chat round-2 / round-0 answer perplexity",
           rows_out[-1]["perplexity"] / rows_out[0]["perplexity"], below=1.0)

    # Raw data never leaves a device, chat data included: no text, no token ids.
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    template = PromptTemplate.for_tokenizer(model_dir)
    files = sorted(captured.glob("*.pkl"))
    assert files
    for file in files:
        got: dict[str, Any] = pickle.loads(file.read_bytes())
        wire: bytes = got["wire"]
        device = load_device_data(DeviceDataSource(inputs.devices.folder(got["partition"])),
                                  "d")
        examples = device.train + device.heldout
        for example in examples:
            for turn in example.turns:
                assert turn.content.encode() not in wire, f"chat text on the wire: {turn}"
        blocks = encode_blocks(tokenizer, examples, template, 96, eos_token_id=0)
        for row in blocks.ids:  # the head of every block this device trains or scores on
            for dtype in (np.int64, np.int32):
                assert row[:24].astype(dtype).tobytes() not in wire, "token ids on the wire"


def test_a_device_with_unreadable_data_fails_its_round_and_nothing_else(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path
) -> None:
    """Bad input on one device (an undecodable line in its own file) is that device's error
    reply: the coordinator counts it as failed, names the file and line in its log, the
    others' updates are aggregated and the run finishes."""
    from simulations.runner import check_inputs, run_federated

    nested = _config(tiny_model_dir).to_nested()
    nested["train"].update(rounds=1, clients_per_round=4)
    nested["eval"].update(fraction_clients=0.0)
    nested["security"] = {"secagg": False}
    inputs = check_inputs(RunConfig.from_nested(nested), mini_cache)
    assert inputs.devices is not None
    broken = inputs.devices.folder(1) / "train.jsonl"
    broken.write_text(broken.read_text() + '{"text": "half a line\n')
    run_dir = run_federated(inputs, tmp_path / "runs", name="bad-device")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["sampled"] == 4 and rows[1]["failed"] == 1 and rows[1]["clients"] == 3
    log = (run_dir / "run.log").read_text()
    assert "train.jsonl, line" in log and "not valid JSON" in log


def test_a_run_whose_rounds_train_nothing_says_so_and_exits_3(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every device fails (its data is unreadable): the run still ends with an adapter, but
    ``fedtune simulate`` prints what happened and exits with the degraded status — never a
    silent success — and the run folder records it."""
    from protocols.config_file import to_toml
    from simulations.cli import main
    from simulations.runner import check_inputs

    nested = _config(tiny_model_dir).to_nested()
    nested["train"].update(rounds=1, clients_per_round=3)
    nested["eval"].update(fraction_clients=0.0)
    config = RunConfig.from_nested(nested)
    inputs = check_inputs(config, mini_cache)  # the device folders, as the run will find them
    assert inputs.devices is not None
    for i in range(inputs.num_clients):
        (inputs.devices.folder(i) / "train.jsonl").write_text("not json\n")
    (tmp_path / "run.toml").write_text(to_toml(config))
    code = main(["simulate", "--no-progress", "--config", str(tmp_path / "run.toml"),
                 "--cache-dir", str(mini_cache), "--runs-dir", str(tmp_path / "runs"),
                 "--name", "idle"])
    out, err = capsys.readouterr()
    assert code == 3
    # the round ran three times (federation.round_retries = 2), every failure counted
    assert "rounds:     0 of 1 rounds trained; 9 client failures, 0 rejected updates; rounds [1]" \
        " trained nothing" in out
    assert err.strip().splitlines()[-1].startswith("fedtune simulate: degraded run (exit status 3)")
    info = json.loads((tmp_path / "runs" / "idle" / "run_info.json").read_text())
    assert info["degraded"] == {"idle_rounds": [1], "failed": 9}
    rows = [json.loads(line) for line in
            (tmp_path / "runs" / "idle" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["retries"] == 2 and rows[1]["sampled"] == 9


class KillWorkerInRound:
    """A client mod that kills the Ray worker running it when a train message of ``round``
    arrives — what Ray's out-of-memory killer does to a ClientApp actor mid-task — the first
    ``kills`` times (counted with files in ``marks``, since a killed worker forgets)."""

    def __init__(self, server_round: int, kills: int, marks: Path) -> None:
        self.server_round, self.kills, self.marks = server_round, kills, marks

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        import os
        import signal

        config = msg.content.config_records.get("config")
        if (msg.metadata.message_type == "train" and config is not None
                and config["server-round"] == self.server_round):
            for i in range(self.kills):
                try:
                    (self.marks / f"kill-{i}").open("x").close()
                except FileExistsError:
                    continue
                os.kill(os.getpid(), signal.SIGKILL)
        return call_next(msg, context)


def test_lost_workers_are_recreated_and_the_lost_round_runs_again(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path
) -> None:
    """Both ClientApp workers of round 1 are killed on every try Ray makes (the task and its
    two retries, each on a restarted worker: real Ray): the round trains nothing, so it runs
    again with a fresh sample; its row counts both failures and the retry, and every round of
    the run trains."""
    from server.run_summary import summarize
    from simulations.runner import check_inputs, run_federated

    nested = _config(tiny_model_dir).to_nested()
    nested["train"].update(rounds=3, clients_per_round=2)
    nested["eval"].update(fraction_clients=0.0)
    nested["security"] = {"secagg": False}
    inputs = check_inputs(RunConfig.from_nested(nested), mini_cache)
    run_dir = run_federated(inputs, tmp_path / "runs", name="lost-workers",
                            client_mods=[KillWorkerInRound(1, kills=6, marks=tmp_path)])
    assert len(list(tmp_path.glob("kill-*"))) == 6
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_round = {r["round"]: r for r in rows}
    assert by_round[1]["clients"] == 2 and by_round[1]["failed"] == 2
    assert by_round[1]["retries"] == 1 and by_round[1]["sampled"] == 4
    for later in (2, 3):
        assert by_round[later]["clients"] == 2 and by_round[later]["failed"] == 0
        assert by_round[later]["retries"] == 0
    summary = summarize(run_dir)
    assert summary.idle == () and summary.trained == (1, 2, 3) and summary.failed == 2


@pytest.mark.parametrize("secagg", [True, False], ids=["distributed-noise", "server-noise"])
def test_client_dp_simulation_spends_and_stops_at_the_budget(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path, secagg: bool
) -> None:
    """DP-FedAvg on the real engine: ε per round in the metrics, a persisted ledger, and a
    budget that ends training before the round that would exceed it. With secure
    aggregation the clients clip and add the noise; without, the coordinator does."""
    from protocols.privacy.accounting import rdp_epsilon
    from protocols.privacy.ledger import load_ledger
    from simulations.runner import check_inputs, run_federated

    q = 3 / 4  # three of the four roles per round
    two = rdp_epsilon(noise_multiplier=2.0, sample_rate=q, steps=2, delta=1e-5)
    three = rdp_epsilon(noise_multiplier=2.0, sample_rate=q, steps=3, delta=1e-5)
    nested = _config(tiny_model_dir).to_nested()
    nested["train"]["rounds"] = 3
    nested["eval"]["fraction_clients"] = 0.0
    nested["lora"]["freeze_a"] = True
    # Server noise: Poisson sampling (the default), whose rounds may draw any number of the
    # four devices, an empty draw releasing the noise alone; with secure aggregation a
    # fixed-size sample, since a round of fewer than two devices cannot be summed securely.
    nested["privacy"] = {"client_dp": True, "clip_norm": 0.05, "noise_multiplier": 2.0,
                         "epsilon_budget": (two + three) / 2,
                         "client_sampling": "fixed" if secagg else "poisson"}
    nested["security"] = {"secagg": secagg}
    inputs = check_inputs(RunConfig.from_nested(nested), mini_cache)

    run_dir = run_federated(inputs, tmp_path / "runs", name="dp")

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["epsilon"] == pytest.approx(two, rel=1e-9)
    assert rows[1]["epsilon"] < rows[2]["epsilon"] == rows[3]["epsilon"]
    assert rows[3]["dp_stopped_at"] == 3 and "clients" not in rows[3]
    assert all(r["bytes_up"] < r["bytes_down"] for r in rows[1:3] if r["clients"]), \
        "FFA-LoRA uploads B only"
    # no device's loss, example count or timing left in the clear under client-level DP
    assert all(r["train_loss"] is None for r in rows[1:3])
    ledger = load_ledger(run_dir / "privacy_ledger.json")
    assert [e.round for e in ledger.history] == [1, 2]
    assert "training stopped before round 3" in (run_dir / "report.html").read_text()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["prompt", "prefix", "ia3"])
def test_every_adapter_kind_federates_under_secure_aggregation_and_client_dp(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path, kind: str
) -> None:
    """Prompt, prefix and (IA)3 adapters on the real engine, through the same paths as LoRA:
    masked uploads summed under secure aggregation, clipped and noised by the devices
    (client-level DP), validated against the spec, and exported as a PEFT adapter that
    ``PeftModel`` loads and that differs from the initial one."""
    from peft import PeftModel
    from safetensors.numpy import load_file

    from kernels.base_model import load_causal_lm
    from kernels.lora import attach_adapter, get_adapter
    from simulations.runner import check_inputs, run_federated

    nested = _config(tiny_model_dir).to_nested()
    nested["lora"] = {"kind": kind, "virtual_tokens": 4}
    nested["eval"]["fraction_clients"] = 0.0
    nested["privacy"] = {"client_dp": True, "clip_norm": 1.0, "noise_multiplier": 0.3,
                         "client_sampling": "fixed"}
    inputs = check_inputs(RunConfig.from_nested(nested), mini_cache)
    run_dir = run_federated(inputs, tmp_path / "runs", name=kind)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients"] == 3 and row["rejected"] == 0 and row["failed"] == 0
        assert row["secagg_s"] > 0 and row["epsilon"] > 0
        assert np.isfinite(row["perplexity"])
    spec = json.loads((run_dir / "adapter_spec.json").read_text())
    assert spec["peft_config"]["peft_type"] == {"prompt": "PROMPT_TUNING",
                                                "prefix": "PREFIX_TUNING", "ia3": "IA3"}[kind]
    loaded = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir).model, run_dir / "adapter")
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert get_adapter(loaded).keys() == saved.keys() == spec["tensors"].keys()
    initial = get_adapter(attach_adapter(load_causal_lm(tiny_model_dir).model,
                                         inputs.config.lora))
    assert any(not np.array_equal(saved[k], initial[k]) for k in saved), "nothing trained"
