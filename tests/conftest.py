"""Shared fixtures: the real public assets beside the checkout (skipped with a reason if absent)."""

import contextlib
import importlib.metadata
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

# XLA:CPU's older loop emitters compile ~35% faster and run as fast (the fitting step is compiled
# with them for users too: fitting.CPU_STEP_COMPILER_OPTIONS). Set for the whole suite and the
# binaries it starts, they cut its CPU time by ~16% (BENCHMARKS.md). Only on the jaxlib this
# was measured with: an XLA that does not know a flag in XLA_FLAGS aborts.
FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
# The suite is mostly compilation of tiny programs: LLVM's backend optimisations off (the same
# XLA programs, code generated without LLVM's passes) halve its time, 1,557 -> 800 s on the
# 2-core dev VM (BENCHMARKS.md, session 25); the tests that run long computations lose a
# little. Results agree to float round-off; the one place that assumed bit-equal
# recomputation, the z-buffer's winner test, no longer does. Users' programs keep XLA's default;
# `XLA_FLAGS=--xla_backend_optimization_level=3 python -m pytest` runs the suite as they compile.
# CPU only: on a GPU the same flag would lower the optimisation of the kernels' PTX, and the
# GPU check (experiments/gpu_check.sh) runs tests to see what the device computes.
TEST_OPT_FLAG = "--xla_backend_optimization_level=0"
# Two more savings on the suite's compilations, CPU only like the one above: XLA's HLO verifier
# re-checks the whole module after every pass pipeline (~9% of a tiny step's compilation,
# perf), and the module is split for parallel LLVM code generation (~14%, on threads the two
# workers' cores do not have to spare). Together ~25% less CPU time in the tiny step's
# compilation (perf samples), 11-19% less in a tiny uncached fit (BENCHMARKS.md, session 30);
# neither changes the compiled program.
TEST_COMPILE_FLAGS = ("--xla_disable_hlo_passes=hlo-verifier",
                      "--xla_cpu_parallel_codegen_split_count=1")


def _accelerator_jax():
    """Whether a JAX plugin for a GPU or TPU is installed (checked before JAX starts)."""
    names = {(d.metadata["Name"] or "").lower().replace("_", "-")
             for d in importlib.metadata.distributions()}
    return any(n.startswith(("jax-cuda", "jax-rocm", "libtpu")) for n in names)


if importlib.metadata.version("jaxlib") == "0.10.2":
    _flags = [FAST_COMPILE_FLAG]
    if os.environ.get("JAX_PLATFORMS", "") == "cpu" or not _accelerator_jax():
        _flags += [TEST_OPT_FLAG, *TEST_COMPILE_FLAGS]
    for _flag in _flags:
        if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

# Many tests compile the same programs (the tiny step in the benchmark, GPU-check, fitting and
# binary tests; each binary a fresh process): one JAX persistent cache for this run, made here
# in pytest's main process before its xdist workers start, so that they and the binaries they
# start inherit it, and removed at the end. ~6% of the suite's wall time (BENCHMARKS.md); a
# JAX_COMPILATION_CACHE_DIR of the caller's own is left alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _TEST_CACHE = tempfile.mkdtemp(prefix="ganfit_jax_test_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _TEST_CACHE
    os.environ["GANFIT_TEST_CACHE_OWNER"] = str(os.getpid())


