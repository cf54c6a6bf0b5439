"""A procedural egocentric task world: first-person videos of people assembling blocks or
following recipes, with the reference dialogue of an assistant that guides them (ProAssist
format). It makes "speaks at the right moment with the right words" measurable without the real
ProAssist data.
"""

from proassist_edge.runtime.episode import Episode, reference_per_frame
from proassist_edge.taskworld.cli import add_taskworld_parser, run_taskworld
from proassist_edge.taskworld.dialogue import SYSTEM_PROMPT
from proassist_edge.taskworld.splits import (
    DEFAULT_EPISODES,
    SPLITS,
    EpisodeParts,
    EpisodeRenderer,
    build_episode,
    generate_split,
    iter_episodes,
    load_split_entry,
    make_episode,
    read_index,
    read_split,
    task_pool,
)

__all__ = [
    "DEFAULT_EPISODES",
    "SPLITS",
    "SYSTEM_PROMPT",
    "Episode",
    "EpisodeParts",
    "EpisodeRenderer",
    "add_taskworld_parser",
    "build_episode",
    "generate_split",
    "iter_episodes",
    "load_split_entry",
    "make_episode",
    "read_index",
    "read_split",
    "reference_per_frame",
    "run_taskworld",
    "task_pool",
]
