"""What one training example is: a plain document, or a conversation with roles.

Instruction data (Alpaca's ``instruction``/``input``/``output``, or ``prompt``/``response``)
becomes a two-turn conversation, so every supervised layout is trained the same way: the
prompt is context, the loss falls on the assistant's turns only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = get_args(Role)


@dataclass(frozen=True)
class Turn:
    """One message of a conversation (OpenAI's ``{"role", "content"}``)."""

    role: Role
    content: str


@dataclass(frozen=True)
class Example:
    """A plain document (``text``, every token trained) or a conversation (``turns``, the
    assistant's turns trained). Exactly one of the two is set."""

    text: str | None = None
    turns: tuple[Turn, ...] = ()

    def __post_init__(self) -> None:
        if (self.text is None) == (not self.turns):
            raise ValueError("an Example is either a document (text) or a conversation "
                             "(turns), not both or neither")

    @property
    def is_chat(self) -> bool:
        return self.text is None

    @property
    def prompt_turns(self) -> tuple[Turn, ...]:
        """The conversation up to (not including) its last assistant turn: a generation
        prompt whose reference answer is :attr:`reference`."""
        last = max(i for i, t in enumerate(self.turns) if t.role == "assistant")
        return self.turns[:last]

    @property
    def reference(self) -> str:
        """The last assistant turn's text (what a generation is scored against)."""
        return next(t.content for t in reversed(self.turns) if t.role == "assistant")

    def to_json(self) -> dict[str, Any]:
        """The canonical row: ``{"text": ...}`` or ``{"messages": [...]}`` (what simulated
        devices' files hold, and what :mod:`kernels.data.formats` reads back)."""
        if self.text is not None:
            return {"text": self.text}
        return {"messages": [{"role": t.role, "content": t.content} for t in self.turns]}


def chat(*turns: tuple[str, str]) -> Example:
    """``chat(("user", "hi"), ("assistant", "hello"))``: a conversation, roles checked."""
    return Example(turns=tuple(Turn(role, content) for role, content in turns))  # type: ignore[arg-type]


def instruction(instruction: str, output: str, input: str = "", system: str = "") -> Example:
    """An Alpaca row as a conversation: the input (if any) follows the instruction after a
    blank line, as in Alpaca's own prompt; the output is the assistant's turn."""
    user = f"{instruction}\n\n{input}" if input else instruction
    turns = [Turn("system", system)] if system else []
    return Example(turns=(*turns, Turn("user", user), Turn("assistant", output)))
