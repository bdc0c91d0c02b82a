"""Optional central evaluation: held-out perplexity of the global adapter each round.

The coordinator scores the global adapter on evaluation data it owns (``eval.path``; in a
simulation, which plays the coordinator too: a fixed sample of every device's held-out
examples, never used for training). Chat and instruction data are scored on the answers
only, as the devices train on them.
This is the only place ``server`` touches torch, through ``kernels``, and the same loaded
model also yields the initial adapter so that coordinator and clients agree on it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.data.blocks import Blocks
from kernels.data.examples import Example
from kernels.data.templates import PromptTemplate
from protocols import keys
from protocols.run_config import RunConfig

log = logging.getLogger(__name__)


def evaluation_examples(path: Path) -> tuple[Example, ...]:
    """The examples of the coordinator's evaluation data: any format fedtune reads; of data
    that brings a train/held-out split, the held-out part."""
    from kernels.data.formats import read_dataset

    dataset = read_dataset(path)
    return dataset.heldout if dataset.heldout is not None else dataset.train


class CentralModel:
    """The base model with an adapter slot, loaded once on the coordinator."""

    def __init__(self, model_dir: Path, config: RunConfig, *, threads: int) -> None:
        import torch

        from kernels.base_model import load_causal_lm, portable_model_name
        from kernels.device import resolve_device
        from kernels.lora import attach_adapter, get_adapter, peft_config_dict

        torch.set_num_threads(threads)
        self.device = resolve_device(config.eval.device, key="eval.device")
        loaded = load_causal_lm(model_dir)
        self.tokenizer = loaded.tokenizer
        torch.nn.Module.to(loaded.model, self.device)  # in place, before the adapter
        self.model = attach_adapter(loaded.model, config.lora)
        self.initial_adapter = get_adapter(self.model)
        self.peft_config = peft_config_dict(
            self.model, portable_model_name(config.model.source, model_dir))
        self.batch_size = config.eval.batch_size
        self.template = PromptTemplate.for_tokenizer(model_dir, config.data.template)
        self.blocks: Blocks | None = None
        self.examples: tuple[Example, ...] = ()

    def load_eval_data(self, path: Path, *, seq_len: int, max_blocks: int) -> int:
        """Read the evaluation data (any format fedtune reads) and keep ``max_blocks`` of
        its blocks, spread over the whole file; return how many."""
        from kernels.data.blocks import encode_blocks

        self.examples = evaluation_examples(path)
        examples = self.examples
        blocks = encode_blocks(self.tokenizer.backend_tokenizer, examples, self.template,
                               seq_len, eos_token_id=self.tokenizer.eos_token_id)
        if len(blocks) == 0:
            raise ValueError(
                f"{path}: the evaluation data makes no {seq_len}-token block with a scored "
                "token; add data or raise train.seq_len")
        # Spread the sample over the whole file (it is ordered by device), not its head.
        pick = np.linspace(0, len(blocks) - 1, num=min(max_blocks, len(blocks))).astype(int)
        self.blocks = blocks.take(np.unique(pick))
        return len(self.blocks)

    def evaluate(self, adapter: Mapping[str, npt.NDArray[Any]]) -> dict[str, float]:
        from kernels.lm_eval import mean_token_loss
        from kernels.lora import set_adapter

        if self.blocks is None:
            raise RuntimeError("load_eval_data() must be called before evaluate()")
        set_adapter(self.model, adapter)
        loss, tokens = mean_token_loss(self.model, self.blocks, self.batch_size)
        return {keys.EVAL_LOSS: loss, keys.PERPLEXITY: math.exp(loss),
                keys.EVAL_TOKENS: float(tokens)}

    def generate(self, adapter: Mapping[str, npt.NDArray[Any]], prompts: Sequence[str], *,
                 max_new_tokens: int) -> list[str]:
        """Greedy answers to rendered ``prompts`` under ``adapter`` (special tokens and the
        prompt removed), one prompt at a time: no padding to get wrong."""
        import torch

        from kernels.lora import set_adapter

        set_adapter(self.model, adapter)
        eos = self.tokenizer.eos_token_id
        answers = []
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([self.tokenizer(prompt, add_special_tokens=False)["input_ids"]],
                                   device=self.device)
                out = self.model.generate(  # type: ignore[no-untyped-call]
                    input_ids=ids, attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                    pad_token_id=eos)
                answer = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                answers.append(str(answer).strip())
        return answers
