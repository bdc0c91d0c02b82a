"""The role split, the simulated devices' folders and the TOML config loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.local_data import DeviceDataSource, load_device_data
from client.shakespeare import Speech, load_speeches
from protocols.config_file import load_config, to_toml
from protocols.run_config import ConfigError, DataSection, RunConfig
from simulations.default_config import DEFAULT_TOML, HEADER
from simulations.devices import DataNotAvailable, central_eval_texts, prepare_devices
from simulations.shakespeare_split import split_roles
from tests.conftest import ROLES


def _speeches() -> list[Speech]:
    out = [Speech("p", "A", f"a{i}") for i in range(10)]
    out += [Speech("p", "B", f"b{i}") for i in range(4)]  # too few speeches
    out += [Speech("q", "A", f"qa{i}") for i in range(5)]  # same role name, other play
    return out


def test_split_keeps_roles_with_enough_speeches_and_holds_out_a_share() -> None:
    clients = split_roles(_speeches(), DataSection(min_examples=5, heldout_fraction=0.2))
    assert [c["client_id"] for c in clients] == ["p/A", "q/A"]
    first = clients[0]
    assert len(first["heldout"]) == 2 and len(first["train"]) == 8  # type: ignore[arg-type]
    assert set(first["train"]).isdisjoint(first["heldout"])  # type: ignore[arg-type]
    assert sorted(first["train"] + first["heldout"]) == sorted(f"a{i}" for i in range(10))  # type: ignore[operator]
    again = split_roles(_speeches(), DataSection(min_examples=5, heldout_fraction=0.2))
    assert again == clients, "the split must be deterministic"


def test_max_clients_keeps_the_largest_roles() -> None:
    clients = split_roles(_speeches(), DataSection(min_examples=2, max_clients=2))
    assert [c["client_id"] for c in clients] == ["p/A", "q/A"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepared_device_folders(mini_cache: Path) -> None:
    """One folder per role with its own train/heldout files, read back by the device's own
    loader; central_eval.jsonl is every held-out speech, in device order."""
    data = DataSection(min_examples=5)
    devices = prepare_devices(data, mini_cache)

    assert devices.root.parent == mini_cache / "devices"
    assert devices.root.name.startswith("shakespeare-")
    assert devices.names == tuple(f"miniature/{role}" for role in ROLES)
    assert devices.num_clients == 4 and devices.layout == "text"
    assert sorted(p.name for p in devices.root.iterdir()) == [
        "00000", "00001", "00002", "00003", "central_eval.jsonl", "index.json"]
    roles = split_roles(load_speeches(mini_cache / "data" / "shakespeare" / "texts"), data)
    for i, role in enumerate(roles):
        folder = devices.folder(i)
        assert folder == devices.root / f"{i:05d}"
        assert sorted(p.name for p in folder.iterdir()) == ["heldout.jsonl", "train.jsonl"]
        local = load_device_data(DeviceDataSource(folder), devices.names[i])
        assert local.client_id == role["client_id"] == devices.names[i]
        assert list(local.train_texts) == role["train"]
        assert [e.text for e in local.heldout] == role["heldout"]
    heldout = central_eval_texts(devices)
    assert heldout == [t for role in roles for t in role["heldout"]]  # type: ignore[attr-defined]
    assert len(heldout) == devices.heldout_examples
    trained = {t for role in roles for t in role["train"]}  # type: ignore[attr-defined]
    assert devices.train_examples == len(trained) and not trained & set(heldout)


def test_prepared_devices_are_cached(mini_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = prepare_devices(DataSection(min_examples=5), mini_cache)
    files = _files(first.root)
    import simulations.devices as devices_module

    def no_rebuild(*_args: object) -> None:
        raise AssertionError("the cached folders were rebuilt")

    monkeypatch.setattr(devices_module, "_parts", no_rebuild)
    again = prepare_devices(DataSection(min_examples=5), mini_cache)
    assert again == first and _files(again.root) == files


def test_the_cache_key_follows_the_data_section(mini_cache: Path) -> None:
    base = prepare_devices(DataSection(min_examples=5), mini_cache)
    other_seed = prepare_devices(DataSection(min_examples=5, seed=1), mini_cache)
    other_share = prepare_devices(DataSection(min_examples=5, heldout_fraction=0.4),
                                  mini_cache)
    assert len({base.root, other_seed.root, other_share.root}) == 3
    assert other_seed.names == base.names
    assert _files(other_seed.root) != _files(base.root), "another seed, another split"
    assert other_share.heldout_examples > base.heldout_examples


def test_a_new_parser_version_prepares_new_folders(
    mini_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folders from an older parser must not be reused (a cached split silently changed
    every run's data once)."""
    import client.shakespeare as parser

    first = prepare_devices(DataSection(min_examples=5), mini_cache)
    monkeypatch.setattr(parser, "PARSER_VERSION", parser.PARSER_VERSION + 1)
    second = prepare_devices(DataSection(min_examples=5), mini_cache)

    assert second.root != first.root
    assert _files(second.root) == _files(first.root)


