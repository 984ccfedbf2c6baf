"""Build the linear UV texture model of GANFIT Eq. 1 (the PCA baseline of Fig. 5(i)).

    python -m experiments.build_texture_pca --uv_dir=DIR --output=pca_texture.npz \
        --resolution=128 [--num_components=K]

Reads NAME.png / NAME_mask.png UV maps, runs masked PCA with iterative low-rank imputation of the
unobserved texels (ganfit_jax/texture/pca.py), writes the .npz that
`ganfit_jax.texture.load_texture_model` reads, and a preview PNG beside it: the mean texture and
mean +- 2 sigma along the first components.
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import common
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ganfit_jax.texture import model as texture_model
from ganfit_jax.texture import pca, uv_io

FLAGS = flags.FLAGS
flags.DEFINE_string("uv_dir", None, "Folder of UV maps (NAME.png, optional NAME_mask.png).")
flags.DEFINE_string("output", None, "Output .npz path.")
flags.DEFINE_integer("resolution", 128, "UV maps are resized to resolution x resolution.",
                     lower_bound=4)
flags.DEFINE_integer("num_components", 0, "Number of components K (0: n - 1, full rank).",
                     lower_bound=0)
flags.DEFINE_integer("imputation_rank", 0, "Rank used to fill unobserved texels (0: default).",
                     lower_bound=0)
flags.DEFINE_integer("iterations", 50, "Imputation iterations at most.", lower_bound=0)


def main(argv):
    del argv
    if not FLAGS.output.endswith(".npz"):
        raise ValueError(f"--output must end in .npz, got {FLAGS.output}")
    names, images, masks = uv_io.load_uv_folder(FLAGS.uv_dir, FLAGS.resolution)
    print(f"Loaded {len(names)} UV maps at {FLAGS.resolution}px; observed texels "
          f"{100 * masks.mean():.1f}%", flush=True)
    model = pca.build_masked_pca(images, masks[..., 0],
                                 num_components=FLAGS.num_components or None,
                                 imputation_rank=FLAGS.imputation_rank or None,
                                 iterations=FLAGS.iterations)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    texture_model.save_pca(model, FLAGS.output)
    errors = []
    for img, m in zip(images, masks):
        p = pca.project(model, img, m)
        errors.append(float(jnp.sum(jnp.abs(model.generate(p) - img) * m) /
                            max(float(m.sum()) * 3, 1.0)))
    print(f"Wrote {FLAGS.output}: K={model.latent_dim}, texels never observed "
          f"{100 * float((model.coverage == 0).mean()):.1f}%, training-map L1 on observed "
          f"texels mean {np.mean(errors):.5f} max {np.max(errors):.5f}", flush=True)
    k = min(3, model.latent_dim)
    tiles = [np.asarray(model.mean)]
    for i in range(k):
        for s in (-2.0, 2.0):
            tiles.append(np.asarray(model.generate(jnp.zeros(model.latent_dim).at[i].set(s))))
    preview = np.concatenate(tiles, axis=1)
    path = FLAGS.output[:-4] + "_preview.png"
    Image.fromarray(np.round(preview * 255).astype(np.uint8)).save(path)
    print(f"Preview (mean, then -2/+2 sigma of the first {k} components): {path}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["uv_dir", "output"])
    app.run(common.input_errors_as_one_line(main))
