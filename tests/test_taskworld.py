"""The procedural task world: determinism, split separation, dialogue alignment, nuisances, I/O."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from proassist_edge.errors import DataError
from proassist_edge.taskworld import (
    EpisodeRenderer,
    add_taskworld_parser,
    build_episode,
    generate_split,
    iter_episodes,
    make_episode,
    read_index,
    read_split,
    reference_per_frame,
    run_taskworld,
    task_pool,
)
from proassist_edge.taskworld.world import MAX_FRAMES, MIN_FRAMES


@pytest.fixture(scope="module")
def test_parts() -> list:
    # Dialogue and states only (nothing rendered): cheap enough for many episodes.
    return [build_episode("test", i) for i in range(20)] + [
        build_episode("train", i) for i in range(20)]


@pytest.fixture(scope="module")
def rendered() -> list:
    return list(iter_episodes("test", 4))


def test_same_seed_same_episode_other_seed_differs() -> None:
    a, b = make_episode("test", 3, seed=7), make_episode("test", 3, seed=7)
    assert np.array_equal(a.frames, b.frames)
    assert a.conversation == b.conversation and a.metadata == b.metadata
    c = make_episode("test", 3, seed=8)
    assert c.conversation != a.conversation or not np.array_equal(c.frames[:5], a.frames[:5])


def test_frames_render_alike_in_any_order() -> None:
    ep = make_episode("val", 1)
    lazy = EpisodeRenderer.from_world("val", 1)
    assert len(lazy) == ep.num_frames
    for i in (5, 0, ep.num_frames - 1, 5):
        assert np.array_equal(lazy(i), ep.frames[i])
    with pytest.raises(IndexError):
        lazy(ep.num_frames)
    assert np.array_equal(EpisodeRenderer(ep, loop=True)(ep.num_frames), ep.frames[0])


def test_test_split_uses_item_sets_never_seen_in_training(test_parts: list) -> None:
    pools = {s: {(f, c) for f, combos in task_pool(s).items() for c in combos}
             for s in ("train", "val", "test")}
    assert not pools["train"] & pools["test"]
    assert not pools["train"] & pools["val"] and not pools["val"] & pools["test"]
    assert all(len(pools[s]) >= 20 for s in pools)
    train_orders = {build_episode("train", i).metadata["task"] for i in range(60)}
    for p in test_parts[:20]:
        key = (p.metadata["family"], tuple(sorted(p.metadata["items"])))
        assert key in pools["test"]
        assert p.metadata["task"] not in train_orders
    with pytest.raises(DataError):
        task_pool("dev")


def test_frames_shape_dtype_and_length(rendered: list) -> None:
    for ep in rendered:
        assert ep.frames.dtype == np.uint8 and ep.frames.shape[1:] == (64, 64, 3)
        assert MIN_FRAMES <= ep.num_frames <= MAX_FRAMES
        assert ep.fps == 2
    big = make_episode("test", 0, size=128)
    assert big.frames.shape[1:] == (128, 128, 3)
    assert big.num_frames == rendered[0].num_frames


def test_frames_turns_tile_the_video_and_system_carries_knowledge(test_parts: list) -> None:
    for p in test_parts:
        conv, n = p.conversation, p.timeline.num_frames
        assert conv[0]["role"] == "system"
        assert p.metadata["knowledge"] in conv[0]["content"]
        assert conv[0]["content"].startswith("You are a helpful assistant")
        spans = [(t["start"], t["end"]) for t in conv if t["role"] == "frames"]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(spans))


def test_assistant_speaks_right_after_each_cue_frame(test_parts: list) -> None:
    for p in test_parts:
        tl, conv = p.timeline, p.conversation
        ref = reference_per_frame(conv, tl.num_frames)
        events = {e["frame"]: e for e in p.metadata["events"]}
        assert {i for i, t in enumerate(ref) if t} == set(events)  # once per event, nowhere else
        assert events[0]["type"] == "greet"
        for i, turn in enumerate(conv):
            if turn["role"] == "assistant":
                assert conv[i - 1]["role"] == "frames"
        for step in p.metadata["steps"]:
            f = step["placed_frame"]
            assert events[f]["type"] in ("confirm_next", "finish")
            # The cue: the item is at its slot on frame f, and was not on frame f - 1.
            assert (step["step"], step["item"]) in tl.states[f].placed
            assert (step["step"], step["item"]) not in tl.states[f - 1].placed
        assert events[p.metadata["steps"][-1]["placed_frame"]]["type"] == "finish"
        for m in p.metadata["mistakes"]:
            assert events[m["placed_frame"]]["type"] == "correct"
            assert m["item"] in events[m["placed_frame"]]["text"]  # names the wrong item
        frames = sorted(events)
        assert all(b - a >= 4 for a, b in itertools.pairwise(frames))  # one event per talk window


def test_user_question_is_answered_after_the_next_frame(test_parts: list) -> None:
    asked = 0
    for p in test_parts:
        conv = p.conversation
        for i, turn in enumerate(conv[2:], start=2):  # skip system and the optional opener
            if turn["role"] == "user":
                asked += 1
                nxt, answer = conv[i + 1], conv[i + 2]
                assert nxt["role"] == "frames" and nxt["end"] == nxt["start"] + 1
                assert answer["role"] == "assistant"
                assert nxt["start"] in p.metadata["question_frames"]
    assert asked >= 5


def test_paraphrases_vary_across_episodes(test_parts: list) -> None:
    by_type: dict[str, set[str]] = {}
    for p in test_parts:
        items = p.metadata["items"] + [m["item"] for m in p.metadata["mistakes"]]
        for e in p.metadata["events"]:
            text = e["text"]
            for word in sorted(set(items), key=len, reverse=True):
                text = re.sub(rf"\b{word}\b", "X", text)
            by_type.setdefault(e["type"], set()).add(text)
    for kind in ("greet", "confirm_next", "finish", "answer_next"):
        assert len(by_type[kind]) >= 4, (kind, by_type[kind])


def test_nuisances_are_present(rendered: list) -> None:
    for ep in rendered:
        states = build_episode("test", ep.metadata["index"]).timeline.states
        # Frames whose scene did not change (same items, hand at rest) still differ:
        # camera shake, light drift, sensor noise.
        still = [i for i in range(1, ep.num_frames)
                 if states[i].placed == states[i - 1].placed and states[i].held is None
                 and min(states[i].hand[1], states[i - 1].hand[1]) > 1.03]
        diffs = [np.abs(ep.frames[i].astype(int) - ep.frames[i - 1]).mean() for i in still]
        assert diffs and min(diffs) > 0.5
        means = ep.frames.reshape(ep.num_frames, -1).mean(axis=1)
        assert means.max() / means.min() > 1.03  # brightness drifts
        nz = ep.metadata["nuisances"]
        assert nz["distractors"] >= 1 and nz["max_shift_px"] > 0.5 and nz["noise_std"] > 1
    # Over an episode the hand occludes the work area now and then.
    parts = build_episode("test", 0)
    assert sum(0.2 < s.hand[0] < 0.8 and s.hand[1] < 0.9 for s in parts.timeline.states) >= 4


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    out = generate_split("val", tmp_path / "val", episodes=3, seed=5)
    index = read_index(out)
    assert [e["episode"] for e in index] == [f"val-s5-{i:04d}" for i in range(3)]
    assert set(index[0]) == {"episode", "dir", "task", "num_frames", "fps"}
    for ep, mem in zip(read_split(out), iter_episodes("val", 3, seed=5), strict=True):
        assert ep.uid == mem.uid and np.array_equal(ep.frames, mem.frames)
        assert ep.conversation == mem.conversation and ep.metadata == mem.metadata
        assert ep.reference() == mem.reference()
    meta = json.loads((out / index[0]["dir"] / "metadata.json").read_text())
    assert {"task_goal", "knowledge", "user_type", "steps", "seed", "split"} <= set(meta)
    (out / index[1]["dir"] / "frames.npy").unlink()
    with pytest.raises(DataError):
        list(read_split(out))
    with pytest.raises(DataError):
        read_index(tmp_path / "nowhere")


def test_reference_per_frame_places_turns_on_the_frame_they_follow() -> None:
    conv = [{"role": "system", "content": "s"}, {"role": "frames", "start": 0, "end": 1},
            {"role": "assistant", "content": "hi"}, {"role": "frames", "start": 1, "end": 4},
            {"role": "user", "content": "?"}, {"role": "frames", "start": 4, "end": 5},
            {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "frames", "start": 5, "end": 6}]
    assert reference_per_frame(conv, 6) == ["hi", "", "", "", "a b", ""]


def test_cli_generates_the_test_split_quickly(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_taskworld_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["taskworld", "generate", "--split", "test", "-o", str(tmp_path)])
    t0 = time.perf_counter()
    assert run_taskworld(args) == 0
    assert time.perf_counter() - t0 < 20
    assert len(read_index(tmp_path)) == 20
    assert "wrote 20 test episodes" in capsys.readouterr().out
