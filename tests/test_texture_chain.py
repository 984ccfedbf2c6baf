"""The paper's texture path through the binaries, file to file: photos → UV maps
(build_uv_dataset) → a progressive GAN on them (train_texture_gan) → GANFIT with that generator
(fit --texture=generator.msgpack) → its render (render --params). Each binary's own tests check
its numbers; this one checks that what each writes is what the next reads."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def binary(name, *args):
    result = subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, (name, result.stderr[-2000:])
    return result.stdout


def test_photos_to_uv_maps_to_a_gan_to_a_fit(faces_dir, sfm_dir, tmp_path, run_fit):
    model = f"--model={sfm_dir / 'sfm_shape_3448.bin'}"
    uv = tmp_path / "uv"
    binary("build_uv_dataset", f"--images={faces_dir / 'ffhq' / 'FFHQ'}", f"--output_dir={uv}",
           "--limit=4", "--resolution=16", "--iterations=20", "--crop_size=96", model)
    maps = sorted(p for p in os.listdir(uv) if p.endswith(".png") and "_mask" not in p)
    assert len(maps) == 4 and all(os.path.exists(uv / m.replace(".png", "_mask.png"))
                                  for m in maps)
    gan = tmp_path / "gan"
    binary("train_texture_gan", f"--uv_dir={uv}", f"--output_dir={gan}", "--max_resolution=16",
           "--steps_per_phase=2", "--batch_size=2", "--fmap_base=32", "--fmap_max=16",
           "--latent_dim=8", "--log_every=1")
    assert json.loads((gan / "config.json").read_text())["latent_dim"] == 8
    fit = tmp_path / "fit"
    code, stdout, stderr = run_fit(
        f"--image={faces_dir / 'ffhq' / 'FFHQ' / '00001.png'}", f"--output_dir={fit}", model,
        f"--texture={gan / 'generator.msgpack'}", "--identity=tiny", "--stage1_iterations=4",
        "--iterations=2", "--chunk=2", "--image_size=64")
    assert code == 0, stderr[-2000:]
    params = np.load(fit / "params.npz")
    assert params["texture"].shape == (8,)  # p_t: the generator's latent
    texture = np.asarray(Image.open(fit / "mesh.png"))
    assert texture.shape == (16, 16, 3) and texture.std() > 1  # G(p_t) at the GAN's resolution
    binary("render", model, f"--params={fit / 'params.npz'}", f"--output_dir={tmp_path / 'r'}",
           "--image_size=64", "--views=0,30")
    assert len(os.listdir(tmp_path / "r")) == 2
