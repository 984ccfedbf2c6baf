"""Files in and out: textured meshes (OBJ + MTL + PNG, or one binary glTF), fitting parameters
(.npz), images, and loss-curve plots. The only module of ganfit_jax besides the model loaders
that touches disk.

Every writer refuses to replace an existing file unless `overwrite=True`, and names the file,
so a long fitting or training run never silently clobbers an earlier result.

Conventions (DESIGN.md): images are float32 H×W×3 RGB in [0, 1], row 0 at the top; UV
coordinates follow OBJ (v up), so texel row = (1 - v)·H, which is also how OBJ viewers read the
PNG written beside the mesh. Mesh vertices keep the model's order: the OBJ's vertex k is model
vertex k, so landmark indices and per-vertex data stay valid on the exported file.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np


# --------------------------------------------------------------------------------------------
# Never overwrite by accident
# --------------------------------------------------------------------------------------------


def refuse_overwrite(path, overwrite=False) -> pathlib.Path:
    """Raises FileExistsError naming `path` if it exists and overwrite is False; makes parents."""
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; refusing to overwrite it "
                              "(pass overwrite=True, or --overwrite to a binary)")
    if path.exists() and path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_never_overwrite(path, data: bytes | str, overwrite=False) -> pathlib.Path:
    """Writes bytes or text to `path`; an existing file is an error unless overwrite=True.

    Without overwrite the file is opened in exclusive mode, so two runs racing for the same name
    cannot both write it.
    """
    path = refuse_overwrite(path, overwrite)
    binary = isinstance(data, (bytes, bytearray))
    mode = ("w" if overwrite else "x") + ("b" if binary else "")
    try:
        with open(path, mode, **({} if binary else {"encoding": "utf-8"})) as f:
            f.write(data)
    except FileExistsError:
        raise FileExistsError(f"{path}: appeared while writing; refusing to overwrite it") from None
    return path


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def to_uint8(image, name="image"):
    """float [0,1] H×W(×3|×4) → uint8, rounding to nearest; out-of-range values are clipped."""
    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"{name}: expected H×W, H×W×3 or H×W×4, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"{name}: expected float values in [0,1] or uint8, got {image.dtype}")
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    out = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out[..., 0] if out.ndim == 3 and out.shape[2] == 1 else out


def encode_png(image) -> bytes:
    import io as _io

    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
    return buf.getvalue()


def save_image(path, image, overwrite=False) -> pathlib.Path:
    """Writes a float [0,1] (or uint8) H×W×3 image as PNG."""
    return write_never_overwrite(path, encode_png(image), overwrite)


def draw_points(image, point_sets, radius=None):
    """A copy of `image` (float [0,1] or uint8 H×W×3) with each (points (K,2) in the project's
    pixel convention, RGB colour) drawn as dots, later sets over earlier; NaN points skipped.
    Returns uint8."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(to_uint8(image, "image"))
    draw = ImageDraw.Draw(canvas)
    r = radius if radius is not None else max(1.0, max(canvas.size) / 160)
    for points, colour in point_sets:
        for x, y in np.asarray(points, np.float64):
            if np.isfinite(x) and np.isfinite(y):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in colour))
    return np.asarray(canvas)


