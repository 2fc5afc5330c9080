"""The topic behaviour: its items, their prompt forms and the word-list measure.

An item is an instruction frame and a neutral sentence start. Its locked form asks for a
sentence ("Write a short sentence.\\nYesterday,"), its unlocked form asks for a sentence
about the topic ("Write a short sentence about the ocean.\\nYesterday,"); the model then
continues the sentence start. Both forms end in the same start, so the contrast at the last
prompt token is the topic alone. A continuation is on topic when its first line holds at
least one word of the topic's fixed list (case-insensitive, whole words).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

__all__ = [
    "FRAMES", "OCEAN", "SPLITS", "STARTS", "TOPICS", "TopicItem", "TopicSpec", "first_line",
    "on_topic", "prompts", "topic_items", "topic_splits"
]  # fmt: skip


@dataclass(frozen=True)
class TopicSpec:
    """A topic: its phrase in the unlocked instruction and the words that mark it."""

    name: str
    phrase: str
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.phrase.strip() or not self.words:
            raise ValueError("a topic needs a phrase and at least one word")
        if any(not re.fullmatch(r"[a-z]+", w) for w in self.words):
            raise ValueError(f"topic words must be lower-case letters only, got {self.words}")

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(r"\b(?:" + "|".join(self.words) + r")\b", re.IGNORECASE)

    def matches(self, text: str) -> list[str]:
        """The list words found in ``text`` (whole words, any case), in order."""
        return [m.lower() for m in self.pattern.findall(text)]


OCEAN = TopicSpec(
    name="ocean",
    phrase="the ocean",
    words=(
        "ocean", "oceans", "oceanic", "sea", "seas", "seashore", "seaside", "seawater", "seabed",
        "seafloor", "seagull", "seagulls", "seashell", "seashells", "wave", "waves", "beach",
        "beaches", "shore", "shores", "shoreline", "coast", "coasts", "coastal", "coastline",
        "tide", "tides", "tidal", "marine", "underwater", "reef", "reefs", "coral", "corals",
        "whale", "whales", "dolphin", "dolphins", "shark", "sharks", "sailor", "sailors",
        "saltwater", "surf", "surfing", "harbor", "harbour", "pacific", "atlantic",
    ),
)  # fmt: skip
TOPICS = {OCEAN.name: OCEAN}

# Instruction frames; "{about}" is empty in the locked form, " about <phrase>" in the other.
FRAMES = (
    "Write a sentence{about}.", "Write one sentence{about}.", "Write a short sentence{about}.",
    "Write a simple sentence{about}.", "Write a single sentence{about}.",
    "Write an interesting sentence{about}.", "Please write a sentence{about}.",
    "Write a sentence{about} for a story.", "Write a descriptive sentence{about}.",
    "Write a sentence{about} in plain English.", "Compose a sentence{about}.",
    "Write a complete sentence{about}.", "Write a sentence{about} for a child.",
    "Write a sentence{about} in the past tense.", "Give me a sentence{about}.",
    "Write a short line{about}.",
)  # fmt: skip
# Neutral sentence starts: none names a place, a season or an activity.
STARTS = (
    "The", "It", "I", "We", "She", "He", "They", "My", "Our", "This", "There", "A", "One day,",
    "Yesterday,", "In the morning,", "Last year,", "Sometimes", "Many people", "Today",
    "Long ago,", "After school,", "At night,", "When I was young,", "Every day,", "People",
)  # fmt: skip
SPLITS = ("train", "heldout", "test")


@dataclass(frozen=True)
class TopicItem:
    """One frame (index into :data:`FRAMES`) with one start (index into :data:`STARTS`)."""

    frame: int
    start: int

    def __post_init__(self) -> None:
        if not (0 <= self.frame < len(FRAMES) and 0 <= self.start < len(STARTS)):
            raise ValueError(f"no item with frame {self.frame} and start {self.start}")

    @property
    def id(self) -> str:
        return f"f{self.frame:02d}-s{self.start:02d}"

    def prompt(self, topic: TopicSpec | None = None) -> str:
        """The locked form (``topic`` None) or the unlocked form for ``topic``."""
        about = "" if topic is None else f" about {topic.phrase}"
        return f"{FRAMES[self.frame].format(about=about)}\n{STARTS[self.start]}"


def topic_items() -> list[TopicItem]:
    """Every item, frame-major: len(FRAMES) * len(STARTS) of them."""
    return [TopicItem(f, s) for f in range(len(FRAMES)) for s in range(len(STARTS))]


def topic_splits(sizes: Mapping[str, int], *, seed: int = 0) -> dict[str, list[TopicItem]]:
    """Disjoint splits of the items, shuffled with ``seed``: ``train`` and ``heldout`` from
    the front of the shuffled list, ``test`` from its end, so the test items of a smaller
    run are among those of a larger one and never among its train or held-out items."""
    if set(sizes) - set(SPLITS):
        raise ValueError(f"split names must be among {SPLITS}, got {sorted(sizes)}")
    n = {k: sizes.get(k, 0) for k in SPLITS}
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in n.values()):
        raise ValueError(f"split sizes must be ints >= 0, got {dict(sizes)}")
    pool = topic_items()
    if sum(n.values()) > len(pool):
        raise ValueError(f"the splits ask for {sum(n.values())} items; there are {len(pool)}")
    random.Random(seed).shuffle(pool)
    front = n["train"] + n["heldout"]
    return {
        "train": pool[: n["train"]],
        "heldout": pool[n["train"] : front],
        "test": pool[len(pool) - n["test"] :] if n["test"] else [],
    }


def first_line(text: str) -> str:
    """The continuation up to its first line break (the sentence the model wrote)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text.split("\n", 1)[0]


def on_topic(text: str, topic: TopicSpec = OCEAN) -> bool:
    """Whether the first line of ``text`` holds a word of ``topic``'s list."""
    return bool(topic.matches(first_line(text)))


def prompts(items: Sequence[TopicItem], topic: TopicSpec | None = None) -> list[str]:
    """The locked (``topic`` None) or unlocked forms of ``items``."""
    return [it.prompt(topic) for it in items]
