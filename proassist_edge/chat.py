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
    # Hugging Face's decode(clean_up_tokenization_spaces=True): the LLM folder's
    # tokenizer_config.json says it (Llama-3.1's did when the authors ran; SmolLM2's does not)
    clean_up_spaces: bool = False

    def render(self, role: str, content: str, with_bos: bool = False) -> str:
        text = self.message.format(role=role, content=content)
        return self.bos + text if with_bos else text

    def system_content(self, system: str, knowledge: str = "") -> str:
        return f"{system}\n\n{knowledge}" if knowledge else system

    @property
    def header(self) -> tuple[str, str]:
        """(header start, header end) around the role in `message`."""
        start, rest = self.message.split("{role}", 1)
        return start, rest.split("{content}", 1)[0]

    def reply_text(self, decoded: str) -> str:
        """The text of a decoded reply, cleaned as the authors' runner cleans it
        (`StreamProcessor.cleanup_text`): cut at the first eos, strip, drop bos and image
        tokens, return what follows the header the model wrote (as it is, even "."), and
        without a header "." alone is silence.

        A header end that is only whitespace (ChatML's newline) counts only after a header
        start at the beginning, so a multi-line reply without a header keeps its first line."""
        text = decoded.split(self.eos, 1)[0].strip()
        for token in (self.bos, self.image):
            if token:
                text = text.replace(token, "")
        start, end = self.header
        if end.strip() and end in text or (text.startswith(start) and end in text):
            return text.split(end, 1)[1]
        return "" if text == "." else text

    def decoded(self, text: str) -> str:
        """What Hugging Face's decode gives for the raw decoded TEXT under this format."""
        return clean_up_spaces(text) if self.clean_up_spaces else text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatFormat:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# transformers' `clean_up_tokenization`, the same ten replacements in the same order; written
# here because the runtime does not depend on transformers
_CLEAN_UP = (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), \
    (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")


def clean_up_spaces(text: str) -> str:
    """Drop the space before punctuation and English contractions, as Hugging Face's decode does
    with clean_up_tokenization_spaces (so "the user 's bowl ." becomes "the user's bowl.")."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


LLAMA3 = ChatFormat()
CHATML = ChatFormat(
    bos="",
    message="<|im_start|>{role}\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    eos="<|im_end|>",
    not_talk="<|im_end|>",
)
