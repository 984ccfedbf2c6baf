"""README.md's library example runs as written, and does what it says."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_block(title):
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_library_example_runs_and_fits_its_own_variant(assets_dir, monkeypatch, capsys):
    code = readme_block("Use it as a library")
    monkeypatch.chdir(ROOT)  # its paths are the README's: relative to the checkout
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    terms, params = namespace["terms"], namespace["params"]
    # every term of Eq. 12 with a network behind it, and the variant's own, all finite
    for name in ("identity", "identity_random", "content", "pixel", "landmark", "reg",
                 "smooth_expression"):
        assert np.isfinite(float(terms[name])), name
    printed = [line for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert len(printed) == 5
    # the custom step moved what stage 2 frees (texture and light are frozen in stage 1)
    start = namespace["fitting"].init_params(namespace["model"], namespace["lm"], (224, 224),
                                             namespace["texture"].latent_dim,
                                             texture_init=namespace["texture"].init_latent())
    assert np.abs(np.asarray(params.texture) - np.asarray(start.texture)).max() > 0
    assert np.abs(np.asarray(params.light) - np.asarray(start.light)).max() > 0


def test_every_name_in_the_paper_map_exists():
    """README's table of the paper beside the code names real functions and classes."""
    import importlib

    text = (ROOT / "README.md").read_text()
    section = text.split("## The paper beside the code\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    names = [n for row in rows for n in re.findall(r"`([a-z_]+(?:\.[A-Za-z_0-9]+)+)`",
                                                  row.rsplit("|", 2)[1])]
    assert len(rows) >= 15 and len(names) >= 30, (len(rows), len(names))
    missing = []
    for name in names:
        module_path, attr = name.rsplit(".", 1)
        try:
            module = importlib.import_module(f"ganfit_jax.{module_path}")
        except ImportError:
            missing.append(name)
            continue
        if not callable(getattr(module, attr, None)):
            missing.append(name)
    assert not missing, missing


def test_the_suite_hands_out_its_slowest_files_first():
    """pytest.ini keeps the collection order (--no-loadscope-reorder) and conftest puts the files
    of SLOW_FILES_FIRST at its head: each of them must exist (a renamed file would silently fall
    to the end and leave one worker idle) and be named once."""
    import configparser
    import pathlib

    import conftest

    tests = pathlib.Path(__file__).resolve().parent
    missing = [name for name in conftest.SLOW_FILES_FIRST if not (tests / name).is_file()]
    assert not missing, missing
    assert len(set(conftest.SLOW_FILES_FIRST)) == len(conftest.SLOW_FILES_FIRST)
    ini = configparser.ConfigParser()
    ini.read(tests.parent / "pytest.ini")
    assert "--no-loadscope-reorder" in ini["pytest"]["addopts"].split()
    assert "loadfile" in ini["pytest"]["addopts"].split()
