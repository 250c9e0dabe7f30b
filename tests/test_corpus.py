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
