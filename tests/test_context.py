"""The rolling memory's rules (runtime/context.py) and the reply cleanup, on hand-built values:
the authors' `manage_kv_cache` and `cleanup_text` as numbers and strings."""

from __future__ import annotations

import pytest

from proassist_edge.chat import CHATML, LLAMA3
from proassist_edge.runtime.context import (
    ContextStrategy,
    Reduction,
    find_knowledge,
    reduction,
    resume_content,
)
from proassist_edge.runtime.prompt import StreamSettings, decide_talk

S = dict(max_seq_len=4096, reserve=128, tail=512)


@pytest.mark.parametrize("strategy", list(ContextStrategy))
def test_nothing_happens_below_the_reduction_point(strategy: ContextStrategy) -> None:
    assert reduction(3967, 100, strategy, **S) is None  # 4096 - 128 - 1
    assert reduction(3968, 100, strategy, **S) is not None  # reached: >=, after the step


def test_drop_all_and_summarize_name_themselves() -> None:
    assert reduction(4000, 100, "drop_all", **S) == Reduction(ContextStrategy.DROP_ALL)
    assert reduction(4000, None, "summarize_and_drop", **S) == Reduction(
        ContextStrategy.SUMMARIZE_AND_DROP
    )


def test_drop_middle_keeps_prefix_and_the_last_positions_after_it() -> None:
    got = reduction(4000, 300, "drop_middle", **S)
    assert got == Reduction(ContextStrategy.DROP_MIDDLE, (300, 4000 - 512, 4000))
    # a prefix reaching into the tail: the kept span starts after the prefix
    assert reduction(4000, 3700, "drop_middle", **S) == Reduction(
        ContextStrategy.DROP_MIDDLE, (3700, 3700, 4000)
    )


def test_drop_middle_without_prefix_drops_all_and_a_short_cache_is_kept() -> None:
    assert reduction(4000, None, "drop_middle", **S) == Reduction(ContextStrategy.DROP_ALL)
    small = dict(max_seq_len=600, reserve=128, tail=512)
    assert reduction(500, 10, "drop_middle", **small) is None  # 500 >= 472 but < 512: no need
    assert reduction(520, 10, "drop_middle", **small) == Reduction(
        ContextStrategy.DROP_MIDDLE, (10, 10, 520)
    )


def test_resume_message_joins_parts_with_single_spaces() -> None:
    assert resume_content("Sys.", "Done two.", "Task knowledge: x") == "Sys. Done two. Task knowledge: x"
    assert resume_content("", "Done two.", "") == "Done two."
    assert resume_content("Sys.", "", "") == "Sys. "  # the formatter strips the ends
    assert resume_content("Sys.", "", "K") == "Sys.  K"  # as the authors join an empty summary


def test_knowledge_is_the_last_system_message_that_holds_it_in_the_first_step_with_one() -> None:
    msgs = [("user", "Task knowledge: no"), ("system", "hello"), ("system", "Task knowledge: a"),
            ("system", "Task knowledge: b"), ("user", "Task knowledge: no")]
    assert find_knowledge("", msgs) == "Task knowledge: b"  # the authors' loop does not break
    assert find_knowledge("Task knowledge: old", msgs) == "Task knowledge: old"
    assert find_knowledge("", [("system", "Steps: 1. red")]) == ""


def test_threshold_at_or_below_zero_lets_the_model_choose() -> None:
    s = StreamSettings(threshold=0.0)
    assert decide_talk(0.9, None, s, lambda: True) and not decide_talk(0.1, None, s, lambda: False)
    s = StreamSettings(threshold=0.5)
    assert decide_talk(0.5, None, s, lambda: False)  # silent only when P > threshold
    assert not decide_talk(0.51, None, s, lambda: True)
    diff = StreamSettings(diff_margin=0.2)
    assert decide_talk(0.7, 0.95, diff) and not decide_talk(0.7, 0.8, diff)


@pytest.mark.parametrize(
    "decoded,text",
    [
        ("<|start_header_id|>assistant<|end_header_id|>\n\nAdd the rice.<|eot_id|>", "Add the rice."),
        ("<|start_header_id|>assistant<|end_header_id|>\n\nA.<|eot_id|>ignored", "A."),
        # after a header the text is returned as it is: "." is a reply, not silence
        ("<|start_header_id|>assistant<|end_header_id|>\n\n.<|eot_id|>", "."),
        # an empty message keeps its header: stripping took the header end's newlines
        ("<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>",
         "<|start_header_id|>assistant<|end_header_id|>"),
        ("<|eot_id|>", ""),
        ("junk<|start_header_id|>assistant<|end_header_id|>\n\nNext.", "Next."),
        ("<|begin_of_text|>No header <image>here.", "No header here."),
        ("  .  ", ""),
    ],
)
def test_llama3_reply_cleanup_is_the_authors(decoded: str, text: str) -> None:
    assert LLAMA3.reply_text(decoded) == text


def test_clean_up_spaces_is_hugging_faces_decode(tmp_path) -> None:
    """A reply decoded with clean_up_spaces equals transformers' decode followed by its
    clean_up_tokenization (what decode did with clean_up_tokenization_spaces=True in the
    authors' transformers 4.43; 5.x no longer applies it to BPE tokenizers), and the export reads
    the setting from the LLM folder's tokenizer_config.json."""
    transformers = pytest.importorskip("transformers")
    from dataclasses import replace

    from tokenizers import Tokenizer

    from proassist_edge.export.checkpoint import hf_clean_up_spaces
    from proassist_edge.export.fixture import llama3_tokenizer_json
    from proassist_edge.runtime.prompt import PromptBuilder

    path = llama3_tokenizer_json()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    pb = PromptBuilder(Tokenizer.from_file(str(path)), replace(LLAMA3, clean_up_spaces=True))
    text = ("<|start_header_id|>assistant<|end_header_id|>\n\nThe user 's bowl , the lid ' s "
            "edge ! Is it done ? We 're , they 've , I 'm and don 't : n't . Next .<|eot_id|>")
    ids = pb.ids(text)
    raw = hf.decode(ids)
    want = hf.clean_up_tokenization(raw)
    assert want != raw  # the example exercises it
    assert pb.reply_text(ids) == LLAMA3.reply_text(want)
    assert PromptBuilder(pb.tok, LLAMA3).reply_text(ids) == LLAMA3.reply_text(raw)
    assert not hf_clean_up_spaces(tmp_path)  # no tokenizer_config.json: off
    (tmp_path / "tokenizer_config.json").write_text('{"clean_up_tokenization_spaces": true}')
    assert hf_clean_up_spaces(tmp_path)


def test_chatml_reply_cleanup_needs_the_header_at_the_start() -> None:
    assert CHATML.reply_text("<|im_start|>assistant\nAdd it.<|im_end|>") == "Add it."
    assert CHATML.reply_text("Line one.\nLine two.<|im_end|>") == "Line one.\nLine two."
