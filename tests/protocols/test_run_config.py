"""Run config schema: unknown keys and bad values are named; the flat form round-trips."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from protocols.run_config import ConfigError, PathsSection, RunConfig


def test_defaults_round_trip_through_flat_form() -> None:
    config = RunConfig()
    flat = config.to_flat()
    assert flat["lora.r"] == 8
    assert RunConfig.from_flat({**flat, "paths.run_dir": "/x", "other": 1}) == config


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trian": {}}, r"unknown config section\(s\) \['trian'\]"),
        ({"train": {"round": 3}}, r"unknown key\(s\) \['train.round'\]; valid keys in \[train\]"),
        ({"train": {"rounds": 0}}, r"train.rounds = 0: must be >= 1"),
        ({"train": {"rounds": "3"}}, r"train.rounds = '3': expected int, got str"),
        ({"lora": {"dropout": 1.0}}, r"lora.dropout = 1.0: must be in \[0, 1\)"),
        ({"data": {"heldout_fraction": 0}}, r"data.heldout_fraction = 0.0: must be in \(0, 1\)"),
        ({"eval": {"central": 1}}, r"eval.central = 1: expected bool, got int"),
        ({"lora": {"target_modules": " , "}}, r"lora.target_modules = \[\]: names no module"),
    ],
)
def test_bad_config_is_named(raw: dict[str, dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_nested(raw)


def test_int_is_accepted_for_float() -> None:
    assert RunConfig.from_nested({"lora": {"alpha": 32}}).lora.alpha == 32.0


def _fields() -> list[tuple[str, dataclasses.Field[Any]]]:
    return [(f"{name}.{f.name}", f) for name, section in RunConfig.sections().items()
            for f in dataclasses.fields(section)]  # type: ignore[arg-type]


def test_every_key_has_help_and_the_documented_default() -> None:
    for key, f in _fields():
        assert f.metadata.get("help"), f"{key} has no help text"
    flat = RunConfig().to_flat()
    assert sorted(flat) == sorted(key for key, _ in _fields())


def _daemon(**values: Any) -> Any:
    from client.node.daemon import DaemonConfig

    return DaemonConfig(**{"address": "127.0.0.1:9093", "state_dir": Path("/tmp/fedtune-x"),
                           "insecure": True, "warm_clientapp": False, **values})


def _schemas() -> list[tuple[str, Any, Any]]:
    """(label, section class, build(name, value)) for every section of every schema: the
    run config's sections and the device daemon's config."""
    from client.node.daemon import DaemonConfig

    cases: list[tuple[str, Any, Any]] = [
        (name, section, lambda n, v, section=section: section(**{n: v}))
        for name, section in RunConfig.sections().items()]
    cases.append(("daemon", DaemonConfig, lambda n, v: _daemon(**{n: v})))
    return cases


def _bound_cases() -> list[Any]:
    from protocols.config_schema import key_of

    cases = []
    for label, section, build in _schemas():
        hints = get_type_hints(section)
        for f in dataclasses.fields(section):
            for bound in ("ge", "gt", "le", "lt"):
                if bound in f.metadata:
                    key = key_of(section, f)
                    cases.append(pytest.param(key, f.name, hints[f.name], build, bound,
                                              f.metadata[bound], id=f"{label}:{key}:{bound}"))
    return cases


@pytest.mark.parametrize(("key", "name", "kind", "build", "bound", "limit"), _bound_cases())
def test_every_bound_refuses_the_value_past_it_and_names_the_key(
        key: str, name: str, kind: type, build: Any, bound: str, limit: float) -> None:
    """Driven by the schemas themselves: a bound added tomorrow is tested here too."""
    step = 1 if kind is int else 1e-9 * max(1.0, abs(limit))
    outside = {"ge": limit - step, "gt": limit, "le": limit + step, "lt": limit}[bound]
    inside = {"ge": limit, "gt": limit + step, "le": limit, "lt": limit - step}[bound]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} = .*: must be "):
        build(name, kind(outside))
    try:
        build(name, kind(inside))
    except ConfigError as err:  # a rule tying fields together may still refuse it
        assert not str(err).startswith(f"{key} = "), err


@pytest.mark.parametrize(("key", "bad"), [
    ("model.quantize", "int3"), ("model.quant_group_size", 48), ("edge.upload", "sparse"),
    ("privacy.accountant", "prv"), ("security.secagg_modulus_bits", 16),
    ("federation.codec", "seed-scalar"), ("federation.codec", "int5"),
])
def test_choices_are_refused_with_the_valid_ones_named(key: str, bad: object) -> None:
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} = .*: must be one of \["):
        RunConfig.from_nested({section: {name: bad}})


def test_lists_are_accepted_where_a_list_is_meant() -> None:
    as_list = RunConfig.from_nested({"lora": {"target_modules": ["q_proj", "v_proj"]}})
    as_text = RunConfig.from_nested({"lora": {"target_modules": "q_proj, v_proj"}})
    assert as_list == as_text and as_list.lora.targets == ("q_proj", "v_proj")
    flat = as_list.to_flat()
    assert flat["lora.target_modules"] == "q_proj,v_proj"  # Flower's run config: scalars
    assert RunConfig.from_flat(flat) == as_list
    with pytest.raises(ConfigError, match="expected a list of strings"):
        RunConfig.from_nested({"lora": {"target_modules": ["q_proj", 3]}})


def test_paths_are_typed_and_a_missing_one_is_named() -> None:
    paths = PathsSection.from_flat({"paths.cache_dir": "/c", "paths.edge_export": "",
                                    "train.rounds": 3})
    assert paths.cache_dir == Path("/c") and paths.edge_export is None
    assert PathsSection.from_flat(paths.to_flat()) == paths
    with pytest.raises(ConfigError, match=r"paths.run_dir is not set"):
        paths.required("run_dir")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['paths.cache'\]"):
        PathsSection.from_flat({"paths.cache": "/c"})


def test_help_lists_every_key_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main

    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = capsys.readouterr().out
    for key, _ in _fields():
        assert f"  {key} (" in out, key
    assert "train.rounds (int, default 10)" in out


def test_edge_quantization_choices_mirror_the_kernels_registry() -> None:
    """protocols cannot import kernels: the config lists the options itself, and this keeps
    the list equal to the registry export-edge uses."""
    from typing import get_args

    from kernels.edge_quantize import DEFAULT_QUANTIZATION, QUANTIZATIONS
    from protocols.run_config import EdgeSection

    choices = get_args(get_type_hints(EdgeSection)["quantization"])
    assert set(choices) == {"default", *QUANTIZATIONS}
    assert DEFAULT_QUANTIZATION in QUANTIZATIONS
    with pytest.raises(ConfigError, match=r"edge.quantization = 'int3': must be one of \["):
        RunConfig.from_nested({"edge": {"quantization": "int3"}})


def test_client_dp_refuses_asking_devices_for_their_held_out_loss() -> None:
    with pytest.raises(ConfigError, match=r"eval\.fraction_clients > 0 asks devices"):
        RunConfig.from_nested({"privacy": {"client_dp": True},
                               "eval": {"fraction_clients": 0.5}})
    RunConfig.from_nested({"privacy": {"client_dp": True}})  # the default (0) is fine


@pytest.mark.parametrize(("client_dp", "sampling", "secagg", "poisson"), [
    (False, "poisson", False, False),  # no DP: the seeded fixed-size sample
    (True, "auto", False, True),       # the coordinator's noise: what the accountant assumes
    (True, "auto", True, False),       # secure aggregation: two devices at least, cohort known
    (True, "poisson", False, True),
    (True, "fixed", False, False),
])
def test_client_sampling_resolves_per_mode(client_dp: bool, sampling: str, secagg: bool,
                                           poisson: bool) -> None:
    config = RunConfig.from_nested({"privacy": {"client_dp": client_dp,
                                                "client_sampling": sampling},
                                    "security": {"secagg": secagg}})
    assert config.privacy.poisson_sampling(secagg=secagg) is poisson


def test_poisson_sampling_under_secure_aggregation_is_refused() -> None:
    with pytest.raises(ConfigError, match="often smaller than the two devices"):
        RunConfig.from_nested({"privacy": {"client_dp": True, "client_sampling": "poisson"},
                               "security": {"secagg": True}})


@pytest.mark.parametrize("combine", ["add", "exclude"])
@pytest.mark.parametrize("other", [
    {"edge": {"upload": "dense"}, "security": {"secagg": False}},
    {"security": {"secagg": True}},
    {"security": {"secagg": False}, "privacy": {"client_dp": True}},
])
def test_edge_combine_apart_needs_replayed_plaintext_steps(combine: str,
                                                           other: dict[str, Any]) -> None:
    raw: dict[str, Any] = {"edge": {"fraction": 0.5, "combine": combine}}
    for section, values in other.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=rf"edge.combine = '{combine}' .*edge.upload = "
                                          "'seed-scalar', security.secagg = false"):
        RunConfig.from_nested(raw)
    ok = RunConfig.from_nested({"edge": {"fraction": 0.5, "combine": combine,
                                         "subspace": "components"},
                                "security": {"secagg": False}})
    assert ok.edge.combine == combine and ok.edge.subspace == "components"


def test_edge_levers_refuse_what_they_cannot_combine_with() -> None:
    plain = {"security": {"secagg": False}}
    with pytest.raises(ConfigError, match="heterogeneous plain-LoRA ranks"):
        RunConfig.from_nested({**plain, "edge": {"fraction": 0.5, "combine": "add"},
                               "lora": {"freeze_a": False, "r": 8, "device_ranks": [4, 8]}})
    with pytest.raises(ConfigError, match=r"'components' .* lora.freeze_a = true"):
        RunConfig.from_nested({**plain, "edge": {"fraction": 0.5, "subspace": "components"},
                               "lora": {"freeze_a": False}})
    with pytest.raises(ConfigError, match=r"'trajectory' .* re-factorised"):
        RunConfig.from_nested({**plain, "edge": {"fraction": 0.5, "subspace": "trajectory"},
                               "lora": {"r": 8, "device_ranks": [4, 8], "freeze_a": False}})
    # FFA-LoRA's mixed ranks are zero-padded, not re-factorised: the step is the step
    assert RunConfig.from_nested({**plain, "edge": {"fraction": 0.5, "subspace": "trajectory"},
                                  "lora": {"r": 8, "device_ranks": [4, 8]}}).lora.freeze_a
    # the trajectory needs no particular adapter kind
    ok = RunConfig.from_nested({**plain, "edge": {"fraction": 0.5, "subspace": "trajectory",
                                                  "combine": "add"},
                                "lora": {"kind": "ia3"}})
    assert ok.edge.subspace == "trajectory"
    # without edge devices the edge options are inert, whatever else is set
    assert RunConfig.from_nested({"edge": {"combine": "add"}}).security.secagg


def test_the_line_search_takes_a_list_of_numbers_and_refuses_what_it_cannot_run_with() -> None:
    edge = {"fraction": 0.5}
    as_list = RunConfig.from_nested({"edge": {**edge, "line_search": [0, 0.5, 1, 2]}})
    as_text = RunConfig.from_nested({"edge": {**edge, "line_search": "0, 0.5, 1, 2"}})
    assert as_list == as_text and as_list.edge.line_search == (0.0, 0.5, 1.0, 2.0)
    assert RunConfig.from_flat(as_list.to_flat()) == as_list  # Flower's flat run config
    assert RunConfig.from_nested({}).edge.line_search == ()  # off by default
    # one number is a list of one (`--set edge.line_search=1` parses the value as a number)
    one = RunConfig.from_nested({"edge": {**edge, "line_search": 1,
                                          "line_search_momentum": 0.5}})
    assert one.edge.line_search == (1.0,) and one.edge.line_search_momentum == (0.5,)
    assert RunConfig.from_nested({"edge": {**edge, "role": "judge", "judges": 1,
                                           "line_search": 1}}).edge.judges == 1
    # under secure aggregation too: the judges score the unmasked sum's step
    assert as_list.security.secagg
    for bad, message in [
        ([0, "x"], "expected a list of numbers"),
        (True, "expected a list of numbers"),
        ([1, 1], "repeated"),
        ([0, 1000], r"\[-100, 100\]"),
        ([0, float("nan")], "finite"),
    ]:
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_nested({"edge": {**edge, "line_search": bad}})
    with pytest.raises(ConfigError, match=r"edge\.fraction = 0 makes none"):
        RunConfig.from_nested({"edge": {"line_search": [0, 1]}})
    with pytest.raises(ConfigError, match="client_dp"):
        RunConfig.from_nested({"edge": {**edge, "line_search": [0, 1]},
                               "privacy": {"client_dp": True}})


def test_edge_judges_need_a_line_search_and_the_judge_role_a_uniform_free_run() -> None:
    edge = {"fraction": 0.5, "line_search": [0.5, 1, 1.5, 2]}
    judged = RunConfig.from_nested({"edge": {**edge, "role": "judge", "judges": 4}})
    assert (judged.edge.role, judged.edge.judges) == ("judge", 4)
    assert RunConfig.from_flat(judged.to_flat()) == judged
    assert (RunConfig.from_nested({}).edge.role, RunConfig.from_nested({}).edge.judges) == \
        ("train", 0)
    # the torch half alone at that sampling: the judge role without a line search
    assert RunConfig.from_nested({"edge": {"fraction": 0.5, "role": "judge"}}).edge.judges == 0
    with pytest.raises(ConfigError, match="judges score the line search, which is off"):
        RunConfig.from_nested({"edge": {"fraction": 0.5, "judges": 2}})
    with pytest.raises(ConfigError, match="not a uniform draw"):
        RunConfig.from_nested({"edge": {"fraction": 0.5, "role": "judge"},
                               "privacy": {"client_dp": True}})
    with pytest.raises(ConfigError, match=r"edge\.fraction = 0 makes none"):
        RunConfig.from_nested({"edge": {"role": "judge"}})
    with pytest.raises(ConfigError, match=r"edge\.role"):
        RunConfig.from_nested({"edge": {"role": "watch"}})
    with pytest.raises(ConfigError, match=r"edge\.judges"):
        RunConfig.from_nested({"edge": {**edge, "judges": -1}})


def test_line_search_momentum_needs_the_line_search_and_distinct_bounded_multiples() -> None:
    edge = {"fraction": 0.5, "line_search": [0.5, 1, 2]}
    ok = RunConfig.from_nested({"edge": {**edge, "line_search_momentum": [0, 0.5]}})
    assert ok.edge.line_search_momentum == (0.0, 0.5)
    assert RunConfig.from_flat(ok.to_flat()) == ok
    assert RunConfig.from_nested({}).edge.line_search_momentum == ()
    for bad, message in [([0, 0], "repeated"), ([0, 500], r"\[-100, 100\]")]:
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_nested({"edge": {**edge, "line_search_momentum": bad}})
    with pytest.raises(ConfigError, match="the line search, which is off"):
        RunConfig.from_nested({"edge": {"fraction": 0.5, "line_search_momentum": [0, 0.5]}})
