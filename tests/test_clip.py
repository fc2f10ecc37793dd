"""The Flax CLIP text encoders against transformers: every hidden state, pooling rules, projections, masks,
checkpoint layouts and errors, round trips, JVPs, and the parameter counts of the SD teachers' encoders."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPTextConfig as TorchConfig
from transformers import CLIPTextModel as TorchCLIPText
from transformers import CLIPTextModelWithProjection as TorchCLIPTextProj

from jdistill.convert.clip import clip_state_dict, load_clip_text
from jdistill.convert.core import ConversionError
from jdistill.models.clip import CLIPTextConfig, clip_text_net, prompt_embeds
from jdistill.models.layers import Precision

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "jdistill" / "teachers" / "configs"
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=1000,
    max_position_embeddings=16,
    projection_dim=24,
    bos_token_id=0,
    pad_token_id=1,
)
NEW_EOS = 5  # a non-legacy eos id, smaller than the ids after it: argmax(ids) would pool elsewhere
# (hidden_act, eos_token_id, with_projection)
VARIANTS = [
    ("quick_gelu", 2, False),
    ("gelu", 2, True),
    ("gelu", NEW_EOS, False),
    ("quick_gelu", NEW_EOS, True),
]
SEQ = 12


def tiny(act: str, eos: int) -> dict:
    return dict(TINY, hidden_act=act, eos_token_id=eos)


def torch_model(kw: dict, with_projection: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = TorchCLIPTextProj if with_projection else TorchCLIPText
    model = cls(TorchConfig(**kw)).eval()
    with torch.no_grad():  # large random weights everywhere (layer norms included) so every path matters
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def token_ids(eos: int, batch: int = 3, seed: int = 0) -> np.ndarray:
    """Prompts as a tokenizer makes them: BOS, words, EOS, then padding, EOS at different places per row.

    Legacy configs (eos 2) pool at argmax(ids): the EOS is 999, the largest id, and padding repeats it (the
    first occurrence must win). Otherwise EOS is ``NEW_EOS``, padding repeats it and larger ids follow, so
    argmax(ids) and the first EOS differ.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 900, (batch, SEQ))
    ids[:, 0] = 0
    for row, end in enumerate((4, 7, SEQ - 1)[:batch]):
        if eos == 2:
            ids[row, end:] = 999
        else:
            ids[row, end] = NEW_EOS
            ids[row, end + 1 :: 2] = NEW_EOS
    return ids


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@dataclasses.dataclass
class Pair:
    """A transformers model and ours with its weights; ``run`` / ``encode`` are jitted (eager NNX dispatch
    compiles every op and is far slower on CPU)."""

    kw: dict
    model: torch.nn.Module
    params: dict
    with_projection: bool
    run: Callable
    encode: Callable

    def reference(self, ids: np.ndarray, **kwargs):
        """transformers' outputs, and the pooled state (the projection model does not return it)."""
        with torch.no_grad():
            out = self.model(torch.tensor(ids), output_hidden_states=True, **kwargs)
            base = (self.model.text_model if self.with_projection else self.model)(
                torch.tensor(ids), **kwargs
            )
        return out, base.pooler_output


def jitted(net) -> tuple[Callable, Callable]:
    run = jax.jit(net.apply, static_argnames="output_hidden_states")
    encode = jax.jit(
        lambda p, ids, layer: nnx.merge(net.graphdef, p).encode_prompt(ids, layer), static_argnames="layer"
    )
    return run, encode


@functools.cache
def make_pair(variant: tuple[str, int, bool]) -> Pair:
    act, eos, with_projection = variant
    kw = tiny(act, eos)
    model = torch_model(kw, with_projection)
    cfg = CLIPTextConfig.from_dict(kw)
    net, params = load_clip_text(numpy_state(model), cfg, with_projection=with_projection)
    return Pair(kw, model, params, with_projection, *jitted(net))


