"""The chat format as data: the special strings of the LLM the model was built on.

The released models use Llama-3's format; a model on another LLM (SmolLM2: ChatML) carries its own
strings in the manifest, and no code branches on the model name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ChatFormat:
    bos: str = "<|begin_of_text|>"
    message: str = "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"
    assistant_prefix: str = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    eos: str = "<|eot_id|>"
    not_talk: str = "<|eot_id|>"
    image: str = "<image>"
    summary_request: str = "Please summarize the progress."
    # The system message that restarts the context after summarize_and_drop.
    resume_system: str = "{system}\n\nProgress so far: {summary}\n\n{knowledge}"

    def render(self, role: str, content: str, with_bos: bool = False) -> str:
        text = self.message.format(role=role, content=content)
        return self.bos + text if with_bos else text

    def system_content(self, system: str, knowledge: str = "") -> str:
        return f"{system}\n\n{knowledge}" if knowledge else system

    def resume_content(self, system: str, summary: str, knowledge: str = "") -> str:
        return self.resume_system.format(
            system=system, summary=summary, knowledge=knowledge
        ).strip()

    def reply_text(self, decoded: str) -> str:
        """The spoken text of a decoded reply: the header the model wrote and the eos removed."""
        text = decoded
        if text.startswith(self.assistant_prefix):
            text = text[len(self.assistant_prefix) :]
        elif self.assistant_prefix.strip() and self.assistant_prefix.strip() in text[:64]:
            text = text.split(self.assistant_prefix.strip(), 1)[1]
        if text.endswith(self.eos):
            text = text[: -len(self.eos)]
        return text.strip()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatFormat:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


LLAMA3 = ChatFormat()
CHATML = ChatFormat(
    bos="",
    message="<|im_start|>{role}\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    eos="<|im_end|>",
    not_talk="<|im_end|>",
)
