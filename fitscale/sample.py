"""Generation at any resolution: load weights, pack many sizes into one batch, integrate, write.

Sampling is the flow ODE from noise (t = 0) to data (t = 1) of fitscale.flow.samplers, with
classifier-free guidance from fitscale.flow.guidance. Images of different sizes share each
forward pass: a batch is a packed sequence, like in training, filled up to a token budget.
Every image's noise comes from a generator seeded by (seed, image index), so an image is the same
whichever batch or rank computes it, and a run split over ranks writes exactly the images of a
run on one process.

Resolution extrapolation is a ModelConfig choice (fitscale.models.rope); `EXTRAPOLATIONS` maps
the paper's names onto it, with per-image frequencies so each size in a batch gets its own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from fitscale.flow.guidance import PackedLayout, PackedVelocity
from fitscale.flow.loss import image_seed
from fitscale.flow.samplers import SAMPLERS, integrate

PIXELS_PER_TOKEN = 16  # the VAE downsamples by 8 and a token covers 2 x 2 latent pixels

# The paper's training-free extrapolation methods as ModelConfig fields ("Vision" = decoupled axes).
EXTRAPOLATIONS = {
    "none": {"rope_method": "none", "rope_decoupled": False},
    "linear": {"rope_method": "linear", "rope_decoupled": False},
    "ntk": {"rope_method": "ntk", "rope_decoupled": False},
    "yarn": {"rope_method": "yarn", "rope_decoupled": False},
    "vision-ntk": {"rope_method": "ntk", "rope_decoupled": True},
    "vision-yarn": {"rope_method": "yarn", "rope_decoupled": True},
}


def extrapolation_overrides(method: str | None, attn_scale: bool = False) -> dict:
    """ModelConfig overrides for an extrapolation method; None keeps the model's own RoPE."""
    if method is None:
        return {"rope_attn_scale": True} if attn_scale else {}
    if method not in EXTRAPOLATIONS:
        raise ValueError(f"--extrapolation {method!r}: choose one of {', '.join(EXTRAPOLATIONS)}")
    return {
        **EXTRAPOLATIONS[method],
        "rope_attn_scale": attn_scale,
        "rope_per_image": True,
        "rope_target_grid": None,
    }


@dataclass
class SampleItem:
    """One image to generate: its global index (seeds its noise), class and grid in tokens."""

    index: int
    label: int
    rows: int
    cols: int

    @property
    def tokens(self) -> int:
        return self.rows * self.cols

    @property
    def height(self) -> int:
        return self.rows * PIXELS_PER_TOKEN

    @property
    def width(self) -> int:
        return self.cols * PIXELS_PER_TOKEN


@dataclass
class SamplingOptions:
    """How to integrate: sampler, steps or tolerances, guidance, seed and batch size."""

    sampler: str = "euler"  # euler | heun | dopri5
    steps: int = 50  # fixed-step samplers only
    atol: float = 1e-6  # dopri5
    rtol: float = 1e-3  # dopri5
    time_shift: float = 1.0  # sample on a shifted time grid (< 1: more steps near noise)
    cfg_scale: float = 1.0  # 1 = no guidance
    guidance_channels: int | None = None  # 3: the release's first-3-channels guidance
    seed: int = 0
    token_budget: int = 16384  # tokens per forward (guidance doubles a batch's tokens)
    autocast: str = "auto"  # auto (bf16 on CUDA), bf16 or fp32

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps}: must be >= 1")
        if self.cfg_scale < 0:
            raise ValueError(f"--cfg {self.cfg_scale}: the guidance scale must be >= 0")
        if self.autocast not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--dtype {self.autocast!r}: choose auto, bf16 or fp32")


