"""FID: the Flax InceptionV3 against pytorch-fid's (random weights, through the converter and a .pth file), the
resize against torch's, the Frechet distance against a closed form and pytorch-fid, FID's sanity (0 on a set
against itself, growing with noise), batching, statistics files, the CLI and the converter's errors.

pytorch-fid's reference code comes from its wheel via ``reference_wheels`` (it needs torchvision's Python model
code, whose index wheels are CUDA builds that cannot be installed here). The reference network is built exactly
as ``pytorch_fid.inception.fid_inception_v3`` builds it, minus the weight download: random weights instead,
batch-norm running statistics included, so every tensor of the checkpoint matters. One compiled network
(batch 2) is shared by the module's tests.
"""

from __future__ import annotations

import functools
import itertools
import pathlib
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_wheels
import torch
from helpers import tool

from jdistill.convert.core import ConversionError
from jdistill.convert.inception import (
    convert_to_safetensors,
    inception_net,
    inception_state_dict,
    load_inception,
    read_state_dict,
)
from jdistill.evaluate.fid import (
    InceptionFeatures,
    fid,
    load_statistics,
    preprocess,
    read_images,
    save_statistics,
    statistics,
    statistics_of,
)
from jdistill.evaluate.frechet import frechet_distance

REPO = pathlib.Path(__file__).resolve().parent.parent
# (size, seed) of the parity inputs: upsampled and downsampled (no antialiasing) to 299, both non-square.
PARITY_INPUTS = (((64, 96), 1), ((331, 317), 2))


def torch_fid_inception(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the bare FID Inception3, pytorch-fid's ``InceptionV3`` wrapper around it), random weights, eval mode."""
    pfi = reference_wheels.pytorch_fid("inception")
    torch.manual_seed(seed)
    # fid_inception_v3() without load_state_dict_from_url: the same construction.
    inception = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    inception.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = pfi.FIDInceptionE_1(1280)
    inception.Mixed_7c = pfi.FIDInceptionE_2(2048)
    with (
        torch.no_grad()
    ):  # variance-preserving convs and non-trivial batch norms: features depend on the input
        for m in inception.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.05)
                m.running_mean.normal_(0.0, 0.05)
                m.running_var.uniform_(0.5, 2.0)
        inception.fc.weight.normal_(0.0, 0.02)
    inception.eval()
    with mock.patch.object(pfi, "fid_inception_v3", lambda: inception):
        wrapper = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    return inception, wrapper


