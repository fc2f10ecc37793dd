"""The Flax T5 encoder against transformers' ``T5EncoderModel``: outputs (both feed-forwards, an inner width
other than d_model, padding masks), the position buckets, strict conversion both ways with the tied embedding,
the stacked parameter layout, configuration checks, T5-XXL's parameter count, and the float32 path on
activations that overflow float16 T5."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
import torch
from transformers import T5Config as TorchConfig
from transformers import T5EncoderModel as TorchT5
from transformers.models.t5.modeling_t5 import T5Attention as TorchAttention

from jdistill.convert.core import ConversionError
from jdistill.convert.t5 import BIAS_KEY, TIED_KEY, load_t5, t5_state_dict
from jdistill.models.layers import Precision
from jdistill.models.t5 import T5Config, relative_position_bucket, t5_net

TINY = tiny_configs.t5(dropout_rate=0.0)
VARIANTS = {
    "gated-gelu": dict(TINY, feed_forward_proj="gated-gelu"),
    "relu": dict(TINY, feed_forward_proj="relu", num_layers=2),
    # inner attention width 3 * 12 = 36 != d_model 32; more logarithmic buckets than the others.
    "inner-36": dict(
        TINY,
        feed_forward_proj="gated-gelu",
        num_layers=2,
        d_kv=12,
        num_heads=3,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=12,
    ),
}
SEQ = 20  # longer than every max distance above: the last bucket is used too
XXL = dict(
    d_model=4096,
    d_kv=64,
    num_heads=64,
    d_ff=10240,
    num_layers=24,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)
# google/t5-v1_1-xxl's config.json as FLUX ships it (text_encoder_2): bookkeeping keys around the XXL fields.
FLUX_T5_JSON = dict(
    XXL,
    _name_or_path="google/t5-v1_1-xxl",
    architectures=["T5EncoderModel"],
    classifier_dropout=0.0,
    decoder_start_token_id=0,
    dense_act_fn="gelu_new",
    dropout_rate=0.1,
    eos_token_id=1,
    initializer_factor=1.0,
    is_encoder_decoder=True,
    is_gated_act=True,
    layer_norm_epsilon=1e-06,
    model_type="t5",
    num_decoder_layers=24,
    output_past=True,
    pad_token_id=0,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    transformers_version="4.43.3",
    use_cache=True,
)


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@dataclasses.dataclass
class Pair:
    model: torch.nn.Module
    state: dict[str, np.ndarray]
    config: T5Config
    params: dict
    run: Callable  # jitted: eager NNX dispatch compiles op by op, far slower on CPU

    def reference(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        with torch.no_grad():
            m = None if mask is None else torch.tensor(mask)
            return self.model(torch.tensor(ids), attention_mask=m).last_hidden_state.numpy()


def torch_model(kw: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = TorchT5(TorchConfig(**kw)).eval()
    with torch.no_grad():  # every parameter random (norm weights around 1) so none is constant
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "layer_norm" in name else 0.0))
    return model


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request) -> Pair:
    kw = VARIANTS[request.param]
    model = torch_model(kw)
    state = numpy_state(model)
    config = T5Config.from_dict(model.config.to_dict())
    net, params = load_t5(state, config)
    return Pair(model, state, config, params, jax.jit(net.apply))


@pytest.fixture(scope="module")
def gated() -> Pair:
    kw = VARIANTS["gated-gelu"]
    model = torch_model(kw, seed=1)
    state = numpy_state(model)
    config = T5Config.from_dict(model.config.to_dict())
    net, params = load_t5(state, config)
    return Pair(model, state, config, params, jax.jit(net.apply))


def inputs(batch: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a padding mask: rows padded after 12 and 5 tokens, the last row unpadded."""
    ids = np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, SEQ))
    mask = np.ones((batch, SEQ), np.int64)
    mask[0, 12:] = 0
    mask[1, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_matches_transformers(pair: Pair, masked: bool):
    ids, mask = inputs()
    mask = mask if masked else None
    ours = np.asarray(pair.run(pair.params, ids, mask))
    ref = pair.reference(ids, mask)
    assert ours.shape == (3, SEQ, pair.config.d_model) and ours.dtype == np.float32
    err = rel_err(ours, ref)
    assert err < 1e-4, err


def test_padding_changes_the_unpadded_positions(gated: Pair):
    """The mask is applied: dropping keys changes what the kept queries see (guards the masked parity test
    against a mask that does nothing on both sides)."""
    ids, mask = inputs()
    full = np.asarray(gated.run(gated.params, ids, None))
    padded = np.asarray(gated.run(gated.params, ids, mask))
    assert rel_err(padded[0, :12], full[0, :12]) > 1e-2
    np.testing.assert_allclose(padded[2], full[2], rtol=1e-6, atol=1e-6)  # the unpadded row


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (16, 12), (6, 20), (64, 300)])
def test_position_buckets_equal_transformers(num_buckets: int, max_distance: int):
    rel = torch.arange(-3000, 3001)
    ref = TorchAttention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(relative_position_bucket(rel.numpy(), num_buckets, max_distance), ref)


