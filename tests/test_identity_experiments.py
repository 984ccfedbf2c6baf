"""experiments/convert_identity and experiments/identity_similarity, run in-process."""

import jax
import numpy as np
import pytest
from absl import flags

from ganfit_jax import identity


def _run(main, argv):
    flags.FLAGS.unparse_flags()
    main(flags.FLAGS(argv))


def test_convert_arcface_pth_and_load(tmp_path, capsys):
    from experiments import convert_identity
    from test_identity_arcface import mbf_state_dict, write_torch_pth

    pth = tmp_path / "backbone.pth"
    write_torch_pth(pth, mbf_state_dict())
    out = tmp_path / "mbf.msgpack"
    _run(convert_identity.main, ["convert", "--arch=mbf", f"--source={pth}", f"--output={out}"])
    printed = capsys.readouterr().out
    assert "layers.0.layers.0.* -> layers_0_layers_0 (conv)" in printed and f"wrote {out}" in printed
    from_pth = identity.load_identity("arcface-mbf", weights=pth)
    from_msgpack = identity.load_identity("arcface-mbf", weights=out)
    image = jax.random.uniform(jax.random.key(0), (112, 112, 3))
    embed = jax.jit(identity.embed)
    np.testing.assert_array_equal(np.asarray(embed(from_pth, image)[0]),
                                  np.asarray(embed(from_msgpack, image)[0]))


def test_similarity_on_aligned_chips(tmp_path, faces_dir, capsys, dlib_models):
    from experiments import identity_similarity

    johns = faces_dir / "dlib" / "johns"
    people = sorted(p for p in johns.iterdir() if p.is_dir())[:2]
    paths = [str(f) for person in people for f in sorted(person.iterdir())[:2]]
    out = tmp_path / "emb.npz"
    _run(identity_similarity.main, ["sim", "--aligned", f"--embeddings_out={out}", *paths])
    data = np.load(out)
    assert list(data["paths"]) == paths and data["embeddings"].shape == (4, 128)
    e = data["embeddings"] / np.linalg.norm(data["embeddings"], axis=1, keepdims=True)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] and sim[2, 3] > sim[1, 3]
    printed = capsys.readouterr().out
    assert "cosine similarity (dlib, 128-d)" in printed and "euclidean distance" in printed
    with pytest.raises(ValueError, match=r"--aligned needs 150×150"):
        _run(identity_similarity.main, ["sim", "--aligned", str(faces_dir / "ffhq" / "FFHQ" / "00000.png")])
