"""Training loop of the patch CNN: balanced tile sampling, masked multi-label BCE, early stopping,
best checkpoint by validation macro AUROC, resume after a kill (mid-epoch included).

Run-folder layout (``cfg.output_dir``)::

    config.resolved.yaml   the validated config, as run
    splits.json            patient-level split (reused)
    log.csv                one row per epoch
    checkpoints/last.pt    resume state (tensors + numbers only: loads with weights_only=True): weights,
                           optimizer, scheduler, AMP scaler, RNG states of every rank, the epoch's
                           losses so far, the split it was trained on (pipeline/training/resume.py)
    checkpoints/best.safetensors
    patch_metrics.json     per-class AUROC / AUPRC / F1 at thresholds picked on validation

Under ``torchrun`` (see :mod:`pipeline.training.distributed`) each rank trains on its own shard
of the epoch's tile sample with a DDP-wrapped model (``train.batch_size`` is per rank); rank 0
alone validates and writes checkpoints, logs and metrics.

A run resumed from ``last.pt`` (mid-epoch or at an epoch's end) ends bit-identical to the
uninterrupted run on the same machine with the same world size and thread count.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file as st_load_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.patch import PATTERN_CLASSES, PatchClassifier, load_backbone_weights
from models.preprocess import to_tensor_batch
from pipeline.core.errors import ConfigError
from pipeline.core.io import atomic_path, atomic_write_bytes, atomic_write_text
from pipeline.core.runtime import autocast_context, resolve_device, resolve_precision, seed_everything
from pipeline.evaluation.metrics import multilabel_tile_metrics, pick_thresholds
from pipeline.training import distributed
from pipeline.training.augment import build_train_augmentation, seed_transforms
from pipeline.training.config import RunConfig
from pipeline.training.data import SlideTiles, TileDataset, balanced_sample, collate_uint8
from pipeline.training.init_bundle import load_init_weights
from pipeline.training.resume import RESUME_FORMAT, loader_generator, restore_rng_state, rng_state

log = logging.getLogger(__name__)

#: Added (times the rank) to the augmentation and dropout seeds of ranks other than 0.
RANK_SEED_STRIDE = 1_000_003


@dataclass
class PatchTrainResult:
    model: PatchClassifier
    thresholds: dict[str, float]
    metrics: dict[str, Any]


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the targets that count (mask), per class averaged."""
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    m = mask.float()
    per_class = (loss * m).sum(0) / m.sum(0).clamp_min(1.0)
    return per_class[m.sum(0) > 0].mean() if (m.sum(0) > 0).any() else loss.sum() * 0.0