def variant_id(v: tuple[str, int, bool]) -> str:
    return f"{v[0]}-eos{v[1]}-{'proj' if v[2] else 'plain'}"


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_matches_transformers(variant):
    pair = make_pair(variant)
    eos = pair.kw["eos_token_id"]
    ids = token_ids(eos)
    ref, ref_pooled = pair.reference(ids)
    out = pair.run(pair.params, jnp.asarray(ids), output_hidden_states=True)

    assert len(out.hidden_states) == len(ref.hidden_states) == pair.kw["num_hidden_layers"] + 1
    errors = {
        f"hidden_states[{i}]": rel_err(a, b)
        for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True))
    }
    errors["last_hidden_state"] = rel_err(out.last_hidden_state, ref.last_hidden_state)
    errors["pooler_output"] = rel_err(out.pooler_output, ref_pooled)
    if pair.with_projection:
        errors["text_embeds"] = rel_err(out.text_embeds, ref.text_embeds)
    else:
        assert out.text_embeds is None
    print(variant_id(variant), {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-5, errors

    # The inputs tell the pooling rules apart: legacy = first argmax of the ids (padding repeats the max id,
    # so the last one would differ); otherwise the first eos id (argmax of the ids would differ).
    if eos == 2:
        pooled_at, other_rule = ids.argmax(-1), SEQ - 1 - ids[:, ::-1].argmax(-1)
    else:
        pooled_at, other_rule = (ids == eos).argmax(-1), ids.argmax(-1)
    assert (pooled_at != other_rule).any()
    last = ref.last_hidden_state.numpy()
    assert rel_err(out.pooler_output, last[np.arange(len(ids)), pooled_at]) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS[:2], ids=variant_id)  # SD1.x/2.x (plain) and SDXL (projection)
def test_prompt_embeds(variant):
    pair = make_pair(variant)
    ids = token_ids(pair.kw["eos_token_id"])
    ref, ref_pooled = pair.reference(ids)
    out = pair.run(pair.params, jnp.asarray(ids), output_hidden_states=True)
    assert rel_err(prompt_embeds(out, "last"), ref.last_hidden_state) < 1e-5
    assert rel_err(prompt_embeds(out, "penultimate"), ref.hidden_states[-2]) < 1e-5  # SDXL's: no final norm
    # The module method, as the SDXL pipeline uses text_encoder_2: penultimate states + pooled text_embeds.
    penultimate, pooled = pair.encode(pair.params, jnp.asarray(ids), "penultimate")
    assert rel_err(penultimate, ref.hidden_states[-2]) < 1e-5
    assert rel_err(pooled, ref.text_embeds if pair.with_projection else ref_pooled) < 1e-5
    with pytest.raises(ValueError, match="output_hidden_states"):
        prompt_embeds(dataclasses.replace(out, hidden_states=None), "penultimate")
    with pytest.raises(ValueError, match="unknown prompt layer"):
        prompt_embeds(out, "first")


@pytest.mark.parametrize("variant", VARIANTS[2:], ids=variant_id)
def test_attention_mask(variant):
    pair = make_pair(variant)
    ids = token_ids(pair.kw["eos_token_id"])
    right = np.ones_like(ids)
    right[0, 5:] = 0
    right[1, 9:] = 0
    left = right[:, ::-1].copy()
    for mask in (right, left):
        ref, _ = pair.reference(ids, attention_mask=torch.tensor(mask))
        out = pair.run(pair.params, jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
        # With left padding, the padded queries see no key at all: their output is undefined (torch's sdpa
        # and eager paths disagree there too). Every query that attends to something must match.
        valid = mask.astype(bool) if mask is left else np.ones_like(mask, bool)
        assert rel_err(np.asarray(out)[valid], ref.last_hidden_state.numpy()[valid]) < 1e-5


def test_layouts_and_folder(tmp_path):
    kw = tiny("quick_gelu", 2)
    model = torch_model(kw, with_projection=False, seed=1)
    cfg = CLIPTextConfig.from_dict(kw)
    bare = numpy_state(model)  # transformers 5's CLIPTextModel: no text_model. prefix
    assert not any(k.startswith("text_model.") for k in bare)
    hub = {"text_model." + k: v for k, v in bare.items()}
    hub["text_model.embeddings.position_ids"] = np.arange(16)[None]  # buffer in older hub checkpoints
    _, from_hub = load_clip_text(hub, cfg, with_projection=False)
    _, from_bare = load_clip_text(bare, cfg, with_projection=False)
    jax.tree.map(np.testing.assert_array_equal, from_hub, from_bare)

    model.save_pretrained(tmp_path, safe_serialization=True)
    net, params = load_clip_text(str(tmp_path))  # config.json + model.safetensors; class from the weights
    assert "text_projection" not in params
    ids = token_ids(2)
    with torch.no_grad():
        ref = model(torch.tensor(ids)).last_hidden_state
    assert rel_err(jax.jit(net.apply)(params, jnp.asarray(ids)).last_hidden_state, ref) < 1e-5


def test_config_from_dict():
    d = json.loads((CONFIGS / "sd15" / "text_encoder" / "config.json").read_text())
    cfg = CLIPTextConfig.from_dict(d)  # ignores architectures, torch_dtype, dropout, ...
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_act, cfg.eos_token_id) == (
        768,
        12,
        "quick_gelu",
        2,
    )
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_dict(dict(d, hidden_act="swish"))
    with pytest.raises(ValueError, match="eos_token_id"):
        CLIPTextConfig.from_dict(dict(d, eos_token_id=[2, 3]))
    with pytest.raises(ValueError, match="model_type"):
        CLIPTextConfig.from_dict(dict(d, model_type="clip_vision_model"))


def test_conversion_errors():
    kw = tiny("gelu", NEW_EOS)
    state = numpy_state(torch_model(kw, with_projection=True))
    cfg = CLIPTextConfig.from_dict(kw)
    key = "text_model.encoder.layers.1.mlp.fc1.weight"
    bad = dict(state, **{key: np.zeros((63, 32), np.float32)})
    with pytest.raises(
        ConversionError, match=r"mis-shaped: text_model\.encoder\.layers\.1\.mlp\.fc1\.weight"
    ):
        load_clip_text(bad, cfg, with_projection=True)
    missing = {k: v for k, v in state.items() if k != "text_model.final_layer_norm.bias"}
    with pytest.raises(ConversionError, match=r"missing: text_model\.final_layer_norm\.bias"):
        load_clip_text(missing, cfg, with_projection=True)
    with pytest.raises(ConversionError, match=r"unexpected: text_projection\.weight"):
        load_clip_text(state, cfg, with_projection=False)


@pytest.mark.parametrize("with_projection", [False, True])
def test_round_trip_is_bit_identical(with_projection):
    kw = tiny("gelu", 2)
    state = numpy_state(torch_model(kw, with_projection, seed=2))
    prefix = next(iter(state)).startswith("text_model.")
    _, params = load_clip_text(state, CLIPTextConfig.from_dict(kw), with_projection=with_projection)
    back = clip_state_dict(params, prefix=prefix)
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k


def test_jvp_matches_finite_differences_and_remat():
    kw = tiny("gelu", 2)
    state = numpy_state(torch_model(kw, with_projection=True, seed=3))
    cfg = CLIPTextConfig.from_dict(kw)
    ids = jnp.asarray(token_ids(2))
    net, params = load_clip_text(state, cfg, with_projection=True)
    remat_net = clip_text_net(cfg, with_projection=True, remat=True)

    def f(n, table):
        p = jax.tree.map(lambda x: x, params)
        p["text_model"]["embeddings"]["token_embedding"]["embedding"] = table
        out = n.apply(p, ids)
        return jnp.concatenate([out.last_hidden_state.reshape(-1), out.text_embeds.reshape(-1)])

    @jax.jit  # one compilation for everything: each separate one costs seconds on CPU
    def derivatives(table, tangent):
        value, jvp = jax.jvp(lambda x: f(net, x), (table,), (tangent,))
        fds = [(f(net, table + e * tangent) - f(net, table - e * tangent)) / (2 * e) for e in (1e-2, 1e-3)]
        loss, grad = jax.value_and_grad(lambda x: jnp.sum(f(remat_net, x) ** 2))(table)
        return value, jvp, fds, loss, grad

    table = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    tangent = jnp.asarray(np.random.default_rng(0).standard_normal(table.shape, np.float32))
    value, jvp, fds, loss, grad = derivatives(table, tangent)
    # float32 central differences with large random weights: truncation error O(eps^2) dominates down to
    # eps ~ 1e-3, below which rounding takes over; the error must shrink ~100x from eps 1e-2 to 1e-3.
    errs = [rel_err(jvp, fd) for fd in fds]
    assert errs[1] < 2e-3 and errs[1] < errs[0] / 20, errs
    # Rematerialised layers: same value, and reverse mode agrees with forward mode: <grad |f|^2, t> = 2 <f, Jt>.
    np.testing.assert_allclose(loss, jnp.sum(value**2), rtol=1e-6)
    directional = float(jnp.vdot(grad, tangent))
    assert abs(directional - 2 * float(jnp.vdot(value, jvp))) < 1e-4 * abs(directional)


def test_bfloat16_compute_runs_close():
    kw = tiny("quick_gelu", 2)
    model = torch_model(kw, with_projection=True, seed=4)
    p = Precision(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    net, params = load_clip_text(numpy_state(model), CLIPTextConfig.from_dict(kw), precision=p)
    ids = token_ids(2)
    out = jax.jit(net.apply)(params, jnp.asarray(ids))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    with torch.no_grad():
        ref = model(torch.tensor(ids)).text_embeds
    assert rel_err(out.text_embeds.astype(jnp.float32), ref) < 5e-2


# Published parameter counts: CLIP ViT-L/14 text tower (SD1.x, SDXL text_encoder) and OpenCLIP bigG text tower
# with its projection (SDXL text_encoder_2). OpenCLIP ViT-H text (SD2.x, 23 of its 24 layers) is derived by hand:
# 49408*1024 + 77*1024 + 23*12,596,224 + 2*1024.
EXPECTED_COUNTS = {
    "sd15/text_encoder": 123_060_480,
    "sdxl/text_encoder": 123_060_480,
    "sd21/text_encoder": 340_387_840,
    "sdxl/text_encoder_2": 694_659_840,
}


@pytest.mark.parametrize("component", sorted(EXPECTED_COUNTS))
def test_full_size_parameter_counts(component):
    d = json.loads((CONFIGS / component / "config.json").read_text())
    with_projection = d["architectures"] == ["CLIPTextModelWithProjection"]
    cfg = CLIPTextConfig.from_dict(d)
    # Net builds its abstract parameters under nnx.eval_shape (jax.eval_shape): shapes only, no memory.
    ours = clip_text_net(cfg, with_projection=with_projection).num_params()
    with torch.device("meta"):
        cls = TorchCLIPTextProj if with_projection else TorchCLIPText
        theirs = sum(p.numel() for p in cls(TorchConfig.from_dict(d)).parameters())
    assert ours == theirs == EXPECTED_COUNTS[component]