# The test files that take longest (worker-seconds of `python -m pytest --durations=0`, session
# 27), heaviest first. pytest-xdist hands each worker a whole file at a time (`--dist loadfile`)
# in collection order (`--no-loadscope-reorder` in pytest.ini; by default it orders files by
# their count of tests, which left the one-test 60 s GPU check and the few long multi-process
# tests to the end, with one worker idle): longest first, the many short files last, so the
# two workers finish within a short file of each other. A file not listed runs after these.
SLOW_FILES_FIRST = (
    "test_fit_binary.py", "test_video.py", "test_benchmark_fit.py", "test_distributed.py",
    "test_fitting.py", "test_gpu_check.py", "test_fitting_steps.py", "test_render.py",
    "test_benchmark_tracking.py", "test_antialias.py", "test_texture_chain.py",
    "test_benchmark_quality.py", "test_render_tools.py", "test_texture_gan.py",
    "test_evaluate_now.py", "test_precision.py", "test_identity_arcface.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


def pytest_unconfigure(config):
    if os.environ.get("GANFIT_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
def dlib_models():
    """`landmarks.dlib_model_file` (dlib's model files by name), or a skip when dlib or
    face_recognition_models is not installed; the package is found, not imported (its import
    needs pkg_resources, which setuptools >= 81 and Python 3.12's venvs lack)."""
    pytest.importorskip("dlib")
    from ganfit_jax import landmarks

    try:
        landmarks.dlib_model_file(landmarks.SHAPE_PREDICTOR_68)
    except ImportError as e:
        pytest.skip(str(e))
    return landmarks.dlib_model_file


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


@pytest.fixture(scope="session")
def run_fit(tmp_path_factory):
    """`python -m experiments.fit ARGS` in a subprocess on the CPU → (exit code, stdout,
    stderr). fit's default --compilation_cache lives under $XDG_CACHE_HOME, so the tests keep
    theirs in a folder of their own (`cache_home=` gives a test a fresh one).

    The fits keep every program that took 0.2 s to compile (JAX's default is 1 s, fit's 0.1 s
    since session 29): at LLVM -O0 few pass a second, and the tests' fits compile many of the
    same mid-sized programs (the outputs' renders at 64², the tiny step): test_fit_binary.py
    236 -> 215 s, test_video.py 129 -> 122 s against 1 s (one process, session 27); caching
    every program cost the suite more than it saved (session 25)."""
    root = pathlib.Path(__file__).resolve().parent.parent
    shared_home = tmp_path_factory.mktemp("xdg")

    def run(*args, timeout=600, cache_home=None, env=None):
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.fit", *args], cwd=root, capture_output=True,
            text=True, timeout=timeout,
            env={"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2", **os.environ,
                 "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(cache_home or shared_home),
                 **(env or {})})
        return proc.returncode, proc.stdout, proc.stderr

    return run


def _read_glb(path):
    """The first mesh primitive of a binary glTF file, decoded from the spec (glTF 2.0, §4.4
    and §5.1) with numpy alone, as a check on the writer that does not go through trimesh:
    dict of its attributes (POSITION, NORMAL, TEXCOORD_0, COLOR_0 as present), `indices` (F,3),
    `image` (H,W,C uint8, the base colour texture, if any), `material` and `json`."""
    import io as _io
    import json
    import struct

    import numpy as np
    from PIL import Image

    data = pathlib.Path(path).read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and length == len(data), (magic, version, length)
    chunks, offset = {}, 12
    while offset < length:
        size, kind = struct.unpack_from("<I4s", data, offset)
        chunks[kind] = data[offset + 8: offset + 8 + size]
        offset += 8 + size
    doc = json.loads(chunks[b"JSON"])
    binary = chunks[b"BIN\x00"]
    dtypes = {5121: np.uint8, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
    widths = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}

    def view_bytes(index):
        view = doc["bufferViews"][index]
        start = view.get("byteOffset", 0)
        return binary[start: start + view["byteLength"]]

    def accessor(index):
        acc = doc["accessors"][index]
        raw = view_bytes(acc["bufferView"])[acc.get("byteOffset", 0):]
        width = widths[acc["type"]]
        return np.frombuffer(raw, dtypes[acc["componentType"]],
                             acc["count"] * width).reshape(acc["count"], width)

    primitive = doc["meshes"][0]["primitives"][0]
    out = {name: accessor(i) for name, i in primitive["attributes"].items()}
    out["indices"] = accessor(primitive["indices"]).reshape(-1, 3)
    out["json"] = doc
    out["material"] = doc["materials"][primitive["material"]] if "material" in primitive else None
    texture = (out["material"] or {}).get("pbrMetallicRoughness", {}).get("baseColorTexture")
    if texture is not None:
        image = doc["images"][doc["textures"][texture["index"]]["source"]]
        out["image"] = np.asarray(Image.open(_io.BytesIO(view_bytes(image["bufferView"]))))
    return out


@pytest.fixture(scope="session")
def read_glb():
    return _read_glb


@pytest.fixture
def optimised_steps(monkeypatch):
    """The fitting steps compiled with LLVM's optimisations (-O3, as users' programs are) in a
    test that runs long fits, while the rest of the suite compiles at -O0 (TEST_OPT_FLAG)."""
    from ganfit_jax import fitting

    monkeypatch.setattr(fitting, "CPU_STEP_COMPILER_OPTIONS",
                        dict(fitting.CPU_STEP_COMPILER_OPTIONS, xla_backend_optimization_level=3))
    fitting.cpu_step_compiler_options.cache_clear()
    yield
    monkeypatch.undo()
    fitting.cpu_step_compiler_options.cache_clear()


@pytest.fixture
def compilations(caplog):
    """`with compilations() as compiled:` lists, once the block ends, the XLA compilations JAX
    logged inside it (a program compiled per operation or per array is the cost several tests
    guard against)."""
    import jax

    @contextlib.contextmanager
    def record():
        compiled = []
        start = len(caplog.records)
        with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
            yield compiled
        compiled.extend(r.getMessage() for r in caplog.records[start:]
                        if "Finished XLA compilation" in r.getMessage())

    return record
