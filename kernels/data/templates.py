"""Rendering conversations for training: the tokenizer's chat template, and where the
response is.

A chat example is rendered to one string with the model's own chat template (what it saw in
instruction tuning, e.g. SmolLM2-Instruct's ``<|im_start|>role ... <|im_end|>``), or, when
the tokenizer has none, with a documented Alpaca-style template (:data:`ALPACA`). Along with
the text come the character spans of every assistant turn (its content and end-of-turn
marker): only the tokens inside them are trained (TRL's completion-only loss, FlowerTune's
convention), the prompt is context.

The spans come from rendering prefixes: for the assistant turn ``i``, ``render(turns[:i],
add_generation_prompt=True)`` ends where the answer starts and ``render(turns[:i+1])`` ends
where it ends. A template that is not prefix-stable (it rewrites earlier turns when later
ones are added) is refused with a clear error rather than trained on wrong spans.

We render Jinja ourselves, as ``transformers.apply_chat_template`` does (same sandbox and
options), because edge devices have no transformers and both kinds of device must cut
identical tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args

from kernels.data.examples import Example, Turn

TemplateChoice = Literal["auto", "alpaca"]
TEMPLATE_CHOICES: tuple[TemplateChoice, ...] = get_args(TemplateChoice)

#: The fallback for tokenizers without a chat template (Alpaca's prompt, as FlowerTune uses
#: it). Multi-turn chats repeat the instruction/response pair; a system turn is the preamble.
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.")
ALPACA = {"instruction": "### Instruction:\n{content}\n\n",
          "response_prompt": "### Response:\n",
          "response_end": "{eos}\n\n"}


class TemplateError(ValueError):
    """The chat template cannot render this conversation; the message says what to do."""


@dataclass(frozen=True)
class Rendered:
    """A rendered example: its text and the ``[start, end)`` character spans to train on."""

    text: str
    spans: tuple[tuple[int, int], ...]


class PromptTemplate:
    """Renders :class:`~kernels.data.examples.Example` s for one tokenizer.

    ``chat_template`` is the Jinja source (None: use Alpaca); ``eos_token`` / ``bos_token``
    are the tokenizer's special tokens as strings (the template refers to them).
    """

    def __init__(self, chat_template: str | None, *, eos_token: str, bos_token: str = ""
                 ) -> None:
        self.source = chat_template
        self.eos_token, self.bos_token = eos_token, bos_token
        self._compiled = _compile(chat_template) if chat_template else None

    @property
    def name(self) -> str:
        return "chat template" if self._compiled is not None else "alpaca"

    @classmethod
    def for_tokenizer(cls, tokenizer_dir: Path, choice: TemplateChoice = "auto"
                      ) -> PromptTemplate:
        """The template of the tokenizer saved in ``tokenizer_dir``: its chat template
        (``chat_template.jinja`` or ``tokenizer_config.json``) unless ``choice`` is
        ``"alpaca"`` or it has none."""
        if choice not in TEMPLATE_CHOICES:
            raise TemplateError(f"template {choice!r}: must be one of {list(TEMPLATE_CHOICES)}")
        config = _tokenizer_config(Path(tokenizer_dir))
        eos, bos = _token_text(config.get("eos_token")), _token_text(config.get("bos_token"))
        if not eos:
            raise TemplateError(f"{tokenizer_dir}: the tokenizer has no eos_token; chat and "
                                "instruction data need one to end each answer")
        source = None if choice == "alpaca" else _chat_template_source(Path(tokenizer_dir),
                                                                       config)
        return cls(source, eos_token=eos, bos_token=bos)

    def render(self, example: Example) -> Rendered:
        """The example's text and the spans to train on (all of a plain document)."""
        if example.text is not None:
            return Rendered(example.text, ((0, len(example.text)),))
        if self._compiled is None:
            return self._alpaca(example.turns)
        full = self._jinja(example.turns, generation_prompt=False)
        spans = []
        for i, turn in enumerate(example.turns):
            if turn.role != "assistant":
                continue
            prompt = self._jinja(example.turns[:i], generation_prompt=True)
            upto = self._jinja(example.turns[: i + 1], generation_prompt=False)
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise TemplateError(
                    "the tokenizer's chat template renders earlier turns differently as a "
                    "conversation grows, so the response tokens cannot be located; set "
                    "data.template = 'alpaca'")
            spans.append((len(prompt), len(upto)))
        return Rendered(full, tuple(spans))

    def prompt(self, turns: Sequence[Turn]) -> str:
        """The text a model continues to answer ``turns`` (generation prompt included)."""
        if self._compiled is None:
            return self._alpaca(tuple(turns), generation_prompt=True).text
        return self._jinja(tuple(turns), generation_prompt=True)

    def _jinja(self, turns: Sequence[Turn], *, generation_prompt: bool) -> str:
        assert self._compiled is not None
        try:
            return str(self._compiled.render(
                messages=[{"role": t.role, "content": t.content} for t in turns],
                add_generation_prompt=generation_prompt, bos_token=self.bos_token,
                eos_token=self.eos_token))
        except Exception as err:  # jinja raises its own types, and raise_exception() ours
            raise TemplateError(f"the chat template failed on this conversation ({err}); "
                                "check the roles' order or set data.template = 'alpaca'"
                                ) from None

    def _alpaca(self, turns: Sequence[Turn], *, generation_prompt: bool = False) -> Rendered:
        system = [t.content for t in turns if t.role == "system"]
        text = (system[0] if system else ALPACA_PREAMBLE) + "\n\n"
        spans = []
        for turn in turns:
            if turn.role == "user":
                text += ALPACA["instruction"].format(content=turn.content)
            elif turn.role == "assistant":
                text += ALPACA["response_prompt"]
                start = len(text)
                text += turn.content + ALPACA["response_end"].format(eos=self.eos_token)
                spans.append((start, len(text) - 2))  # the answer and EOS, not the "\n\n"
        if generation_prompt:
            text += ALPACA["response_prompt"]
        return Rendered(text, tuple(spans))


@lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    from jinja2.exceptions import TemplateError as JinjaTemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent,
                                                                  ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except JinjaTemplateError as err:
        raise TemplateError(f"the tokenizer's chat template does not compile ({err}); set "
                            "data.template = 'alpaca'") from None


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise TemplateError(f"{path}: not valid JSON ({err})") from None
    return config if isinstance(config, dict) else {}


def _token_text(value: Any) -> str:
    """A special token as a string (configs store a string or an AddedToken dict)."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value) if value else ""


def _chat_template_source(folder: Path, config: dict[str, Any]) -> str | None:
    """``chat_template.jinja`` (transformers 5 saves it there), else the config's entry
    (a string, or a list of named templates of which 'default' is used)."""
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    entry = config.get("chat_template")
    if isinstance(entry, list):
        named = {t.get("name"): t.get("template") for t in entry if isinstance(t, dict)}
        entry = named.get("default")
    return entry if isinstance(entry, str) and entry else None