def plan_items(
    sizes: list[tuple[int, int]],
    num_per_size: int,
    num_classes: int,
    labels: list[int] | None = None,
    seed: int = 0,
) -> list[SampleItem]:
    """The images of a run: `num_per_size` of each (height, width) in pixels, labels cycled or random."""
    if num_per_size < 1:
        raise ValueError(f"--num-per-size {num_per_size}: must be >= 1")
    for height, width in sizes:
        if height % PIXELS_PER_TOKEN or width % PIXELS_PER_TOKEN or min(height, width) <= 0:
            raise ValueError(
                f"size {height}x{width}: height and width must be positive multiples of {PIXELS_PER_TOKEN} pixels"
            )
    for label in labels or []:
        if not 0 <= label < num_classes:
            raise ValueError(f"--labels: class {label} is outside [0, {num_classes}) for this model")
    rng = np.random.default_rng([seed, 7])
    items = []
    for height, width in sizes:
        for _ in range(num_per_size):
            index = len(items)
            label = labels[index % len(labels)] if labels else int(rng.integers(num_classes))
            items.append(SampleItem(index, label, height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN))
    return items


def batches_by_budget(items: list[SampleItem], token_budget: int, guided: bool) -> list[list[SampleItem]]:
    """Consecutive items grouped so each forward holds at most `token_budget` tokens."""
    factor = 2 if guided else 1
    groups: list[list[SampleItem]] = []
    used = 0
    for item in items:
        need = item.tokens * factor
        if need > token_budget:
            raise ValueError(
                f"a {item.height}x{item.width} image needs {need} tokens per forward, over --token-budget "
                f"{token_budget}; raise the budget"
            )
        if not groups or used + need > token_budget:
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += need
    return groups


def initial_noise(item: SampleItem, token_dim: int, seed: int) -> torch.Tensor:
    """(rows*cols, p*p*C) standard normal noise that depends only on (seed, item index)."""
    generator = torch.Generator().manual_seed(image_seed(seed, 0, item.index))
    return torch.randn(item.tokens, token_dim, generator=generator)


