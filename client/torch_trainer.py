"""Backprop adapter training with torch + PEFT on a frozen base (the "GPU client"): LoRA,
or prompt, prefix or (IA)3 tuning (``lora.kind``).

It trains where ``client.device`` says (``auto``: CUDA when present), optionally with the
frozen base in bfloat16 under autocast and with gradient checkpointing; a quantized base
(``model.quantize``) runs the fused Triton kernels on CUDA and the torch reference on the
CPU. Whatever the device and precision, the adapter leaves as float32 numpy arrays, so the
codec sees exactly what a CPU client would produce for the same values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from client.dp_sgd import DpSgdLedger, DpSgdSettings, dp_train
from client.local_data import LocalData
from client.trainer import DeviceBlocks, EvalOutcome, TrainInstruction, TrainOutcome
from kernels.base_model import load_causal_lm
from kernels.data.blocks import Blocks
from kernels.data.templates import PromptTemplate, TemplateChoice
from kernels.device import autocast
from kernels.lm_eval import mean_token_loss
from kernels.lora import attach_adapter, get_adapter, is_adapter_parameter, set_adapter
from protocols import keys
from protocols.run_config import ClientSection, LoraSection, ModelSection

log = logging.getLogger(__name__)


class TorchLoraTrainer:
    """Trains the adapter (``lora.kind``: LoRA, prompt, prefix or (IA)3) of a frozen causal
    LM with AdamW.

    The base model is loaded once per process and reused for every round: the adapter is
    overwritten from the coordinator's copy at the start of each call, so no state leaks
    from one round (or one simulated client) to the next.

    With ``dpsgd`` set, every ``train`` call runs sample-level DP-SGD (:mod:`client.dp_sgd`)
    and reports this client's local (epsilon, delta) so far. The only state kept across calls
    is the per-client accounting history: Opacus's hooks live for one call only.
    """

    def __init__(
        self,
        model_dir: Path,
        lora: LoraSection,
        *,
        threads: int = 1,
        dpsgd: DpSgdSettings | None = None,
        model_section: ModelSection | None = None,
        template: TemplateChoice = "auto",
        client: ClientSection | None = None,
    ) -> None:
        import torch

        from kernels.device import resolve_device, torch_dtype

        client = client or ClientSection()
        torch.set_num_threads(threads)
        self.device = resolve_device(client.device)
        self.dtype = torch_dtype(client.dtype)
        # opacus#820: the base is materialised, cast and moved to its device first and LoRA
        # is attached afterwards, on that device; nothing moves the model later (dp_train
        # checks it). PEFT keeps the adapter in float32 over a bfloat16 base.
        loaded = load_causal_lm(model_dir)
        self.tokenizer = loaded.tokenizer
        base = loaded.model
        torch.nn.Module.to(base, device=self.device)  # in place
        for param in base.parameters():  # parameters only: the rotary inv_freq stays fp32
            param.data = param.data.to(self.dtype)
        if client.gradient_checkpointing:
            # Non-reentrant: gradients reach the adapter although the base's inputs need none.
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={  # type: ignore[no-untyped-call]
                "use_reentrant": False})
            base.config.use_cache = False
        self.model = attach_adapter(base, lora)
        self.quant_report = None
        if model_section is not None and model_section.quantize != "none":
            from kernels.quantize_model import quantize_base

            # After attach_adapter: PEFT wraps float layers, then their base_layer is swapped.
            # No fused base+LoRA node under DP-SGD: Opacus hooks PEFT's lora_A/lora_B.
            self.quant_report = quantize_base(
                self.model, model_section.quantize, model_section.quant_group_size,
                symmetric=model_section.quant_symmetric, fused=dpsgd is None,
            )
        self.lora = lora
        self.dpsgd = dpsgd
        self.dpsgd_ledger = DpSgdLedger()
        self.load_seconds = loaded.seconds
        # The fast tokenizer's backend: the same tokenizers.Tokenizer an edge device runs.
        self.blocks = DeviceBlocks(self.tokenizer.backend_tokenizer,
                                   PromptTemplate.for_tokenizer(model_dir, template),
                                   self.tokenizer.eos_token_id)

    def train(
        self,
        adapter: Mapping[str, npt.NDArray[Any]],
        data: LocalData,
        instruction: TrainInstruction,
    ) -> TrainOutcome:
        import torch

        start = time.perf_counter()
        set_adapter(self.model, adapter)
        blocks = self.blocks.get(data, "train", instruction.seq_len)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=instruction.learning_rate, weight_decay=0.0)
        if self.dpsgd is not None:
            return self._train_private(self.dpsgd, data, blocks, optimizer, instruction, start)
        order = _batch_order(len(blocks), instruction)
        self.model.train()
        losses = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)  # this round's peak, not the run's
        loop_start = time.perf_counter()
        for step in range(instruction.local_steps):
            idx = order[step * instruction.batch_size : (step + 1) * instruction.batch_size]
            batch = blocks.take(idx)
            # Labels are -100 off the scored tokens (prompts, padding): response-only loss.
            with autocast(self.device, self.dtype):
                loss = self.model(input_ids=torch.from_numpy(batch.ids).to(self.device),
                                  labels=torch.from_numpy(batch.labels()).to(self.device)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))  # (a sync: the step's time is its own)
        self.model.eval()
        # Only trained tensors leave the device: frozen ones (FFA-LoRA's A) are the
        # coordinator's own and sending them back would only cost bytes.
        tensors = {k: v for k, v in get_adapter(self.model).items() if not self.lora.is_frozen(k)}
        return TrainOutcome(
            tensors=tensors,
            num_examples=len(blocks),
            metrics={
                keys.TRAIN_LOSS: float(np.mean(losses)),
                keys.TRAIN_SECONDS: time.perf_counter() - start,
                keys.STEP_SECONDS: (time.perf_counter() - loop_start) / instruction.local_steps,
                **_memory_metrics(self.model),
            },
        )

    def _train_private(
        self,
        settings: DpSgdSettings,
        data: LocalData,
        blocks: Blocks,
        optimizer: Any,
        instruction: TrainInstruction,
        start: float,
    ) -> TrainOutcome:
        # A test seed is mixed with the round's seed; without one the draws and the noise
        # come from OS entropy, never from the coordinator's seed (it could replay them).
        seed = None if settings.seed is None else int(np.random.SeedSequence(
            [settings.seed, instruction.seed, instruction.server_round]).generate_state(1)[0])
        run = dp_train(self.model, blocks, optimizer, settings=settings,
                       batch_size=instruction.batch_size, steps=instruction.local_steps,
                       seed=seed)
        self.dpsgd_ledger.record(data.client_id, noise_multiplier=settings.noise_multiplier,
                                 sample_rate=run.sample_rate, steps=run.steps)
        eps = self.dpsgd_ledger.epsilon(data.client_id, delta=settings.delta,
                                        accountant=settings.accountant)
        log.debug("client %s: DP-SGD q=%.4f, %d steps, mean train loss %.4f, epsilon %.3f",
                  data.client_id, run.sample_rate, run.steps,
                  float(np.mean(run.losses)) if run.losses else float("nan"), eps)
        tensors = {k: v for k, v in get_adapter(self.model).items() if not self.lora.is_frozen(k)}
        # No train-loss here: it is computed from the raw batches and is not covered by the
        # (epsilon, delta) below, so it stays on the device.
        return TrainOutcome(
            tensors=tensors,
            num_examples=len(blocks),
            metrics={
                keys.TRAIN_SECONDS: time.perf_counter() - start,
                keys.DPSGD_EPSILON: eps,
                keys.DPSGD_DELTA: settings.delta,
            },
        )

    def evaluate(
        self,
        adapter: Mapping[str, npt.NDArray[Any]],
        data: LocalData,
        *,
        seq_len: int,
        batch_size: int,
    ) -> EvalOutcome:
        set_adapter(self.model, adapter)
        blocks = self.blocks.get(data, "heldout", seq_len)
        with autocast(self.device, self.dtype):
            loss, tokens = mean_token_loss(self.model, blocks, batch_size)
        return EvalOutcome(loss=loss, tokens=tokens)


def _memory_metrics(model: Any) -> dict[str, float]:
    """Bytes held by the frozen base (quantized or not) and the process's peak memory.

    Peak memory is CUDA's peak allocation when the model is on a GPU, else the process's
    peak resident set; both are high-water marks since the process started.
    """
    import resource

    import torch

    frozen = [p for n, p in model.named_parameters()
              if not p.requires_grad and not is_adapter_parameter(n)]
    frozen += list(model.buffers())  # a quantized base lives in buffers
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in frozen}
    device = next(model.parameters()).device
    if device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(device))
    else:
        peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB
    return {keys.BASE_WEIGHT_BYTES: float(sum(storages.values())), keys.PEAK_MEMORY_BYTES: peak}


def _batch_order(n_blocks: int, instruction: TrainInstruction) -> npt.NDArray[np.int64]:
    """Shuffled epochs of block indices, enough for all local steps.

    Seeded by (seed, round) so a rerun of the same round draws the same batches.
    """
    rng = np.random.default_rng([instruction.seed, instruction.server_round])
    needed = instruction.local_steps * instruction.batch_size
    epochs = -(-needed // n_blocks)
    return np.concatenate([rng.permutation(n_blocks) for _ in range(epochs)])[:needed]
