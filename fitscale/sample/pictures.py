"""Pictures out of latents and onto disk: grey previews of one latent channel, labelled grids of
pictures of any sizes (rows by class, columns by size, a caption), PNG files, and the ADM
evaluation suite's `.npz` batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fitscale.sample.plan import SampleItem


def preview_latents(latents: list[torch.Tensor], channel: int) -> list[np.ndarray]:
    """One latent channel in [-1, 1] as a grey uint8 (h, w, 3) picture (the digits data keep the
    image in channel 0)."""
    pictures = []
    for latent in latents:
        grey = ((latent[channel].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        pictures.append(np.repeat(grey[:, :, None], 3, axis=2))
    return pictures


def save_png(picture: np.ndarray, path: Path, scale: int = 1) -> None:
    """Write a uint8 (H, W, 3) picture as PNG, upscaled `scale` times by nearest neighbour."""
    from PIL import Image

    image = Image.fromarray(picture)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path, format="PNG")  # by name: the path may be a temporary one


def write_npz_by_size(out_dir: Path, items: list[SampleItem], files: list[Path]) -> list[Path]:
    """ADM evaluation-suite batches: one `samples_HxW.npz` per size, `arr_0` uint8 NHWC, `arr_1` labels,
    from the PNG `files` of `items` (in order), streamed one picture at a time: a 50,000-image run
    never holds its pictures in memory (written through a temporary file and a rename)."""
    import zipfile

    from PIL import Image

    by_size: dict[tuple[int, int], list[int]] = {}
    for i, file in enumerate(files):
        with Image.open(file) as image:  # the header only
            by_size.setdefault((image.height, image.width), []).append(i)
    written = []
    for size in sorted(by_size):
        chosen = by_size[size]
        path = out_dir / f"samples_{size[0]}x{size[1]}.npz"
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                header = {"descr": "|u1", "fortran_order": False, "shape": (len(chosen), *size, 3)}
                np.lib.format.write_array_header_2_0(member, header)
                for i in chosen:
                    with Image.open(files[i]) as image:
                        member.write(np.asarray(image.convert("RGB"), dtype=np.uint8).tobytes())
            with archive.open("arr_1.npy", "w") as member:
                np.lib.format.write_array(member, np.array([items[i].label for i in chosen], dtype=np.int64))
        tmp.replace(path)
        written.append(path)
    return written


def extrapolation_name(config) -> str:
    """A ModelConfig's RoPE extrapolation in `--extrapolation` words: none, linear, ntk, yarn,
    vision-ntk, vision-yarn (decoupled axes), ntk_by_parts; `+attn-scale` when the logit scale is on."""
    name = config.rope_method
    if config.rope_decoupled and name != "none":
        name = f"vision-{name}"
    return f"{name}+attn-scale" if config.rope_attn_scale else name


def grid_caption(options, extrapolation: str, step: int | None = None, size_unit: str = "pixels") -> str:
    """The caption under a labelled grid: step, guidance, sampler, extrapolation and the size unit.

    `options` is a fitscale.sample.options.SamplingOptions."""
    if options.mode == "sde":
        solver = f"SDE {options.sde_sampler} {options.steps} steps {options.diffusion_form}"
    elif options.steps is None:  # adaptive
        solver = f"{options.sampler} rtol {options.rtol:g}"
    else:
        solver = f"{options.sampler} {options.steps} steps"
    guidance = f"cfg {options.cfg_scale:g}" + (f" pow {options.scale_pow:g}" if options.scale_pow else "")
    parts = [f"step {step}"] if step is not None else []
    parts += [guidance, solver, f"extrapolation {extrapolation}", f"seed {options.seed}"]
    return " | ".join(parts) + f"   (rows: class, columns: {size_unit})"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled font (needs FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def labelled_grid(
    cells: list[list[np.ndarray | None]],
    row_labels: list[str],
    column_labels: list[str],
    caption: str = "",
    scale: int = 1,
    pad: int = 4,
    font_size: int = 12,
) -> np.ndarray:
    """A grid with a label left of every row, one above every column and a caption below, uint8 (H, W, 3).

    `cells[r][c]` is a uint8 (h, w, 3) picture or None (left blank); pictures of any sizes are
    upscaled `scale` times by nearest neighbour and centred in equal cells. Text uses Pillow's
    bundled default font. Raises ValueError when the labels do not match the cells' shape or
    no cell holds a picture.
    """
    from PIL import Image, ImageDraw

    if len(row_labels) != len(cells) or any(len(row) != len(column_labels) for row in cells):
        raise ValueError(
            f"labelled_grid: {len(row_labels)} row and {len(column_labels)} column labels for a "
            f"{len(cells)} x {len(cells[0]) if cells else 0} grid of cells"
        )
    shown = [p for row in cells for p in row if p is not None]
    if not shown:
        raise ValueError("no pictures to put in a grid")
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    cell_h = max(p.shape[0] for p in shown) * scale + pad
    cell_w = max(max(p.shape[1] for p in shown) * scale, *(text_size(c)[0] for c in column_labels)) + pad
    label_w = max(text_size(r)[0] for r in row_labels) + 2 * pad
    line_h = text_size("Ag")[1] + pad
    caption_h = line_h + pad if caption else 0
    width = max(label_w + len(column_labels) * cell_w + pad, text_size(caption)[0] + 2 * pad)
    height = line_h + pad + len(cells) * cell_h + pad + caption_h
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    top0 = line_h + pad
    for c, text in enumerate(column_labels):
        w, _ = text_size(text)
        draw.text((label_w + c * cell_w + (cell_w - w) // 2, pad // 2), text, fill=(0, 0, 0), font=font)
    for r, row in enumerate(cells):
        _, h = text_size(row_labels[r])
        draw.text((pad, top0 + r * cell_h + (cell_h - h) // 2), row_labels[r], fill=(0, 0, 0), font=font)
        for c, picture in enumerate(row):
            if picture is None:
                continue
            tile = Image.fromarray(picture)
            if scale > 1:
                tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
            left = label_w + c * cell_w + (cell_w - tile.width) // 2
            top = top0 + r * cell_h + (cell_h - tile.height) // 2
            image.paste(tile, (left, top))
    if caption:
        draw.text((pad, height - caption_h + pad // 2), caption, fill=(60, 60, 60), font=font)
    return np.asarray(image)


def class_size_grid(
    items: list[SampleItem],
    pictures: list[np.ndarray],
    class_names: list[str] | None = None,
    caption: str = "",
    size_unit: str = "pixels",
    scale: int = 1,
) -> np.ndarray:
    """`labelled_grid` of sampled images: one row per class (by name, else index), one column per
    size (height x width in `size_unit`: "pixels" or "tokens"), repeated for several images of a
    class at one size; cells without an image stay blank. `pictures[i]` belongs to `items[i]`."""
    if len(items) != len(pictures):
        raise ValueError(f"class_size_grid: {len(items)} items but {len(pictures)} pictures")

    def size_of(item: SampleItem) -> tuple[int, int]:
        return (item.rows, item.cols) if size_unit == "tokens" else (item.height, item.width)

    sizes = list(dict.fromkeys(size_of(item) for item in items))
    labels = sorted({item.label for item in items})
    by_cell: dict[tuple[int, tuple[int, int]], list[np.ndarray]] = {}
    for item, picture in zip(items, pictures):
        by_cell.setdefault((item.label, size_of(item)), []).append(picture)
    repeats = {size: max(len(by_cell.get((label, size), [])) for label in labels) for size in sizes}
    columns = [(size, k) for size in sizes for k in range(repeats[size])]
    cells = [
        [
            by_cell[(label, size)][k] if k < len(by_cell.get((label, size), [])) else None
            for size, k in columns
        ]
        for label in labels
    ]
    names = [
        class_names[label] if class_names is not None and label < len(class_names) else str(label)
        for label in labels
    ]
    column_labels = [f"{h}x{w}" for (h, w), _ in columns]
    return labelled_grid(cells, names, column_labels, caption, scale=scale)
