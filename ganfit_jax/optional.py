"""Optional dependencies: what only some features need (pyproject.toml's extras)."""

import importlib


def require(module, extra, purpose):
    """`module` imported, or an ImportError that says what needed it and how to install it.

    `pip install ganfit-jax` brings what the loss terms, the renderer, the models and the fit
    need; dlib's detector (landmarks of a photo) and video files are extras, so that the library
    installs where their wheels do not exist (dlib-bin has none for macOS arm64 or Linux
    aarch64). requirements.txt, which the binaries run with, pins them all."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{purpose} needs the '{module}' package: pip install 'ganfit-jax[{extra}]' (or, "
            f"in the clone, pip install -r requirements.txt)") from None