def contact_sheet(images, labels, columns=4, tile_height=128, label_height=16, gap=6):
    """One uint8 image of `images` (float [0,1] or uint8 H×W×3, any sizes) in rows of `columns`,
    each scaled to `tile_height` pixels high (aspect kept, the widest sets the column width) with
    its label drawn in a strip above it, `gap` white pixels between columns, in order: a data
    set's fits reviewed at a glance."""
    from PIL import Image, ImageDraw

    images = [Image.fromarray(to_uint8(image, "contact_sheet image")) for image in images]
    if not images or len(images) != len(labels):
        raise ValueError(f"contact_sheet: expected as many labels as images (at least one), got "
                         f"{len(images)} images and {len(labels)} labels")
    tiles = [im.resize((max(1, round(im.width * tile_height / im.height)), tile_height),
                       Image.Resampling.BILINEAR) for im in images]
    width = max(t.width for t in tiles)
    rows = -(-len(tiles) // columns)
    columns = min(columns, len(tiles))
    sheet = Image.new("RGB", (columns * width + (columns - 1) * gap,
                              rows * (tile_height + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    font = label_font()
    for k, (tile, label) in enumerate(zip(tiles, labels)):
        x, y = (k % columns) * (width + gap), (k // columns) * (tile_height + label_height)
        draw.text((x + 3, y + 1), fit_label(str(label), width - 6, font), fill=(0, 0, 0),
                  font=font)
        sheet.paste(tile, (x, y + label_height))
    return np.asarray(sheet)


def fit_label(text, width, font):
    """`text` shortened in the middle, "…" in place of what is left out, to at most `width`
    pixels in `font`: a photo's name keeps its start and the error after it, and does not run
    into the next tile's label."""
    if font.getlength(text) <= width:
        return text
    head, tail = text[: len(text) // 2], text[len(text) // 2:]
    while head or tail:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
        short = head + "…" + tail
        if font.getlength(short) <= width:
            return short
    return ""


def write_video(path, frames, fps, overwrite=False, crf=18) -> int:
    """Writes an iterable of H×W×3 images (float [0,1] or uint8, all one size) as an H.264 MP4
    at `fps` frames per second (PyAV's FFmpeg; yuv420p, which players need, so an odd width or
    height is padded by repeating the last column or row). Frames are encoded as they come, so
    a long sequence is never held whole. Returns how many were written; nothing is written if
    `frames` is empty. Refuses an existing `path` unless overwrite."""
    import fractions
    import itertools

    from ganfit_jax import optional

    av = optional.require("av", "video", "writing MP4 video (PyAV)")
    path = refuse_overwrite(path, overwrite)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        return 0
    first = to_uint8(first, "frame")
    height, width = first.shape[:2]
    rate = fractions.Fraction(fps).limit_denominator(1001)
    count = 0
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt, stream.options = "yuv420p", {"crf": str(crf)}
        for image in itertools.chain([first], frames):
            image = to_uint8(image, "frame")
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"{path}: frame {count} is not H×W×3 RGB ({image.shape})")
            if image.shape[:2] != (height, width):
                raise ValueError(f"{path}: frame {count} is {image.shape[1]}×{image.shape[0]}, "
                                 f"the first was {width}×{height}")
            image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
            count += 1
        for packet in stream.encode():
            container.mux(packet)
    return count


def load_image(path) -> np.ndarray:
    """Any Pillow-readable image → float32 H×W×3 RGB in [0,1]; see `landmarks.load_image`
    (greyscale, RGBA, 16-bit and float images are all handled there, once)."""
    from ganfit_jax import landmarks

    return landmarks.load_image(path)


# --------------------------------------------------------------------------------------------
# Fitting parameters
# --------------------------------------------------------------------------------------------


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if "/" in str(key):
            raise ValueError(f"parameter name {key!r} contains '/', which .npz keys use to nest")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        elif value is not None:
            out[name] = np.asarray(value)
    return out


def _state_dict(params):
    if isinstance(params, Mapping):
        return params
    from flax import serialization

    return serialization.to_state_dict(params)  # flax.struct dataclasses, NamedTuples, ...


def save_params(path, params, overwrite=False, **metadata) -> pathlib.Path:
    """Saves a (nested) dict or flax pytree of arrays as .npz; nested keys are joined by '/'.

    `metadata` (strings, numbers) is stored under '__meta__/NAME'.
    """
    import io as _io

    arrays = _flatten(dict(_state_dict(params)))
    for key, value in metadata.items():
        arrays[f"__meta__/{key}"] = np.asarray(value)
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    return write_never_overwrite(path, buf.getvalue(), overwrite)


def load_params(path, target=None):
    """Reads save_params' .npz → nested dict of arrays (metadata under '__meta__').

    With `target` (a pytree of the same structure, e.g. a fresh params dataclass), returns the
    values restored into that structure instead, so the result plugs straight into jit.
    """
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such parameter file")
    try:
        with np.load(path, allow_pickle=False) as data:
            flat = {k: data[k] for k in data.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, EOFError: truncated or foreign
        raise ValueError(f"{path}: not a readable parameter .npz ({e})") from None
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if target is None:
        return tree
    from flax import serialization

    tree.pop("__meta__", None)
    try:
        return serialization.from_state_dict(target, tree)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: parameters do not match the target structure ({e})") from None


# --------------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------------


class ObjMesh(NamedTuple):
    vertices: np.ndarray          # (N,3)
    triangles: np.ndarray         # (F,3) int32, 0-based
    uv: Optional[np.ndarray]      # (N,2) OBJ convention, or None
    texture: Optional[np.ndarray]  # float32 H×W×3 in [0,1], or None
    vertex_colours: Optional[np.ndarray]  # (N,3) in [0,1], or None


def _checked_mesh(path, vertices, triangles, uv, texture):
    """The mesh's arrays as the writers take them, or a ValueError naming `path`."""
    vertices = np.asarray(vertices, np.float64)
    triangles = np.asarray(triangles)
    n = vertices.shape[0] if vertices.ndim else 0
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not np.all(np.isfinite(vertices)):
        raise ValueError(f"{path}: vertices must be finite (N,3), got {vertices.shape}")
    if triangles.ndim != 2 or triangles.shape[1] != 3 or (
            triangles.size and (triangles.min() < 0 or triangles.max() >= n)):
        raise ValueError(f"{path}: triangles must be (F,3) indices in [0,{n})")
    if (uv is None) != (texture is None):
        raise ValueError(f"{path}: uv and texture come together (got only one)")
    if uv is not None:
        uv = np.asarray(uv, np.float64)
        if uv.shape != (n, 2):
            raise ValueError(f"{path}: uv must be ({n},2), got {uv.shape}")
    return vertices, triangles.astype(np.int64), uv


def _vertex_colours_uint8(vertex_colours, n):
    return to_uint8(np.asarray(vertex_colours).reshape(n, 3)[:, None, :],
                    "vertex_colours")[:, 0, :]


def write_obj(path, vertices, triangles, uv=None, texture=None, vertex_colours=None,
              overwrite=False) -> list[pathlib.Path]:
    """Writes a mesh as Wavefront OBJ; with `uv` and `texture`, also STEM.mtl and STEM.png.

    vertices (N,3), triangles (F,3) 0-based; uv (N,2) per vertex, OBJ convention (v up);
    texture float H×W×3 in [0,1]; or vertex_colours (N,3) in [0,1] instead of a texture.
    The OBJ keeps the vertex order (trimesh with process=False; checked after export).
    Returns the paths written. Nothing is written if any of them exists (unless overwrite).
    """
    import trimesh
    from PIL import Image
    from trimesh.exchange.obj import export_obj

    path = pathlib.Path(path)
    if path.suffix.lower() != ".obj":
        raise ValueError(f"{path}: expected a .obj file name")
    vertices, triangles, uv = _checked_mesh(path, vertices, triangles, uv, texture)
    n = len(vertices)
    textured = uv is not None
    stem = path.stem
    outputs = [path] + ([path.with_suffix(".mtl"), path.with_name(stem + ".png")]
                        if textured else [])
    for p in outputs:
        refuse_overwrite(p, overwrite)

    if textured:
        material = trimesh.visual.material.SimpleMaterial(
            image=Image.fromarray(to_uint8(texture, "texture")), name=stem,
            diffuse=[255, 255, 255, 255], ambient=[255, 255, 255, 255],
            specular=[0, 0, 0, 255])
        visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    elif vertex_colours is not None:
        visual = trimesh.visual.ColorVisuals(
            vertex_colors=_vertex_colours_uint8(vertex_colours, n))
    else:
        visual = None
    mesh = trimesh.Trimesh(vertices, triangles, visual=visual, process=False, validate=False)
    text, files = export_obj(mesh, include_normals=False, include_texture=textured,
                             include_color=vertex_colours is not None, return_texture=True,
                             mtl_name=stem + ".mtl", digits=8)
    # trimesh must not have merged, dropped or reordered anything: one v (and vt) per vertex.
    counts = {tag: sum(1 for line in text.splitlines() if line.startswith(tag + " "))
              for tag in ("v", "vt", "f")}
    if counts["v"] != n or counts["f"] != len(triangles) or (textured and counts["vt"] != n):
        raise RuntimeError(f"{path}: trimesh wrote {counts} for {n} vertices and "
                           f"{len(triangles)} triangles; vertex order would be lost")
    written = [write_never_overwrite(path, text, overwrite)]
    for name, data in sorted(files.items()):
        written.append(write_never_overwrite(path.with_name(name), data, overwrite))
    return written


GLB_METRES_PER_UNIT = 1e-3  # glTF's unit is the metre; the models' is the millimetre


def write_glb(path, vertices, triangles, uv=None, texture=None, vertex_colours=None,
              overwrite=False, metres_per_unit=GLB_METRES_PER_UNIT) -> list[pathlib.Path]:
    """Writes a mesh as one binary glTF file (.glb), its texture map embedded as PNG.

    One file a browser, Blender or a phone shows with its texture (the OBJ needs three). The
    arrays are as `write_obj` takes them; the vertices are scaled to glTF's metres (model
    millimetres × 1e-3) and keep the model's order, with smooth vertex normals; the material is
    unlit-looking skin (metallic 0, roughness 1). Returns [path]; an existing file is an error
    unless overwrite.
    """
    import trimesh
    from PIL import Image
    from trimesh.exchange.gltf import export_glb

    path = pathlib.Path(path)
    if path.suffix.lower() != ".glb":
        raise ValueError(f"{path}: expected a .glb file name")
    vertices, triangles, uv = _checked_mesh(path, vertices, triangles, uv, texture)
    refuse_overwrite(path, overwrite)
    if uv is not None:
        material = trimesh.visual.material.PBRMaterial(
            name=path.stem, baseColorTexture=Image.fromarray(to_uint8(texture, "texture")),
            baseColorFactor=[255, 255, 255, 255], metallicFactor=0.0, roughnessFactor=1.0,
            doubleSided=True)
        visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    elif vertex_colours is not None:
        visual = trimesh.visual.ColorVisuals(
            vertex_colors=_vertex_colours_uint8(vertex_colours, len(vertices)))
    else:
        visual = None
    mesh = trimesh.Trimesh(vertices * metres_per_unit, triangles, visual=visual, process=False,
                           validate=False)
    return [write_never_overwrite(path, export_glb(mesh, include_normals=True), overwrite)]


MESH_WRITERS = {".obj": write_obj, ".glb": write_glb}


def write_mesh(path, vertices, triangles, uv=None, texture=None, vertex_colours=None,
               overwrite=False) -> list[pathlib.Path]:
    """`write_obj` or `write_glb`, by the file name's suffix."""
    writer = MESH_WRITERS.get(pathlib.Path(path).suffix.lower())
    if writer is None:
        raise ValueError(f"{path}: a mesh file name ends in one of {sorted(MESH_WRITERS)}")
    return writer(path, vertices, triangles, uv, texture, vertex_colours, overwrite=overwrite)


def read_obj(path) -> ObjMesh:
    """Reads an OBJ (and the map_Kd texture of its MTL) keeping every vertex in file order.

    A small parser rather than trimesh.load: trimesh drops unreferenced vertices of textured
    meshes even with process=False, which would shift every later vertex index. Polygons are
    fanned into triangles; per-vertex uv takes each vertex's first `vt` (our writer emits one
    per vertex); 'v x y z r g b' lines give vertex colours.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such OBJ file")
    verts, colours, tex_coords, faces, face_tex, mtllibs = [], [], [], [], [], []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                fields = line.split("#")[0].split()
                if not fields:
                    continue
                tag, args = fields[0], fields[1:]
                if tag == "v":
                    verts.append([float(a) for a in args[:3]])
                    if len(args) >= 6:
                        colours.append([float(a) for a in args[3:6]])
                elif tag == "vt":
                    tex_coords.append([float(a) for a in args[:2]])
                elif tag == "f":
                    corners = [c.split("/") for c in args]
                    vi = [int(c[0]) for c in corners]
                    ti = [int(c[1]) if len(c) > 1 and c[1] else 0 for c in corners]
                    for k in range(1, len(vi) - 1):
                        faces.append([vi[0], vi[k], vi[k + 1]])
                        face_tex.append([ti[0], ti[k], ti[k + 1]])
                elif tag == "mtllib":
                    mtllibs.append(" ".join(args))
    except (ValueError, IndexError) as e:
        raise ValueError(f"{path}: malformed OBJ at line {number} ({e})") from None
    n = len(verts)
    vertices = np.asarray(verts, np.float64).reshape(-1, 3)
    faces = np.asarray(faces, np.int64).reshape(-1, 3)
    faces = np.where(faces < 0, faces + n, faces - 1)  # 1-based; negative = relative to the end
    if faces.size and (faces.min() < 0 or faces.max() >= n):
        raise ValueError(f"{path}: face indices outside the {n} vertices")
    uv = texture = vertex_colours = None
    if tex_coords and faces.size:
        vt = np.asarray(tex_coords, np.float64)
        ft = np.asarray(face_tex, np.int64).reshape(-1, 3)
        ft = np.where(ft < 0, ft + len(vt), ft - 1)
        uv = np.zeros((n, 2))
        seen = np.zeros(n, bool)
        for v_idx, t_idx in zip(faces.reshape(-1)[::-1], ft.reshape(-1)[::-1]):
            if t_idx >= 0:  # walking backwards leaves each vertex's first vt in place
                uv[v_idx], seen[v_idx] = vt[t_idx], True
        if not seen.any():
            uv = None
        elif len(vt) == n and not seen.all():
            uv[~seen] = vt[~seen]  # unreferenced vertices: our writer pairs vt k with v k
        texture = _mtl_texture(path, mtllibs)
    if colours and len(colours) == n:
        vertex_colours = np.asarray(colours, np.float32)
    return ObjMesh(vertices, faces.astype(np.int32), uv, texture, vertex_colours)


def _mtl_texture(obj_path, mtllibs):
    for name in mtllibs:
        mtl = obj_path.parent / name
        if not mtl.exists():
            continue
        for line in mtl.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split()
            if fields and fields[0] == "map_Kd" and len(fields) > 1:
                return load_image(mtl.parent / fields[-1])
    return None


def write_model_obj(path, model, shape_coeffs=0.0, expression_coeffs=0.0, texture=None,
                    overwrite=False):
    """The morphable model's mesh for given coefficients, with its uv and a texture map."""
    from ganfit_jax import morphable

    verts = np.asarray(morphable.vertices(model, shape_coeffs, expression_coeffs))
    uv = None if texture is None else np.asarray(model.uv)
    return write_obj(path, verts, np.asarray(model.triangles), uv, texture, overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# Loss curves (Pillow only, no matplotlib)
# --------------------------------------------------------------------------------------------

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _nice_ticks(lo, hi, count=5):
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / count))
    for mult in (1, 2, 2.5, 5, 10):
        if span / (step * mult) <= count:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


@functools.lru_cache(maxsize=None)
def label_font(size=12):
    """The font every chart and sheet label is drawn in: Pillow's own scalable face at 12 px.
    Its 10 px default rounds a word space to 2 px, and titles such as "GANFIT fit of
    00001.png" read as one word."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _label(value):
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.0e}"
    return f"{value:.4g}"


def render_curves(curves: Mapping[str, Sequence[float]], steps=None, log_y=False, title=None,
                  size=(720, 440), x_label="step") -> np.ndarray:
    """Draws one line per loss term with axes, ticks and a legend; returns uint8 H×W×3.

    curves: {term name: values}; steps: shared x values (default 0..len-1 per curve).
    Non-finite values (and, with log_y, values <= 0) are left out of the lines.
    """
    from PIL import Image, ImageDraw

    if not curves:
        raise ValueError("render_curves: no curves given")
    width, height = size
    font = label_font()
    series = []
    for name, values in curves.items():
        y = np.asarray(values, np.float64).reshape(-1)
        x = np.arange(len(y), dtype=np.float64) if steps is None else np.asarray(
            steps, np.float64).reshape(-1)[: len(y)]
        if len(x) != len(y):
            raise ValueError(f"render_curves: curve {name!r} has {len(y)} values, steps {len(x)}")
        ok = np.isfinite(y) & (y > 0 if log_y else True)
        series.append((str(name), x[ok], np.log10(y[ok]) if log_y else y[ok]))
    xs = np.concatenate([s[1] for s in series])
    ys = np.concatenate([s[2] for s in series])
    if ys.size == 0:
        raise ValueError("render_curves: no finite" + (" positive" if log_y else "")
                         + " values to plot")
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = float(ys.min()), float(ys.max())
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        pad = 0.5 if log_y else max(abs(y0) * 0.1, 1e-12)
        y0, y1 = y0 - pad, y1 + pad
    if log_y:
        y0, y1 = math.floor(y0), math.ceil(y1)
    else:
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, top, bottom = 70, 30, height - 45
    rows = [name for name, _, _ in series]
    box_w = 34 + max(int(draw.textlength(r, font=font)) for r in rows)
    # the legend beside the plot, not over it: inside, it hid the curves' last steps, where a
    # fit converges (the top-right corner of a loss plot that rises, of every curve near its top)
    edge = width - 20
    legend_outside = edge - box_w - 16 - left >= 0.5 * (width - left)
    right = edge - box_w - 16 if legend_outside else edge
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
    py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)

    y_ticks = list(range(int(y0), int(y1) + 1)) if log_y else _nice_ticks(y0, y1)
    if log_y and len(y_ticks) > 8:
        y_ticks = y_ticks[:: math.ceil(len(y_ticks) / 8)]
    for t in y_ticks:
        yy = py(t)
        draw.line([(left, yy), (right, yy)], fill=(230, 230, 230))
        draw.line([(left - 5, yy), (left, yy)], fill=(0, 0, 0))
        text = f"1e{t}" if log_y else _label(t)
        draw.text((left - 8 - draw.textlength(text, font=font), yy - 6), text, fill=(0, 0, 0),
                  font=font)
    for t in _nice_ticks(x0, x1, 6):
        xx = px(t)
        draw.line([(xx, bottom), (xx, bottom + 5)], fill=(0, 0, 0))
        text = _label(t)
        draw.text((xx - draw.textlength(text, font=font) / 2, bottom + 8), text, fill=(0, 0, 0),
                  font=font)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    label = x_label
    draw.text(((left + right) / 2 - draw.textlength(label, font=font) / 2, bottom + 24), label,
              fill=(0, 0, 0), font=font)
    if title:
        draw.text((left, 8), title + ("  (log scale)" if log_y else ""), fill=(0, 0, 0),
                  font=font)

    for k, (name, x, y) in enumerate(series):
        colour = _PALETTE[k % len(_PALETTE)]
        points = [(px(a), py(b)) for a, b in zip(x, y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:
            (a, b), = points
            draw.ellipse([a - 2, b - 2, a + 2, b + 2], fill=colour)

    # Legend: one swatch per term, in the order given, right of the plot (or, where the names
    # leave the plot too little room, in its top-right corner).
    bx1, by0 = (edge if legend_outside else right - 8), top + 8
    bx0, by1 = bx1 - box_w, by0 + 8 + 16 * len(rows)
    draw.rectangle([bx0, by0, bx1, by1], fill=(255, 255, 255), outline=(120, 120, 120))
    for k, name in enumerate(rows):
        colour = _PALETTE[k % len(_PALETTE)]
        yy = by0 + 12 + 16 * k
        draw.line([(bx0 + 6, yy), (bx0 + 24, yy)], fill=colour, width=3)
        draw.text((bx0 + 28, yy - 6), name, fill=(0, 0, 0), font=font)
    return np.asarray(image)


def save_loss_curves(path, curves, steps=None, log_y=False, title=None, size=(720, 440),
                     overwrite=False) -> pathlib.Path:
    """render_curves → PNG at `path` (refuses to overwrite unless overwrite=True)."""
    return write_never_overwrite(
        path, encode_png(render_curves(curves, steps, log_y, title, size)), overwrite)
