"""Sample-level DP-SGD for the torch LoRA trainer, through Opacus.

Each optimizer step follows Abadi et al., "Deep Learning with Differential Privacy" (CCS
2016), Algorithm 1, with Poisson sampling as Opacus implements it:

1. draw a batch by including each of the client's ``N`` token blocks independently with
   probability ``q = batch_size / N`` (Opacus ``DPDataLoader``);
2. compute each block's own gradient of its mean next-token loss (Opacus per-sample hooks
   on the LoRA ``nn.Linear`` layers: the frozen base gets no hooks and no gradients);
3. clip each block's gradient, over all trainable tensors together, to L2 norm ``C``;
4. add ``N(0, (sigma*C)^2)`` noise to the sum and divide by the *expected* batch size
   ``q*N`` (not the drawn one: the divisor must not depend on the data);
5. hand the result to the ordinary optimizer (AdamW here: post-processing).

A "sample" is one token block of ``seq_len`` tokens. Blocks are packed from the client's
text, so a speech that spans ``k`` blocks is protected at group size ``k``.

The privacy loss of ``steps`` such steps is the Poisson-subsampled Gaussian mechanism with
``(sigma, q)`` composed ``steps`` times; :class:`DpSgdLedger` keeps that history per client
(plain data, merged like Opacus's own accountants) and :func:`epsilon` turns it into
``epsilon`` with an Opacus accountant (PRV by default: Gopi et al., NeurIPS 2021).

Randomness: the coordinator chooses the training seed, so the batch draws and the noise must
not come from it, or the coordinator could replay the noise and subtract it. They come from
torch generators seeded with fresh OS entropy (``secrets``) on every call, unless a test seed
is injected (``DpSgdSettings.seed``). This is not Opacus's ``secure_mode`` (a CSPRNG and
noise hardened against floating-point attacks; it needs ``torchcsprng``).
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from protocols.run_config import PrivacySection

if TYPE_CHECKING:
    import torch

    from kernels.data.blocks import Blocks

#: Opacus per-sample-gradient modes that work on the LoRA layers here. "hooks" is the
#: default: a LoRA tensor's per-sample gradients are small (B x r x d), so materialising them
#: is cheaper than ghost clipping's second backward pass and its (T x T) Gram norms. On
#: SmolLM2 (batch 4 x 64, 1 thread) a step cost 1.13x / 1.75x / 1.30x a non-private step
#: with hooks / ghost / functorch (``simulations/bench/dpsgd_step.py``).
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
ACCOUNTANTS = ("prv", "rdp")

#: One accounting entry: ``(noise_multiplier, sample_rate, steps)``, as in Opacus.
Mechanism = tuple[float, float, int]

#: Parameter attributes Opacus's hooks and optimizers set and do not all remove.
_OPACUS_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample",
                       "_norm_sample", "summed_grad")
_OPACUS_MODULE_ATTRS = ("activations", "max_batch_len")


@dataclass(frozen=True, kw_only=True)
class DpSgdSettings:
    """How a torch client runs DP-SGD. Built from ``[privacy]`` by :meth:`from_privacy`."""

    noise_multiplier: float = field(
        metadata={"help": "sigma: noise std on the sum of clipped block gradients is sigma*C"}
    )
    max_grad_norm: float = field(metadata={"help": "C: L2 bound of one block's gradient"})
    delta: float = field(metadata={"help": "delta of the reported (epsilon, delta)"})
    accountant: str = field(default="prv", metadata={"help": "'prv' or 'rdp' (Opacus)"})
    # Runtime-only settings below: never part of a saved config.
    grad_sample_mode: str = field(
        default="hooks", metadata={"help": f"Opacus per-sample mode, one of {GRAD_SAMPLE_MODES}"}
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "tests only: seed for batch draws and noise; None = OS entropy"},
    )

    def __post_init__(self) -> None:
        # 0 (no noise: clipping only, epsilon infinite) exists for the correctness tests; the
        # run config's privacy.dpsgd_noise_multiplier must be > 0.
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, "
                             f"got {self.grad_sample_mode!r}")

    @classmethod
    def from_privacy(cls, privacy: PrivacySection) -> DpSgdSettings:
        return cls(noise_multiplier=privacy.dpsgd_noise_multiplier,
                   max_grad_norm=privacy.dpsgd_max_grad_norm, delta=privacy.dpsgd_delta)


def poisson_sample_rate(batch_size: int, n_blocks: int) -> float:
    """``q = batch_size / n_blocks``, capped at 1 (every block in every step)."""
    if n_blocks < 1 or batch_size < 1:
        raise ValueError(f"need batch_size >= 1 and n_blocks >= 1, got {batch_size}, {n_blocks}")
    return min(1.0, batch_size / n_blocks)


def compose(history: Sequence[Mechanism], *, noise_multiplier: float, sample_rate: float,
            steps: int) -> list[Mechanism]:
    """``history`` plus ``steps`` more steps; equal consecutive mechanisms are merged."""
    out = list(history)
    if out and out[-1][:2] == (noise_multiplier, sample_rate):
        out[-1] = (noise_multiplier, sample_rate, out[-1][2] + steps)
    else:
        out.append((noise_multiplier, sample_rate, steps))
    return out


def epsilon(history: Sequence[Mechanism], *, delta: float, accountant: str = "prv") -> float:
    """The ``epsilon`` at ``delta`` of the composed ``history`` (0 for no step)."""
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = list(history)
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q) = -inf at q = 1: harmless
        return float(acc.get_epsilon(delta=delta))


class DpSgdLedger:
    """Per-client DP-SGD history in this process (one process serves many clients)."""

    def __init__(self) -> None:
        self._history: dict[str, list[Mechanism]] = {}

    def record(self, client_id: str, *, noise_multiplier: float, sample_rate: float,
               steps: int) -> None:
        self._history[client_id] = compose(self._history.get(client_id, []),
                                           noise_multiplier=noise_multiplier,
                                           sample_rate=sample_rate, steps=steps)

    def history(self, client_id: str) -> list[Mechanism]:
        return list(self._history.get(client_id, []))

    def epsilon(self, client_id: str, *, delta: float, accountant: str = "prv") -> float:
        return epsilon(self._history.get(client_id, []), delta=delta, accountant=accountant)


@dataclass
class DpSgdRun:
    """What one call of :func:`dp_train` did (the losses stay on the device)."""

    sample_rate: float
    steps: int
    losses: list[float]
    batch_sizes: list[int]


def per_sample_loss(model: torch.nn.Module, batch: torch.Tensor,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss of each block over its scored tokens: ``(B, T)`` ids -> ``(B,)``.

    ``labels`` are Hugging Face labels (``-100`` where nothing is scored: prompts, padding);
    ``None`` scores every token. For plain-text blocks ``mean()`` of this equals the
    ``labels=`` loss, so the DP and non-DP paths optimise the same objective; for chat blocks
    each block weighs its own response tokens equally (a block is the DP sample).
    """
    import torch.nn.functional as F

    n, t = batch.shape
    logits = model(input_ids=batch).logits  # (B, T, V)
    # Shift the labels, not the logits: a (B, T-1, V) slice or a class-dim transpose would
    # copy the logits (3x slower loss at V = 49k, measured). The last position is ignored.
    source = batch if labels is None else labels
    shifted = F.pad(source[:, 1:], (0, 1), value=-100)  # (B, T)
    loss = F.cross_entropy(logits.reshape(n * t, -1), shifted.reshape(-1), reduction="none")
    if labels is None:
        return loss.view(n, t).sum(dim=1) / (t - 1)  # (B,)
    counts = (shifted != -100).sum(dim=1).clamp(min=1)  # (B,)
    return loss.view(n, t).sum(dim=1) / counts  # (B,)


