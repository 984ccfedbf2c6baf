"""pyproject.toml: the package builds, installs and imports away from the clone, names the
packages requirements.txt pins (on the same platforms), and imports without its extras (a
feature that needs one names it, and a fit that needs dlib where it is missing says so in one
line)."""

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _pins(path):
    """{name: Requirement} of a requirements file's pins (one `==` each, markers kept)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = req
    return pins


def _version(req):
    return next(iter(req.specifier)).version


# the extras requirements.txt installs for the binaries; the others are the test
# references' (onnx) or another JAX build's (cuda12, tpu)
BINARY_EXTRAS = ("dlib", "video")
# [dlib]'s source build for the platforms dlib-bin has no wheel for: requirements.txt leaves it
# to the user there (a compiler and CMake; the fit runs without it on given landmarks)
EXTRA_ONLY = {"dlib"}


def test_pyproject_names_what_requirements_pins_and_accepts_each_pin():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    needed = {canonicalize_name(Requirement(r).name): Requirement(r)
              for r in [*project["dependencies"], *(r for e in BINARY_EXTRAS for r in extras[e])]}
    pins = _pins(ROOT / "requirements.txt")
    assert set(needed) - EXTRA_ONLY == set(pins), set(needed) ^ set(pins)
    for name, req in pins.items():
        assert needed[name].specifier.contains(_version(req)), (name, req, needed[name])
        # installed on the same platforms either way
        assert str(needed[name].marker) == str(req.marker), (name, req, needed[name])
    # the optional ONNX import is tested with requirements-test.txt's onnx
    onnx = Requirement(extras["onnx"][0])
    assert onnx.specifier.contains(_version(_pins(ROOT / "requirements-test.txt")["onnx"]))


PLATFORMS = [("linux", "x86_64"), ("win32", "AMD64"), ("darwin", "arm64"), ("darwin", "x86_64"),
             ("linux", "aarch64")]


@pytest.mark.parametrize("system,machine", PLATFORMS)
def test_dlib_is_prebuilt_where_wheels_exist_and_built_from_source_elsewhere(
        system, machine, monkeypatch):
    """dlib-bin has wheels for x86-64 Linux and Windows only: requirements.txt installs it
    there and nowhere else (so the rest installs on a Mac or an ARM machine and fits photos with
    given landmarks); [dlib] asks for it there and for dlib, built from source, elsewhere; and
    a feature that needs dlib says which way to install it on this platform."""
    import platform

    from ganfit_jax import landmarks, optional

    env = {"sys_platform": system, "platform_machine": machine}
    wanted = lambda reqs: {canonicalize_name(r.name) for r in reqs  # noqa: E731
                           if r.marker is None or r.marker.evaluate(env)}
    pins = wanted(_pins(ROOT / "requirements.txt").values())
    extra = wanted(Requirement(r) for r in _pyproject()["project"]["optional-dependencies"]["dlib"])
    monkeypatch.setattr(sys, "platform", system)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    prebuilt = optional.dlib_has_wheels()
    # the platforms PyPI has dlib-bin 20.0.1.post1 wheels for (pip download --platform ...)
    assert prebuilt == ((system, machine) in (("linux", "x86_64"), ("win32", "AMD64")))
    assert ("dlib-bin" in pins) == prebuilt and "dlib" not in pins
    assert "face-recognition-models" in pins  # data only: every platform
    assert extra == ({"dlib-bin"} if prebuilt else {"dlib"}) | {"face-recognition-models"}
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(optional.MissingDependency) as error:
        landmarks.detect_landmarks(np.zeros((64, 64, 3), np.uint8))
    if prebuilt:
        assert "pip install 'ganfit-jax[dlib]'" in str(error.value)
    else:
        assert "pip install dlib builds it from source" in str(error.value)
        assert f"{system} {machine}" in str(error.value)


def _pip(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-q"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _import_elsewhere(site_dir, cwd):
    """Import the package with `site_dir` as a site directory (its .pth files read, as an
    editable install needs) from a folder outside the clone; → ganfit_jax's file."""
    code = ("import site, sys; site.addsitedir(sys.argv[1]); "
            "import ganfit_jax, ganfit_jax.losses, ganfit_jax.render, ganfit_jax.fitting; "
            "import importlib.util; "
            "assert importlib.util.find_spec('experiments') is None, 'experiments installed'; "
            "print(ganfit_jax.__version__, ganfit_jax.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, str(site_dir)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version, path = proc.stdout.split()
    return version, pathlib.Path(path)


@pytest.fixture
def source(tmp_path):
    """What a clone holds for the package, copied (a build writes build/ and *.egg-info beside
    pyproject.toml; the test leaves the repository as it was)."""
    try:
        import setuptools
    except ImportError:
        pytest.skip("setuptools (requirements-test.txt) is not installed")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(f"setuptools {setuptools.__version__} builds no wheel alone; "
                    "requirements-test.txt pins a newer one")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "ganfit_jax", src / "ganfit_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def test_the_wheel_holds_the_package_alone_and_imports_away_from_the_clone(source, tmp_path):
    import ganfit_jax

    _pip("wheel", "-w", str(tmp_path / "dist"), str(source), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("ganfit_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ganfit_jax").rglob("*.py")}
    assert modules <= names, modules - names
    assert not [n for n in names if n.startswith(("experiments/", "tests/", "checkpoints/"))]
    assert f"Version: {ganfit_jax.__version__}" in metadata
    assert "Requires-Dist: jax>=" in metadata and "Requires-Python: >=3.11" in metadata

    _pip("install", "--target", str(tmp_path / "site"), str(wheel), cwd=tmp_path)
    version, path = _import_elsewhere(tmp_path / "site", cwd=tmp_path)
    assert version == ganfit_jax.__version__
    assert path == tmp_path / "site" / "ganfit_jax" / "__init__.py"


def test_an_editable_install_imports_the_source_itself(source, tmp_path):
    prefix = tmp_path / "prefix"
    _pip("install", "--prefix", str(prefix), "-e", str(source), cwd=tmp_path)
    (site_dir,) = prefix.glob("lib/python*/site-packages")
    _, path = _import_elsewhere(site_dir, cwd=tmp_path)
    # an edit to the clone is what the next import sees
    assert path == source / "ganfit_jax" / "__init__.py"


def test_the_core_imports_without_the_extras_and_a_missing_extra_is_named(tmp_path):
    """What `pip install ganfit-jax` without extras gives: every module imports, and a feature
    that needs an extra says which, instead of a bare ModuleNotFoundError (or an import error
    from deep inside)."""
    code = """
import sys, pkgutil, importlib
for name in ("dlib", "face_recognition_models", "av", "onnx"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import ganfit_jax
for m in pkgutil.walk_packages(ganfit_jax.__path__, "ganfit_jax."):
    importlib.import_module(m.name)
import numpy as np
from ganfit_jax import identity, inputs, io, landmarks
from ganfit_jax.identity import arcface, weights
for call in (lambda: landmarks.detect_landmarks(np.zeros((64, 64, 3), np.uint8)),
             identity.default_dlib_weights,
             lambda: io.write_video(sys.argv[1], [np.zeros((16, 16, 3), np.uint8)], 25),
             lambda: next(inputs.iter_video_frames(sys.argv[1])),
             lambda: weights.variables_from_onnx(arcface.make_arcface("r18"), sys.argv[2])):
    try:
        call()
    except ImportError as e:
        print(e)
    else:
        raise SystemExit("no ImportError")
"""
    out = tmp_path / "clip.mp4"
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(onnx_file)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 5, proc.stdout
    from ganfit_jax import optional
    for line, extra in zip(lines, ("dlib", "dlib", "video", "video", "onnx")):
        if extra == "dlib" and not optional.dlib_has_wheels():  # a Mac, ARM Linux: no wheel
            assert "pip install dlib builds it from source" in line, line
        else:
            assert f"pip install 'ganfit-jax[{extra}]'" in line, line
    assert "reading video (PyAV)" in lines[3], lines[3]
    assert not out.exists()


def test_a_fit_that_needs_dlib_or_pyav_where_it_is_missing_says_so_in_one_line(faces_dir, tmp_path):
    """Without dlib (a Mac or an ARM machine), a photo with no landmarks beside it ends the fit
    as one line saying how to install dlib, before anything is written; so does a folder of
    them (`--images`: not each photo skipped in turn and then "none could be fitted"); and a
    video without PyAV."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(faces_dir / "ffhq" / "FFHQ" / "00001.png", photos / name)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not decoded: the missing package is named first")
    code = ("import runpy, sys; sys.modules['dlib'] = sys.modules['av'] = None; "
            "sys.argv = ['fit', *sys.argv[1:]]; runpy.run_module('experiments.fit', "
            "run_name='__main__')")
    dlib_error = "error: finding faces and their landmarks (dlib) needs the 'dlib'"
    for source, error in ((f"--image={photos / 'a.png'}", dlib_error),
                          (f"--images={photos}", dlib_error),
                          (f"--frames={clip}", f"error: {clip}: reading video (PyAV) needs the "
                                               "'av' package")):
        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, "-c", code, source, f"--output_dir={out}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(error), (source, proc.stdout[-2000:], proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr and "skipped" not in proc.stdout, source
        assert not list(out.glob("*/metrics.json")), source