def test_bfloat16_is_as_close_to_float32_as_transformers(gated: Pair):
    """bf16 parameters and compute (the half-precision norm branch): finite, and no further from the float32
    output than transformers' own bf16 model (random tiny T5s amplify rounding: both sides are off by ~3%)."""
    net = t5_net(gated.config, precision=Precision(jnp.bfloat16, jnp.bfloat16))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), gated.params)
    ids, mask = inputs()
    out = jax.jit(net.apply)(params, ids, mask)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())
    ref = gated.reference(ids, mask)
    with torch.no_grad():
        model = copy.deepcopy(gated.model).to(torch.bfloat16)
        theirs = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.float().numpy()
    err, their_err = rel_err(out.astype(jnp.float32), ref), rel_err(theirs, ref)
    assert err < 1.5 * their_err, (err, their_err)


# Feed-forward input weights scaled so that the gated product gelu(wi_0 x) * wi_1 x, the input of wo, exceeds
# float16's range (65504) in float32, as T5 v1.1's feed-forwards do in the large checkpoints.
FF_OVERFLOW_SCALE = 200.0
FLOAT16_MAX = 65504.0


def test_float32_is_finite_and_exact_where_float16_t5_overflows(tmp_path):
    """transformers' float16 T5 as a pipeline loads it (``from_pretrained(dtype=float16)``: wo kept in float32,
    the gated product computed in float16) turns to inf/NaN, or is clamped far off, on activations past
    float16's range; jdistill's float32 path stays finite and equal to transformers' float32 model."""
    model = torch_model(VARIANTS["gated-gelu"], seed=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "DenseReluDense.wi" in name:
                p.mul_(FF_OVERFLOW_SCALE)
    peaks = []
    hooks = [
        m.register_forward_hook(lambda _m, args, _out: peaks.append(float(args[0].abs().max())))
        for name, m in model.named_modules()
        if name.endswith("DenseReluDense.wo")
    ]
    ids, mask = inputs()
    with torch.no_grad():
        ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    for hook in hooks:
        hook.remove()
    assert len(peaks) == 3 and max(peaks) > 4 * FLOAT16_MAX, peaks  # past float16 in float32 arithmetic
    assert np.isfinite(ref).all()

    model.save_pretrained(tmp_path)
    half = TorchT5.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert half.shared.weight.dtype == torch.float16
    with torch.no_grad():
        theirs = half(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.float().numpy()
    assert not np.isfinite(theirs).all() or rel_err(theirs, ref) > 0.1

    net, params = load_t5(numpy_state(model), T5Config.from_dict(model.config.to_dict()))
    ours = np.asarray(jax.jit(net.apply)(params, ids, mask))
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    err = rel_err(ours, ref)
    assert err < 1e-4, err


# --------------------------------------------------------------------------------------------- conversion


def test_export_equals_the_torch_state_dict(pair: Pair):
    exported = t5_state_dict(pair.params)
    assert set(exported) == set(pair.state)
    for key, want in pair.state.items():
        assert exported[key].dtype == want.dtype, key
        assert np.array_equal(exported[key], want), key


def test_folder_without_the_tied_key_loads(gated: Pair, tmp_path):
    """save_pretrained writes config.json and safetensors without encoder.embed_tokens.weight."""
    gated.model.save_pretrained(tmp_path)
    net, params = load_t5(str(tmp_path))
    assert net.config == gated.config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(gated.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loading_is_strict(gated: Pair):
    state, config = gated.state, gated.config
    key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    with pytest.raises(ConversionError, match=rf"1 missing: {key}"):
        load_t5({k: v for k, v in state.items() if k != key}, config)
    for extra in ("encoder.block.3.layer.0.SelfAttention.q.weight", BIAS_KEY.replace("block.0", "block.1")):
        with pytest.raises(ConversionError, match=rf"1 unexpected: {extra}"):
            load_t5({**state, extra: state["encoder.block.0.layer.0.SelfAttention.q.weight"]}, config)
    key = "encoder.block.2.layer.0.SelfAttention.q.weight"
    with pytest.raises(ConversionError, match=rf"{key}: checkpoint \(32, 31\), model expects \(32, 32\)"):
        load_t5({**state, key: np.zeros((32, 31), np.float32)}, config)
    with pytest.raises(ConversionError, match=rf"{BIAS_KEY}: checkpoint \(8, 3\)"):
        load_t5({**state, BIAS_KEY: np.zeros((8, 3), np.float32)}, config)
    with pytest.raises(ConversionError, match=rf"is the checkpoint's {BIAS_KEY}"):
        load_t5({k: v for k, v in state.items() if k != BIAS_KEY}, config)


def test_tied_embedding_must_equal_shared(gated: Pair):
    other = gated.state["shared.weight"].copy()
    other[3, 4] += 1.0
    with pytest.raises(ConversionError, match=TIED_KEY):
        load_t5({**gated.state, TIED_KEY: other}, gated.config)


def test_blocks_are_stacked_on_a_leading_layer_axis(gated: Pair):
    net = t5_net(gated.config)
    blocks = gated.params["encoder"]["block"]
    assert set(blocks) == {"stacked"}
    q = blocks["stacked"]["layer"][0]["SelfAttention"]["q"]["kernel"]
    assert q.shape == (3, 32, 32)
    np.testing.assert_array_equal(q[1], gated.state["encoder.block.1.layer.0.SelfAttention.q.weight"].T)
    assert blocks["stacked"]["layer"][1]["layer_norm"]["weight"].shape == (3, 32)
    assert net.logical_axes["encoder"]["block"]["stacked"]["layer"][0]["SelfAttention"]["q"]["kernel"] == (
        None,
        "embed",
        "heads",
    )
    assert net.abstract["encoder"]["relative_attention_bias"]["embedding"].shape == (8, 4)


# ------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "change,name",
    [
        ({"is_decoder": True}, "is_decoder"),
        ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj"),
        ({"model_type": "umt5"}, "model_type"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
        ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets"),
        ({"hidden_size": 64}, "hidden_size"),  # an alias contradicting d_model
    ],
)
def test_unsupported_options_are_refused_by_name(change: dict, name: str):
    with pytest.raises(ValueError, match=name):
        T5Config.from_dict({**FLUX_T5_JSON, **change})


def test_config_round_trips_through_transformers():
    cfg = T5Config.from_dict(FLUX_T5_JSON)
    assert cfg == T5Config(**XXL)
    assert T5Config.from_dict(cfg.to_dict()) == cfg
    theirs = TorchConfig(**cfg.to_dict())
    assert theirs.is_gated_act and theirs.dense_act_fn == "gelu_new"
    assert T5Config.from_dict(theirs.to_dict()) == cfg


def test_t5_xxl_parameter_count_equals_transformers():
    """Both sides abstract: jdistill's shapes only, transformers on the meta device."""
    ours = t5_net(T5Config.from_dict(FLUX_T5_JSON)).num_params()
    with torch.device("meta"):
        model = TorchT5(TorchConfig(**XXL))
    assert next(model.parameters()).device.type == "meta"
    assert ours == sum(p.numel() for _, p in model.named_parameters())  # tied embedding counted once
    assert ours == 4_762_310_656
