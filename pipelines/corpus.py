"""The built-in sample corpus: seeded, offline, TinyStories-like children's stories.

The quickstart and the tests need real-looking text without a network. Each story is
composed from a small grammar (a hero, a friend, a place, an object, a problem, a
resolution, a feeling and a moral), so thousands of distinct stories share a small
vocabulary, as TinyStories does. Output is the `TinyStoriesV2-GPT4-*.txt` layout:
stories separated by lines that hold exactly `<|endoftext|>`.

    python -m pipelines.corpus --output data/stories.txt --num_stories 5000 --seed 0
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

from pipelines import signals

SEPARATOR = "<|endoftext|>"

NAMES = [
    "Lily", "Tom", "Mia", "Ben", "Sam", "Anna", "Max", "Lucy", "Jack", "Emma", "Leo",
    "Zoe", "Tim", "Sara", "Finn", "Ruby", "Noah", "Ella", "Oscar", "Maya", "Kai", "Ivy",
]
CREATURES = [
    ("a little girl", "she"), ("a little boy", "he"), ("a small dog", "it"),
    ("a kind cat", "she"), ("a brave rabbit", "he"), ("a happy bird", "she"),
    ("a curious fox", "he"), ("a tiny mouse", "she"), ("a big bear", "he"),
    ("a slow turtle", "it"), ("a silly duck", "she"), ("a young frog", "he"),
]
PLACES = [
    "the park", "the forest", "the beach", "the garden", "the farm", "the big hill",
    "the lake", "the town", "the school", "the zoo", "the river", "the meadow",
    "the library", "the playground", "the old barn", "the busy market",
]
OBJECTS = [
    "a red ball", "a shiny stone", "a blue kite", "a little boat", "a soft teddy",
    "a big box", "a yellow hat", "a magic key", "a toy car", "a pretty flower",
    "a green apple", "a wooden drum", "a paper map", "a golden bell", "a warm blanket",
    "a tall tower of blocks", "a jar of honey", "a silver spoon",
]
WEATHER = ["sunny", "windy", "rainy", "snowy", "warm", "cold", "bright", "cloudy"]
PROBLEMS = [
    ("the {obj} rolled far away", "ran after it"),
    ("the {obj} got stuck in a tree", "climbed up carefully"),
    ("the {obj} fell into the water", "reached out with a long stick"),
    ("the {obj} was broken", "fixed it with some tape"),
    ("the {obj} was lost in the tall grass", "looked under every leaf"),
    ("a strong wind took the {obj}", "followed the wind"),
    ("a big dog wanted the {obj}", "shared it with the dog"),
    ("the {obj} was too heavy to carry", "asked for help"),
]
HELPERS = ["mom", "dad", "grandma", "grandpa", "the teacher", "a friendly owl", "an old man"]
FEELINGS = ["happy", "sad", "scared", "proud", "excited", "tired", "surprised", "thankful"]
MORALS = [
    "Sharing makes everyone happy.",
    "It is good to ask for help.",
    "Being kind is the best thing to do.",
    "Friends can fix anything together.",
    "Never give up, even when it is hard.",
    "Telling the truth is always right.",
    "Being careful keeps us safe.",
    "A little patience goes a long way.",
]
ENDINGS = [
    "They played until the sun went down.",
    "That night, {hero} slept with a big smile.",
    "From that day on, they were best friends.",
    "They went home and had warm soup.",
    "Everyone laughed and clapped.",
    "{hero} hugged {friend} and said thank you.",
]


# Each sentence of the grammar, written once: the generator renders them and the checker
# (`check_story`) enumerates their arguments.
def _opening(kind: str, hero: str) -> str:
    return f"Once upon a time, there was {kind} named {hero}."


def _play(subject: str, place: str, article: str, weather: str) -> str:
    return f"{subject} loved to play at {place} on {article} {weather} day."


def _found(hero: str, obj: str) -> str:
    return f"One day, {hero} found {obj}."


def _showed(hero: str, friend: str) -> str:
    return f"{hero} showed it to {friend}, and they played together."


def _problem(problem: str, obj: str) -> str:
    return f"But then {problem.format(obj=obj.split(' ', 1)[1])}."


def _felt(hero: str, feeling: str) -> str:
    return f"{hero} felt {feeling}."


def _reassure(friend: str) -> str:
    return f"{friend} said, \"Don't worry, we can do it!\""


def _asked(helper: str) -> str:
    return f"They asked {helper} what to do."


def _action(hero: str, action: str) -> str:
    return f"So {hero} {action}."


def _got_back(hero: str, feeling: str) -> str:
    return f"In the end, they got it back and {hero} felt {feeling}."


ARTICLES = ["a", "one"]
FEELINGS_BAD = FEELINGS[1:4]
FEELINGS_GOOD = FEELINGS[3:] + FEELINGS[:1]


def _story(rng: random.Random) -> str:
    hero, friend = rng.sample(NAMES, 2)
    kind, pronoun = rng.choice(CREATURES)
    obj = rng.choice(OBJECTS)
    place = rng.choice(PLACES)
    problem, action = rng.choice(PROBLEMS)
    feeling_bad, feeling_good = rng.choice(FEELINGS_BAD), rng.choice(FEELINGS_GOOD)
    sentences = [
        _opening(kind, hero),
        _play(pronoun.capitalize(), place, rng.choice(ARTICLES), rng.choice(WEATHER)),
        _found(hero, obj),
        _showed(hero, friend),
        _problem(problem, obj),
        _felt(hero, feeling_bad),
    ]
    if rng.random() < 0.5:
        sentences.append(_reassure(friend))
    if rng.random() < 0.4:
        sentences.append(_asked(rng.choice(HELPERS)))
    sentences += [
        _action(hero, action),
        _got_back(hero, feeling_good),
        rng.choice(ENDINGS).format(hero=hero, friend=friend),
    ]
    if rng.random() < 0.6:
        sentences.append(rng.choice(MORALS))
    # Two paragraphs, like most TinyStories: the setup, then the problem and its end.
    return " ".join(sentences[:4]) + "\n" + " ".join(sentences[4:])


def generate_stories(num_stories: int, seed: int = 0) -> Iterator[str]:
    """Yields `num_stories` distinct stories, the same ones for the same seed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < num_stories:
        story = _story(rng)
        if story not in seen:
            seen.add(story)
            yield story


