"""Optional central evaluation: held-out perplexity of the global adapter each round.

The coordinator scores the global adapter on a validation set it holds itself (in a
simulation: a fixed sample of every role's held-out speeches, never used for training).
This is the only place ``server`` touches torch, through ``kernels``, and the same loaded
model also yields the initial adapter so that coordinator and clients agree on it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols import keys
from protocols.run_config import RunConfig

log = logging.getLogger(__name__)


class CentralModel:
    """The base model with an adapter slot, loaded once on the coordinator."""

    def __init__(self, model_dir: Path, config: RunConfig, *, threads: int) -> None:
        import torch

        from kernels.base_model import load_causal_lm, portable_model_name
        from kernels.lora import attach_lora, get_adapter, peft_config_dict

        torch.set_num_threads(threads)
        loaded = load_causal_lm(model_dir)
        self.tokenizer = loaded.tokenizer
        self.model = attach_lora(loaded.model, config.lora)
        self.initial_adapter = get_adapter(self.model)
        self.peft_config = peft_config_dict(
            self.model, portable_model_name(config.model.source, model_dir))
        self.batch_size = config.eval.batch_size
        self.blocks: npt.NDArray[np.int64] | None = None

    def load_eval_texts(self, eval_file: Path, *, seq_len: int, max_blocks: int) -> int:
        from kernels.causal_lm_data import token_blocks

        texts = json.loads(eval_file.read_text(encoding="utf-8"))["texts"]
        blocks = token_blocks(self.tokenizer, texts, seq_len)
        if len(blocks) == 0:
            raise ValueError(
                f"{eval_file}: held-out text is shorter than one {seq_len}-token block"
            )
        # Spread the sample over the whole file (it is ordered by role), not its head.
        pick = np.linspace(0, len(blocks) - 1, num=min(max_blocks, len(blocks))).astype(int)
        self.blocks = blocks[np.unique(pick)]
        return len(self.blocks)

    def evaluate(self, adapter: Mapping[str, npt.NDArray[Any]]) -> dict[str, float]:
        from kernels.lm_eval import mean_token_loss
        from kernels.lora import set_adapter

        if self.blocks is None:
            raise RuntimeError("load_eval_texts() must be called before evaluate()")
        set_adapter(self.model, adapter)
        loss, tokens = mean_token_loss(self.model, self.blocks, self.batch_size)
        return {keys.EVAL_LOSS: loss, keys.PERPLEXITY: math.exp(loss),
                keys.EVAL_TOKENS: float(tokens)}
