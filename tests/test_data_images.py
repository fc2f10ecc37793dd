"""Image-text sources (image folder, parquet, array_record): decoding, per-host reads, and the world's data
source turning images into VAE latents, against diffusers' own AutoencoderKL."""

from __future__ import annotations

import base64
import importlib.util
import io
import json

import jax
import numpy as np
import pytest
import torch
from helpers import load
from PIL import Image

from jdistill.data import images as images_module
from jdistill.data.images import ImageTextSource, decode_image, open_image_text
from jdistill.teachers import build_world

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
RES = 16


def _bands(width: int, height: int, edge: int, outer, inner) -> np.ndarray:
    """Landscape: outer colour in ``edge`` columns at both sides; portrait: in ``edge`` rows top and bottom."""
    a = np.empty((height, width, 3), np.uint8)
    a[:] = inner
    if width > height:
        a[:, :edge], a[:, -edge:] = outer, outer
    else:
        a[:edge], a[-edge:] = outer, outer
    return a


def _examples() -> list[tuple[Image.Image, str, np.ndarray]]:
    """(image, caption, expected RES x RES result). Centre crops of the shorter-side resize keep only the inner
    colour (the bands lie outside the crop by more than the bicubic footprint), so the expectation is exact."""
    gray = Image.new("L", (20, 20), 100)
    rgba = Image.new("RGBA", (24, 16), (10, 20, 30, 128))
    return [
        (Image.fromarray(_bands(64, 32, 8, RED, GREEN)), "green between red", np.full((RES, RES, 3), GREEN)),
        (Image.fromarray(_bands(24, 48, 6, RED, BLUE)), "blue between red", np.full((RES, RES, 3), BLUE)),
        (gray, "gray square", np.full((RES, RES, 3), 100)),
        (rgba, "translucent", np.full((RES, RES, 3), (10, 20, 30))),
        (Image.fromarray(_bands(40, 20, 4, BLUE, RED)), "red between blue", np.full((RES, RES, 3), RED)),
    ]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(root, examples, text_key="text"):
    (root / "imgs").mkdir(parents=True)
    lines = []
    for i, (img, caption, _) in enumerate(examples):
        img.save(root / "imgs" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"imgs/{i}.png", text_key: caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _parquet(path, examples, struct: bool, image_key="image", text_key="caption"):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = [_png(img) for img, _, _ in examples]
    column = [{"bytes": b, "path": None} for b in data] if struct else data
    table = pa.table(
        {"id": list(range(len(examples))), image_key: column, text_key: [c for _, c, _ in examples]}
    )
    pq.write_table(table, path, row_group_size=2)
    return path


def _array_record(path, records: list[dict | bytes]):
    """JSON records from dicts, serialized protos as they are."""
    module = pytest.importorskip("array_record.python.array_record_module")
    writer = module.ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r if isinstance(r, bytes) else json.dumps(r).encode())
    writer.close()
    return path


def _b64_records(examples):
    return [{"image": base64.b64encode(_png(img)).decode(), "text": c} for img, c, _ in examples]


def test_decoding_resizes_the_shorter_side_and_centre_crops():
    for img, caption, want in _examples():
        got = decode_image(_png(img), RES, caption)
        assert got.dtype == np.uint8 and got.shape == (RES, RES, 3)
        np.testing.assert_array_equal(got, want, err_msg=caption)
    with pytest.raises(ValueError, match=r"cannot decode the image of row 7"):
        decode_image(b"not an image", RES, "row 7")


def test_every_format_gives_the_same_images_and_captions(tmp_path):
    examples = _examples()
    tables = {
        "folder": open_image_text(str(_image_folder(tmp_path / "folder", examples))),
        "folder_meta": open_image_text(str(tmp_path / "folder" / "metadata.jsonl")),
        "parquet_struct": open_image_text(str(_parquet(tmp_path / "s.parquet", examples, struct=True))),
        "parquet_bytes": open_image_text(
            str(_parquet(tmp_path / "b.parquet", examples, struct=False, image_key="jpg", text_key="text"))
        ),
    }
    if importlib.util.find_spec("array_record") is not None:  # optional: jdistill[data]
        records = _b64_records(examples)
        tables["array_record"] = open_image_text(str(_array_record(tmp_path / "x.array_record", records)))
        if importlib.util.find_spec("google.protobuf") is not None:  # TFDS: tf.train.Example records
            from tf_example_proto import serialize_example

            examples_pb = [serialize_example({"image": [_png(i)], "caption": [c]}) for i, c, _ in examples]
            tables["tfds"] = open_image_text(str(_array_record(tmp_path / "t.array_record", examples_pb)))
    order = [4, 0, 2, 2]
    for name, table in tables.items():
        assert len(table) == len(examples), name
        items = table.take(order)
        assert [it.text for it in items] == [examples[i][1] for i in order], name
        for it, i in zip(items, order, strict=True):
            np.testing.assert_array_equal(decode_image(it.image, RES, it.where), examples[i][2], err_msg=name)


