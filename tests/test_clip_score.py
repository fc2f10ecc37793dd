"""CLIP with both towers against transformers and OpenCLIP, the CLIP score against a hand computation from
transformers' outputs, the preprocessing against transformers' PIL image processor, loading and errors.

OpenCLIP's reference model comes from its wheel, unpacked into ``.cache/reference`` and imported without its
package ``__init__`` (open-clip-torch requires torchvision, whose index wheels are CUDA builds that break
transformers' imports here; its model code only needs ``torchvision.ops.misc.FrozenBatchNorm2d`` for ResNet
towers, stubbed while it imports)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import sys
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_wheels
import torch
from flax import nnx
from safetensors.numpy import save_file
from tiny_pipeline import tiny_tokenizer
from transformers import CLIPConfig as TorchCLIPConfig
from transformers import CLIPModel as TorchCLIPModel
from transformers import CLIPVisionConfig as TorchVisionConfig
from transformers import CLIPVisionModelWithProjection as TorchVisionProj
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from jdistill.convert.clip_model import (
    clip_model_net,
    load_clip,
    load_clip_model,
    load_clip_vision,
    load_open_clip,
    open_clip_config,
)
from jdistill.convert.core import ConversionError
from jdistill.evaluate.clip_score import CLIP_STD, CLIPScore, aggregate, preprocess
from jdistill.models.clip_vision import CLIPConfig

TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=600,  # the tiny tokenizer has 514 tokens: bos 512, eos 513 (its pad token too)
    max_position_embeddings=16,
    projection_dim=24,
    bos_token_id=512,
    pad_token_id=513,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=24,
)
# (hidden_act, eos_token_id): the legacy eos id 2 pools at argmax(ids), 513 at the first eos.
VARIANTS = [("quick_gelu", 2), ("gelu", 513)]
PROMPTS = [
    "a red circle",
    "the digit 3",
    "x",
    "a blue square on a green field, drawn very large",
]  # last > 16
LEVEL = 1 / 255


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Large random weights everywhere (norms around 1) so that every path matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            one = name.endswith("weight") and any(n in name for n in ("norm", "ln_", "layrnorm"))
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if one else 0.0))
    return model.eval()


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@functools.cache
def tokenizer():
    return tiny_tokenizer()


def torch_config(act: str, eos: int) -> TorchCLIPConfig:
    return TorchCLIPConfig(
        text_config=dict(TEXT, hidden_act=act, eos_token_id=eos),
        vision_config=dict(VISION, hidden_act=act),
        projection_dim=24,
    )


@dataclasses.dataclass
class Pair:
    model: TorchCLIPModel
    config: CLIPConfig
    params: dict
    forward: Callable  # jitted: every output compared, one compilation


@functools.cache
def make_pair(variant: tuple[str, int]) -> Pair:
    tc = torch_config(*variant)
    model = randomize(TorchCLIPModel(tc))
    config = CLIPConfig.from_dict(tc.to_dict())  # a transformers config dict, as in config.json
    net, params = load_clip_model(numpy_state(model), config)

    def forward(params, ids, mask, pixels):
        m = nnx.merge(net.graphdef, params)
        return (
            m.vision_model(pixels, output_hidden_states=True),
            m.get_image_features(pixels),
            m.get_text_features(ids, mask),
            m(ids, pixels, mask),
        )

    return Pair(model, config, params, jax.jit(forward))


def text_inputs(n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    out = tokenizer()(PROMPTS[-n:], padding="max_length", max_length=16, truncation=True, return_tensors="np")
    return out["input_ids"], out["attention_mask"]


def pixels(n: int = 3, seed: int = 0) -> np.ndarray:
    """Normalised-looking pixel values, NCHW (transformers' layout)."""
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-eos{v[1]}")
def test_matches_transformers(variant):
    pair = make_pair(variant)
    ids, mask = text_inputs()
    px = pixels()
    vision, image_features, text_features, out = pair.forward(
        pair.params, ids, mask, jnp.asarray(px.transpose(0, 2, 3, 1))
    )
    m = pair.model
    with torch.no_grad():
        t_px, t_ids, t_mask = torch.tensor(px), torch.tensor(ids), torch.tensor(mask)
        ref_vision = m.vision_model(pixel_values=t_px, output_hidden_states=True)
        ref_image = m.get_image_features(pixel_values=t_px).pooler_output  # transformers 5: projected pooler
        ref_text = m.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output
        ref = m(input_ids=t_ids, pixel_values=t_px, attention_mask=t_mask)
    assert len(vision.hidden_states) == len(ref_vision.hidden_states) == 3
    errors = {
        f"vision.hidden_states[{i}]": rel_err(a, b)
        for i, (a, b) in enumerate(zip(vision.hidden_states, ref_vision.hidden_states, strict=True))
    }
    errors |= {
        "vision.last_hidden_state": rel_err(vision.last_hidden_state, ref_vision.last_hidden_state),
        "vision.pooler_output": rel_err(vision.pooler_output, ref_vision.pooler_output),
        "get_image_features": rel_err(image_features, ref_image),
        "get_text_features": rel_err(text_features, ref_text),
        "image_embeds": rel_err(out.image_embeds, ref.image_embeds),
        "text_embeds": rel_err(out.text_embeds, ref.text_embeds),
        "logits_per_image": rel_err(out.logits_per_image, ref.logits_per_image),
        "logits_per_text": rel_err(out.logits_per_text, ref.logits_per_text),
    }
    print(variant, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-5, errors


def test_vision_model_with_projection():
    """The vision-only classes: transformers' CLIPVisionModelWithProjection holds exactly CLIPModel's vision keys."""
    pair = make_pair(VARIANTS[0])
    state = numpy_state(pair.model)
    vision = {k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))}
    with torch.device("meta"):
        reference = TorchVisionProj(TorchVisionConfig(**VISION, hidden_act="quick_gelu"))
    assert sorted(reference.state_dict()) == sorted(vision)
    vision_config = pair.config.vision_config
    net, params = load_clip_vision(vision, vision_config)
    px = pixels(2, seed=2)
    out = jax.jit(net.apply)(params, jnp.asarray(px.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        ref = pair.model.get_image_features(pixel_values=torch.tensor(px)).pooler_output
    assert rel_err(out.image_embeds, ref) < 1e-5
    # transformers 5's CLIPVisionModel layout (no prefix) loads as the plain model.
    bare = {k.removeprefix("vision_model."): v for k, v in vision.items() if k.startswith("vision_model.")}
    plain_net, plain = load_clip_vision(bare, vision_config)
    assert "visual_projection" not in plain
    with pytest.raises(ValueError, match="pixel_values must be"):
        plain_net.apply(plain, jnp.zeros((1, 16, 16, 3)))


def scorer(variant, batch_size: int = 2) -> CLIPScore:
    pair = make_pair(variant)
    return CLIPScore(clip_model_net(pair.config), pair.params, tokenizer(), batch_size=batch_size)


def images(seed: int = 0) -> list[np.ndarray]:
    """uint8 images of two sizes (shrunk and enlarged to 32), in mixed order: three of one size, one of the
    other, so that with batches of 2 both sizes need a padded batch."""
    rng = np.random.default_rng(seed)
    shapes = [(40, 48), (20, 26), (40, 48), (40, 48)]
    return [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]


def hand_scores(model: TorchCLIPModel, pixel_values: np.ndarray, prompts: list[str]) -> np.ndarray:
    """100 * cos of transformers' embeddings, computed by hand (NCHW pixel values)."""
    tok = tokenizer()(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.tensor(pixel_values)).pooler_output.double()
        text = model.get_text_features(**tok).pooler_output.double()
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    return (100 * (image * text).sum(-1)).numpy()


preprocess_jit = jax.jit(preprocess, static_argnums=1)


def test_score_matches_hand_computation():
    # One variant: the towers' variants are covered above; this checks the metric's own steps.
    variant = VARIANTS[1]
    metric, model = scorer(variant), make_pair(variant).model
    imgs, prompts = images(), PROMPTS
    ours = metric.scores(imgs, prompts)
    # transformers on our pixel values: the embeddings, cosines and batching are exact.
    ours_px = np.concatenate([np.asarray(preprocess_jit(jnp.asarray(im[None]), 32)) for im in imgs])
    exact = hand_scores(model, ours_px.transpose(0, 3, 1, 2), prompts)
    # transformers on its PIL processor's pixel values: the whole reference pipeline.
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    reference = hand_scores(model, processor(images=imgs, return_tensors="np")["pixel_values"], prompts)
    print("score errors: exact", rel_err(ours, exact), "vs PIL pixels", np.abs(ours - reference).max())
    assert rel_err(ours, exact) < 1e-5
    # Preprocessing differs from PIL's by at most 2 levels on < 2% of values: scores within 0.1 (of 100).
    assert np.abs(ours - reference).max() < 0.1
    assert (ours < 0).any() and (ours > 0).any()  # random weights: both clamping rules matter
    assert metric(imgs, prompts) == pytest.approx(max(exact.mean(), 0), rel=1e-5)
    assert metric(imgs, prompts, clamp="pair") == pytest.approx(np.maximum(exact, 0).mean(), rel=1e-5)


def test_aggregate():
    s = np.array([30.0, -10.0, 20.0])
    assert aggregate(s) == pytest.approx(40 / 3)  # torchmetrics: max(mean, 0)
    assert aggregate(s, "pair") == pytest.approx(50 / 3)  # per pair: mean of max(s, 0)
    assert aggregate(-s) == 0.0
    with pytest.raises(ValueError, match="unknown clamp"):
        aggregate(s, "none")


# (height, width, size): shrink both ways, enlarge, one side unchanged (PIL skips that pass), square, full size.
PREPROCESS_CASES = [(40, 48, 32), (70, 50, 32), (20, 28, 32), (32, 45, 32), (64, 64, 32), (300, 451, 224)]


@pytest.mark.parametrize("shape", PREPROCESS_CASES, ids=lambda s: "x".join(map(str, s)))
def test_preprocess_matches_pil_processor(shape):
    h, w, size = shape
    rng = np.random.default_rng(h * w)
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # overshoots everywhere: tests the 8-bit passes
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    smooth = (255 * (0.5 + 0.5 * np.sin(np.stack([6 * xx, 9 * yy, 5 * (xx + yy)], -1)))).astype(np.uint8)
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    batch = np.stack([noise, smooth])
    ref = processor(images=list(batch), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = np.asarray(preprocess_jit(jnp.asarray(batch), size))
    assert ours.shape == ref.shape == (2, size, size, 3)
    levels = np.abs(ours - ref) * np.asarray(CLIP_STD) / LEVEL
    # Measured: here at most 1 level on <= 0.2% of values; 2 levels (the two passes rounding the same way at a
    # .5 boundary) on 1.3% of a 512 x 512 gradient's values.
    assert levels.max() < 2.01 and (levels > 0.01).mean() < 0.02, (levels.max(), (levels > 0.01).mean())
    as_float = np.asarray(preprocess_jit(jnp.asarray(batch / 255.0, jnp.float32), size))
    np.testing.assert_allclose(as_float, ours, atol=1e-5)


def test_load_from_transformers_folder(tmp_path):
    pair = make_pair(VARIANTS[1])
    pair.model.save_pretrained(tmp_path, safe_serialization=True)
    net, params = load_clip(str(tmp_path))  # config.json + model.safetensors: transformers' layout
    assert net.config == pair.config
    jax.tree.map(np.testing.assert_array_equal, params, pair.params)
    _, from_file = load_clip_model(str(tmp_path / "model.safetensors"))  # one file, config.json beside it
    jax.tree.map(np.testing.assert_array_equal, from_file, pair.params)
    with pytest.raises(ValueError, match="no CLIP tokenizer"):
        CLIPScore.from_pretrained(str(tmp_path))
    tokenizer().save_pretrained(tmp_path)
    metric = CLIPScore.from_pretrained(str(tmp_path))  # the tokenizer from the same folder
    # Same weights and tokens as the in-memory metric of test_score_matches_hand_computation, so same scores.
    jax.tree.map(np.testing.assert_array_equal, metric.params, pair.params)
    for a, b in zip(metric.tokenize(PROMPTS), text_inputs(len(PROMPTS)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (metric.image_size, metric.max_length) == (32, 16)


# --- OpenCLIP ----------------------------------------------------------------------------------------------

OPEN_CLIP_CFG = dict(
    embed_dim=24,
    vision_cfg=dict(layers=2, width=32, head_width=8, patch_size=8, image_size=32),
    text_cfg=dict(context_length=16, vocab_size=600, width=32, heads=4, layers=2),
)


@functools.cache
def open_clip_model_module() -> types.ModuleType:
    """``open_clip.model`` from the unpacked wheel (``reference_wheels``)."""
    root = reference_wheels.unpacked("open_clip")
    package = types.ModuleType("open_clip")  # bypasses open_clip/__init__ (factory, torchvision transforms)
    package.__path__ = [str(root / "open_clip")]
    stubs = {
        name: types.ModuleType(name) for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    }
    stubs["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    saved = {k: sys.modules.get(k) for k in ["open_clip", *stubs]}
    sys.modules.update({"open_clip": package, **stubs})
    try:
        return importlib.import_module("open_clip.model")
    finally:  # nothing else may see the placeholder torchvision
        for k, v in saved.items():
            if k != "open_clip":
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v


def open_clip_ids() -> np.ndarray:
    """OpenCLIP's tokens: BOS, words, EOS (the largest id, where OpenCLIP pools), zero padding."""
    ids = np.random.default_rng(1).integers(1, 500, (3, 16))
    for row, end in enumerate((4, 9, 15)):
        ids[row, end], ids[row, end + 1 :] = 599, 0
    return ids


def test_open_clip_matches_open_clip(tmp_path):
    """OpenAI's activation (quick_gelu); the gelu towers are the transformers tests' and the translation of
    the flag is checked in test_full_size_configs."""
    oc = open_clip_model_module()
    quick_gelu = True
    cfg = dict(OPEN_CLIP_CFG, quick_gelu=quick_gelu)
    model = randomize(oc.CLIP(**cfg), seed=3)
    state = numpy_state(model)
    net, params = load_open_clip(state, cfg)
    assert net.config.vision_config.hidden_act == net.config.text_config.hidden_act == "quick_gelu"
    ids, px = open_clip_ids(), pixels(seed=1)
    with torch.no_grad():
        ref_image = model.encode_image(torch.tensor(px))
        ref_text = model.encode_text(torch.tensor(ids))
        ref_logits, _ = model.get_logits(torch.tensor(px), torch.tensor(ids))

    @jax.jit
    def forward(params, ids, pixels):
        m = nnx.merge(net.graphdef, params)
        return m.get_image_features(pixels), m.get_text_features(ids), m(ids, pixels).logits_per_image

    image, text, logits = forward(params, ids, jnp.asarray(px.transpose(0, 2, 3, 1)))
    errors = {
        "image": rel_err(image, ref_image),
        "text": rel_err(text, ref_text),
        "logits": rel_err(logits, ref_logits),
    }
    print("open_clip", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-5, errors

    # A hub-style folder: open_clip_model.safetensors + open_clip_config.json, found by load_clip.
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    _, from_folder = load_clip(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, from_folder, params)
    # The older pickle file, refused unless trusted.
    pickled = tmp_path / "bin"
    pickled.mkdir()
    torch.save(model.state_dict(), pickled / "open_clip_pytorch_model.bin")
    with pytest.raises(ConversionError, match="pickle"):
        load_open_clip(str(pickled), cfg)
    _, from_pickle = load_open_clip(str(pickled), cfg, allow_pickle=True)
    jax.tree.map(np.testing.assert_array_equal, from_pickle, params)
    # CustomTextCLIP keeps the text tower under "text."; the logit scale may be (1,).
    custom = {
        ("text." + k if not k.startswith(("visual.", "logit_scale")) else k): v for k, v in state.items()
    }
    custom["logit_scale"] = state["logit_scale"].reshape(1)
    _, from_custom = load_open_clip(custom, open_clip_config(cfg))
    jax.tree.map(np.testing.assert_array_equal, from_custom, params)


def test_open_clip_errors(tmp_path):
    oc = open_clip_model_module()
    cfg = dict(OPEN_CLIP_CFG, quick_gelu=True)
    state = numpy_state(oc.CLIP(**cfg))
    missing = {k: v for k, v in state.items() if k != "visual.ln_post.bias"}
    with pytest.raises(ConversionError, match=r"1 missing: visual\.ln_post\.bias"):
        load_open_clip(missing, cfg)
    extra = dict(state, **{"visual.transformer.resblocks.0.ls_1.gamma": np.ones(32, np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected: visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
        load_open_clip(extra, cfg)
    key = "transformer.resblocks.1.attn.in_proj_weight"
    bad = dict(state, **{key: np.zeros((90, 32), np.float32)})
    with pytest.raises(
        ConversionError, match=rf"mis-shaped: {key}: checkpoint \(90, 32\), model expects \(96, 32\)"
    ):
        load_open_clip(bad, cfg)
    with pytest.raises(ConversionError, match=r"vision_cfg\.ls_init_value=1e-05"):
        open_clip_config(dict(cfg, vision_cfg=dict(cfg["vision_cfg"], ls_init_value=1e-5)))
    with pytest.raises(ConversionError, match=r"text_cfg\.pool_type='last'"):
        open_clip_config(dict(cfg, text_cfg=dict(cfg["text_cfg"], pool_type="last")))
    with pytest.raises(ConversionError, match=r"unknown option\(s\) vision_cfg\.rope"):
        open_clip_config(dict(cfg, vision_cfg=dict(cfg["vision_cfg"], rope=True)))
    with pytest.raises(ConversionError, match="ModifiedResNet"):
        open_clip_config(dict(cfg, vision_cfg=dict(cfg["vision_cfg"], layers=[3, 4, 6, 3])))
    # Weights given to the transformers loader, and a folder without OpenCLIP's config.
    with pytest.raises(ConversionError, match="load_open_clip"):
        load_clip_model(state, make_pair(VARIANTS[0]).config)
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(ConversionError, match=r"open_clip_config\.json is missing"):
        load_clip(str(tmp_path))


def test_transformers_errors(tmp_path):
    pair = make_pair(VARIANTS[0])
    state = numpy_state(pair.model)
    key = "vision_model.encoder.layers.1.self_attn.k_proj.weight"
    with pytest.raises(ConversionError, match=rf"mis-shaped: {key}: checkpoint \(31, 32\)"):
        load_clip_model(dict(state, **{key: np.zeros((31, 32), np.float32)}), pair.config)
    with pytest.raises(ConversionError, match=r"missing: vision_model\.embeddings\.class_embedding"):
        load_clip_model({k: v for k, v in state.items() if "class_embedding" not in k}, pair.config)
    with pytest.raises(ConversionError, match=r"unexpected: vision_model\.extra\.weight"):
        load_clip_model(dict(state, **{"vision_model.extra.weight": np.zeros(1)}), pair.config)
    with pytest.raises(ConversionError, match=r"config\.json is missing"):
        load_clip_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(pair.config.text_config.to_dict()))
    with pytest.raises(ConversionError, match="not a CLIP config"):
        load_clip_model(str(tmp_path))
    torch.save({}, tmp_path / "weights.bin")
    with pytest.raises(ConversionError, match="pickle"):
        load_clip_model(str(tmp_path / "weights.bin"), pair.config)


def test_score_errors():
    metric = scorer(VARIANTS[0])
    img = np.zeros((32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        metric.scores([img, img], ["a"])
    with pytest.raises(ValueError, match=r"in \[0, 1\].*\(x \+ 1\) / 2"):
        metric.scores([img - 1], ["a"])
    with pytest.raises(ValueError, match="RGB"):
        metric.scores([np.zeros((32, 32, 4), np.uint8)], ["a"])
    with pytest.raises(ValueError, match="one string"):
        metric.scores([img], "a")
    small = CLIPConfig(dataclasses.replace(make_pair(VARIANTS[0]).config.text_config, vocab_size=100))
    with pytest.raises(ValueError, match="514 tokens but the text tower only 100"):
        CLIPScore(clip_model_net(small), {}, tokenizer())


# OpenAI's CLIP ViT-L/14 (the CLIP score's usual model): transformers' config.json and open_clip's ViT-L-14.json.
VIT_L_14 = dict(
    projection_dim=768,
    text_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
    ),
    vision_config=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=24,
        patch_size=14,
        image_size=224,
        projection_dim=768,
    ),
)
OPEN_CLIP_VIT_L_14 = dict(
    embed_dim=768,
    quick_gelu=True,
    vision_cfg=dict(image_size=224, layers=24, width=1024, patch_size=14),
    text_cfg=dict(context_length=77, vocab_size=49408, width=768, heads=12, layers=12),
)


def test_full_size_configs():
    """ViT-L/14 from either config: transformers' parameter count, and the same architecture."""
    with torch.device("meta"):
        theirs = sum(p.numel() for p in TorchCLIPModel(TorchCLIPConfig(**VIT_L_14)).parameters())
    hf = CLIPConfig.from_dict(dict(VIT_L_14, model_type="clip"))
    assert clip_model_net(hf).num_params() == theirs == 427_616_513
    oc = open_clip_config(OPEN_CLIP_VIT_L_14)
    assert oc.vision_config == hf.vision_config  # 1024 / head_width 64 = 16 heads, mlp 4 x 1024
    assert oc.projection_dim == hf.projection_dim
    # The text towers differ only in pooling: OpenCLIP's argmax of the ids is transformers' legacy eos rule.
    assert dataclasses.replace(oc.text_config, eos_token_id=hf.text_config.eos_token_id) == (hf.text_config)
    gelu = open_clip_config(dict(OPEN_CLIP_VIT_L_14, quick_gelu=False))
    assert gelu.vision_config.hidden_act == gelu.text_config.hidden_act == "gelu"
