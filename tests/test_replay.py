"""Episode loading and deterministic replay (library and CLI), including a graph that gives NaN."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from proassist_edge.errors import DataError
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.episode import episode_inputs, load_episode
from proassist_edge.runtime.messages import TextMessage
from proassist_edge.runtime.prompt import StreamSettings
from proassist_edge.runtime.replay import replay_episode

N, SIZE = 10, 32
SYSTEM, KNOWLEDGE = "You guide the user.", "1. Take the red block. 2. Put it on the base."
FRAME_KEYS = {"index", "t", "p_not_talk", "talk", "text", "token_ids", "context_len", "reset",
              "summary"}
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Help me build the tower."},
    {"role": "frames", "start": 0, "end": 4},
    {"role": "assistant", "content": "Take the red block."},
    {"role": "user", "content": "What's next?"},
    {"role": "frames", "start": 4, "end": 7},
    {"role": "system", "content": "The user looks lost."},
    {"role": "user", "content": "Hello?"},
    {"role": "frames", "start": 7, "end": N},
    {"role": "user", "content": "after the last frame"},
]
EXPECTED = [
    TextMessage("user", "Help me build the tower.", 0.0),
    TextMessage("user", "What's next?", 2.0),
    TextMessage("system", "The user looks lost.", 3.5),
    TextMessage("user", "Hello?", 3.5),
]


@pytest.fixture(scope="module")
def tiny(tiny_bundle) -> tuple[Path, float]:
    bundle, _, thr = tiny_bundle(1, "lm", 1)
    return bundle, thr


def pixels(n: int = N) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def write_episode(root: Path, frames: np.ndarray | None = None, conversation: object = None,
                  metadata: dict | None = None) -> Path:
    root.mkdir(parents=True)
    np.save(root / "frames.npy", pixels() if frames is None else frames)
    conv = CONVERSATION if conversation is None else conversation
    (root / "conversation.json").write_text(json.dumps(conv))
    meta = {"knowledge": KNOWLEDGE} if metadata is None else metadata
    (root / "metadata.json").write_text(json.dumps(meta))
    return root


# --- loading ---------------------------------------------------------------------------------
def test_load_episode_frames_npy_both_layouts(tmp_path: Path) -> None:
    nhwc = pixels()
    a = load_episode(write_episode(tmp_path / "a", nhwc))
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    b = load_episode(write_episode(tmp_path / "b", nchw))
    assert a.frames.shape == (N, SIZE, SIZE, 3) and a.frames.dtype == np.uint8
    np.testing.assert_array_equal(a.frames, nhwc)
    np.testing.assert_array_equal(b.frames, nhwc)
    inputs = episode_inputs(a)
    assert inputs.messages == EXPECTED and inputs.system == SYSTEM
    assert inputs.knowledge == KNOWLEDGE and a.fps == 2.0


def test_load_episode_image_folder(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    root = tmp_path / "ep"
    (root / "frames").mkdir(parents=True)
    frames = pixels(12)
    for i, img in enumerate(frames):  # frame_2 must come before frame_10
        cv2.imwrite(str(root / "frames" / f"frame_{i}.png"), img[:, :, ::-1])
    (root / "conversation.json").write_text(json.dumps({"conversation": CONVERSATION,
                                                        "metadata": {"knowledge": KNOWLEDGE}}))
    ep = load_episode(root)
    np.testing.assert_array_equal(ep.frames, frames)
    inputs = episode_inputs(ep)
    # a ProAssist sample's metadata knowledge is not fed: the authors' runner feeds the dialogue
    assert inputs.messages == EXPECTED and inputs.knowledge == "" and inputs.system == SYSTEM


def test_knowledge_already_in_the_system_turn_is_not_doubled(tmp_path: Path) -> None:
    conv = [{"role": "system", "content": f"{SYSTEM}\n\n{KNOWLEDGE}"}, *CONVERSATION[1:]]
    ep = load_episode(write_episode(tmp_path / "ep", conversation={"conversation": conv,
                                                                   "fps": 4}))
    inputs = episode_inputs(ep)
    assert (inputs.system, inputs.knowledge, ep.fps) == (SYSTEM, KNOWLEDGE, 4.0)
    assert [m.t for m in inputs.messages] == [0.0, 1.0, 1.75, 1.75]


def test_bad_episodes_raise_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        load_episode(tmp_path / "missing")
    with pytest.raises(DataError):
        load_episode(write_episode(tmp_path / "f", pixels().astype(np.float32)))
    with pytest.raises(DataError):
        load_episode(write_episode(tmp_path / "r", conversation=[{"role": "robot"}]))


# --- replay ----------------------------------------------------------------------------------
def frame_records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e["type"] == "frame":
            out.append({k: v for k, v in e.items() if k not in ("t_wall", "step_ms")})
    return out


def test_replay_writes_every_frame_and_is_deterministic(tiny, tmp_path: Path) -> None:
    bundle, thr = tiny
    ep = write_episode(tmp_path / "ep")
    opts = {"threshold": thr, "max_reply_tokens": 4}
    first = replay_episode(bundle, ep, opts, tmp_path / "a.jsonl")
    second = replay_episode(bundle, ep, opts, tmp_path / "b.jsonl")
    a, b = frame_records(tmp_path / "a.jsonl"), frame_records(tmp_path / "b.jsonl")
    assert len(a) == N and [r["index"] for r in a] == list(range(N))
    assert all(FRAME_KEYS <= r.keys() for r in a)
    assert [r["t"] for r in a] == [i / 2 for i in range(N)]
    assert a == b and first == second
    assert 0 < sum(r["talk"] for r in a) < N, "the fixture threshold gives a mix"
    # The same as driving the core directly with the episode's opening and messages.
    episode = load_episode(ep)
    core = StreamCore(open_bundle(bundle), StreamSettings(threshold=thr, max_reply_tokens=4),
                      SYSTEM, KNOWLEDGE)
    assert list(core.replay(episode.frames, episode_inputs(episode).messages)) == first


def test_replay_cli(tiny, tmp_path: Path, capsys) -> None:
    from proassist_edge.cli import main

    bundle, thr = tiny
    ep = write_episode(tmp_path / "ep")
    out = tmp_path / "out.jsonl"
    rc = main(["replay", str(bundle), "--episode", str(ep), "--events", str(out),
               "--threshold", str(thr), "--max-reply-tokens", "4", "--context", "drop_all",
               "--max-seq-len", "200"])
    assert rc == 0
    assert len(frame_records(out)) == N
    assert f"replayed {N} frames" in capsys.readouterr().out
    rc = main(["replay", str(tmp_path / "nobundle"), "--episode", str(ep), "--events", str(out)])
    assert rc == 1 and "not a bundle" in capsys.readouterr().err


@pytest.mark.parametrize("decoder", ["decoder", "decoder_gqa"])
def test_nan_from_a_real_graph_skips_only_that_frame(tiny, tmp_path: Path, decoder: str) -> None:
    """Embedding row of a token set to NaN: the step with that message is rolled back; the frames
    after it are exactly those of a run that never had the message at all."""
    from proassist_edge.manifest import sha256_file

    bundle, thr = tiny
    poison = "Xylophone quokka"
    token = open_bundle(bundle).tokenizer.encode(poison, add_special_tokens=False).ids[-1]
    nan = tmp_path / "nan"
    shutil.copytree(bundle, nan)
    table = np.load(nan / "embeddings.npy")
    table[token] = np.nan
    np.save(nan / "embeddings.npy", table)
    manifest = json.loads((nan / "manifest.json").read_text())
    manifest["files"]["embeddings.npy"] = sha256_file(nan / "embeddings.npy")
    (nan / "manifest.json").write_text(json.dumps(manifest))

    conv = [CONVERSATION[0], {"role": "frames", "start": 0, "end": 3},
            {"role": "user", "content": poison}, {"role": "frames", "start": 3, "end": N}]
    ep = write_episode(tmp_path / "ep", conversation=conv)
    opts = {"threshold": thr, "max_reply_tokens": 4}
    got = replay_episode(nan, ep, opts, tmp_path / "nan.jsonl", decoder)
    records = frame_records(tmp_path / "nan.jsonl")
    assert len(records) == N and records[3]["skipped"] and records[3]["p_not_talk"] is None
    assert np.isnan(got[3].p_not_talk) and not got[3].talk
    events = [json.loads(x) for x in (tmp_path / "nan.jsonl").read_text().splitlines()]
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["kind"] == "NonFiniteOutputError"
    # the reference: the same frames without the poisoned step (frame 3 and its message)
    core = StreamCore(open_bundle(bundle, decoder), StreamSettings(threshold=thr,
                                                                   max_reply_tokens=4),
                      SYSTEM, KNOWLEDGE)
    frames = load_episode(ep).frames
    ref = [core.step(frames[i : i + 1], i, i / 2) for i in range(N) if i != 3]
    kept = [r for r in got if r.index != 3]
    assert [r.token_ids for r in kept] == [r.token_ids for r in ref]
    assert [r.p_not_talk for r in kept] == pytest.approx([r.p_not_talk for r in ref], abs=1e-6)
