"""Episodes of the task world, in memory or written to disk as a split.

Splits differ in tasks, not only in seeds: every set of items (which blocks, which ingredients)
belongs to exactly one split, chosen by a stable hash, so the test split only has item
combinations (and hence orders) never seen in training. Everything follows from (split, seed,
index): the same call gives the same frames and words.

On disk, a split written to DIR is:
    DIR/index.jsonl                 one line per episode: {"episode": uid,
                                    "dir": "episodes/<uid>", "task", "num_frames", "fps": 2}
    DIR/split.json                  how it was made (split, seed, size, episodes)
    DIR/episodes/<uid>/frames.npy   uint8 (N, H, W, 3) RGB at 2 fps
    DIR/episodes/<uid>/conversation.json   ProAssist turns (see episode.py)
    DIR/episodes/<uid>/metadata.json       task_goal, knowledge, user_type, steps, events, seed...
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from proassist_edge.errors import DataError
from proassist_edge.runtime.episode import (  # noqa: F401 - the split readers, re-exported
    Episode,
    Turn,
    load_split_entry,
    read_index,
    read_split,
)
from proassist_edge.taskworld.dialogue import build_conversation
from proassist_edge.taskworld.render import Scene
from proassist_edge.taskworld.world import (
    FAMILY_ITEMS,
    FPS,
    MAX_STEPS,
    MIN_STEPS,
    USER_TYPES,
    VARIANTS,
    TaskSpec,
    Timeline,
    simulate,
)

SPLITS = ("train", "val", "test")
DEFAULT_EPISODES = {"train": 400, "val": 20, "test": 20}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_HELD_OUT = {"test": (0.0, 0.15), "val": (0.15, 0.25)}  # fractions of each family's item sets
_USER_TYPE_P = (0.4, 0.4, 0.2)


def _check_split(split: str) -> None:
    if split not in _SPLIT_CODE:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def _combo_key(family: str, combo: tuple[str, ...]) -> bytes:
    # sha256, not hash(): Python salts string hashes per process.
    return hashlib.sha256(f"{family}:{'-'.join(combo)}".encode()).digest()


@functools.cache
def task_pool(split: str) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Per family, the item sets (sorted tuples) that episodes of `split` may use."""
    _check_split(split)
    pool: dict[str, tuple[tuple[str, ...], ...]] = {}
    for family, items in FAMILY_ITEMS.items():
        combos = [c for r in range(MIN_STEPS, MAX_STEPS + 1)
                  for c in itertools.combinations(sorted(items), r)]
        combos.sort(key=functools.partial(_combo_key, family))
        cut = {name: (round(a * len(combos)), round(b * len(combos)))
               for name, (a, b) in _HELD_OUT.items()}
        if split == "train":
            taken = combos[cut["val"][1]:]
        else:
            taken = combos[cut[split][0] : cut[split][1]]
        pool[family] = tuple(taken)
    return pool


def episode_seed(split: str, index: int, seed: int = 0) -> int:
    _check_split(split)
    return int(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]).generate_state(1)[0])


def sample_task(split: str, rng: np.random.Generator) -> tuple[TaskSpec, str]:
    """A task from the split's pool (random layout and order) and a user type."""
    pool = task_pool(split)
    family = sorted(pool)[int(rng.integers(len(pool)))]
    combo = pool[family][int(rng.integers(len(pool[family])))]
    variants = sorted(k for k, v in VARIANTS.items() if v.family == family)
    variant = VARIANTS[variants[int(rng.integers(len(variants)))]]
    order = tuple(combo[i] for i in rng.permutation(len(combo)))
    user_type = USER_TYPES[int(rng.choice(len(USER_TYPES), p=_USER_TYPE_P))]
    return TaskSpec(variant, order), user_type


class EpisodeParts(NamedTuple):
    """An episode before its frames are rendered: `scene.render(i)` draws frame i."""

    uid: str
    timeline: Timeline
    scene: Scene
    conversation: list[Turn]
    metadata: dict[str, Any]