def dp_train(
    model: torch.nn.Module,
    blocks: Blocks | npt.NDArray[np.int64],
    optimizer: torch.optim.Optimizer,
    *,
    settings: DpSgdSettings,
    batch_size: int,
    steps: int,
    seed: int | None = None,
    on_step: Callable[[Any, torch.Tensor], None] | None = None,
) -> DpSgdRun:
    """Run ``steps`` DP-SGD steps of ``optimizer`` (over the model's trainable tensors).

    Opacus's hooks are attached to ``model`` itself (non-wrapping mode, no
    ``GradSampleModule``) for this call only and removed on the way out, exceptions
    included: the PEFT model keeps its type and state-dict keys, and nothing accumulates
    when the same model serves many rounds and simulated clients.

    ``seed`` (tests and benchmarks only) fixes the batch draws and the noise; ``None`` draws
    them from OS entropy. ``on_step(dp_optimizer, batch)`` is called after each step, before
    the per-sample state is cleared (tests inspect it).
    """
    import torch
    from opacus.data_loader import DPDataLoader
    from opacus.grad_sample import prepare_module
    from opacus.optimizers import get_optimizer_class
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    from kernels.data.blocks import Blocks

    trainable = [p for p in model.parameters() if p.requires_grad]
    _check_model(model, trainable, optimizer)
    # Plain-text blocks score every token; chat blocks carry labels (-100 off the answers).
    columns = ((torch.from_numpy(blocks.ids), torch.from_numpy(blocks.labels()))
               if isinstance(blocks, Blocks) and not blocks.every_token_scored
               else (torch.from_numpy(blocks.ids if isinstance(blocks, Blocks) else blocks),))
    q = poisson_sample_rate(batch_size, len(blocks))
    # Divisor of the noisy sum: the expected batch q*N, never the drawn size (data-dependent).
    expected_batch = min(batch_size, len(blocks))
    device = trainable[0].device  # one device: _check_model made sure
    sampler_rng, noise_rng = _generators(seed, noise_device=device)
    loader = DPDataLoader(torch.utils.data.TensorDataset(*columns),
                          sample_rate=q, generator=sampler_rng)
    mode = settings.grad_sample_mode
    ghost = mode == "ghost"
    extra = {"max_grad_norm": settings.max_grad_norm} if ghost else {}
    with warnings.catch_warnings():
        # The first LoRA layers' inputs need no grad (frozen base): their full backward
        # hooks see output gradients only, which is all Opacus uses.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        # Backward runs on the SUM of the per-block losses, so the hooks see each block's own
        # gradient with no rescaling by the drawn batch size (Opacus's "mean" multiplies
        # every backprop by it: ~4 % of a SmolLM2 step). The optimizer's "mean" then divides
        # the noisy sum by the expected batch.
        hooks = prepare_module(model, mode, wrap_model=False, batch_first=True,
                               loss_reduction="sum", **extra)
        try:
            dp_optimizer = get_optimizer_class(clipping="flat", distributed=False,
                                               grad_sample_mode=mode)(
                optimizer, noise_multiplier=settings.noise_multiplier,
                max_grad_norm=settings.max_grad_norm, expected_batch_size=expected_batch,
                loss_reduction="mean", generator=noise_rng, secure_mode=False,
            )
            hooks.forbid_grad_accumulation()  # Poisson batches: one backward per step
            model.train()
            run = DpSgdRun(sample_rate=q, steps=steps, losses=[], batch_sizes=[])
            for _, (batch, *labels) in zip(range(steps), _cycle(loader), strict=False):
                run.batch_sizes.append(len(batch))
                if len(batch) == 0:
                    # The mechanism still releases sum(nothing) + noise, as accounted for.
                    _empty_step(trainable, ghost=ghost)
                else:
                    losses = per_sample_loss(model, batch.to(device),
                                             *(t.to(device) for t in labels))  # (B,)
                    if ghost:
                        # Two backward passes: norms, then the clipped-weighted loss.
                        dp_loss = DPTensorFastGradientClipping(hooks, dp_optimizer, losses, "sum")
                        dp_loss.backward()
                    else:
                        losses.sum().backward()  # type: ignore[no-untyped-call]
                    run.losses.append(float(losses.detach().mean()))
                dp_optimizer.step()
                if on_step is not None:
                    on_step(dp_optimizer, batch)
                dp_optimizer.zero_grad(set_to_none=True)
        finally:
            hooks.cleanup()
            _strip_opacus_state(model)
            model.eval()
    return run


