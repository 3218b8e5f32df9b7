"""The data section of a recipe: where the latents live and how they become packed steps.

Every field is checked in `__post_init__`, so a bad recipe fails when it is parsed, with a
message that names the field, the value and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from fitscale.config.bounds import bound
from fitscale.config.schema import check_choices
from fitscale.errors import UserError


@dataclass
class DataConfig:
    """Where the latents live and how they become packed steps (fitscale.data.loader)."""

    # A dataset written by `fitscale data ...` (MDS shards + samples.npy + fitscale.json). Without
    # `remote` this is the dataset itself; with `remote` it is the local cache the shards go to:
    # one live run per cache folder on a machine (fitscale/data/cache.py).
    path: str | None = None
    # Remote URI of the dataset (s3://, gs://, oci://, hf://, or another local folder); shards are
    # downloaded into `path` on first use, so one copy per node serves every rank of that node.
    remote: str | None = None
    # Held-out validation split: another dataset written the same way (local folder).
    val_path: str | None = None
    # Remote URI of the validation split; `val_path` is then its local cache.
    val_remote: str | None = None
    # "images": `global_batch_size` images per optimizer step (the paper's 256), split over ranks
    # with balanced token counts and packed into micro-batches of at most `token_budget` tokens.
    # "tokens": every rank gets `micro_batches_per_step` micro-batches filled up to `token_budget`
    # tokens; the number of images per step varies and the trainer all-reduces it.
    batch_mode: Literal["images", "tokens"] = "images"
    # Images per optimizer step over all ranks (batch_mode "images" only).
    global_batch_size: int = 256
    # Most tokens in one micro-batch: the activation memory of one forward pass.
    token_budget: int = 8192
    # Micro-batches per rank per optimizer step (batch_mode "tokens" only; another value in "images"
    # mode is refused, as it would be ignored there).
    micro_batches_per_step: int = 1
    # Token limit the dataset was written for: 256 (256x256 pretraining) or 1024 (512x512).
    max_image_tokens: Literal[256, 1024] = field(
        default=256, metadata={"hint": "256 for 256x256 images, 1024 for 512x512"}
    )
    # Images with fewer tokens are skipped and counted, as in the release.
    min_image_tokens: int = 16
    # Pad every micro-batch to exactly `token_budget` tokens (static shapes for torch.compile);
    # the padding is its own final segment, see fitscale/data/batch.py.
    pad_to_budget: bool = False
    # Probability of using the stored horizontally flipped variant (when the sample has one).
    flip_prob: float = field(
        default=0.5, metadata=bound(0, 1, template="{path}={value!r}: must be a probability in [0, 1]")
    )
    # Probability of the centre-crop variant over the resized one (when the sample has one);
    # the paper's mixed resize/crop preprocessing.
    crop_prob: float = field(
        default=0.5, metadata=bound(0, 1, template="{path}={value!r}: must be a probability in [0, 1]")
    )
    # Shuffle the global sample order every epoch (off for evaluation).
    shuffle: bool = True
    # Seed of the sample order and of every flip/crop choice, derived from (seed, epoch, sample).
    seed: int = 0
    # Worker processes (or threads) that read shards and pack micro-batches; 0 reads inline.
    num_workers: int = field(default=2, metadata=bound(0, template="{path}={value!r}: must be 0 or more"))
    # "process" workers sidestep the GIL; "thread" workers start instantly and share one cache.
    worker_method: Literal["process", "thread"] = "process"
    # Work items (whole steps, 256 images or more) each worker keeps ready ahead of the trainer.
    prefetch: int = field(default=2, metadata=bound(1, template="{path}={value!r}: must be at least 1"))
    # Put micro-batches in pinned memory so the host-to-GPU copy can overlap compute.
    pin_memory: bool = False
    # Number of real classes; labels must lie in [0, num_classes) and num_classes is the null class.
    num_classes: int = field(default=1000, metadata=bound(1, template="{path}={value!r}: must be at least 1"))
    # Images the "tokens" packer may look ahead in the sample order to fill a micro-batch exactly.
    packing_lookahead: int = 512
    # Seconds to wait for one shard download from `remote`.
    download_timeout: float = field(
        default=120.0, metadata=bound(0, low_open=True, template="{path}={value!r}: must be positive seconds")
    )
    # Further attempts at a failed shard download (Streaming's backoff doubles from 1 s each time,
    # on top of boto3's own retries): a server restart or a network blip of up to ~30 s is ridden out.
    download_retry: int = field(default=5, metadata=bound(0, template="{path}={value!r}: must be 0 or more"))
    # Most bytes of shards kept in the local cache of a remote dataset (e.g. "200gb"); None keeps all.
    cache_limit: str | None = None
    # Check each shard against the xxh64 recorded in index.json when a reader first maps it (one
    # hash pass per shard and reading process; fitscale/data/integrity.py, docs/benchmarks.md).
    verify_shards: bool = True

    def __post_init__(self) -> None:
        if self.path is None and self.remote is None:
            raise UserError("data.path: set it to a dataset folder (or set data.remote and a cache path)")
        if self.remote is not None and self.path is None:
            raise UserError(
                f"data.path: data.remote={self.remote!r} needs a local cache folder; set data.path to one"
            )
        if self.val_remote is not None and self.val_path is None:
            raise UserError(
                f"data.val_path: data.val_remote={self.val_remote!r} needs a local cache folder; "
                "set data.val_path to one"
            )
        check_choices(self, "data.")
        for name in ("global_batch_size", "token_budget", "micro_batches_per_step", "packing_lookahead"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"data.{name}={value!r}: must be a positive integer")
        if self.batch_mode == "images" and self.micro_batches_per_step != 1:
            raise UserError(
                f"data.micro_batches_per_step={self.micro_batches_per_step} applies to data.batch_mode=tokens only; "
                "with data.batch_mode=images the micro-batches follow from data.global_batch_size and "
                "data.token_budget: remove it, or set data.batch_mode=tokens"
            )
        if not 1 <= self.min_image_tokens <= self.max_image_tokens:
            raise UserError(
                f"data.min_image_tokens={self.min_image_tokens!r}: must lie in [1, max_image_tokens="
                f"{self.max_image_tokens}]"
            )
        if self.token_budget < self.max_image_tokens:
            raise UserError(
                f"data.token_budget={self.token_budget}: must hold the largest image "
                f"(data.max_image_tokens={self.max_image_tokens}); raise the budget"
            )

    def validation(self) -> DataConfig:
        """The config of the held-out split: same packing, no augmentation, a fixed order."""
        if self.val_path is None:
            raise UserError("data.val_path: no validation split is configured; set data.val_path")
        return replace(
            self,
            path=self.val_path,
            remote=self.val_remote,
            val_path=None,
            val_remote=None,
            flip_prob=0.0,
            crop_prob=0.0,
            shuffle=False,
        )