def build_episode(split: str, index: int, seed: int = 0, size: int = 64) -> EpisodeParts:
    """Episode `index` of `split` with its dialogue and metadata, no frame rendered yet."""
    es = episode_seed(split, index, seed)
    rng = np.random.default_rng([es, 0])
    spec, user_type = sample_task(split, rng)
    tl = simulate(spec, rng, user_type)
    conversation, events = build_conversation(tl, np.random.default_rng([es, 3]))
    scene = Scene(tl, es, size)
    metadata: dict[str, Any] = {
        "task": spec.task_id,
        "task_goal": spec.goal,
        "knowledge": spec.knowledge,
        "user_type": user_type,
        "family": spec.variant.family,
        "variant": spec.variant.key,
        "items": list(spec.items),
        "steps": tl.steps,
        "mistakes": tl.mistakes,
        "events": events,
        "question_frames": tl.question_frames,
        "handedness": "right" if tl.handedness > 0 else "left",
        "nuisances": {
            "distractors": scene.n_distractors,
            "max_shift_px": float(np.abs(scene.shake[:, :2]).max()),
            "max_rotation_deg": float(np.degrees(np.abs(scene.shake[:, 2]).max())),
            "brightness": [float(scene.brightness.min()), float(scene.brightness.max())],
            "noise_std": scene.noise,
        },
        "split": split,
        "split_seed": seed,
        "index": index,
        "seed": es,
        "fps": FPS,
        "size": size,
        "num_frames": tl.num_frames,
    }
    return EpisodeParts(f"{split}-s{seed}-{index:04d}", tl, scene, conversation, metadata)


def make_episode(split: str, index: int, seed: int = 0, size: int = 64) -> Episode:
    """Episode `index` of `split`, rendered in memory."""
    parts = build_episode(split, index, seed, size)
    return Episode(parts.uid, parts.scene.render_all(), parts.conversation, parts.metadata,
                   float(FPS))


def iter_episodes(split: str, n: int | None = None, seed: int = 0,
                  size: int = 64) -> Iterator[Episode]:
    """The first n episodes of a split (default: its usual size), one at a time, never on disk."""
    _check_split(split)
    for index in range(DEFAULT_EPISODES[split] if n is None else n):
        yield make_episode(split, index, seed, size)


def generate_split(split: str, out_dir: str | Path, episodes: int | None = None, seed: int = 0,
                   size: int = 64) -> Path:
    """Write a split to out_dir (layout in the module docstring); returns out_dir."""
    out = Path(out_dir)
    n = DEFAULT_EPISODES[split] if episodes is None and split in DEFAULT_EPISODES else episodes
    lines = []
    for ep in iter_episodes(split, n, seed, size):
        rel = f"episodes/{ep.uid}"
        ep_dir = out / rel
        ep_dir.mkdir(parents=True, exist_ok=True)
        np.save(ep_dir / "frames.npy", ep.frames)
        (ep_dir / "conversation.json").write_text(json.dumps(ep.conversation, indent=1))
        (ep_dir / "metadata.json").write_text(json.dumps(ep.metadata, indent=1))
        lines.append(json.dumps({"episode": ep.uid, "dir": rel, "task": ep.task,
                                 "num_frames": ep.num_frames, "fps": FPS}))
    (out / "index.jsonl").write_text("".join(line + "\n" for line in lines))
    info = {"split": split, "seed": seed, "size": size, "episodes": len(lines), "fps": FPS}
    (out / "split.json").write_text(json.dumps(info, indent=1))
    return out


class EpisodeRenderer:
    """`renderer(i)` gives frame i (uint8 (H, W, 3)): the hook a synthetic camera source calls.

    Built from an in-memory Episode, or with `from_world` rendering each frame on demand (no
    frame array held). Past the end it raises IndexError unless `loop` is set.
    """

    def __init__(self, episode: Episode, loop: bool = False) -> None:
        self._frame: Callable[[int], np.ndarray] = episode.frames.__getitem__
        self.num_frames, self.fps, self.loop = episode.num_frames, episode.fps, loop
        self.episode: Episode | None = episode

    @classmethod
    def from_world(cls, split: str, index: int, seed: int = 0, size: int = 64,
                   loop: bool = False) -> EpisodeRenderer:
        scene = build_episode(split, index, seed, size).scene
        self = cls.__new__(cls)
        self._frame = scene.render
        self.num_frames, self.fps, self.loop = scene.tl.num_frames, float(FPS), loop
        self.episode = None
        return self

    def __len__(self) -> int:
        return self.num_frames

    def __call__(self, index: int) -> np.ndarray:
        if self.loop:
            index %= self.num_frames
        elif not 0 <= index < self.num_frames:
            raise IndexError(f"frame {index} is past the episode's {self.num_frames} frames "
                             "(use loop=True to repeat it)")
        return self._frame(index)
