"""The device side's patches of Flower internals (client/flower_patches.py): each still fits
the installed Flower, is in force inside its scope, and Flower's original is back after it.
(What the short sleeps do to a fake module and how warm children use the tuned pull:
tests/simulations/test_warm_clientapp.py.)
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
import types

import pytest

from client.flower_patches import (
    FLOWER_IDLE_SLEEP_S,
    FLOWER_REPLY_SLEEP_S,
    PULL_ATTR,
    WARM_PULL_BACKOFF,
    short_supernode_sleeps,
    warm_message_pull,
)

SLEEPS = "Flower changed: revisit client/flower_patches.py:short_supernode_sleeps"
PULL = "Flower changed: revisit client/flower_patches.py:warm_message_pull"


class Boom(Exception):
    pass


# --- short_supernode_sleeps ---------------------------------------------------------------------


def test_guard_the_supernode_sleeps_through_the_name_we_replace() -> None:
    from flwr.supernode import start_client_internal

    assert getattr(start_client_internal, "time", None) is time, SLEEPS
    source = inspect.getsource(start_client_internal)
    assert f"time.sleep({FLOWER_IDLE_SLEEP_S})" in source, SLEEPS
    assert f"time.sleep({FLOWER_REPLY_SLEEP_S})" in source, SLEEPS


def test_inside_the_scope_the_supernode_sleeps_less_and_after_it_as_flower_does() -> None:
    from flwr.supernode import start_client_internal

    with short_supernode_sleeps(0.4) as applied:
        assert applied
        stand_in = start_client_internal.time
        assert stand_in is not time
        assert (stand_in.idle_s, stand_in.reply_s) == (0.4, 0.1)  # type: ignore[attr-defined]
        assert stand_in.monotonic is time.monotonic
    assert start_client_internal.time is time


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_the_supernodes_time_is_back_when_the_scope_raised(error: type[BaseException]) -> None:
    from flwr.supernode import start_client_internal

    with pytest.raises(error), short_supernode_sleeps(0.4):
        raise error()
    assert start_client_internal.time is time


def test_a_moved_internal_is_left_alone() -> None:
    moved = types.ModuleType("moved")
    with short_supernode_sleeps(0.4, moved) as applied:
        assert not applied and not hasattr(moved, "time")
    assert not hasattr(moved, "time")


# --- warm_message_pull --------------------------------------------------------------------------


def test_guard_the_clientapp_runtime_pulls_through_the_name_we_replace() -> None:
    from flwr.supernode.runtime import run_clientapp

    pull = getattr(run_clientapp, PULL_ATTR, None)
    assert callable(pull) and not isinstance(pull, functools.partial), PULL
    params = inspect.signature(pull).parameters
    for name in WARM_PULL_BACKOFF:
        assert name in params, PULL
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, PULL
    assert f"{PULL_ATTR}(" in inspect.getsource(run_clientapp), PULL


def test_inside_the_scope_the_pull_backs_off_less_and_after_it_as_flower_does() -> None:
    from flwr.supernode.runtime import run_clientapp

    original = getattr(run_clientapp, PULL_ATTR)
    with warm_message_pull() as applied:
        assert applied
        tuned = getattr(run_clientapp, PULL_ATTR)
        assert isinstance(tuned, functools.partial) and tuned.func is original
        assert tuned.keywords == WARM_PULL_BACKOFF
        with warm_message_pull() as again:  # an enclosing scope: nothing changes
            assert again and getattr(run_clientapp, PULL_ATTR) is tuned
        assert getattr(run_clientapp, PULL_ATTR) is tuned
    assert getattr(run_clientapp, PULL_ATTR) is original


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_the_pull_is_back_when_the_scope_raised(error: type[BaseException]) -> None:
    from flwr.supernode.runtime import run_clientapp

    original = getattr(run_clientapp, PULL_ATTR)
    with pytest.raises(error), warm_message_pull():
        raise error()
    assert getattr(run_clientapp, PULL_ATTR) is original


def test_an_unloaded_or_changed_runtime_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.runtime import run_clientapp

    monkeypatch.delitem(sys.modules, run_clientapp.__name__)
    with warm_message_pull() as applied:
        assert not applied
    monkeypatch.undo()

    def old_style(tree: object, pull: object, confirm: object, initial_backoff: float = 1.0
                  ) -> None:  # backoff positional: not what the patch was written against
        pass

    monkeypatch.setattr(run_clientapp, PULL_ATTR, old_style)
    with warm_message_pull() as applied:
        assert not applied and getattr(run_clientapp, PULL_ATTR) is old_style
    assert getattr(run_clientapp, PULL_ATTR) is old_style