class StoryCheck(NamedTuple):
    """A story judged against the grammar. Counts cover the sentences that end after the prompt."""
    sentences: int  # complete sentences
    valid: int  # of them, productions consistent with the story so far, in the story's order
    correct: bool  # no error at all: every sentence valid, none skipped, an end where the story ended
    errors: tuple[str, ...]  # what was wrong, in order (for reports)


def _pick(bound: dict, key: str, domain: list) -> list:
    return [bound[key]] if key in bound else domain


def _slots() -> list[tuple[str, bool, Callable[[dict], Iterator[tuple[str, dict]]]]]:
    """The story's sentences in order: (name, optional, expand). `expand(bound)` yields every
    sentence the slot allows given the values bound so far, with the values it binds."""
    def opening(b):
        for creature in _pick(b, "creature", CREATURES):
            for hero in _pick(b, "hero", NAMES):
                yield _opening(creature[0], hero), {"creature": creature, "hero": hero}

    def play(b):
        for creature in _pick(b, "creature", CREATURES):
            for place, article, weather in itertools.product(PLACES, ARTICLES, WEATHER):
                yield _play(creature[1].capitalize(), place, article, weather), {"creature": creature}

    def found(b):
        for hero, obj in itertools.product(_pick(b, "hero", NAMES), _pick(b, "obj", OBJECTS)):
            yield _found(hero, obj), {"hero": hero, "obj": obj}

    def showed(b):
        for hero, friend in itertools.product(_pick(b, "hero", NAMES), _pick(b, "friend", NAMES)):
            if friend != hero:
                yield _showed(hero, friend), {"hero": hero, "friend": friend}

    def problem(b):
        for trouble, obj in itertools.product(_pick(b, "problem", PROBLEMS), _pick(b, "obj", OBJECTS)):
            yield _problem(trouble[0], obj), {"problem": trouble, "obj": obj}

    def felt(b):
        for hero, feeling in itertools.product(_pick(b, "hero", NAMES), FEELINGS_BAD):
            yield _felt(hero, feeling), {"hero": hero}

    def reassure(b):
        for friend in _pick(b, "friend", NAMES):
            if friend != b.get("hero"):
                yield _reassure(friend), {"friend": friend}

    def asked(b):
        for helper in HELPERS:
            yield _asked(helper), {}

    def action(b):
        for hero, trouble in itertools.product(_pick(b, "hero", NAMES), _pick(b, "problem", PROBLEMS)):
            yield _action(hero, trouble[1]), {"hero": hero, "problem": trouble}

    def got_back(b):
        for hero, feeling in itertools.product(_pick(b, "hero", NAMES), FEELINGS_GOOD):
            yield _got_back(hero, feeling), {"hero": hero}

    def ending(b):
        for hero, friend, end in itertools.product(_pick(b, "hero", NAMES), _pick(b, "friend", NAMES), ENDINGS):
            if friend != hero:
                yield end.format(hero=hero, friend=friend), {"hero": hero, "friend": friend}

    def moral(b):
        for text in MORALS:
            yield text, {}

    return [("opening", False, opening), ("play", False, play), ("found", False, found),
            ("showed", False, showed), ("problem", False, problem), ("felt", False, felt),
            ("reassure", True, reassure), ("asked", True, asked), ("action", False, action),
            ("got_back", False, got_back), ("ending", False, ending), ("moral", True, moral)]


