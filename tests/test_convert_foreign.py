"""tools/convert_teacher.py --verify on FLUX / SD3 / SD3.5 pipelines the jdistill team did not design.

The pipelines (tests/foreign_flow_pipelines.py) take their sizes and options from diffusers' own dummy
pipelines and hf-internal-testing/tiny-random-t5: patch size 1, one-block stacks, 5-layer legacy-EOS CLIP
encoders, a ReLU T5 with 8 buckets, a one-group VAE, QK norm with a dual-attention block, and tokenizers unlike
the team's. Each converts, every component matches its PyTorch twin, the tokenizers come through unchanged,
and a mis-shaped tensor is refused by its checkpoint name. Past --verify, the flow teacher's prompt encoding
is compared with the pipelines' encode_prompt (SD3's CLIP states are wider than its T5: cropped to T5's width).
"""

from __future__ import annotations

import json
import shutil

import foreign_flow_pipelines as foreign
import numpy as np
import pytest
from helpers import encode_flow_prompts, pipeline_prompt_embeds, tool
from safetensors.numpy import load_file, save_file

from jdistill.convert.pipeline import CONVERTED_MARKER, TOKENIZERS, load_pipeline

CLIP_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state")
VAE_OUTPUTS = {("vae", o) for o in ("latent_mean", "latent_logvar", "decode")}
FLUX_ROWS = {
    ("transformer", "sample"),
    *VAE_OUTPUTS,
    *(("text_encoder", o) for o in (*CLIP_OUTPUTS, "pooler_output")),
    ("text_encoder_2", "last_hidden_state"),
}
SD3_ROWS = {
    ("transformer", "sample"),
    *VAE_OUTPUTS,
    *((enc, o) for enc in ("text_encoder", "text_encoder_2") for o in (*CLIP_OUTPUTS, "text_embeds")),
    ("text_encoder_3", "last_hidden_state"),
}
CASES = {  # kind: (components in conversion order, the rows --verify must print)
    "flux": (["transformer", "vae", "text_encoder", "text_encoder_2"], FLUX_ROWS),
    "flux_guidance": (["transformer", "vae", "text_encoder", "text_encoder_2"], FLUX_ROWS),
    "sd3": (["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"], SD3_ROWS),
    "sd35": (["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"], SD3_ROWS),
}
PROMPT = "A painting of a squirrel eating a burger"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    return {kind: build(root / kind) for kind, build in foreign.BUILDERS.items()}


def _table(out: str) -> dict[tuple[str, str], float]:
    """(component, output) -> max relative error, from --verify's table."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] != "component":
            try:
                rows[(parts[0], parts[1])] = float(parts[3])
            except ValueError:
                continue
    return rows


def test_the_pipelines_are_not_the_teams(pipelines):
    """The options that make these pipelines foreign really are in the saved configs."""

    def config(kind, name):
        return json.loads((pipelines[kind] / name / "config.json").read_text())

    flux, flux_g = config("flux", "transformer"), config("flux_guidance", "transformer")
    assert (flux["patch_size"], flux["in_channels"], flux["axes_dims_rope"]) == (1, 4, [4, 4, 8])
    assert not flux["guidance_embeds"] and flux_g["guidance_embeds"]
    sd3, sd35 = config("sd3", "transformer"), config("sd35", "transformer")
    assert (sd3["patch_size"], sd3["num_layers"], sd3["qk_norm"]) == (1, 1, None)
    assert not sd3["dual_attention_layers"]
    assert (sd35["num_layers"], sd35["qk_norm"], list(sd35["dual_attention_layers"])) == (4, "rms_norm", [0])
    t5 = config("flux", "text_encoder_2")
    assert (t5["feed_forward_proj"], t5["relative_attention_num_buckets"], t5["d_ff"]) == ("relu", 8, 37)
    clip = config("sd3", "text_encoder")
    assert (clip["eos_token_id"], clip["num_hidden_layers"], clip["vocab_size"]) == (2, 5, 1000)
    assert config("flux", "vae")["latent_channels"] == 1 and config("sd3", "vae")["norm_num_groups"] == 1


@pytest.mark.parametrize("kind", list(CASES))
def test_convert_and_verify(pipelines, tmp_path, capsys, kind):
    components, rows = CASES[kind]
    dst = tmp_path / "out"
    assert tool("convert_teacher").main(["--src", str(pipelines[kind]), "--dst", str(dst), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verification passed" in out
    table = _table(out)
    assert set(table) == rows  # every needed component, every output compared
    assert all(err <= 1e-4 for err in table.values())
    marker = json.loads((dst / CONVERTED_MARKER).read_text())
    assert marker["components"] == components and marker["skipped"] == {}

    # The tokenizers are copied as they were: the converted pipeline tokenizes as the source does.
    from transformers import CLIPTokenizer, T5TokenizerFast

    pipe = load_pipeline(str(dst), allow_download=False)
    assert sorted(pipe.components) == sorted(components)
    for encoder, tok in pipe.tokenizers.items():
        folder = pipelines[kind] / TOKENIZERS[encoder]
        t5 = pipe.components[encoder].config.get("model_type") == "t5"
        source = (T5TokenizerFast if t5 else CLIPTokenizer).from_pretrained(folder)
        assert tok.model_max_length == (foreign.T5_LENGTH if t5 else foreign.CLIP_POSITIONS)
        assert tok(PROMPT).input_ids == source(PROMPT).input_ids
        assert len(tok) == len(source)


@pytest.mark.parametrize(
    "kind, key",
    [
        ("sd35", "transformer_blocks.0.attn.norm_q.weight"),  # the dual-attention block's RMS QK norm
        ("flux_guidance", "time_text_embed.guidance_embedder.linear_1.weight"),
    ],
)
def test_a_mis_shaped_tensor_is_refused_by_name(pipelines, tmp_path, capsys, kind, key):
    src = tmp_path / "src"
    shutil.copytree(pipelines[kind], src)
    weights = src / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state[key] = np.ascontiguousarray(state[key][..., :-1])
    save_file(state, str(weights))
    dst = tmp_path / "out"
    assert tool("convert_teacher").main(["--src", str(src), "--dst", str(dst), "--verify"]) == 1
    captured = capsys.readouterr()
    assert "mis-shaped" in captured.err and key in captured.err
    assert "verification" not in captured.out
    assert not (dst / CONVERTED_MARKER).exists()


@pytest.mark.parametrize("kind", ["flux", "sd3"])  # sd3: two CLIPs wider than T5 (cropped as diffusers)
def test_prompt_encoding_equals_the_pipelines_encode_prompt(pipelines, kind):
    """Past --verify: the teacher's prompt encoding of a converted-on-load foreign pipeline is the pipeline's."""
    path = str(pipelines[kind])
    prompts = [PROMPT, "a photo of the cat"]
    cond = encode_flow_prompts(kind, path, prompts, foreign.T5_LENGTH, allow_download=False)
    embeds, pooled = pipeline_prompt_embeds(kind, path, prompts, foreign.T5_LENGTH)
    for ours_, ref in ((cond["encoder_hidden_states"], embeds), (cond["pooled_projections"], pooled)):
        ours_, ref = np.asarray(ours_), ref.numpy()
        assert ours_.shape == ref.shape
        assert np.abs(ours_ - ref).max() <= 1e-4 * np.abs(ref).max()
