"""Fixtures shared by every test module; the helpers they use live in ``tests/helpers``."""

import os
from pathlib import Path

import pytest

from helpers.runs import HH_DATA, free_port


@pytest.fixture
def hh_data() -> Path:
    """The HH-RLHF file; tests that need it are skipped, saying how to get it, where it is absent."""
    if not HH_DATA.is_file():
        pytest.skip(
            f"HH-RLHF data not found at {HH_DATA}: download `harmless-base/test.jsonl.gz` of the Hub dataset "
            "Anthropic/hh-rlhf and set DS_DPO_HH_DATA to its path"
        )
    return HH_DATA


@pytest.fixture(scope="session")
def builtin_files(tmp_path_factory) -> dict[str, str]:
    """The built-in tiny model, tokenizer and train/eval pairs, generated once for the session."""
    from ds_dpo.data import builtin

    return builtin.materialize(tmp_path_factory.mktemp("builtin"), seed=42)


@pytest.fixture(scope="session")
def single_rank():
    """A one-rank gloo process group for in-process DeepSpeed engines."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    from ds_dpo import distributed

    yield distributed.init_distributed(timeout_s=600)
    distributed.release_shm_buffers()


@pytest.fixture(autouse=True)
def _no_leftover_zero3():
    """An in-process ZeRO-3 engine leaves transformers' global HfDeepSpeedConfig set, which would make every later
    ``from_pretrained``/``from_config`` in this process build a partitioned model; reset it after each test."""
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@pytest.fixture(scope="session", autouse=True)
def attention_kernels():
    """ds_dpo's attention kernels registered with transformers, as a run's setup registers them
    (``ds_dpo.forward.hooks``); put back after the session."""
    from ds_dpo.forward import hooks

    hooks.install()
    yield
    hooks.uninstall()


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """transformers compiles FlexAttention, which inductor cannot do on this CPU (torch 2.13: a C++ compile error);
    torch's plain kernel computes the same attention from the same block mask. The padded path's block masks are
    built uncompiled too (the same mask; compiling it costs ~20 s here)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from transformers import masking_utils
    from transformers.integrations import flex_attention as hf_flex

    monkeypatch.setattr(
        hf_flex,
        "compile_friendly_flex_attention",
        lambda query, key, value, training=False, **kwargs: flex_attention(query, key, value, **kwargs),
    )
    monkeypatch.setattr(
        masking_utils, "create_block_mask", lambda *args, _compile=False, **kwargs: create_block_mask(*args, **kwargs)
    )
