"""Optional dependencies: what only some features need (pyproject.toml's extras)."""

import importlib
import importlib.util
import os
import platform
import sys


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message says how to get it."""


def dlib_has_wheels():
    """Whether dlib-bin (dlib's prebuilt wheels) exists for this platform: x86-64 Linux and
    Windows only, as requirements.txt's marker on it says; elsewhere (macOS, ARM Linux) dlib
    builds from source."""
    return (sys.platform, platform.machine()) in {("linux", "x86_64"), ("win32", "AMD64")}


def _install_hint(module, extra, purpose):
    if module == "dlib" and not dlib_has_wheels():
        return (f"{purpose} needs the 'dlib' package, which has no prebuilt wheel for "
                f"{sys.platform} {platform.machine()}: pip install dlib builds it from source "
                f"(it needs CMake and a C++ compiler)")
    return (f"{purpose} needs the '{module}' package: pip install 'ganfit-jax[{extra}]' (or, in "
            f"the clone, pip install -r requirements.txt)")


def require(module, extra, purpose):
    """`module` imported, or a MissingDependency (an ImportError) that says what needed it and
    how to install it.

    `pip install ganfit-jax` brings what the loss terms, the renderer, the models and the fit
    need; dlib's detector (landmarks of a photo) and video files are extras, so that the library
    installs where their wheels do not exist (dlib-bin has none for macOS or ARM Linux).
    requirements.txt, which the binaries run with, pins them all (dlib-bin where it has wheels).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if _spec(module) is not None:  # there, but its import fails (a missing system library)
            raise MissingDependency(f"{purpose} needs the '{module}' package, which is "
                                    f"installed but does not import: {e}") from e
        raise MissingDependency(_install_hint(module, extra, purpose)) from None


def _spec(module):
    """Where `module` is installed, without importing it; None where it is not (or is hidden as
    `sys.modules[module] = None`)."""
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def package_file(package, relative, extra, purpose):
    """The path of a data file installed inside `package`, found without importing it.

    face_recognition_models (dlib's model files) imports `pkg_resources` to name its own files;
    setuptools 81 removed that module and Python 3.12's virtual environments have no setuptools
    at all, so importing the package fails where it is installed. Its files are plain files in
    its folder: the import system's spec gives the folder without running the package's code.
    """
    spec = _spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(_install_hint(package, extra, purpose))
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the '{package}' package is installed but has no "
                                f"{relative}; reinstall it (pip install --force-reinstall "
                                f"{package})")
    return path
