"""ganfit_jax.io: meshes keep vertex order, images/params round-trip, nothing is overwritten."""

import flax.struct
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh
from PIL import Image

from ganfit_jax import io, morphable

RNG = np.random.default_rng(0)


def _textured_mesh(n_faces=40, n_verts=30):
    verts = RNG.normal(size=(n_verts, 3)) * 50
    tris = RNG.integers(0, n_verts - 1, size=(n_faces, 3))  # the last vertex is unreferenced
    tris[:, 1] = (tris[:, 0] + 1) % (n_verts - 1)
    tris[:, 2] = (tris[:, 0] + 2) % (n_verts - 1)
    uv = RNG.uniform(size=(n_verts, 2))
    texture = RNG.uniform(size=(16, 24, 3)).astype(np.float32)
    return verts, tris, uv, texture


def test_obj_round_trip_keeps_vertex_order(tmp_path):
    verts, tris, uv, texture = _textured_mesh()
    written = io.write_obj(tmp_path / "face.obj", verts, tris, uv, texture)
    assert sorted(p.name for p in written) == ["face.mtl", "face.obj", "face.png"]
    assert "mtllib face.mtl" in (tmp_path / "face.obj").read_text()
    assert "map_Kd face.png" in (tmp_path / "face.mtl").read_text()
    back = io.read_obj(tmp_path / "face.obj")
    np.testing.assert_allclose(back.vertices, verts, atol=1e-7)   # same order, unreferenced kept
    np.testing.assert_array_equal(back.triangles, tris)
    np.testing.assert_allclose(back.uv, uv, atol=1e-7)
    np.testing.assert_allclose(back.texture, np.rint(texture * 255) / 255, atol=1e-6)
    # An independent reader agrees: the raw text's k-th 'v' line is vertex k.
    v_lines = [l.split()[1:4] for l in (tmp_path / "face.obj").read_text().splitlines()
               if l.startswith("v ")]
    np.testing.assert_allclose(np.asarray(v_lines, float), verts, atol=1e-7)


def test_obj_texture_orientation_matches_uv_convention(tmp_path):
    """A texel at row (1-v)*H of the PNG is what trimesh samples at uv (OBJ: v up)."""
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    tris = np.array([[0, 1, 2]])
    texture = np.zeros((4, 4, 3), np.float32)
    texture[0, :, 0] = 1.0   # top row red
    texture[3, :, 2] = 1.0   # bottom row blue
    uv = np.array([[0.5, 0.9], [0.5, 0.1], [0.1, 0.9]])
    io.write_obj(tmp_path / "t.obj", verts, tris, uv, texture)
    mesh = trimesh.load(tmp_path / "t.obj", process=False, maintain_order=True)
    colours = trimesh.visual.color.uv_to_color(mesh.visual.uv, mesh.visual.material.image)
    assert tuple(colours[0, :3]) == (255, 0, 0)   # v = 0.9 → top row
    assert tuple(colours[1, :3]) == (0, 0, 255)   # v = 0.1 → bottom row


def test_obj_vertex_colours_and_model_export(tmp_path, sfm_model):
    verts, tris, _, _ = _textured_mesh()
    colours = RNG.uniform(size=(len(verts), 3))
    io.write_obj(tmp_path / "c.obj", verts, tris, vertex_colours=colours)
    back = io.read_obj(tmp_path / "c.obj")
    np.testing.assert_allclose(back.vertex_colours, np.rint(colours * 255) / 255, atol=1e-6)
    p = np.zeros(sfm_model.num_shape)
    p[0] = 1.5
    io.write_model_obj(tmp_path / "sfm.obj", sfm_model, p, 0.0, texture=np.ones((8, 8, 3)))
    back = io.read_obj(tmp_path / "sfm.obj")
    np.testing.assert_allclose(back.vertices, morphable.vertices(sfm_model, p, 0.0), atol=1e-4)
    np.testing.assert_array_equal(back.triangles, sfm_model.triangles)
    np.testing.assert_allclose(back.uv, sfm_model.uv, atol=1e-6)


