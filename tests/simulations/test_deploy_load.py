"""The load script's pure parts (issue #5 point 8): argument bounds, process-tree memory
sampling, the synthetic federation it builds, and the report. The end-to-end run at full
size is a benchmark (``python -m simulations.bench.deploy_load``): it takes minutes; at toy
size (1 node, 1 round) it runs in ``test_bench_smoke.py``."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from protocols.processes import ManagedProcess, descendants
from simulations.bench import deploy_load as dl
from simulations.bench import proc_memory as pm


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "201"], r"--nodes 201: must be in 1\.\.200"),
        (["--nodes", "0"], r"--nodes 0: must be in 1\.\.200"),
        (["--rounds", "51"], r"--rounds 51: must be in 1\.\.50"),
        (["--nodes", "4", "--clients-per-round", "5"],
         r"--clients-per-round 5: must be in 1\.\.--nodes \(4\)"),
        (["--nodes", "4", "--clients-per-round", "1", "--secagg"],
         r"--secagg needs --clients-per-round >= 2"),
        (["--timeout", "0"], r"--timeout 0: must be in \(0, 14400\] s"),
        (["--max-starting", "0"], r"--max-starting 0: must be >= 1"),
        (["--interval", "-1"], r"--interval -1: must be > 0"),
    ],
    ids=["too-many-nodes", "no-nodes", "rounds", "clients", "secagg-one", "timeout",
         "max-starting", "interval"],
)
def test_unbounded_or_inconsistent_settings_are_refused_by_name(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dl.main(argv)

    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_clients_per_round_defaults_to_every_node() -> None:
    parser = dl.build_parser()
    args = parser.parse_args(["--nodes", "7"])

    dl.check_args(parser, args)

    assert args.clients_per_round == 7 and args.rounds == 5 and args.secagg is False


def test_help_names_the_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dl.main(["--help"])

    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--nodes" in out and "--timeout" in out and "--no-secagg" in out


# --- /proc ---------------------------------------------------------------------------------------


def test_stat_line_with_spaces_and_parentheses_in_the_name() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags 4x faults 4x times prio nice
    # threads itreal starttime vsize rss: fields 22 (starttime) and 24 (rss, pages).
    line = "123 (a (b) c) S 7 99 5 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 4242 1000 25 0"

    info = pm.parse_stat(line)

    assert info == pm.ProcInfo(123, "a (b) c", 7, 99, 4242, 25 * os.sysconf("SC_PAGE_SIZE"))
    assert pm.parse_stat(line.replace(") S ", ") Z ")) is None, "a zombie holds no memory"


def test_tree_follows_children_and_orphaned_group_members() -> None:
    def proc(pid: int, ppid: int, pgrp: int) -> pm.ProcInfo:
        return pm.ProcInfo(pid, f"p{pid}", ppid, pgrp, 0, pid)

    table = {p.pid: p for p in [
        proc(10, 1, 10),   # root, leads its group
        proc(11, 10, 10),  # child
        proc(12, 11, 12),  # grandchild in a new session (SuperLink -> SuperExec)
        proc(13, 1, 10),   # orphan reparented to init, still in the root's group
        proc(14, 13, 10),  # the orphan's child
        proc(20, 1, 20),   # unrelated
    ]}

    assert sorted(pm.tree(10, table)) == [10, 11, 12, 13, 14]
    assert pm.tree(99, table) == []


def test_sampler_sums_the_rss_of_a_real_process_tree(process_tree: ManagedProcess) -> None:
    pids = [process_tree.pid, *descendants(process_tree.pid)]
    sampler = pm.MemorySampler(1.0, detailed=["t"])
    sampler.roots["t"] = process_tree.pid

    sample = sampler.sample()
    page = os.sysconf("SC_PAGE_SIZE")
    expected = sum(int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page for p in pids)

    assert len(pids) == 2 and set(sampler.seen) == set(pids)
    assert sample.rss["t"] == pytest.approx(expected, rel=0.1)
    assert sum(sample.by_comm["t"].values()) == sample.rss["t"]
    assert 0 < sample.pss["t"] <= sample.rss["t"], "the first sample reads PSS too"
    assert sorted(pm.alive_seen(sampler.seen)) == sorted(pids)
    process_tree.stop(timeout=5)
    assert pm.alive_seen(sampler.seen) == []


# --- the synthetic federation --------------------------------------------------------------------


def test_synthetic_play_gives_one_client_per_node(tmp_path: Path) -> None:
    from client.shakespeare import load_speeches
    from protocols.run_config import DataSection
    from simulations.shakespeare_split import split_roles

    (tmp_path / "loadtest_gut.txt").write_text(dl.synthetic_play(30))

    clients = split_roles(load_speeches(tmp_path), DataSection(min_examples=5,
                                                               heldout_fraction=0.25))

    assert len(clients) == 30
    assert len({c["role"] for c in clients}) == 30
    assert dl.role_name(0) == "CITIZEN BA" and dl.role_name(26) == "CITIZEN CA"


def test_device_config_is_what_the_daemon_accepts(tmp_path: Path) -> None:
    from client.node.daemon import parse_config
    from server.service.certs import make_node_keys, make_tls

    tls = make_tls(tmp_path / "certs")
    keys = make_node_keys(tmp_path / "certs", "node-3")
    data = tmp_path / "device-3"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "a"}\n')
    text = dl.daemon_toml(
        name="node-3", address="127.0.0.1:9999", ca=tls.ca_cert, key=keys.private_key,
        state_dir=tmp_path / "n3", runtime_port=9100, data=data, partition_id=3,
        cache_dir=tmp_path / "cache", edge_export=tmp_path / "cache" / "edge",
        manifest_key="ab" * 32, require_secagg=False)

    config = parse_config(tomllib.loads(text), tmp_path)

    assert config.kind == "edge" and config.partition_id == 3 and config.runtime_port == 9100
    assert config.path == data
    assert config.private_key == keys.private_key and config.root_ca == tls.ca_cert
    assert config.node_config()["fedtune-edge-export"] == str(tmp_path / "cache" / "edge")
    assert "warm_clientapp" not in text, "unset: the daemon's own default applies"
    cold = text.replace("\n[data]", "\nwarm_clientapp = false\n[data]")
    assert cold == dl.daemon_toml(
        name="node-3", address="127.0.0.1:9999", ca=tls.ca_cert, key=keys.private_key,
        state_dir=tmp_path / "n3", runtime_port=9100, data=data, partition_id=3,
        cache_dir=tmp_path / "cache", edge_export=tmp_path / "cache" / "edge",
        manifest_key="ab" * 32, require_secagg=False, warm_clientapp=False)
    assert parse_config(tomllib.loads(cold), tmp_path).warm_clientapp is False


def test_free_ports_are_distinct() -> None:
    ports = dl.free_ports(20)
    assert len(set(ports)) == 20


# --- the report ----------------------------------------------------------------------------------


def _sample(t: float, coordinator: int, devices: dict[str, int]) -> pm.Sample:
    return pm.Sample(t, {"coordinator": coordinator, **devices},
                     {"coordinator": {"flwr-serverapp": coordinator}},
                     {"coordinator": coordinator // 2})


def test_memory_summary_uses_the_run_window() -> None:
    mb = 1024 * 1024
    samples = [
        _sample(0.0, 900 * mb, {"node-0": 50 * mb}),  # before round 0: excluded
        _sample(1.0, 100 * mb, {"node-0": 10 * mb, "node-1": 30 * mb}),
        _sample(2.0, 300 * mb, {"node-0": 20 * mb, "node-1": 50 * mb}),
        _sample(3.0, 800 * mb, {"node-0": 90 * mb}),  # after the coordinator exit: excluded
    ]

    summary = dl.memory_summary(samples, ["node-0", "node-1"], since=1.0, until=2.0)

    coord, dev = summary["coordinator_mb"], summary["device_mb"]
    assert summary["samples"] == 2
    assert coord["rss_peak"] == 300.0 and coord["rss_mean"] == 200.0
    assert coord["pss_peak"] == 150.0
    assert coord["rss_peak_by_process"] == {"flwr-serverapp": 300.0}
    assert dev["rss_mean"] == (15.0 + 40.0) / 2  # mean over devices of each one's mean
    assert dev["rss_peak_mean"] == (20.0 + 50.0) / 2 and dev["rss_peak_max"] == 50.0
    assert dev["all_devices_rss_peak"] == 70.0 and dev["devices_sampled"] == 2


def test_round_table_keeps_training_rounds_and_render_shows_them() -> None:
    rows = [{"round": 0, "wall_s": 0.0},
            {"round": 1, "round_s": 12.3, "clients_s": 12.0, "aggregate_s": 0.3, "clients": 4,
             "sampled": 4, "failed": 0, "rejected": 0, "bytes_up": 2048, "bytes_down": 8192,
             "perplexity": 300.0}]
    table = dl.round_table(rows)
    assert table == [{"round": 1, "round_s": 12.3, "clients_s": 12.0, "aggregate_s": 0.3,
                      "clients": 4, "sampled": 4, "failed": 0, "rejected": 0,
                      "bytes_up": 2048, "bytes_down": 8192}]

    parser = dl.build_parser()
    args = parser.parse_args(["--nodes", "4", "--rounds", "1"])
    dl.check_args(parser, args)
    result = dl.summarize(args, None, outcome="completed", wall_s=61.0, setup_s=10.0,
                          leftovers=[])
    result["rounds"], result["all_accepted"] = table, True
    text = dl.render(result)

    assert "4 SuperNodes x 1 rounds, 4 clients/round, secagg off: completed" in text
    assert "    1     12.3      12.0    0.30        4/4      0        0      2.0      8.0" in text
    assert "WARNING" not in text
    result["all_accepted"] = False
    assert "WARNING: not every sampled client's update was aggregated" in dl.render(result)