def test_a_missing_corpus_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataNotAvailable, match="fedtune prepare"):
        prepare_devices(DataSection(), tmp_path / "empty-cache")


def test_default_config_file_is_the_schemas_defaults(tmp_path: Path) -> None:
    """simulations/configs/default.toml is generated (`fedtune config`): byte for byte the
    schema's defaults with their help, so the two can never disagree again."""
    assert DEFAULT_TOML.read_text() == HEADER + to_toml(RunConfig(), comments=True)
    assert load_config(DEFAULT_TOML) == load_config() == RunConfig()
    saved = tmp_path / "saved.toml"
    saved.write_text(to_toml(load_config(None, ["train.rounds=3"])))
    assert load_config(saved).train.rounds == 3


def test_overrides_are_parsed_as_toml_values() -> None:
    config = load_config(None, ["train.rounds=3", "model.source=/models/x", "eval.central=false"])
    assert config.train.rounds == 3
    assert config.model.source == "/models/x"
    assert config.eval.central is False
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_config(None, ["rounds=3"])


def _simulated_node_ids(count: int) -> list[int]:
    """Node ids as Flower's Simulation Engine registers them, in the order the grid lists
    them (the set ``InMemoryLinkState.get_nodes`` builds)."""
    from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.server.superlink.linkstate import InMemoryLinkState
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    state = InMemoryLinkState(NoOpFederationManager(), ObjectStoreFactory().store())
    ids = [state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, bytes([i]) * 32,
                             heartbeat_interval=HEARTBEAT_INTERVAL_INF) for i in range(count)]
    return list(set(ids))


def test_seeded_node_ids_make_simulated_sampling_repeat() -> None:
    from simulations.flower_patches import seeded_node_ids

    with seeded_node_ids(0):
        first = _simulated_node_ids(40)
    with seeded_node_ids(0):
        again = _simulated_node_ids(40)
    with seeded_node_ids(1):
        other_seed = _simulated_node_ids(40)
    unseeded = _simulated_node_ids(40)

    # Same ids in the same order: a seeded sampler (server/node_sampling.py) picks the same
    # positions, so the same partitions.
    assert first == again
    assert set(other_seed) != set(first)
    assert not set(unseeded) & set(first), "Flower's own random ids again outside the context"


def test_clients_at_once_are_bounded_by_cpus_and_memory() -> None:
    """Ray's out-of-memory killer took workers when more clients trained at once than fit:
    the pool is sized by memory too."""
    from simulations.runner import parallel_clients

    gb = 2**30
    config = RunConfig.from_nested({"federation": {"client_cpus": 1.0, "client_memory_gb": 2.0}})
    assert parallel_clients(config, 2, 18 * gb) == 2  # CPUs bound it (this box)
    assert parallel_clients(config, 16, 10 * gb) == 4  # 0.8 * 10 GB / 2 GB
    assert parallel_clients(config, 16, 1 * gb) == 1  # never fewer than one
    assert parallel_clients(config, 16, None) == 16  # memory unknown: CPUs only
    no_limit = RunConfig.from_nested({"federation": {"client_memory_gb": 0.0}})
    assert parallel_clients(no_limit, 8, 1 * gb) == 8