def predict_tiles(
    model: PatchClassifier,
    ds: TileDataset,
    batch_size: int,
    device: torch.device,
    precision: str,
    channels_last: bool,
    num_workers: int = 0,
    desc: str = "predict",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities (M, C), targets (M, C), mask (M, C) over a dataset (no augmentation)."""
    model.eval()
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_uint8,
        persistent_workers=False,
        generator=loader_generator(0),  # leaves the global generator (dropout) untouched
    )
    probs, targets, masks = [], [], []
    norm = model_norm()
    with torch.inference_mode():
        for tiles, t, m in tqdm(loader, desc=desc, leave=False, disable=None):
            x = to_tensor_batch(tiles, *norm, channels_last=channels_last, device=device)
            with autocast_context(device, precision):
                logits = model(x)
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
            targets.append(t.numpy())
            masks.append(m.numpy())
    return np.concatenate(probs), np.concatenate(targets), np.concatenate(masks)


def model_norm() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    from models.preprocess import IMAGENET_MEAN, IMAGENET_STD

    return IMAGENET_MEAN, IMAGENET_STD


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def train_patch_model(
    cfg: RunConfig,
    run_dir: Path,
    train: list[SlideTiles],
    val: list[SlideTiles],
    split_sha256: str | None = None,
) -> PatchTrainResult:
    """Train (or resume) the patch classifier; returns the best model with thresholds and metrics.

    ``split_sha256`` (:func:`pipeline.training.resume.split_sha256` of the split ``train`` and
    ``val`` come from) is written into every checkpoint; resuming a checkpoint of another split
    is an error.
    """
    tcfg = cfg.train
    dctx = distributed.current()
    device = dctx.device if dctx.enabled else resolve_device(tcfg.device)
    precision = tcfg.precision
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    seed_everything(cfg.seed)
    classes = list(cfg.labels.classes)
    n_patterns = sum(c in PATTERN_CLASSES for c in classes)
    model = PatchClassifier(cfg.model.backbone, classes, cfg.model.dropout)
    if cfg.model.init_weights is not None:
        load_backbone_weights(model, cfg.model.init_weights)
    load_init_weights(model, cfg)  # model.init_bundle: fine-tune (before a resume overwrites the weights)
    model.to(device)
    if tcfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    # each rank runs over its shard (ceil(tiles / world) tiles): the same number of steps on every rank
    steps_per_epoch = math.ceil(math.ceil(tcfg.tiles_per_epoch / dctx.world_size) / tcfg.batch_size)
    total_steps = steps_per_epoch * tcfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tcfg.lr, total_steps=total_steps, pct_start=0.15)
    scaler = torch.amp.GradScaler(device.type, enabled=resolve_precision(device, precision) == "fp16")

    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.safetensors"
    start_epoch, start_step, best_score, bad_epochs = 0, 0, -1.0, 0
    resumed_rng: dict[str, Any] | None = None
    resumed_losses: list[float] = []
    if last.is_file():
        state = _load_checkpoint(last)
        _check_split(last, state, split_sha256)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        best_score, bad_epochs = float(state["best_score"]), int(state["bad_epochs"])
        resumed_rng, resumed_losses = _rank_resume_state(state, dctx.rank, dctx.world_size, last)
        log.info(
            "resuming from %s: epoch %d step %d (best macro AUROC %.4f)", last, start_epoch + 1, start_step, best_score
        )
    if dctx.enabled:
        points = distributed.all_gather_object((start_epoch, start_step))
        if len(set(points)) > 1:
            raise ConfigError(
                f"{last}: the ranks resume from different points {points}; the run folder must be on "
                "storage shared by every node"
            )
        if dctx.rank:
            torch.manual_seed(cfg.seed + RANK_SEED_STRIDE * dctx.rank)  # own dropout and data-loader seeds per rank
    ddp_model = distributed.wrap_model(model)
    show_bars = None if dctx.is_main else True
    tiles_per_rank: list[int] = []

    epi_col = classes.index("epidermis") if "epidermis" in classes else None
    hard: dict[str, Any] = {"epidermis_col": epi_col, "epidermal_negative_fraction": tcfg.epidermal_negative_fraction}
    val_items = balanced_sample(
        val, min(tcfg.max_val_tiles, sum(len(s.coords) for s in val)), n_patterns, seed=cfg.seed + 999, **hard
    )
    val_ds = TileDataset(val, val_items, cfg.tiling.tile_px)
    augment = build_train_augmentation(cfg.augment)
    log_path = run_dir / "log.csv"
    fields = [
        "epoch",
        "train_loss",
        "val_loss",
        *[f"val_auroc_{c}" for c in classes],
        "val_macro_auroc",
        "lr",
        "seconds",
    ]

    for epoch in range(start_epoch, tcfg.epochs):
        if bad_epochs >= tcfg.patience:
            log.info("early stopping: %d epochs without improvement", bad_epochs)
            break
        t0 = time.perf_counter()
        items = balanced_sample(train, tcfg.tiles_per_epoch, n_patterns, seed=cfg.seed * 1000 + epoch, **hard)
        items = distributed.shard(items, dctx.rank, dctx.world_size)  # disjoint positions per rank
        skip = start_step * tcfg.batch_size if epoch == start_epoch else 0
        epoch_seed = cfg.seed * 1000 + epoch + RANK_SEED_STRIDE * dctx.rank
        seed_transforms(augment, epoch_seed)
        ds = TileDataset(
            train, items[skip:], cfg.tiling.tile_px, transform=augment, seed=epoch_seed, first_position=skip
        )
        loader = DataLoader(
            ds,
            batch_size=tcfg.batch_size,
            shuffle=False,
            num_workers=tcfg.num_workers,
            collate_fn=collate_uint8,
            drop_last=False,
            worker_init_fn=_seed_worker,
            generator=loader_generator(epoch_seed),
        )
        ddp_model.train()
        losses: list[float] = []
        step = start_step if epoch == start_epoch else 0
        if epoch == start_epoch and resumed_rng is not None:
            restore_rng_state(resumed_rng)  # the generators continue where the checkpoint left them
            losses = list(resumed_losses)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{tcfg.epochs}", leave=False, disable=show_bars)
        for tiles, targets, mask in bar:
            x = to_tensor_batch(tiles, *model_norm(), channels_last=tcfg.channels_last, device=device)
            targets, mask = targets.to(device), mask.to(device)
            with autocast_context(device, precision):
                logits = ddp_model(x)
            loss = masked_bce(logits, targets, mask)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if sched.last_epoch < total_steps - 1:
                sched.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if step % tcfg.checkpoint_every == 0:
                ranks = distributed.all_gather_object({"rng": rng_state(), "losses": list(losses)})
                if dctx.is_main:
                    _save_checkpoint(
                        last,
                        _state(model, opt, sched, scaler, epoch, step, best_score, bad_epochs, ranks, split_sha256),
                    )
        train_loss = float(np.mean(losses)) if losses else float("nan")
        if dctx.enabled:
            total, count = distributed.all_reduce_sum([float(np.sum(losses)), float(len(losses))])
            train_loss = total / count if count else float("nan")
            gathered = distributed.all_gather_object((len(ds), rng_state()))
            tiles_per_rank = [int(n) for n, _ in gathered]
            epoch_end_rng = [r for _, r in gathered]
            if not dctx.is_main:  # rank 0 validates and decides; the others wait for its decision
                ds.close()
                best_score, bad_epochs = distributed.broadcast_object(None)
                continue
            log.info(
                "epoch %d: %d ranks trained on %s tiles",
                epoch + 1,
                dctx.world_size,
                " + ".join(map(str, tiles_per_rank)),
            )
        # validation (rank 0)
        probs, vt, vm = predict_tiles(model, val_ds, tcfg.batch_size, device, precision, tcfg.channels_last)
        with torch.no_grad():
            val_loss = float(
                masked_bce(
                    torch.logit(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6)),
                    torch.from_numpy(vt),
                    torch.from_numpy(vm),
                )
            )
        m = multilabel_tile_metrics(probs, vt, vm, classes)
        aurocs = [m["per_class"][c]["auroc"] for c in classes if c in PATTERN_CLASSES]
        aurocs = [a for a in aurocs if a is not None]
        macro = float(np.mean(aurocs)) if aurocs else 0.0
        improved = macro > best_score + 1e-4
        if improved:
            best_score, bad_epochs = macro, 0
            with atomic_path(best_path) as tmp:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        else:
            bad_epochs += 1
        row = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 5),
            "val_loss": round(val_loss, 5),
            "val_macro_auroc": round(macro, 5),
            "lr": opt.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        for c in classes:
            a = m["per_class"][c]["auroc"]
            row[f"val_auroc_{c}"] = round(a, 5) if a is not None else ""
        _append_csv(log_path, fields, row)
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, val macro AUROC %.4f%s (%.0f s)",
            epoch + 1,
            row["train_loss"],
            val_loss,
            macro,
            " (best)" if improved else "",
            row["seconds"],
        )
        ranks = (
            [{"rng": r, "losses": []} for r in epoch_end_rng] if dctx.enabled else [{"rng": rng_state(), "losses": []}]
        )
        _save_checkpoint(
            last, _state(model, opt, sched, scaler, epoch + 1, 0, best_score, bad_epochs, ranks, split_sha256)
        )
        ds.close()
        if dctx.enabled:
            distributed.broadcast_object((best_score, bad_epochs))

    if not dctx.is_main:  # rank 0 alone picks thresholds and reports
        val_ds.close()
        model.eval()
        return PatchTrainResult(model=model.cpu().to(memory_format=torch.contiguous_format), thresholds={}, metrics={})
    # best weights → thresholds on validation → metrics
    if best_path.is_file():
        model.load_state_dict(st_load_file(str(best_path), device=str(device)))
    probs, vt, vm = predict_tiles(
        model, val_ds, tcfg.batch_size, device, precision, tcfg.channels_last, desc="validation"
    )
    thresholds = pick_thresholds(
        probs, vt, vm, classes, rule=tcfg.threshold_rule, specificity=tcfg.threshold_specificity
    )
    metrics = multilabel_tile_metrics(probs, vt, vm, classes, thresholds=thresholds)
    val_ds.close()
    model.eval()
    summary: dict[str, Any] = {"validation": metrics, "best_val_macro_auroc": best_score}
    if dctx.enabled:
        summary["distributed"] = {
            **dctx.describe(),
            "tiles_per_rank_last_epoch": tiles_per_rank,
            "batch_size_per_rank": tcfg.batch_size,
        }
    return PatchTrainResult(
        model=model.cpu().to(memory_format=torch.contiguous_format), thresholds=thresholds, metrics=summary
    )


def _seed_worker(worker_id: int) -> None:
    """Give each data-loader worker its own augmentation stream (derived from torch's per-worker seed)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, TileDataset) and info.dataset.transform is not None:
        seed_transforms(info.dataset.transform, torch.initial_seed() % 2**32)


def _state(
    model,
    opt,
    sched,
    scaler,
    epoch: int,
    step: int,
    best: float,
    bad: int,
    ranks: list[dict[str, Any]],
    split_sha256: str | None,
) -> dict[str, Any]:
    """Everything a resumed run needs (``ranks``: each rank's RNG state and the epoch's losses so far)."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "epoch": epoch,
        "step": step,
        "best_score": best,
        "bad_epochs": bad,
        "resume_format": RESUME_FORMAT,
        "ranks": ranks,
        "split_sha256": split_sha256 or "",
    }


def _check_split(path: Path, state: dict[str, Any], split_sha256: str | None) -> None:
    """A checkpoint trained on another split must not be resumed (validation slides would leak)."""
    saved = state.get("split_sha256") or None
    if saved and split_sha256 and saved != split_sha256:
        raise ConfigError(
            f"{path}: checkpoint was trained on another split than the current splits.json (slides or "
            "split changed); delete the checkpoints/ folder to retrain, or use a new output_dir"
        )


def _rank_resume_state(
    state: dict[str, Any], rank: int, world: int, path: Path
) -> tuple[dict[str, Any] | None, list[float]]:
    """This rank's saved RNG state and losses, or (None, []) with a warning when the checkpoint lacks them."""
    ranks = state.get("ranks") or []
    if len(ranks) != world:
        why = "predates resume state" if not ranks else f"was written by {len(ranks)} rank(s), this run has {world}"
        log.warning("%s %s: the resumed run continues but is not bit-identical to an uninterrupted one", path, why)
        return None, []
    mine = ranks[rank]
    return mine["rng"], [float(v) for v in mine["losses"]]


def _append_csv(path: Path, fields: list[str], row: dict[str, Any]) -> None:
    """Append a row, rewriting the file atomically (small logs: one row per epoch)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) < int(row["epoch"])]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in [*rows, row]:
        w.writerow({k: r.get(k, "") for k in fields})
    atomic_write_text(path, buf.getvalue())
