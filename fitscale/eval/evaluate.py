"""One ADM evaluation of a sample batch against a reference batch, on every rank of a job.

Every check that can fail runs on every rank before a feature is computed: the reference's stored
statistics, the batches' dtype and sizes, the counts for precision/recall, the Inception weights
and their hash, an existing --save-features file. Then both batches' features are computed in parts
over the ranks (fitscale.eval.features), and rank 0 computes the metrics (fitscale.eval.adm).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fitscale.errors import UserError
from fitscale.eval import adm
from fitscale.eval.batches import NpzBatch, open_batch
from fitscale.eval.features import (
    BATCH_SIZE,
    PART_SIZE,
    check_manifest,
    extract_parts,
    reduce_parts,
    write_features,
)
from fitscale.eval.inception import WEIGHTS_SHA256_PREFIX, InceptionFeatures, check_weights, weights_path
from fitscale.eval.reference import stored_statistics

NOT_COMPARABLE_STATS = "computed from arr_0 (--ref-stats-from-arr0): NOT comparable with published numbers"


@dataclass
class EvalSettings:
    """How features are computed: the Inception weights file and its expected sha256 (prefix; None
    skips the check), the device, and the part and batch sizes (parts: resumable units)."""

    inception_weights: str | None = None
    inception_sha256: str | None = WEIGHTS_SHA256_PREFIX
    device: str = "cpu"
    part_size: int = PART_SIZE
    batch_size: int = BATCH_SIZE
    ref_stats_from_arr0: bool = False
    extra: dict = field(default_factory=dict)  # recorded in the result (e.g. the sampling settings)

    def network(self) -> InceptionFeatures:
        """The Inception feature network (weights checked again: they may have changed on disk)."""
        return InceptionFeatures(self.inception_weights, self.inception_sha256, self.device)


def check_weights_file(settings: EvalSettings) -> str:
    """The weights' sha256 after the checks of fitscale.eval.inception (before any work starts)."""
    return check_weights(weights_path(settings.inception_weights), settings.inception_sha256)


def batch_features(
    batch, work: Path, settings: EvalSettings, sha256: str, rank: int, world_size: int, gather: bool = True
):
    """Compute `batch`'s missing parts into `work` on every rank; rank 0 gets them reduced
    (fitscale.eval.features.Reduced; `gather=False`: statistics only), the others None."""
    manifest = {
        "source": batch.source,
        "count": batch.count,
        "size": list(batch.size),
        "part_size": settings.part_size,
        "batch_size": settings.batch_size,
        "inception_sha256": sha256,
        **({"recipe": batch.recipe} if hasattr(batch, "recipe") else {}),
    }
    check_manifest(work, manifest, rank, world_size)
    extract_parts(batch, settings.network, work, rank, world_size, settings.part_size, settings.batch_size)
    return reduce_parts(work, batch.count, settings.part_size, gather) if rank == 0 else None


def evaluate(
    sample: str | Path,
    reference: str | Path,
    settings: EvalSettings,
    work: str | Path | None = None,
    save_features: str | Path | None = None,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    save_ref_features: str | Path | None = None,
    metrics: bool = True,
) -> dict | None:
    """FID, sFID, IS, precision and recall of the `sample` batch (ADM .npz, image folder or
    `fitscale sample` folder) against the ADM `reference` .npz, as a dict on rank 0 (None elsewhere).

    `work` keeps the feature parts (resume; needed with several ranks, on a filesystem all of them
    see); without it a temporary folder is used and removed. `save_features` writes the sample's
    features (pool, spatial, softmax), `save_ref_features` the reference's; `metrics=False` stops
    there (features only: the metrics can be computed elsewhere from the files). Raises ValueError / FileNotFoundError / FileExistsError
    with one line naming the file and the fix, before anything is computed or written.
    """
    reference = Path(reference)
    ref_batch = NpzBatch(reference)
    stored = stored_statistics(reference)
    if stored is None and not settings.ref_stats_from_arr0:
        raise UserError(
            f"{reference}: no mu/sigma/mu_s/sigma_s (the statistics of the whole reference set, which ADM's FID "
            "uses); use an ADM reference batch or build one with `fitscale eval-ref`, or pass --ref-stats-from-arr0 "
            "to compute them from its arr_0 (the FID is then not comparable with published numbers)"
        )
    batch = open_batch(sample)
    k = max(adm.NHOOD_SIZES)
    for name, source in (("sample", batch), ("reference", ref_batch)):
        if source.count <= k:
            raise UserError(
                f"{source.source}: {source.count} pictures; precision/recall need more than k={k} (ADM's "
                f"nhood_sizes) in the {name} batch and the FID at least 2"
            )
    for flag, path in (("--save-features", save_features), ("--save-ref-features", save_ref_features)):
        if path is not None and Path(path).exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pick another {flag} file or pass --overwrite")
    sha256 = check_weights_file(settings)
    if work is None:
        if world_size > 1:
            raise UserError(
                "several ranks share their features through a folder: pass --work DIR (on a shared filesystem)"
            )
        with tempfile.TemporaryDirectory(prefix="fitscale-eval-") as tmp:
            return evaluate(
                sample,
                reference,
                settings,
                tmp,
                save_features,
                overwrite,
                rank,
                world_size,
                save_ref_features,
                metrics,
            )
    work = Path(work)
    sample_reduced = batch_features(batch, work / "sample", settings, sha256, rank, world_size)
    ref_reduced = batch_features(ref_batch, work / "reference", settings, sha256, rank, world_size)
    if rank != 0:
        return None
    # ADM's read_statistics uses statistics stored in the sample batch too, when it has them.
    sample_stored = stored_statistics(Path(sample)) if str(sample).endswith(".npz") else None
    result = {"images": batch.count, "size": f"{batch.size[0]}x{batch.size[1]}", "sample": batch.source}
    if save_features is not None:
        write_features(work / "sample", batch.count, Path(save_features), settings.part_size)
        result["features"] = str(save_features)
    if save_ref_features is not None:
        write_features(work / "reference", ref_batch.count, Path(save_ref_features), settings.part_size)
        result["reference_features"] = str(save_ref_features)
    if not metrics:
        return result
    if stored is None:
        ref_pool, ref_spatial = ref_reduced.pool_stats, ref_reduced.spatial_stats
    else:
        ref_pool, ref_spatial = stored
    precision, recall = adm.precision_recall(ref_reduced.pool, sample_reduced.pool)
    sample_pool, sample_spatial = sample_stored or (sample_reduced.pool_stats, sample_reduced.spatial_stats)
    result = {
        **result,
        "fid": adm.frechet_distance(sample_pool, ref_pool),
        "sfid": adm.frechet_distance(sample_spatial, ref_spatial),
        "inception_score": adm.inception_score(sample_reduced.softmax),
        "precision": precision,
        "recall": recall,
        "is_splits": -(-batch.count // adm.IS_SPLIT_SIZE),
        "reference": str(reference),
        "reference_images": ref_batch.count,
        "reference_statistics": "stored (whole set)" if stored is not None else NOT_COMPARABLE_STATS,
        "sample_statistics": "stored in the sample batch (used, as ADM does)"
        if sample_stored
        else "computed",
        "inception_sha256": sha256,
        "comparable": stored is not None and sha256.startswith(WEIGHTS_SHA256_PREFIX),
        **settings.extra,
    }
    return result