def smooth_images(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w, 3) float32 in [0, 1]: random waves plus a little noise (random networks see past pure noise)."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    freq, phase = rng.uniform(0.5, 4.0, (n, 1, 1, 3, 2)), rng.uniform(0, 2 * np.pi, (n, 1, 1, 3))
    wave = np.sin(2 * np.pi * (freq[..., 0] * xx[..., None] + freq[..., 1] * yy[..., None]) + phase)
    x = 0.5 + 0.35 * wave + 0.05 * rng.standard_normal((n, h, w, 3))
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Random pytorch-fid network saved as .pth, the Flax one loaded from that file, and reference features."""
    inception, wrapper = torch_fid_inception()
    path = tmp_path_factory.mktemp("fid") / "inception.pth"
    torch.save(inception.state_dict(), path)
    net, params = load_inception(path)
    images, expected = [], []
    for (h, w), seed in PARITY_INPUTS:
        x = smooth_images(np.random.default_rng(seed), 2, h, w)
        with torch.no_grad():
            (out,) = wrapper(torch.from_numpy(x).permute(0, 3, 1, 2))
        images.append(x)
        expected.append(out[:, :, 0, 0].numpy())
    fc = {k: v.detach().numpy() for k, v in inception.fc.state_dict().items()}
    return dict(
        path=path,
        features=InceptionFeatures(net, params, batch_size=2),
        images=images,
        expected=expected,
        fc=fc,
        state=inception.state_dict(),
    )


def test_inception_matches_pytorch_fid(reference):
    features = reference["features"]
    for x, want in zip(reference["images"], reference["expected"], strict=True):
        got = features(x)
        assert got.shape == (2, 2048) and got.dtype == np.float32
        assert rel_err(got, want) < 1e-5, rel_err(got, want)
        # The input-dependent part as well, not only the bias-driven common part.
        centred = rel_err(got - got.mean(0), want - want.mean(0))
        assert centred < 1e-4, centred
        assert np.abs(want[0] - want[1]).mean() > 0.02 * np.abs(want).mean()
    # fc (not used by FID) converted with the right orientation.
    params = reference["features"].params
    feats = reference["expected"][0]
    logits = feats @ np.asarray(params["fc"]["kernel"]) + np.asarray(params["fc"]["bias"])
    np.testing.assert_allclose(
        logits, feats @ reference["fc"]["weight"].T + reference["fc"]["bias"], rtol=1e-5
    )


def test_features_batching_and_input_forms(reference):
    features = reference["features"]
    small, large = reference["images"]
    want = np.concatenate(reference["expected"])
    # Three images in batches of two (the last padded); an iterable mixing a single image and batches of two
    # sizes, regrouped into batches.
    three = features(np.concatenate([large, large[:1]]))
    assert rel_err(three, np.concatenate([want[2:], want[2:3]])) < 2e-5
    mixed = features([small[0], small[1:], large])
    assert rel_err(mixed, want) < 2e-5
    # uint8 images are divided by 255 exactly (correctly rounded, as torchvision's ToTensor).
    as_uint8 = np.round(small * 255).astype(np.uint8)
    assert rel_err(features(as_uint8), features(as_uint8.astype(np.float32) / np.float32(255))) < 1e-6
    with pytest.raises(ValueError, match=r"\[-1, 1\] map to \[0, 1\]"):
        features(2 * small - 1)


def test_preprocess_is_pytorch_fids_resize_and_scale():
    """torch's bilinear, align_corners=False, no antialias (pytorch-fid's resize), then 2x - 1."""
    rng = np.random.default_rng(0)
    for h, w in ((32, 48), (299, 299), (512, 384), (300, 650), (7, 5)):
        x = rng.random((1, h, w, 3), dtype=np.float32)
        want = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False
        )
        want = (2 * want - 1).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(jax.jit(preprocess)(x)), want, atol=2e-6, err_msg=f"{h}x{w}")
    # uint8 at 299 x 299: exactly torchvision's ToTensor (x.float().div(255)), then 2x - 1.
    x = rng.integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    want = 2 * torch.from_numpy(x).float().div(255) - 1
    np.testing.assert_array_equal(np.asarray(jax.jit(preprocess)(x)), want.numpy())


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")  # pytorch-fid's
def test_frechet_distance_closed_form_and_pytorch_fid():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-10)
    reference = reference_wheels.pytorch_fid("fid_score").calculate_frechet_distance
    # Full-rank covariances, and rank-deficient ones (fewer samples than dimensions: a singular product).
    for n in (200, 9):
        a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.5
        sa, sb = statistics(a), statistics(b)
        assert frechet_distance(*sa, *sb) == pytest.approx(float(reference(*sa, *sb)), rel=1e-9)
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(mu1, np.diag(v1), mu2[:3], np.diag(v2[:3]))


def cheap_features(images) -> np.ndarray:
    """A fixed random feature map (8x8 average pool, projection, tanh): 32-d, fast, input-sensitive."""
    x = np.concatenate(list(images)) if not isinstance(images, np.ndarray) else images
    x = jnp.asarray(x, jnp.float32)
    n, h, w, _ = x.shape
    pooled = x.reshape(n, 8, h // 8, 8, w // 8, 3).mean(axis=(2, 4)).reshape(n, -1)
    proj = jax.random.normal(jax.random.key(0), (pooled.shape[1], 32)) / np.sqrt(pooled.shape[1])
    return np.asarray(jnp.tanh(4 * (pooled - 0.5) @ proj))


def test_fid_zero_on_itself_and_growing_with_noise():
    rng = np.random.default_rng(0)
    images = smooth_images(rng, 96, 32, 32)
    stats = statistics_of(images, cheap_features)
    scale = float(np.trace(stats.sigma))
    assert abs(fid(images, images, cheap_features)) < 1e-6 * scale
    assert abs(fid(stats, stats)) < 1e-6 * scale
    values = []
    for strength in (0.05, 0.1, 0.2, 0.4):
        noisy = np.clip(images + strength * rng.standard_normal(images.shape), 0, 1).astype(np.float32)
        values.append(fid(images, noisy, cheap_features))
    assert all(a < b for a, b in itertools.pairwise(values)), values
    assert values[0] > 1e-4 * scale, values


def test_image_folders_and_arrays(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "a.PNG")  # grey -> RGB
    (tmp_path / "notes.txt").write_text("not an image")
    images = list(read_images(tmp_path))
    assert [(x.shape, x.dtype) for x in images] == [((16, 16, 3), np.uint8), ((20, 30, 3), np.uint8)]
    np.save(tmp_path / "set.npy", rng.random((5, 8, 8, 3), dtype=np.float32))
    assert [len(x) for x in read_images(tmp_path / "set.npy", chunk=2)] == [2, 2, 1]
    with pytest.raises(ValueError, match=r"neither a folder of images nor a \.npy file"):
        read_images(tmp_path / "absent.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        read_images(tmp_path / "empty")


def test_statistics_files(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = statistics(rng.normal(size=(10, 4)))
    save_statistics(tmp_path / "stats", (mu, sigma))  # written as given: no ".npz" appended
    loaded = load_statistics(tmp_path / "stats")
    np.testing.assert_array_equal(loaded.mu, mu)
    np.testing.assert_array_equal(loaded.sigma, sigma)
    # pytorch-fid's own files (np.savez_compressed with mu and sigma) load too; paths work in fid().
    np.savez_compressed(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
    assert fid(tmp_path / "stats", str(tmp_path / "pytorch_fid.npz")) == pytest.approx(0.0, abs=1e-9)
    np.savez(tmp_path / "bad.npz", mean=mu, sigma=sigma)
    with pytest.raises(ValueError, match="lacks \\['mu'\\]"):
        load_statistics(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="no feature extractor"):
        fid(rng.random((4, 8, 8, 3)), tmp_path / "stats")


@functools.cache
def zero_state() -> dict[str, np.ndarray]:
    """A state dict with every key and shape of the checkpoint (zeros), cheap to build."""
    abstract = inception_net().abstract
    return inception_state_dict(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract))


def test_converter_names_bad_keys(tmp_path, monkeypatch):
    state = zero_state()
    assert len(state) == 5 * 94 + 2  # 94 conv + batch norm (4 tensors, no num_batches_tracked); fc
    key = "Mixed_6b.branch7x7_2.conv.weight"
    with pytest.raises(ConversionError, match=r"1 missing: Mixed_6b\.branch7x7_2\.conv\.weight"):
        load_inception({k: v for k, v in state.items() if k != key})
    with pytest.raises(ConversionError, match=r"1 unexpected: AuxLogits\.fc\.weight"):
        load_inception({**state, "AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    wrong = {**state, "Mixed_7c.branch_pool.bn.running_var": np.ones(191, np.float32)}
    with pytest.raises(
        ConversionError, match=r"Mixed_7c\.branch_pool\.bn\.running_var: checkpoint \(191,\), "
    ):
        load_inception(wrong)
    with pytest.raises(ConversionError, match=r"pt_inception-2015-12-05-6726825d\.pth"):
        read_state_dict(tmp_path / "absent.pth")
    torch.save({"x": torch.zeros(1)}, tmp_path / "any.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ConversionError, match="needs PyTorch"):
        read_state_dict(tmp_path / "any.pth")


def test_safetensors_conversion_and_cli(reference, tmp_path):
    fid_stats = tool("fid_stats")
    target = tmp_path / "inception.safetensors"
    assert fid_stats.main(["--inception", str(reference["path"]), "--to", str(target)]) == 0
    state = {k: v.numpy() for k, v in reference["state"].items() if not k.endswith("num_batches_tracked")}
    converted = read_state_dict(target)
    assert converted.keys() == state.keys()
    for k, v in state.items():
        np.testing.assert_array_equal(converted[k], v, err_msg=k)
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        convert_to_safetensors(reference["path"], tmp_path / "x.pth")
    # Statistics of a .npy image set through the CLI.
    images = np.concatenate(reference["images"][:1] * 2)  # 4 images of one size: two batches of 2
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "stats.npz"
    argv = ["--inception", str(target), "--images", str(tmp_path / "images.npy"), "--batch-size", "2"]
    assert fid_stats.main([*argv, "--out", str(out)]) == 0
    assert rel_err(load_statistics(out).mu, reference["expected"][0].mean(0)) < 1e-5
    missing = ["--inception", str(target), "--images", str(tmp_path / "nothing.npy"), "--out", str(out)]
    assert fid_stats.main(missing) == 1
