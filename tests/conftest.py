"""Shared test fixtures: where the shared data lives, and small configs."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GPTJAX_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_tfds_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GPTJAX_SHARED_TFDS", REPO.parent / "shared" / "tfds"))


@pytest.fixture
def shared_data() -> pathlib.Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared data folder {d} is absent (set GPTJAX_SHARED_DATA)")
    return d


@pytest.fixture
def shared_tfds() -> pathlib.Path:
    d = shared_tfds_dir()
    if not d.is_dir():
        pytest.skip(f"shared tfds data_dir {d} is absent (set GPTJAX_SHARED_TFDS)")
    return d
