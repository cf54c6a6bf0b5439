"""One decoder for every plain greedy generation of a bundle (benchmarks, text-only replies).

`greedy_generate` (runtime/core.py) made a decoder per call: under CUDA or TensorRT that is a
new pair of capacity-sized KV buffers on the device each time. `GreedyGenerator` makes one on
its first call, resets it for each next one, and closes it when done.
"""

from __future__ import annotations

from proassist_edge.runtime.backend import Decoder
from proassist_edge.runtime.bundle import Bundle
from proassist_edge.runtime.core import greedy_generate


class GreedyGenerator:
    """greedy_generate on one decoder kept across calls. Its capacity is the bundle's
    max_seq_len (or a longer request's, which replaces it once)."""

    def __init__(self, bundle: Bundle) -> None:
        self.b = bundle
        self.dec: Decoder | None = None
        self.made = 0  # decoders made: one, unless a request outgrew it

    def __call__(self, prompt: list[int], max_new: int, eos: int | None = None) -> list[int]:
        need = len(prompt) + max_new + 1
        if self.dec is None or self.dec.capacity < need:
            self.close()
            self.dec = self.b.new_decoder(max(need, self.b.manifest.model.max_seq_len))
            self.made += 1
        return greedy_generate(self.b, prompt, max_new, eos, decoder=self.dec)

    def close(self) -> None:
        """Free the decoder (a TensorRT decoder's device buffers at once)."""
        dec, self.dec = self.dec, None
        if dec is not None and (close := getattr(dec, "close", None)) is not None:
            close()

    def __enter__(self) -> GreedyGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
