"""Range readers: any split of a file into byte ranges reads every record exactly once."""

import json

import pytest

from pipelines import sources
from pipelines.sources import WorkUnit


def _read_all(path, layout, chunk):
    size = path.stat().st_size
    out = []
    for start in range(0, size, chunk):
        unit = WorkUnit(layout, str(path), start, min(start + chunk, size))
        out += [(r.source, r.position, r.payload) for r in sources.read_unit(unit)]
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, 333, 4096, 1 << 20])
def test_story_ranges_partition_the_file(story_file, stories, chunk):
    read = _read_all(story_file, "text", chunk)
    assert [payload.decode().strip() for _, _, payload in read] == stories
    assert len({position for _, position, _ in read}) == len(stories)


def test_story_separator_lines_tolerate_whitespace_and_crlf(tmp_path):
    path = tmp_path / "s.txt"
    path.write_bytes(b"one\r\n<|endoftext|>\r\n  two\n  <|endoftext|>  \nthree\n")
    for chunk in (1, 5, 100):
        stories = [p.strip() for _, _, p in _read_all(path, "text", chunk)]
        assert stories == [b"one", b"two", b"three"]


def test_consecutive_separators_yield_an_empty_story(tmp_path):
    path = tmp_path / "s.txt"
    path.write_bytes(b"a\n<|endoftext|>\n<|endoftext|>\nb\n<|endoftext|>\n\n")
    assert [p for _, _, p in _read_all(path, "text", 3)] == [b"a\n", b"", b"b\n"]


@pytest.mark.parametrize("chunk", [1, 10, 1000])
def test_jsonl_ranges_partition_the_file(tmp_path, chunk):
    rows = [{"text": f"story {i} " + "x" * (i % 13)} for i in range(40)]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    read = _read_all(path, "jsonl", chunk)
    assert [payload for _, _, payload in read] == rows
    assert [position for _, position, _ in read] == sorted({p for _, p, _ in read})


def test_malformed_json_line_is_marked_not_raised(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n')
    payloads = [p for _, _, p in _read_all(path, "jsonl", 1000)]
    assert payloads[0] == {"text": "ok"} and isinstance(payloads[1], sources.MalformedJson)


def test_unknown_extension_is_a_user_error():
    with pytest.raises(sources.UserError, match="cannot tell the layout"):
        sources.layout_of("data/stories.csv")


def test_glob_matching_nothing_is_a_user_error(tmp_path):
    with pytest.raises(sources.UserError, match="matches no files"):
        sources.expand_inputs([str(tmp_path / "*.txt")])


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_a_leading_byte_order_mark_is_not_text(tmp_path, chunk):
    stories = tmp_path / "s.txt"
    stories.write_bytes(b"\xef\xbb\xbfOnce upon a time.\n<|endoftext|>\nThe end.\n")
    assert [payload.strip() for _, _, payload in _read_all(stories, "text", chunk)] == [b"Once upon a time.", b"The end."]
    rows = tmp_path / "r.jsonl"
    rows.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert [payload for _, _, payload in _read_all(rows, "jsonl", chunk)] == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize("make,reason", [(lambda p: p.symlink_to(p.parent / "gone.txt"), "No such file"),
                                         (lambda p: p.symlink_to(p), "symbolic links")])
def test_a_glob_match_that_cannot_be_read_is_refused_not_dropped(tmp_path, make, reason):
    (tmp_path / "a.txt").write_text("Once upon a time.\n")
    make(tmp_path / "b.txt")
    with pytest.raises(sources.UserError, match=rf"matches {tmp_path / 'b.txt'}, which cannot be read \(.*{reason}"):
        sources.expand_inputs([str(tmp_path / "*.txt")])
    (tmp_path / "b.txt").unlink()
    assert [path for path, _ in sources.expand_inputs([str(tmp_path / "*.txt")])] == [str(tmp_path / "a.txt")]
