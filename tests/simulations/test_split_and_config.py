"""The role split and the TOML config loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.local_data import LocalDataError, load_partition
from client.shakespeare import Speech
from protocols.config_file import load_config, to_toml
from protocols.run_config import ConfigError, DataSection, RunConfig
from simulations.default_config import DEFAULT_TOML, HEADER
from simulations.shakespeare_split import prepare_split, split_roles


def _speeches() -> list[Speech]:
    out = [Speech("p", "A", f"a{i}") for i in range(10)]
    out += [Speech("p", "B", f"b{i}") for i in range(4)]  # too few speeches
    out += [Speech("q", "A", f"qa{i}") for i in range(5)]  # same role name, other play
    return out


def test_split_keeps_roles_with_enough_speeches_and_holds_out_a_share() -> None:
    clients = split_roles(_speeches(), DataSection(min_speeches=5, heldout_fraction=0.2))
    assert [c["client_id"] for c in clients] == ["p/A", "q/A"]
    first = clients[0]
    assert len(first["heldout"]) == 2 and len(first["train"]) == 8  # type: ignore[arg-type]
    assert set(first["train"]).isdisjoint(first["heldout"])  # type: ignore[arg-type]
    assert sorted(first["train"] + first["heldout"]) == sorted(f"a{i}" for i in range(10))  # type: ignore[operator]
    again = split_roles(_speeches(), DataSection(min_speeches=5, heldout_fraction=0.2))
    assert again == clients, "the split must be deterministic"


def test_max_clients_keeps_the_largest_roles() -> None:
    clients = split_roles(_speeches(), DataSection(min_speeches=2, max_clients=2))
    assert [c["client_id"] for c in clients] == ["p/A", "q/A"]


def test_prepared_split_files(mini_cache: Path, tmp_path: Path) -> None:
    texts = mini_cache / "data" / "shakespeare" / "texts"
    split = prepare_split(texts, DataSection(min_speeches=5), tmp_path / "parts")
    assert split.num_clients == 4
    heldout = json.loads(split.eval_file.read_text())["texts"]
    assert len(heldout) == split.heldout_speeches
    data = load_partition(split.partitions_file, 1)
    assert data.client_id == "miniature/MIRANDA"
    assert set(data.heldout) <= set(heldout) and not set(data.train) & set(heldout)
    with pytest.raises(LocalDataError, match="partition-id 4 is out of range"):
        load_partition(split.partitions_file, 4)


def test_a_new_parser_version_prepares_a_new_split(
    mini_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached split from an older parser must not be reused (it silently changed every
    run's data once)."""
    import simulations.shakespeare_split as split_module

    texts = mini_cache / "data" / "shakespeare" / "texts"
    first = prepare_split(texts, DataSection(min_speeches=5), tmp_path / "parts")
    monkeypatch.setattr(split_module, "PARSER_VERSION", split_module.PARSER_VERSION + 1)
    second = prepare_split(texts, DataSection(min_speeches=5), tmp_path / "parts")

    assert second.partitions_file != first.partitions_file
    assert second.partitions_file.read_bytes() == first.partitions_file.read_bytes()


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
