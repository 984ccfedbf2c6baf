"""Shared fixtures: the real public assets beside the checkout (skipped with a reason if absent)."""

import os
import pathlib

import pytest

ASSETS = pathlib.Path(os.environ.get(
    "GANFIT_ASSETS", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "assets"))


def _asset(relative):
    path = ASSETS / relative
    if not path.exists():
        pytest.skip(f"shared asset {path} is absent (set GANFIT_ASSETS to the assets folder)")
    return path


@pytest.fixture(scope="session")
def assets_dir():
    return _asset(".")


@pytest.fixture(scope="session")
def sfm_dir():
    return _asset("sfm")


@pytest.fixture(scope="session")
def sfm_model(sfm_dir):
    from ganfit_jax import morphable

    return morphable.load(sfm_dir / "sfm_shape_3448.bin")


@pytest.fixture(scope="session")
def ict_path():
    return _asset("ict/ict_face_light.npz")


@pytest.fixture(scope="session")
def faces_dir():
    return _asset("faces")
