"""Shared fixtures: a small generated corpus, the real samples in ../shared/data, the GCS emulator."""

from __future__ import annotations

import pathlib

import pytest

from pipelines import corpus
from tests.gcs import GcsEmulator

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def stories() -> list[str]:
    return list(corpus.generate_stories(800, seed=7))


@pytest.fixture(scope="session")
def story_file(tmp_path_factory, stories) -> pathlib.Path:
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    corpus.write_tinystories_layout(iter(stories), str(path))
    return path


@pytest.fixture
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not present at {SHARED_DATA} (see shared/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gcs_emulator():
    with GcsEmulator() as emulator:
        yield emulator