def _cycle(loader: Any) -> Iterator[Any]:
    while True:  # each pass draws 1/q fresh Poisson batches
        yield from loader


def _empty_step(trainable: Sequence[torch.nn.Parameter], *, ghost: bool) -> None:
    """Per-sample state of an empty batch: the optimizer then adds noise to a zero sum."""
    import torch

    for p in trainable:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros(  # type: ignore[attr-defined]  # Opacus's attribute
                (0, *p.shape), dtype=p.dtype, device=p.device)


def _strip_opacus_state(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None
        for attr in _OPACUS_PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
    for module in model.modules():
        for attr in _OPACUS_MODULE_ATTRS:
            if attr in module.__dict__:
                delattr(module, attr)


def _check_model(model: torch.nn.Module, trainable: Sequence[torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer) -> None:
    """Guards for opacus#820 (LoRA silently never updated under DP).

    There, the base was not on its device when ``get_peft_model`` ran, and lazy device
    handling materialised parameters after Opacus had hooked and the optimizer had bound
    them, so the optimizer stepped stale tensors. Our base is loaded eagerly on CPU by
    ``load_causal_lm`` (no ``device_map``, no meta tensors), ``attach_lora`` wraps it there
    and nothing moves it later, so the order is right; these checks keep it so.
    """
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or any(p.is_meta for p in model.parameters()):
        raise ValueError(
            f"DP-SGD needs every parameter materialised on one device, got "
            f"{sorted(str(d) for d in devices)}: move the base to its device before attaching "
            "LoRA (opacus#820)"
        )
    bound = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not trainable or bound != {id(p) for p in trainable}:
        raise ValueError(
            f"the optimizer must hold exactly the model's {len(trainable)} trainable (LoRA) "
            f"tensors, it holds {len(bound)}: build it from the model after attaching LoRA"
        )


def _generators(seed: int | None, *, noise_device: torch.device | None = None
                ) -> tuple[torch.Generator, torch.Generator]:
    """Independent generators for the batch draws (on the CPU, where the loader samples)
    and the noise (on the parameters' device, where Opacus draws it)."""
    import torch

    if seed is None:
        states = [secrets.randbits(63) for _ in range(2)]
    else:
        states = [int(s) for s in np.random.SeedSequence(seed).generate_state(2, np.uint64)]
    out = []
    for state, device in zip(states, ("cpu", noise_device or "cpu"), strict=True):
        gen = torch.Generator(device=device)
        gen.manual_seed(state)
        out.append(gen)
    return out[0], out[1]