SLOTS = _slots()
_LAST_REQUIRED = max(i for i, (_, optional, _) in enumerate(SLOTS) if not optional)
# A sentence: up to a stop (and a closing quote) followed by a space or the end of the text.
_SENTENCE = re.compile(r'\S.*?[.!?]"?(?= |$)')


def _next_slots(position: int) -> range:
    """The slots the next sentence may fill without skipping a required one."""
    end = position
    while end < len(SLOTS) and SLOTS[end][1]:
        end += 1
    return range(position, min(end + 1, len(SLOTS)))


def _fill(sentence: str, slots, bound: dict) -> tuple[int, dict] | None:
    """(the first slot among `slots` that yields `sentence` given `bound`, the values it binds)."""
    for index in slots:
        for text, values in SLOTS[index][2](bound):
            if text == sentence:
                return index, values
    return None


def check_story(prompt: str, generation: str, ended: bool) -> StoryCheck:
    """Parses `prompt + generation` against the grammar of `generate_stories`.

    A sentence is valid when it is a production (word lists, template) consistent with the story
    so far (one hero, the friend, the creature's pronoun, the object of the problem, the action
    that belongs to it) and comes later in the story's order than the sentence before it; a story
    is correct when every sentence is valid, none that the story requires is skipped, and it ends
    where a story may end (`ended`: the model wrote EOS) or, cut off at the generation limit, its
    unfinished last sentence is the start of one that may come next. Whitespace runs count as one
    space (the paragraph break is layout)."""
    text = " ".join((prompt + generation).split())
    prompt_end = len(" ".join(prompt.split()))
    position, bound = 0, {}
    sentences = valid = 0
    errors: list[str] = []
    consumed, valid_before = 0, True
    for match in _SENTENCE.finditer(text):
        sentence, consumed = match.group(), match.end()
        counted = match.end() > prompt_end
        filled = _fill(sentence, range(position, len(SLOTS)), bound)
        if filled is None:
            errors.append(f"not a production here: {sentence}")
        else:
            if filled[0] not in _next_slots(position) and valid_before:
                errors.append(f"skipped {SLOTS[position][0]} before: {sentence}")
            position, bound = filled[0] + 1, {**bound, **filled[1]}
        valid_before = filled is not None
        sentences += counted
        valid += counted and filled is not None
    rest = text[consumed:].strip()
    if rest and (ended or not any(t.startswith(rest) for i in _next_slots(position) for t, _ in SLOTS[i][2](bound))):
        errors.append(f"unfinished sentence: {rest}")
    if ended and not rest and position <= _LAST_REQUIRED:
        errors.append(f"ended before {SLOTS[position][0]}")
    return StoryCheck(sentences, valid, not errors, tuple(errors))


def write_tinystories_layout(stories: Iterator[str], path: str) -> int:
    """Writes stories in the TinyStoriesV2 text layout; returns how many were written."""
    count = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for story in stories:
            f.write(f"{story}\n{SEPARATOR}\n")
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="Text file to write.")
    parser.add_argument("--num_stories", type=int, default=5000, help="Distinct stories to write.")
    parser.add_argument("--seed", type=int, default=0, help="Generator seed.")
    args = parser.parse_args(argv)
    return signals.exit_status(lambda: _write(args))


def _write(args: argparse.Namespace) -> int:
    count = write_tinystories_layout(generate_stories(args.num_stories, args.seed), args.output)
    print(f"wrote {count} stories to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
