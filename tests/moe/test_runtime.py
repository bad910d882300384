"""The allocator setting a CPU SwitchFFN applies once per process, and its documented opt-outs."""

import pytest

from switchformer import runtime
from switchformer.moe import SwitchFFN


@pytest.fixture
def fresh_runtime(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "_state", {"disabled": False, "attempted": False, "applied": False})
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv(runtime.ENV_VAR, raising=False)
    return calls


def test_first_cpu_layer_applies_the_setting_once(fresh_runtime):
    SwitchFFN(4, 8, 2)
    SwitchFFN(4, 8, 2)
    assert fresh_runtime == [1] and runtime.malloc_tuning_applied()


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_environment_variable_opts_out(fresh_runtime, monkeypatch, value):
    monkeypatch.setenv(runtime.ENV_VAR, value)
    SwitchFFN(4, 8, 2)
    assert fresh_runtime == [] and not runtime.malloc_tuning_applied() and not runtime.malloc_tuning_enabled()


def test_disable_function_opts_out(fresh_runtime):
    runtime.disable_malloc_tuning()
    SwitchFFN(4, 8, 2)
    assert fresh_runtime == [] and not runtime.tune_malloc_once()


def test_reuse_freed_memory_reports_whether_it_applied():
    assert isinstance(runtime.reuse_freed_memory(), bool)  # True on glibc; False elsewhere, changing nothing
