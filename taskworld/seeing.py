"""An auxiliary lesson in seeing: name the item just placed from the frames alone (`--see W`).

Why: at a right placement the item the model should name follows from counting the steps in the
dialogue, so the LM loss there teaches counting, not looking; only the few wrong items (a
correction) need the frames, and the lite model learned to miss them (docs/taskworld.md). A linear
probe names the item placed in 0.85 of placements from the frame minus the frame before the reach,
0.22 from the frame alone (scripts/item_probe.py): the model must compare frames to see it.

So, on each step with frames, the window's frames go through the LM a second time with no text at
all (no dialogue to count from), and a linear head on the last token of each frame at a placement
(the placement's frame and the next) is trained to name the item placed, right or wrong. The
projector and the LoRA learn to compare frames; the head is thrown away (training only, the shipped
model keeps the ProAssist layout). Placements whose frame before the reach is outside the window
are not labelled (nothing to compare with).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LABELLED_FRAMES = 2  # the placement's frame and the one after it


def placements(metadata: dict[str, Any]) -> list[tuple[int, int, str]]:
    """(frame before the reach, frame of the placement, item) of every item placed, right or wrong."""
    out = [(int(s["start_frame"]) - 1, int(s["placed_frame"]), str(s["item"])) for s in metadata["steps"]]
    # a wrong item's reach is not recorded: the hand takes about 4 frames (render.py's reach)
    out += [(int(m["placed_frame"]) - 4, int(m["placed_frame"]), str(m["item"]))
            for m in metadata.get("mistakes", [])]
    return out


class SeeingLoss(nn.Module):
    """Cross-entropy of the item placed, from a frames-only pass of the LM (module docstring)."""

    def __init__(self, width: int, metadata: list[dict[str, Any]], layer: int = 0) -> None:
        """LAYER: the decoder layer whose output the head reads (transformers' hidden_states[LAYER];
        the last layer's is after the final norm, what the LM head reads; 0: that one)."""
        super().__init__()
        self.layer = layer
        self.items = sorted({item for m in metadata for _, _, item in placements(m)})
        index = {item: i for i, item in enumerate(self.items)}
        # per episode: {frame: (frame before the reach, item class)}
        self.labels: list[dict[int, tuple[int, int]]] = []
        for m in metadata:
            lab: dict[int, tuple[int, int]] = {}
            for before, placed, item in placements(m):
                for f in range(placed, placed + LABELLED_FRAMES):
                    lab[f] = (before, index[item])
            self.labels.append(lab)
        self.head = nn.Linear(width, len(self.items))

    def targets(self, index: int, frames: torch.Tensor) -> tuple[list[int], list[int]]:
        """(positions in FRAMES, item classes) of the labelled frames whose comparison frame is in it."""
        first = int(frames[0]) if len(frames) else 0
        pos, cls = [], []
        for k, f in enumerate(frames.tolist()):
            hit = self.labels[index].get(f)
            if hit is not None and hit[0] >= first:
                pos.append(k)
                cls.append(hit[1])
        return pos, cls

    def forward(self, llm: Any, tokens: torch.Tensor, index: int, frames: torch.Tensor
                ) -> torch.Tensor | None:
        """TOKENS (F, I, H): the window's projected frame tokens. None when nothing is labelled."""
        pos, cls = self.targets(index, frames)
        if not pos:
            return None
        n, per, width = tokens.shape
        out = llm.model(inputs_embeds=tokens.reshape(1, n * per, width), use_cache=False,
                        output_hidden_states=bool(self.layer))
        h = out.hidden_states[self.layer] if self.layer else out.last_hidden_state
        last = torch.tensor(pos) * per + per - 1  # each labelled frame's last token
        return F.cross_entropy(self.head(h[0, last]), torch.tensor(cls))


def placement_replies(metadata: dict[str, Any]) -> dict[int, float]:
    """{frame of the reference's reply to a placement: 1.0 where the item was wrong (a correction),
    0.0 where it was right (a confirmation or the finish)}."""
    return {int(e["frame"]): float(e["type"] == "correct") for e in metadata["events"]
            if e["type"] in ("confirm_next", "finish", "correct")}


class WrongItemLoss(nn.Module):
    """`--ask W`: the question a reply needs, asked in the streaming context. At the frame of the
    reference's reply to each placement (a confirmation or a correction) a linear head on decoder
    layer `layer`'s output, normalised, says whether the item just placed was the wrong one (BCE,
    the wrong ones weighed as much as the right ones in all). Unlike `SeeingLoss` there is no second pass:
    the dialogue is in context, so the answer is "the item seen is not the one asked for", which
    is what the words of a correction need. Training only; the head is not saved."""

    def __init__(self, width: int, metadata: list[dict[str, Any]], layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.labels = [placement_replies(m) for m in metadata]
        wrong = sum(v for lab in self.labels for v in lab.values())
        right = sum(len(lab) for lab in self.labels) - wrong
        self.pos_weight = torch.tensor(right / max(wrong, 1.0))
        self.head = nn.Linear(width, 1)

    def forward(self, hidden: torch.Tensor, index: int, frames: torch.Tensor, frame_last: torch.Tensor
                ) -> torch.Tensor | None:
        """HIDDEN (S, H): layer `layer`'s output of one sequence. None when nothing is labelled."""
        lab = self.labels[index]
        hits = [(k, lab[f]) for k, f in enumerate(frames.tolist()) if f in lab]
        if not hits:
            return None
        h = hidden[frame_last[[k for k, _ in hits]]]
        # normalised first: on layer 22's raw state a fresh head's answers cost a BCE of 33 at
        # the third step, and a 45-minute run spent itself settling that scale (docs/taskworld.md)
        z = self.head(F.layer_norm(h, h.shape[-1:])).squeeze(-1)
        return F.binary_cross_entropy_with_logits(z, torch.tensor([y for _, y in hits]),
                                                  pos_weight=self.pos_weight)