def test_obj_refuses_to_overwrite_any_of_its_files(tmp_path):
    verts, tris, uv, texture = _textured_mesh()
    (tmp_path / "face.png").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="face.png.*refusing to overwrite"):
        io.write_obj(tmp_path / "face.obj", verts, tris, uv, texture)
    assert not (tmp_path / "face.obj").exists()  # nothing half-written
    assert (tmp_path / "face.png").read_bytes() == b"keep me"
    io.write_obj(tmp_path / "face.obj", verts, tris, uv, texture, overwrite=True)
    assert (tmp_path / "face.png").read_bytes()[:4] == b"\x89PNG"


def test_obj_bad_input(tmp_path):
    verts, tris, uv, texture = _textured_mesh()
    with pytest.raises(ValueError, match="triangles must be"):
        io.write_obj(tmp_path / "a.obj", verts, tris + 100)
    with pytest.raises(ValueError, match="uv and texture come together"):
        io.write_obj(tmp_path / "a.obj", verts, tris, uv)
    with pytest.raises(ValueError, match="a.ply.*expected a .obj"):
        io.write_obj(tmp_path / "a.ply", verts, tris)
    with pytest.raises(FileNotFoundError, match="none.obj"):
        io.read_obj(tmp_path / "none.obj")


def test_image_round_trip_and_refusal(tmp_path):
    image = RNG.uniform(size=(7, 5, 3)).astype(np.float32)
    io.save_image(tmp_path / "x.png", image)
    back = io.load_image(tmp_path / "x.png")
    assert back.dtype == np.float32 and back.shape == (7, 5, 3)
    np.testing.assert_allclose(back, image, atol=0.5 / 255 + 1e-6)
    # row 0 is the top of the PNG, as Pillow (an independent reader) sees it
    raw = np.asarray(Image.open(tmp_path / "x.png"))
    np.testing.assert_array_equal(raw[0], np.rint(image[0] * 255).astype(np.uint8))
    with pytest.raises(FileExistsError, match="x.png"):
        io.save_image(tmp_path / "x.png", image)
    io.save_image(tmp_path / "x.png", 1 - image, overwrite=True)
    np.testing.assert_allclose(io.load_image(tmp_path / "x.png"), 1 - image, atol=0.5 / 255 + 1e-6)
    with pytest.raises(ValueError, match="NaN"):
        io.save_image(tmp_path / "n.png", np.full((2, 2, 3), np.nan))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="bad.png is not an image file"):
        io.load_image(tmp_path / "bad.png")


@flax.struct.dataclass
class _Params:
    shape: jnp.ndarray
    camera: jnp.ndarray
    light: dict


def test_params_round_trip(tmp_path):
    params = {"shape": np.arange(4.0), "expression": np.ones(3, np.float32),
              "camera": {"eye": np.array([0, 0, 600.0]), "focal": np.float32(1066.0)}}
    io.save_params(tmp_path / "p.npz", params, image="einstein.jpg", step=100)
    back = io.load_params(tmp_path / "p.npz")
    np.testing.assert_array_equal(back["shape"], params["shape"])
    assert back["expression"].dtype == np.float32
    np.testing.assert_array_equal(back["camera"]["eye"], params["camera"]["eye"])
    assert str(back["__meta__"]["image"]) == "einstein.jpg" and int(back["__meta__"]["step"]) == 100
    with pytest.raises(FileExistsError, match="p.npz"):
        io.save_params(tmp_path / "p.npz", params)

    dc = _Params(shape=jnp.arange(3.0), camera=jnp.ones(7), light={"ambient": jnp.zeros(3)})
    io.save_params(tmp_path / "dc.npz", dc)
    restored = io.load_params(tmp_path / "dc.npz", target=_Params(
        shape=jnp.zeros(3), camera=jnp.zeros(7), light={"ambient": jnp.ones(3)}))
    assert isinstance(restored, _Params)
    np.testing.assert_array_equal(restored.shape, dc.shape)
    np.testing.assert_array_equal(restored.light["ambient"], np.zeros(3))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="junk.npz"):
        io.load_params(tmp_path / "junk.npz")


def test_write_never_overwrite(tmp_path):
    path = io.write_never_overwrite(tmp_path / "sub" / "a.txt", "hello")
    assert path.read_text() == "hello"
    with pytest.raises(FileExistsError, match=r"a.txt: already exists; refusing"):
        io.write_never_overwrite(path, "bye")
    assert path.read_text() == "hello"
    io.write_never_overwrite(path, b"bye", overwrite=True)
    assert path.read_bytes() == b"bye"