def pack_layout(items: list[SampleItem], device: torch.device) -> PackedLayout:
    from fitscale.data.batch import grid_positions

    lengths = torch.tensor([item.tokens for item in items], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(items) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    return PackedLayout(
        labels=torch.tensor([item.label for item in items], dtype=torch.int64, device=device),
        pos=torch.cat([grid_positions(item.rows, item.cols) for item in items]).to(device),
        cu_seqlens=cu_seqlens.to(device),
        sizes=torch.tensor([[item.rows, item.cols] for item in items], dtype=torch.int64, device=device),
        max_seqlen=int(lengths.max()),
    )


def unpatchify(tokens: torch.Tensor, rows: int, cols: int, patch_size: int = 2) -> torch.Tensor:
    """(rows*cols, C*p*p) tokens -> (C, rows*p, cols*p) latent (fitscale.data.format's layout)."""
    channels = tokens.shape[1] // (patch_size * patch_size)
    grid = tokens.reshape(rows, cols, channels, patch_size, patch_size)
    return grid.permute(2, 0, 3, 1, 4).reshape(channels, rows * patch_size, cols * patch_size)


def autocast_dtype(option: str, device: torch.device) -> torch.dtype | None:
    if option == "bf16" or (option == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@torch.no_grad()
def generate_latents(
    model: torch.nn.Module, items: list[SampleItem], options: SamplingOptions
) -> list[torch.Tensor]:
    """Latents (C, h, w) float32 on the CPU, one per item in order; the model stays on its device."""
    model.eval()
    config = model.config
    device = next(model.parameters()).device
    dtype = autocast_dtype(options.autocast, device)
    out: list[torch.Tensor] = []
    for group in batches_by_budget(items, options.token_budget, options.cfg_scale != 1.0):
        layout = pack_layout(group, device)
        x = torch.cat([initial_noise(item, config.token_dim, options.seed) for item in group]).to(device)
        velocity = PackedVelocity(model, layout, options.cfg_scale, options.guidance_channels, dtype)
        result = integrate(
            velocity, x, options.sampler, options.steps, options.atol, options.rtol, options.time_shift
        )
        tokens = result.x.float().cpu()
        start = 0
        for item in group:
            out.append(
                unpatchify(tokens[start : start + item.tokens], item.rows, item.cols, config.patch_size)
            )
            start += item.tokens
    return out


# ------------------------------------------------------------------------------------ weights


def _run_model_section(run_dir: Path) -> tuple[str, dict]:
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: a DCP checkpoint is read with its run's config.yaml; pass --model for a file"
        )
    model = OmegaConf.to_container(OmegaConf.load(path)).get("model") or {}
    return model.get("name", "tiny"), dict(model.get("overrides") or {})


def load_dcp_weights(model: torch.nn.Module, checkpoint: Path, ema: bool = True) -> None:
    """Copy a run checkpoint's EMA (or raw) weights into a materialised model, on one process.

    DCP reads only the entries asked for, so the optimizer state is never loaded.
    """
    import torch.distributed.checkpoint as dcp

    weights = {name: tensor for name, tensor in model.state_dict().items()}
    state = {"ema": {"params": weights}} if ema else {"model": weights}
    try:
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    except Exception as error:  # DCP wraps a missing key in CheckpointException
        which = "EMA weights (key `ema`)" if ema else "weights (key `model`)"
        hint = "; pass --raw to use the raw weights" if ema else ""
        raise ValueError(
            f"{checkpoint} has no usable {which}: {str(error).splitlines()[0][:300]}{hint}"
        ) from None


def load_sampling_model(
    checkpoint: str | Path,
    model_name: str | None = None,
    overrides: dict | None = None,
    ema: bool = True,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """A model ready to sample, from a run folder / `step-N` checkpoint (DCP) or a weights file.

    A run checkpoint knows its model from the run's config.yaml; a file (.safetensors / .bin / .pt,
    e.g. a released FiTv2 or `fitscale convert export` output) needs `model_name`. `overrides`
    (e.g. extrapolation, attention backend) change the ModelConfig but never its shapes.
    """
    from fitscale.checkpoint.layout import find_checkpoint
    from fitscale.models import build_model, load_official_checkpoint

    path = Path(checkpoint)
    overrides = dict(overrides or {})
    if path.is_file():
        if model_name is None:
            raise ValueError(f"{path} is a weights file: name its model with --model (e.g. fitv2-xl)")
        with torch.device("meta"):
            model = build_model(model_name, **overrides)
        model.to_empty(device="cpu")
        model.init_weights()
        load_official_checkpoint(model, path, container_key=None if ema else "model")
    else:
        step_dir = find_checkpoint(path)
        run_name, run_overrides = _run_model_section(step_dir.parent.parent)
        with torch.device("meta"):
            model = build_model(model_name or run_name, **{**run_overrides, **overrides})
        model.to_empty(device="cpu")
        model.init_weights()
        load_dcp_weights(model, step_dir, ema=ema)
    return model.to(device).eval()


# ------------------------------------------------------------------------------------ images


VAE_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def check_vae_folder(path: str | Path, latent_channels: int | None = None) -> dict:
    """The config of a local AutoencoderKL folder (what `save_pretrained` writes), checked before
    any sampling starts; each error names the path and what is wrong with it."""
    folder = Path(path)
    hint = "expected an AutoencoderKL saved with save_pretrained (config.json and its weights)"
    if not folder.is_dir():
        raise FileNotFoundError(f"--vae {path}: no such folder; {hint}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        inside = " (a diffusers pipeline: pass its vae/ subfolder)" if (folder / "vae").is_dir() else ""
        raise ValueError(f"--vae {path}: no config.json in the folder{inside}; {hint}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--vae {path}: config.json is not valid JSON ({error}); {hint}") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderKL":
        raise ValueError(
            f"--vae {path}: config.json describes {kind or 'no diffusers model'}, not an AutoencoderKL"
        )
    if not any((folder / name).is_file() for name in VAE_WEIGHT_FILES):
        raise ValueError(f"--vae {path}: no weights file ({' or '.join(VAE_WEIGHT_FILES)}); {hint}")
    channels = config.get("latent_channels", 4)
    if latent_channels is not None and channels != latent_channels:
        raise ValueError(
            f"--vae {path}: it decodes {channels}-channel latents but the model makes {latent_channels}-channel ones"
        )
    return config


def load_vae(path: str | Path, device: torch.device | str, latent_channels: int | None = None):
    """A checked local AutoencoderKL in eval mode on `device`."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ImportError("decoding needs diffusers: pip install 'fitscale[images]'") from error
    check_vae_folder(path, latent_channels)
    try:
        # low_cpu_mem_usage needs accelerate; without it diffusers would warn, then load fully anyway.
        vae = AutoencoderKL.from_pretrained(str(path), low_cpu_mem_usage=find_spec("accelerate") is not None)
    except (OSError, ValueError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"--vae {path}: cannot be loaded as an AutoencoderKL ({reason})") from error
    return vae.to(device).eval()


@torch.no_grad()
def decode_latents(vae, latents: list[torch.Tensor]) -> list[np.ndarray]:
    """Latents (scaled by the VAE's scaling_factor, as in training) -> uint8 (H, W, 3) pictures."""
    device = next(vae.parameters()).device
    pictures = []
    for latent in latents:
        pixels = vae.decode(latent[None].to(device, vae.dtype) / vae.config.scaling_factor).sample[0]
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pictures.append(pixels.permute(1, 2, 0).cpu().numpy())
    return pictures


def preview_latents(latents: list[torch.Tensor], channel: int) -> list[np.ndarray]:
    """One latent channel in [-1, 1] as a grey picture (the digits data keep the image in channel 0)."""
    pictures = []
    for latent in latents:
        grey = ((latent[channel].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        pictures.append(np.repeat(grey[:, :, None], 3, axis=2))
    return pictures


def image_grid(pictures: list[np.ndarray], columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Pictures of any sizes in a grid of equal cells (each centred), uint8 (H, W, 3)."""
    if not pictures:
        raise ValueError("no pictures to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(pictures)))
    cell_h = max(p.shape[0] for p in pictures) + pad
    cell_w = max(p.shape[1] for p in pictures) + pad
    rows = math.ceil(len(pictures) / columns)
    grid = np.full((rows * cell_h + pad, columns * cell_w + pad, 3), 255, dtype=np.uint8)
    for index, picture in enumerate(pictures):
        top = (index // columns) * cell_h + pad + (cell_h - pad - picture.shape[0]) // 2
        left = (index % columns) * cell_w + pad + (cell_w - pad - picture.shape[1]) // 2
        grid[top : top + picture.shape[0], left : left + picture.shape[1]] = picture
    return grid


def save_png(picture: np.ndarray, path: Path, scale: int = 1) -> None:
    from PIL import Image

    image = Image.fromarray(picture)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)


def write_npz_by_size(out_dir: Path, items: list[SampleItem], pictures: list[np.ndarray]) -> list[Path]:
    """ADM evaluation-suite batches: one `samples_HxW.npz` per size, `arr_0` uint8 NHWC, `arr_1` labels."""
    written = []
    for size in sorted({(p.shape[0], p.shape[1]) for p in pictures}):
        chosen = [i for i, p in enumerate(pictures) if p.shape[:2] == size]
        path = out_dir / f"samples_{size[0]}x{size[1]}.npz"
        np.savez(
            path,
            arr_0=np.stack([pictures[i] for i in chosen]),
            arr_1=np.array([items[i].label for i in chosen], dtype=np.int64),
        )
        written.append(path)
    return written


# ------------------------------------------------------------------------------------ FID

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception


def default_inception_weights() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def load_reference_images(path: str | Path) -> np.ndarray:
    """uint8 NHWC pictures from an ADM reference batch (.npz with `arr_0`) or a folder of PNG/JPEG files."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            if "arr_0" not in data:
                raise ValueError(f"{path}: no `arr_0` array; an ADM reference batch holds the images there")
            return data["arr_0"]
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise ValueError(f"{path}: no .png/.jpg images")
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    raise FileNotFoundError(f"FID reference {path} is neither an .npz file nor a folder of images")


def compute_fid(
    generated: list[np.ndarray] | np.ndarray,
    reference: np.ndarray,
    inception_weights: str | Path | None = None,
    feature_extractor: torch.nn.Module | None = None,
    batch_size: int = 64,
) -> float:
    """FID between uint8 pictures (any sizes; resized to 299 by the metric) with torchmetrics.

    The Inception weights are never downloaded: give `inception_weights` (torch-fidelity's
    file) or place it in torch's hub cache. `feature_extractor` replaces Inception (tests).
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as error:
        raise ImportError(
            "FID needs torchmetrics and torch-fidelity: pip install 'fitscale[sample]'"
        ) from error
    if feature_extractor is None:
        weights = Path(inception_weights) if inception_weights else default_inception_weights()
        if not weights.is_file():
            raise FileNotFoundError(
                f"Inception weights {weights} not found; FID needs torch-fidelity's {INCEPTION_WEIGHTS_FILE} "
                "on local disk: pass --inception-weights PATH (nothing is downloaded)"
            )
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    else:
        metric = FrechetInceptionDistance(feature=feature_extractor)
    for real, pictures in ((True, reference), (False, generated)):
        for picture in pictures if not isinstance(pictures, np.ndarray) else list(pictures):
            metric.update(torch.from_numpy(np.ascontiguousarray(picture)).permute(2, 0, 1)[None], real=real)
    return float(metric.compute())


# ------------------------------------------------------------------------------------ a run


@dataclass
class SampleRun:
    """What `fitscale sample` writes and where; one process's share is `items[rank::world_size]`."""

    out_dir: Path
    items: list[SampleItem]
    options: SamplingOptions = field(default_factory=SamplingOptions)
    vae: str | None = None  # AutoencoderKL folder; None writes latents (and previews)
    preview_channel: int | None = None  # without a VAE: also write this channel as grey PNGs
    grid_size: int = 64  # images in grid.png
    grid_scale: int = 1  # nearest-neighbour upscaling of grid.png (small latents)


def run_sampling(model: torch.nn.Module, run: SampleRun, rank: int = 0, world_size: int = 1) -> list[Path]:
    """Generate this rank's share and write it; rank 0 then adds the grid, npz files and an index.

    Call on every rank; with world_size > 1 torch.distributed must be initialised (a barrier
    separates the two phases). Returns the files this rank wrote.
    """
    import torch.distributed as dist

    out = run.out_dir
    (out / "images").mkdir(parents=True, exist_ok=True)
    mine = run.items[rank::world_size]
    device = next(model.parameters()).device
    # Loaded (and checked) before the ODE runs, so a bad folder fails in seconds, not after sampling.
    vae = load_vae(run.vae, device, model.config.in_channels) if run.vae is not None else None
    latents = generate_latents(model, mine, run.options) if mine else []
    written: list[Path] = []
    if run.vae is None:
        (out / "latents").mkdir(exist_ok=True)
        for item, latent in zip(mine, latents):
            path = out / "latents" / f"{item.index:06d}.npy"
            np.save(path, latent.numpy())
            written.append(path)
    pictures: list[np.ndarray] = []
    if vae is not None:
        pictures = decode_latents(vae, latents)
    elif run.preview_channel is not None:
        pictures = preview_latents(latents, run.preview_channel)
    for item, picture in zip(mine, pictures):
        path = out / "images" / f"{item.index:06d}_class{item.label}_{item.height}x{item.width}.png"
        save_png(picture, path)
        written.append(path)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        written += _write_summary(run, bool(pictures))
    return written


def _write_summary(run: SampleRun, have_pictures: bool) -> list[Path]:
    from PIL import Image

    out = run.out_dir
    written = []
    index = [
        {
            "index": i.index,
            "label": i.label,
            "height": i.height,
            "width": i.width,
            "rows": i.rows,
            "cols": i.cols,
        }
        for i in run.items
    ]
    (out / "samples.json").write_text(json.dumps({"options": vars(run.options), "images": index}, indent=1))
    written.append(out / "samples.json")
    if have_pictures:
        files = {int(p.name[:6]): p for p in (out / "images").glob("*.png")}
        pictures = [np.asarray(Image.open(files[i.index]).convert("RGB")) for i in run.items]
        save_png(image_grid(pictures[: run.grid_size]), out / "grid.png", run.grid_scale)
        written.append(out / "grid.png")
        written += write_npz_by_size(out, run.items, pictures)
    return written


__all__ = [
    "EXTRAPOLATIONS",
    "SampleItem",
    "SampleRun",
    "SamplingOptions",
    "check_vae_folder",
    "compute_fid",
    "extrapolation_overrides",
    "generate_latents",
    "image_grid",
    "load_sampling_model",
    "load_vae",
    "plan_items",
    "run_sampling",
]
