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
import os
import random
import sys
from collections.abc import Iterator

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


def _story(rng: random.Random) -> str:
    hero, friend = rng.sample(NAMES, 2)
    kind, pronoun = rng.choice(CREATURES)
    obj = rng.choice(OBJECTS)
    place = rng.choice(PLACES)
    problem, action = rng.choice(PROBLEMS)
    feeling_bad, feeling_good = rng.choice(FEELINGS[1:4]), rng.choice(FEELINGS[3:] + FEELINGS[:1])
    subject = pronoun.capitalize()
    sentences = [
        f"Once upon a time, there was {kind} named {hero}.",
        f"{subject} loved to play at {place} on {rng.choice(['a', 'one'])} {rng.choice(WEATHER)} day.",
        f"One day, {hero} found {obj}.",
        f"{hero} showed it to {friend}, and they played together.",
        f"But then {problem.format(obj=obj.split(' ', 1)[1])}.",
        f"{hero} felt {feeling_bad}.",
    ]
    if rng.random() < 0.5:
        sentences.append(f"{friend} said, \"Don't worry, we can do it!\"")
    if rng.random() < 0.4:
        sentences.append(f"They asked {rng.choice(HELPERS)} what to do.")
    sentences += [
        f"So {hero} {action}.",
        f"In the end, they got it back and {hero} felt {feeling_good}.",
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