def _pixels_of(image, colour):
    return np.argwhere(np.all(image == np.asarray(colour, np.uint8), axis=-1))


def test_loss_curves(tmp_path):
    steps = np.arange(50)
    curves = {"landmark": 1000 * np.exp(-steps / 10), "identity": np.linspace(1.0, 0.5, 50)}
    image = io.render_curves(curves, log_y=False, title="fit")
    assert image.shape == (440, 720, 3) and image.dtype == np.uint8
    first, second = io._PALETTE[0], io._PALETTE[1]
    a, b = _pixels_of(image, first), _pixels_of(image, second)
    assert len(a) > 100 and len(b) > 100
    plot_a = a[a[:, 1] < 600]   # leave out the legend swatch in the top-right corner
    # a decreasing curve: its pixels on the left sit higher (smaller row) than on the right
    assert plot_a[plot_a[:, 1] < 150][:, 0].mean() < plot_a[plot_a[:, 1] > 500][:, 0].mean()
    # on a linear axis the slowly decreasing 'identity' curve hugs the bottom (values ≪ 1000)
    plot_b = b[b[:, 1] < 600]
    assert plot_b[:, 0].min() > 350
    # on a log axis it is lifted well off the bottom: log10(1) is 3 decades above log10(1e-3)
    log_image = io.render_curves(curves, log_y=True)
    log_b = _pixels_of(log_image, second)
    # y axis spans 1e-1..1e3 (rows 395..30): value 1 at the left edge sits 1/4 up, row ~304
    assert np.all(np.abs(log_b[log_b[:, 1] < 80][:, 0] - 304) <= 3)
    path = io.save_loss_curves(tmp_path / "loss.png", curves, log_y=True)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), log_image)
    with pytest.raises(FileExistsError, match="loss.png"):
        io.save_loss_curves(path, curves)
    with pytest.raises(ValueError, match="no finite positive values"):
        io.render_curves({"zero": [0.0, -1.0]}, log_y=True)


def test_chart_labels_keep_their_word_spaces():
    """Pillow's 10 px default face rounds a space to 2 px: "GANFIT fit of 00001.png" over
    loss.png read as one word."""
    font = io.label_font()
    assert font.getlength(" ") >= 3
    assert font.getlength("GANFIT fit of") - font.getlength("GANFITfitof") >= 6


def test_the_legend_leaves_the_curves_ends_in_view():
    """A curve that rises to the plot's top-right corner (where every curve of a loss plot
    ends, converged) is drawn to its end: the legend sits right of the plot's frame."""
    rising = np.linspace(0.0, 1.0, 100)
    image = io.render_curves({"rising": rising, "a much longer term name": 0.5 + 0 * rising})
    frame = np.all(image == 0, axis=-1)
    frame_right = np.flatnonzero(frame.sum(0) > 0.8 * image.shape[0] * 0.8).max()
    # the legend box's grey outline (its sides: columns of it; the labels' antialiased edges
    # hit the same grey only at scattered pixels)
    outline = np.all(image == (120, 120, 120), axis=-1)
    sides = np.flatnonzero(outline.sum(0) >= 10)
    assert len(sides) == 2 and sides.min() > frame_right
    curve = _pixels_of(image, io._PALETTE[0])
    plotted = curve[curve[:, 1] < frame_right]
    # the line's last pixels: at the frame's right edge, at the top of the plot (row 30, and
    # the linear axis' 5% margin above the largest value)
    end = plotted[plotted[:, 1] >= frame_right - 3]
    assert len(end) and end[:, 0].min() < 60


def test_glb_holds_the_mesh_in_metres_in_model_order_with_its_texture(tmp_path, read_glb):
    """Read back by a decoder written from the glTF spec (conftest), not by trimesh: vertex k
    is model vertex k in metres, the triangles as given, glTF's texture coordinates are OBJ's
    with v flipped (glTF's origin is the image's top left), and the embedded PNG is the map."""
    verts, tris, uv, texture = _textured_mesh()
    assert [p.name for p in io.write_glb(tmp_path / "face.glb", verts, tris, uv, texture)] \
        == ["face.glb"]
    glb = read_glb(tmp_path / "face.glb")
    np.testing.assert_allclose(glb["POSITION"], verts * 1e-3, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(glb["indices"], tris)
    np.testing.assert_allclose(glb["TEXCOORD_0"], np.stack([uv[:, 0], 1 - uv[:, 1]], 1),
                               atol=1e-6)
    np.testing.assert_array_equal(glb["image"][..., :3], io.to_uint8(texture))
    normals = glb["NORMAL"][np.unique(tris)]
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-5)
    pbr = glb["material"]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0 and pbr["roughnessFactor"] == 1