def test_source_batches_are_deterministic_and_hosts_decode_only_their_rows(tmp_path, monkeypatch):
    examples = _examples()
    table = open_image_text(str(_parquet(tmp_path / "s.parquet", examples, struct=True)))

    def tokenize(texts):
        return {"input_ids.text_encoder": np.array([[len(t), ord(t[0])] for t in texts], np.int32)}

    source = ImageTextSource(table, tokenize, RES, seed=3)
    full = source.local_batch(2, 8)
    assert full["images"].shape == (8, RES, RES, 3) and full["images"].dtype == np.uint8
    picks = np.random.default_rng([3, 2]).integers(
        0, len(examples), 8
    )  # the documented (seed, position) rule
    np.testing.assert_array_equal(full["images"], np.stack([examples[i][2] for i in picks]))
    np.testing.assert_array_equal(
        full["input_ids.text_encoder"], tokenize([examples[i][1] for i in picks])["input_ids.text_encoder"]
    )
    again = source.local_batch(2, 8)
    assert all(np.array_equal(full[k], again[k]) for k in full)
    other = source.local_batch(3, 8)
    assert not np.array_equal(other["input_ids.text_encoder"], full["input_ids.text_encoder"])

    decoded, read = [], []
    real_decode, real_take = images_module.decode_image, table.take
    monkeypatch.setattr(images_module, "decode_image", lambda *a: decoded.append(a[2]) or real_decode(*a))
    monkeypatch.setattr(table, "take", lambda idx: read.extend(int(i) for i in idx) or real_take(idx))
    rows = np.array([1, 2, 6])
    local = source.local_batch(2, 8, rows)
    for k in full:
        np.testing.assert_array_equal(local[k], full[k][rows], err_msg=k)
    assert read == [int(i) for i in picks[rows]] and len(decoded) == len(rows)


def test_bad_image_text_sources_are_named(tmp_path):
    examples = _examples()[:2]
    folder = _image_folder(tmp_path / "folder", examples, text_key="label")
    with pytest.raises(ValueError, match=r"metadata\.jsonl line 1 has no field text / caption / prompt"):
        open_image_text(str(folder))
    table = open_image_text(str(folder), text_field="label")
    (folder / "imgs" / "1.png").unlink()
    source = ImageTextSource(table, lambda t: {}, RES)
    with pytest.raises(ValueError, match=r"cannot decode the image of .*metadata\.jsonl line 2: .*1\.png"):
        for position in range(20):  # some batch picks the missing image
            source.local_batch(position, 4)

    parquet = _parquet(tmp_path / "p.parquet", examples, struct=True, image_key="picture")
    with pytest.raises(ValueError, match=r"p\.parquet has no column image / jpg / png / webp .*'picture'"):
        open_image_text(str(parquet))
    assert len(open_image_text(str(parquet), image_field="picture")) == 2
    with pytest.raises(ValueError, match=r"cannot read .*p\.txt .*formats understood: imagefolder"):
        (tmp_path / "p.txt").write_text("x\n")
        open_image_text(str(tmp_path / "p.txt"))

    pytest.importorskip("array_record.python.array_record_module")
    records = [
        *_b64_records(examples),
        {"image": "%%%", "text": "bad"},
        {"image": base64.b64encode(b"xx").decode()},
    ]
    table = open_image_text(str(_array_record(tmp_path / "r.array_record", records)))
    with pytest.raises(ValueError, match=r"record 2 .*r\.array_record.*the image field is not base64"):
        table.take([2])
    with pytest.raises(ValueError, match=r"record 3 .* has no field text / caption / prompt"):
        table.take([3])


def test_world_data_prepares_images_into_vae_latents(tiny_pipelines, tmp_path):
    """teacher.data: the world's data source, and prepare's x0 against diffusers' AutoencoderKL posterior mean."""
    from diffusers import AutoencoderKL

    # Textured images: flat ones leave GroupNorm with almost no variance, where any two implementations part.
    rng = np.random.default_rng(0)
    examples = [
        (Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), f"noise {w}x{h}", None)
        for w, h in ((48, 32), (32, 40), (32, 32))
    ]
    folder = _image_folder(tmp_path / "folder", examples, text_key="caption")
    config = load(
        "tests/configs/tiny_unet.py:sd",
        [
            ("teacher.path", str(tiny_pipelines["sd"])),
            ("teacher.prompts", str(tiny_pipelines["prompts"])),
            ("teacher.data", str(folder)),
            ("teacher.data_field", "caption"),
        ],
    )
    world = build_world(config)
    res = config.teacher.resolution
    batch = world.data.local_batch(0, 4)
    assert batch["images"].shape == (4, res, res, 3)
    prepared = jax.device_get(jax.jit(world.prepare)(world.frozen, batch))
    assert sorted(prepared) == ["cond", "x0"]
    assert prepared["x0"].shape == (4, *world.sample_shape)

    vae = AutoencoderKL.from_pretrained(tiny_pipelines["sd"], subfolder="vae").eval()
    pixels = torch.from_numpy(batch["images"].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    with torch.no_grad():
        want = (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(prepared["x0"], want, rtol=1e-5, atol=1e-5)

    # The captions' conditioning is the world's encoding of the same captions.
    picks = np.random.default_rng([config.seed, 0]).integers(0, len(examples), 4)
    captions = [examples[i][1] for i in picks]
    cond = jax.device_get(jax.jit(world.prepare)(world.frozen, world.conditions.tokenize(captions))["cond"])
    np.testing.assert_allclose(
        prepared["cond"]["encoder_hidden_states"], cond["encoder_hidden_states"], rtol=1e-6, atol=1e-6
    )
