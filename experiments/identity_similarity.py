"""Pairwise identity similarity of face images (e.g. a reconstruction's render against the photo).

  python -m experiments.identity_similarity photo.jpg render.png
  python -m experiments.identity_similarity --identity=arcface-r50 \
      --weights=checkpoints/arcface_r50_backbone.msgpack a.jpg b.jpg
  python -m experiments.identity_similarity --aligned --embeddings_out=emb.npz chip1.jpg chip2.jpg

Without --aligned each image's face is found by dlib (HOG detector + 68-point predictor, the largest
face) and aligned to the network's template (dlib chip or ArcFace 5-point crop); with --aligned the
images must already be the network's input size. Prints the cosine-similarity matrix; the optional
npz holds `paths` and `embeddings` (one row per image, in argument order).
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common

from ganfit_jax import identity, landmarks

FLAGS = flags.FLAGS
flags.DEFINE_string("identity", "dlib", "dlib | arcface | arcface-<r18|r34|r50|r100|mbf> | tiny")
flags.DEFINE_string("weights", None, "Weights for the network (.dat, .pth, .onnx or .msgpack).")
flags.DEFINE_boolean("aligned", False, "Images are already aligned crops of the network's input size.")
flags.DEFINE_string("embeddings_out", None, "Write paths and embeddings to this .npz.")
flags.DEFINE_enum("detector", "hog", landmarks.DETECTORS, "dlib face detector when not --aligned.")
flags.DEFINE_boolean("use_annotations", False, "Use a sibling .pts/.npy/.json instead of detecting.")


def main(argv):
    paths = [pathlib.Path(p) for p in argv[1:]]
    if not paths:
        raise app.UsageError("give one or more IMAGE paths")
    net = identity.load_identity(FLAGS.identity, weights=FLAGS.weights,
                                 key=jax.random.key(0) if FLAGS.identity == "tiny" else None)
    embed = jax.jit(lambda image: identity.embed(net, image)[0])
    align = jax.jit(lambda image, lm: identity.align(net, image, lm))
    rows = []
    for path in paths:
        image = landmarks.load_image(path)
        if FLAGS.aligned:
            if image.shape[:2] != (net.input_size, net.input_size):
                raise ValueError(f"{path}: --aligned needs {net.input_size}×{net.input_size} images for "
                                 f"{FLAGS.identity}, got {image.shape[1]}×{image.shape[0]}")
            crop = jnp.asarray(image)
        else:
            if FLAGS.use_annotations:
                lm = landmarks.load_or_detect(path, detector=FLAGS.detector)
            else:
                lm = landmarks.detect_landmarks(path, detector=FLAGS.detector)
            crop = align(jnp.asarray(image), jnp.asarray(lm))
        rows.append(np.asarray(embed(crop)))
    embeddings = np.stack(rows)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    names = [p.name for p in paths]
    width = max(len(n) for n in names)
    print(f"cosine similarity ({FLAGS.identity}, {embeddings.shape[1]}-d):")
    print(" " * (width + 3) + "  ".join(f"{i:>6d}" for i in range(len(paths))))
    for i, name in enumerate(names):
        print(f"{i:>2d} {name:<{width}}" + "  ".join(f"{s:6.3f}" for s in similarity[i]))
    if net.alignment == "dlib":  # dlib's own verification rule: same person if distance < 0.6
        distance = np.linalg.norm(embeddings[:, None] - embeddings[None], axis=-1)
        print("euclidean distance (dlib: same person below 0.6):")
        for i, name in enumerate(names):
            print(f"{i:>2d} {name:<{width}}" + "  ".join(f"{d:6.3f}" for d in distance[i]))
    if FLAGS.embeddings_out:
        np.savez(FLAGS.embeddings_out, paths=np.array([str(p) for p in paths]), embeddings=embeddings)
        print(f"wrote {FLAGS.embeddings_out}", file=sys.stderr)


if __name__ == "__main__":
    app.run(common.input_errors_as_one_line(main))
