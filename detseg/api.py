"""The Python API; the CLI is a thin shell around these four functions.

>>> import detseg.api as ds
>>> metrics = ds.train("cls/convnet", epochs=3, seed=7, out="runs/convnet")
>>> model, checkpoint = ds.load("runs/convnet/best.pt")
>>> ds.predict("runs/convnet/best.pt", ["photo.png"], out="preds")
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from . import __version__, registry
from .config import parse_overrides, resolve
from .engine.checkpoint import checked_payload, load_checkpoint, load_matching
from .engine.run import finish, fit
from .engine.trainer import Trainer
from .errors import ConfigError, error_reason
from .io import check_writable, load_yaml, remove_stale_temporaries, save_yaml, write_json


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda: no CUDA GPU is available on this machine")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _use_machine_threads(local_world: int, threads: int = 0) -> None:
    # Processes sharing a machine split its cores; oversubscription makes every process slower (on a busy machine
    # several-times slower: OpenMP threads wait for each other at every parallel region), hence the explicit knob.
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))


def _default_run_dir(model_name: str) -> Path:
    return Path("runs") / f"{model_name.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(model_name: str, *, data: str | None = None, val: str | None = None, epochs: int | None = None,
          time_budget: float | None = None, out: str | Path | None = None, seed: int | None = None,
          resume: bool = False, overrides: Mapping[str, Any] | Iterable[str] | None = None,
          progress: bool = True, verbose: bool = True, init: str | Path | None = None) -> dict[str, float]:
    """Train ``model_name`` and write a run directory; returns the final metrics (also in metrics.json).

    ``init``: a checkpoint (or run directory) to fine-tune from - every tensor whose name and shape match is loaded
    into the freshly built model, the others (e.g. the class layers) keep their initialisation
    (:func:`detseg.engine.checkpoint.load_matching`); a report is printed.
    """
    started = time.perf_counter()
    entry = registry.get(model_name)
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    overrides = dict(overrides or {})
    for key, value in (("epochs", epochs), ("time_budget", time_budget), ("seed", seed)):
        if value is not None:
            overrides[key] = value
    run_dir = Path(out) if out is not None else None
    base: dict[str, Any] | None = None     # a resumed run's saved config
    init_payload = None
    if init is not None:   # read now: a wrong path fails before any data is generated
        if resume:
            raise ConfigError("--init: a resumed run continues from its own last.pt; drop --init or --resume")
        init_payload = checked_payload(init, load_checkpoint(init, map_location="cpu"))
    if resume:
        if run_dir is None:
            raise ConfigError("--resume needs --out RUN_DIR, the directory of the run to continue")
        if not (run_dir / "last.pt").is_file():
            raise ConfigError(f"{run_dir}: nothing to resume (no last.pt)")
        saved = load_yaml(run_dir / "config.yaml")
        if saved.get("model") != model_name:
            raise ConfigError(f"{run_dir}: holds a run of {saved.get('model')}, not {model_name}")
        base = saved.get("config", {})
        data = data if data is not None else saved.get("data")
        val = val if val is not None else saved.get("val")
    config = resolve(entry.all_options(), overrides, base)
    run_dir = run_dir or _default_run_dir(model_name)

    rank, world, local_rank = _distributed()
    device = _device(config["device"], local_rank)
    resumed_state = _read_resume_state(run_dir, model_name, device) if resume else None
    if rank == 0:   # a read-only or full run directory fails here, not after the first epoch
        check_writable(run_dir)
        remove_stale_temporaries(run_dir)   # what a kill mid-write left: never taken for a result
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _use_machine_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)), config["threads"])
    task = entry.make_task(config)
    placeholder = task.placeholder_info(data)
    if placeholder is not None:
        check_buildable(entry, config, placeholder)  # fail fast on a bad knob combination or an absurd size
    seed_everything(config["seed"])
    bundle = task.make_data(data, val)

    def build_model() -> torch.nn.Module:
        return entry.build(config, bundle.info)

    seed_everything(config["seed"])  # the same initial weights whatever the data generation consumed
    model = build_model()
    if init_payload is not None:
        init_report = load_matching(model, init_payload["model"],
                                    origin=f"{init} ({init_payload.get('model_name', 'unknown model')})")
        if verbose and rank == 0:
            print(init_report.summary(), flush=True)
    trainer = Trainer(model, task, bundle, config, device=device, rank=rank, world=world, progress=progress)
    trainer.set_checkpoint_extras(model_name=model_name, config=config, info=bundle.info, version=__version__,
                                  data={"data": _as_path_text(data), "val": _as_path_text(val)})
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(run_dir / "config.yaml", {"model": model_name, "data": data, "val": val,
                                              "init": None if init is None else str(init), "config": config})
    if resume:
        try:
            trainer.load_state_dict(resumed_state)
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            raise ConfigError(f"{run_dir / 'last.pt'}: does not fit this run's model and config "
                              f"({error_reason(error, 120)}); resume with the run's own knobs") from None
        trainer.config.update({key: config[key] for key in ("epochs", "time_budget")})
        if verbose and rank == 0:
            print(f"resuming {run_dir} at epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}", flush=True)
    elif verbose and rank == 0:
        print(f"training {model_name} ({_count_params(model):,} parameters) on {len(bundle.train)} examples, "
              f"validating on {len(bundle.val)}; run directory {run_dir}", flush=True)
    if verbose and rank == 0:
        def first_step() -> None:   # how long a user waited for training to start: data opened, model built
            print(f"first training step done {time.perf_counter() - started:.1f} s after train() started",
                  flush=True)
        trainer.on_first_step = first_step
    try:
        fit(trainer, run_dir, verbose=verbose)
        metrics = finish(trainer, run_dir, build_model, _count_params(model), verbose=verbose) if rank == 0 else {}
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        _report_skipped(bundle)
    return metrics


def _read_resume_state(run_dir: Path, model_name: str, device: torch.device) -> dict:
    """RUN_DIR/last.pt, checked before any data is made: readable, of ``model_name``, holding a trainer state."""
    path = run_dir / "last.pt"
    payload = checked_payload(path, load_checkpoint(path, map_location=device))   # model_name, weights checked
    if payload["model_name"] != model_name:
        raise ConfigError(f"{path}: a checkpoint of {payload['model_name']}, not of {model_name}; it cannot resume "
                          f"this run")
    if not isinstance(payload.get("trainer"), dict) or "optimizer" not in payload:
        raise ConfigError(f"{path}: holds no training state to resume from (a converted or exported checkpoint?)")
    return payload


# Weights, gradients and two Adam moments in float32: 16 bytes a parameter, 16 GB at this size. Beyond it a knob
# was surely mistyped (width=10000), and the allocation would take the machine down rather than fail.
MAX_PARAMETERS = 1_000_000_000


def check_buildable(entry: registry.ModelEntry, config: Mapping[str, Any], info: Mapping[str, Any]) -> int:
    """Build the model on the meta device (shapes only, no memory): a builder's ConfigError about a combination of
    knobs surfaces in milliseconds, and a model too large to allocate is refused; returns its parameter count
    (-1 where the builder needs real tensors)."""
    try:
        with torch.device("meta"):
            model = entry.build(dict(config), dict(info))
    except NotImplementedError:
        # a builder that reads values off a tensor (e.g. class weights from the data's pixel shares) cannot run on
        # shapes alone: the real build checks the knobs, the size stays unchecked
        return -1
    count = _count_params(model)
    if count > MAX_PARAMETERS:
        sizes = ", ".join(f"{key}={config[key]}" for key in sorted(config)
                          if key.endswith(("width", "hidden", "channels", "size", "grid", "depth"))
                          and key not in ("batch_size", "train_size", "val_size", "image_size"))
        raise ConfigError(f"{entry.name}: these knobs make a model of {count:,} parameters, more than "
                          f"{MAX_PARAMETERS:,} can train here ({sizes})")
    return count


def _as_path_text(path) -> str | None:
    """A data argument as checkpoints keep it: an absolute path for files, the name for built-in data."""
    if path is None or str(path) == "scenes" or not Path(path).exists():
        return None if path is None else str(path)
    return str(Path(path).resolve())


def _report_skipped(bundle) -> None:
    """The count promised by ``skip_bad_images``: image files that failed to decode and were left out."""
    skipped = {split: getattr(data, "skipped", 0) for split, data in (("train", bundle.train), ("val", bundle.val))}
    if any(skipped.values()):
        names = [name for data in (bundle.train, bundle.val) if hasattr(data, "skipped_files")
                 for name in data.skipped_files()]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        print(f"skipped {sum(skipped.values())} images that could not be decoded (train {skipped['train']}, val "
              f"{skipped['val']}): {shown}; skip_bad_images=false stops on the first instead",
              file=sys.stderr, flush=True)


def load(checkpoint: str | Path, device: str = "cpu",
         overrides: Mapping[str, Any] | Iterable[str] | None = None, fuse: bool = False):
    """Rebuild the model of a checkpoint; returns (model in eval mode, the checkpoint dict).

    ``overrides`` change test-time knobs of the saved config (``rpn_post_nms_test=10``, ``score_thresh=0.3``); the
    returned payload's ``config`` holds them. A knob that changes the weights' shapes is a ConfigError naming it.
    ``fuse=True`` returns an inference-only copy with batch norms folded into the convolutions and channels-last
    maps (:func:`detseg.models.inference.fuse_for_inference`): the same outputs up to float rounding, faster.
    """
    payload = checked_payload(checkpoint, load_checkpoint(checkpoint, map_location=device))
    entry = registry.get(payload["model_name"])
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    if overrides:
        payload = {**payload, "config": resolve(entry.all_options(), overrides, payload["config"])}
    try:
        check_buildable(entry, payload["config"], payload["info"])
    except ConfigError as error:     # a knob combination the builder refuses: say which file holds it
        raise ConfigError(f"{checkpoint}: {error}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as error:
        # the info a checkpoint carries (class names, input shape, ...) is whatever its file holds
        raise ConfigError(f"{checkpoint}: its config and info do not build a {payload['model_name']} "
                          f"({type(error).__name__}: {error_reason(error, 100)})") from None
    model = entry.build(payload["config"], payload["info"])
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:
        if not overrides:
            raise ConfigError(f"{checkpoint}: its weights do not fit the {payload['model_name']} its config "
                              f"describes ({error_reason(error, 120)})") from None
        raise ConfigError(f"{checkpoint}: {', '.join(f'{k}={v}' for k, v in overrides.items())} changes the "
                          f"model's weights; only test-time knobs can be changed here") from error
    model = model.to(device).eval()
    if fuse:
        from .models.inference import fuse_for_inference
        model = fuse_for_inference(model)
    return model, payload


def evaluate(checkpoint: str | Path, *, data: str | None = None, val: str | None = None,
             out: str | Path | None = None, device: str = "cpu",
             overrides: Mapping[str, Any] | Iterable[str] | None = None) -> dict[str, float]:
    """Metrics of a checkpoint on the validation data of its run (or on ``data`` / ``val`` given here), with
    test-time knobs changed by ``overrides`` (see :func:`load`)."""
    model, payload = load(checkpoint, device, overrides)
    config = dict(payload["config"])
    task = registry.get(payload["model_name"]).make_task(config)
    seed_everything(config["seed"])
    if data is None and val is None:     # the run's own data: its files when it trained on files
        saved = payload.get("data") or {}
        data, val = saved.get("data"), saved.get("val")
    bundle = task.make_data(data, val)
    trainer = Trainer(model, task, bundle, config, device=device, progress=False)
    scorer = task.scorer(bundle)
    metrics = trainer.evaluate(model, scorer)
    metrics["params"] = _count_params(model)
    if out is not None:
        out = Path(out)
        write_json(out / "metrics.json", metrics)
        task.write_outputs(scorer, out)
    return metrics


def predict(checkpoint: str | Path, images: Iterable[str | Path], *, out: str | Path | None = None,
            device: str = "cpu", batch_size: int = 8, workers: int = 1, conf: float | None = None,
            max_det: int | None = None, coco: str | Path | None = None, draw: bool = True,
            progress: bool = False, fuse: bool = False, draw_score: float | None = None) -> list[dict]:
    """Predictions for image files, directories, globs and videos (:mod:`detseg.predict`): one dict per image or
    video frame, in input order. With ``out``: a drawing per image, a drawn video + JSON lines per video,
    predictions.json and, for detectors, coco_results.json (image ids from the ``coco`` json when given).

    ``batch_size`` images share a forward, decoded by ``workers`` DataLoader processes; ``conf`` / ``max_det`` set a
    detector's ``score_thresh`` / ``detections_per_image``; ``device`` is cpu, cuda or auto; ``fuse`` folds batch
    norms and uses channels-last maps (see :func:`load`); ``draw_score``: drawings show the regions scoring at least
    this (default 0.5; detectors, instances, captions)."""
    from .predict import DEVICES, draw_options, predict_paths, test_time_overrides

    if device not in DEVICES:
        raise ConfigError(f"--device {device}: must be one of {', '.join(DEVICES)}")
    if draw_score is not None:      # refused before the model is built (the checkpoint's name read once more)
        draw_options(str(load_checkpoint(checkpoint).get("model_name")), draw_score)
    chosen = _device(device, 0)
    model, payload = load(checkpoint, chosen, test_time_overrides(checkpoint, conf, max_det), fuse=fuse)
    return predict_paths(model, payload, images, out=out, device=chosen, batch_size=batch_size, workers=workers,
                         coco=coco, draw=draw, progress=progress, draw_score=draw_score).results


def convert_torchvision(name: str, state_dict: str | Path, *, out: str | Path, bn_eps: float | None = None) -> Path:
    """A detseg checkpoint from torchvision's ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` /
    ``keypointrcnn_resnet50_fpn`` state dict (either key layout); see :mod:`detseg.convert`."""
    from .convert import convert_torchvision as convert

    return convert(name, state_dict, out, bn_eps)


def export(checkpoint: str | Path, *, format: str = "onnx", out: str | Path | None = None, dynamic: bool = False,
           size: str | int | tuple[int, int] | None = None, check: bool = True) -> dict:
    """Export a checkpoint to an ONNX file (default: beside the checkpoint, ``.onnx``), then run the file in
    onnxruntime against PyTorch on the same inputs; returns the report (names, shapes, ``max_diff`` per output,
    ``within_tolerance``). ``size`` is the input size ("S" or "HxW", default the checkpoint's); ``dynamic`` makes the
    batch (and a fully convolutional segmenter's height and width) dynamic. See :mod:`detseg.export`."""
    from .export import export_onnx, parse_size, require_onnx

    if format != "onnx":
        raise ConfigError(f"--format {format}: the only export format is onnx")
    require_onnx()
    model, payload = load(checkpoint)
    if out is None:
        source = Path(checkpoint)
        out = source / "model.onnx" if source.is_dir() else source.with_suffix(".onnx")
    shape = tuple(size) if isinstance(size, (tuple, list)) else parse_size(size)
    return export_onnx(model, payload, out, dynamic=dynamic, size=shape, check=check)