def test_glb_vertex_colours_refusals_and_write_mesh(tmp_path, read_glb):
    verts, tris, uv, texture = _textured_mesh()
    colours = RNG.uniform(size=(len(verts), 3))
    io.write_mesh(tmp_path / "c.glb", verts, tris, vertex_colours=colours)
    glb = read_glb(tmp_path / "c.glb")
    assert "TEXCOORD_0" not in glb
    np.testing.assert_array_equal(glb["COLOR_0"][:, :3], np.rint(colours * 255))
    with pytest.raises(FileExistsError, match="c.glb.*refusing to overwrite"):
        io.write_glb(tmp_path / "c.glb", verts, tris)
    io.write_mesh(tmp_path / "c.glb", verts, tris, uv, texture, overwrite=True)
    assert "TEXCOORD_0" in read_glb(tmp_path / "c.glb")
    with pytest.raises(ValueError, match="uv must be"):
        io.write_glb(tmp_path / "d.glb", verts, tris, uv[:3], texture)
    with pytest.raises(ValueError, match="d.gltf.*expected a .glb"):
        io.write_glb(tmp_path / "d.gltf", verts, tris)
    with pytest.raises(ValueError, match="d.ply.*one of"):
        io.write_mesh(tmp_path / "d.ply", verts, tris)
    assert not any(tmp_path.glob("d.*"))
    io.write_mesh(tmp_path / "m.obj", verts, tris, uv, texture)
    np.testing.assert_allclose(io.read_obj(tmp_path / "m.obj").vertices, verts, atol=1e-7)


def test_contact_sheet_places_tiles_in_order_under_their_labels():
    from ganfit_jax import io

    red, blue = np.zeros((20, 40, 3)), np.zeros((10, 10, 3))
    red[..., 0], blue[..., 2] = 1.0, 1.0
    sheet = io.contact_sheet([red, blue, red], ["a", "b", "c"], columns=2, tile_height=10,
                             label_height=12, gap=3)
    # every tile 10 px high, the widest (red: 20 px) sets the column width; two rows
    assert sheet.shape == (2 * (12 + 10), 20 + 3 + 20, 3) and sheet.dtype == np.uint8
    assert (sheet[12:22, 0:20] == [255, 0, 0]).all()  # red, scaled to 20 × 10
    assert (sheet[12:22, 23:33] == [0, 0, 255]).all() and (sheet[12:22, 33:] == 255).all()
    assert (sheet[34:44, 0:20] == [255, 0, 0]).all() and (sheet[34:, 20:] == 255).all()
    assert sheet[:12, :20].min() < 128  # the label "a", dark on white
    with pytest.raises(ValueError, match="as many labels"):
        io.contact_sheet([red], ["a", "b"])


def test_a_long_label_is_shortened_in_its_middle_to_its_tiles_width():
    """A data set's long photo names: each label stays above its own tile, keeping the name's
    start and the error at its end."""
    font = io.label_font()
    name = "id08392-DGGTJx470Ag-005451_inputs_inputs_and_more_of_it.jpg: 3.52%"
    short = io.fit_label(name, 150, font)
    assert font.getlength(short) <= 150 < font.getlength(name)
    assert short.startswith("id08") and short.endswith("3.52%") and "…" in short
    assert io.fit_label("00001: 3.39%", 150, font) == "00001: 3.39%"
    tile = np.zeros((40, 80, 3))
    sheet = io.contact_sheet([tile, tile], [name, name], columns=2, tile_height=40,
                             label_height=16, gap=10)
    strip = sheet[:16].min(-1) < 128  # the labels' dark pixels
    assert strip[:, :80].any() and not strip[:, 77:93].any()  # none in the gap between tiles
