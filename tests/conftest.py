"""Shared fixtures: a tiny random-init causal LM and a miniature play, built offline.

Unit and end-to-end tests must not depend on the 135M model (too slow here) nor on any hub:
the tiny model is a real Llama architecture with a real byte-level BPE tokenizer trained on
the fly, saved as an ordinary Hugging Face folder, which also exercises the "any local
causal-LM directory" path of ``model.source``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import measured

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def pytest_runtest_setup(item: pytest.Item) -> None:
    measured.enter_test(item.nodeid, marked=item.get_closest_marker("measured") is not None)


ROLES = ("PROSPERO", "MIRANDA", "ARIEL", "CALIBAN")


def mini_play(speeches_per_role: int = 12) -> str:
    """A play in the modern Gutenberg format with four roles and distinctive speeches."""
    lines = ["THE MINIATURE", "", "by William Shakespeare", "", "", "ACT I", "", "SCENE 1",
             "", "[An island]", ""]
    for i in range(speeches_per_role):
        for j, role in enumerate(ROLES):
            lines += [f"{role}.",
                      f"Speech {i} of {role.lower()}: the isle is full of noises {i * 7 + j},",
                      f"sounds and sweet airs that give delight and hurt not {role[:3]}.", ""]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
    )
    tok.train_from_iterator([mini_play()] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture()
def mini_cache(tmp_path: Path) -> Path:
    """A fedtune cache folder holding one miniature play as the corpus."""
    texts = tmp_path / "cache" / "data" / "shakespeare" / "texts"
    texts.mkdir(parents=True)
    (texts / "miniature_gut.txt").write_text(mini_play())
    return tmp_path / "cache"
