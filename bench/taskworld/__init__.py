"""A procedural egocentric task world: first-person videos of people assembling blocks or
following recipes, with the reference dialogue of an assistant that guides them (ProAssist
format). It makes "speaks at the right moment with the right words" measurable without the real
ProAssist data.
"""

from .cli import add_taskworld_parser, run_taskworld
from .dialogue import SYSTEM_PROMPT
from .episode import Episode, reference_per_frame
from .splits import (
    DEFAULT_EPISODES,
    SPLITS,
    EpisodeParts,
    EpisodeRenderer,
    build_episode,
    generate_split,
    iter_episodes,
    load_episode,
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
    "load_episode",
    "make_episode",
    "read_index",
    "read_split",
    "reference_per_frame",
    "run_taskworld",
    "task_pool",
]
