import pytest

from pipelines import corpus, sources


def test_same_seed_same_stories_other_seed_other_stories():
    first = list(corpus.generate_stories(300, seed=1))
    assert first == list(corpus.generate_stories(300, seed=1))
    assert first != list(corpus.generate_stories(300, seed=2))


def test_thousands_of_distinct_varied_stories():
    stories = list(corpus.generate_stories(5000, seed=0))
    assert len(set(stories)) == 5000
    # Varied: many heroes, places and objects appear, not one template with one filling.
    assert sum(any(name in s.split(".")[0] for s in stories) for name in corpus.NAMES) == len(corpus.NAMES)
    assert all(any(place in s for s in stories) for place in corpus.PLACES)
    assert all(any(obj in s for s in stories) for obj in corpus.OBJECTS)


def test_written_in_tinystories_layout_and_read_back(tmp_path):
    stories = list(corpus.generate_stories(50, seed=3))
    path = tmp_path / "s.txt"
    assert corpus.write_tinystories_layout(iter(stories), str(path)) == 50
    lines = path.read_text().splitlines()
    assert lines.count(sources.STORY_SEPARATOR.decode()) == 50 and lines[-1] == "<|endoftext|>"
    with open(path, "rb") as f:
        read = [story.decode().strip() for _, story in sources.read_stories(f, 0, path.stat().st_size)]
    assert read == stories


# A story with every optional sentence, so each kind of corruption has a sentence to act on.
STORY = ("Once upon a time, there was a big bear named Lucy. He loved to play at the meadow on a sunny day. "
         "One day, Lucy found a soft teddy. Lucy showed it to Oscar, and they played together.\n"
         "But then the soft teddy got stuck in a tree. Lucy felt sad. Oscar said, \"Don't worry, we can do it!\" "
         "They asked grandma what to do. So Lucy climbed up carefully. In the end, they got it back and Lucy felt "
         "happy. Lucy hugged Oscar and said thank you. Being careful keeps us safe.")
PROMPT = STORY[:40]  # a prompt ends mid-sentence, like the evals' 16-token prompts


def test_every_generated_story_is_correct_and_every_sentence_valid():
    for story in corpus.generate_stories(3000, seed=11):
        check = corpus.check_story(story[:50], story[50:], ended=True)
        assert check.correct and check.valid == check.sentences >= 8, (story, check.errors)
    assert corpus.check_story(PROMPT, STORY[40:], ended=True) == corpus.StoryCheck(12, 12, True, ())


@pytest.mark.parametrize("kind, old, new", [
    ("repeated word", "and they played together", "and they played played together"),
    ("changed name", "So Lucy climbed", "So Mia climbed"),
    ("friend changed", "Lucy hugged Oscar", "Lucy hugged Tom"),
    ("wrong pronoun", "He loved to play", "She loved to play"),
    ("foreign object", "found a soft teddy", "found a silver teddy"),
    ("another object in the problem", "the soft teddy got stuck", "the red ball got stuck"),
    ("wrong action", "climbed up carefully", "ran after it"),
    ("mixed templates", "So Lucy climbed up carefully.", "So Lucy felt happy."),
    ("out of order", "Lucy felt sad. Oscar said", "Oscar said"),
    ("a required sentence left out", "Lucy felt sad. ", ""),
    ("a sentence repeated", "Lucy felt sad.", "Lucy felt sad. Lucy felt sad."),
    ("a special token", "They asked grandma", "They asked <|mask|> grandma"),
])
def test_each_kind_of_corruption_is_an_error(kind, old, new):
    assert old in STORY[40:]
    check = corpus.check_story(PROMPT, STORY[40:].replace(old, new, 1), ended=True)
    assert not check.correct and check.errors, kind
    if kind not in ("a required sentence left out", "out of order"):
        assert check.valid < check.sentences, kind  # the corrupted sentence itself is invalid


def test_an_unfinished_sentence_is_judged_as_a_prefix_only_at_the_generation_limit():
    cut = STORY.index("felt sad") + 6  # "... Lucy felt s"
    assert corpus.check_story(PROMPT, STORY[40:cut], ended=False).correct
    check = corpus.check_story(PROMPT, STORY[40:cut], ended=True)  # EOS mid-sentence
    assert not check.correct and check.errors == ("unfinished sentence: Lucy felt s",)
    assert not corpus.check_story(PROMPT, STORY[40:cut] + "x", ended=False).correct  # no sentence starts so
    assert not corpus.check_story(PROMPT, STORY[40:cut - 9] + " Tom felt", ended=False).correct  # another hero
    whole = STORY.index("Lucy felt sad.") + len("Lucy felt sad.")
    assert not corpus.check_story(PROMPT, STORY[40:whole], ended=True).correct  # EOS before the story's end
    assert corpus.check_story(PROMPT, STORY[40:whole], ended=False).correct


def test_only_sentences_that_end_after_the_prompt_are_counted():
    split = STORY.index("Lucy showed")  # three whole sentences in the prompt
    check = corpus.check_story(STORY[:split], STORY[split:], ended=True)
    assert check.sentences == 9 and check.correct
