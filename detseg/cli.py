"""The ``detseg`` command: parses arguments, calls :mod:`detseg.api`, prints.

Bad input (a missing file, an unknown model, a malformed annotation, a bad override) prints one line on stderr and
exits with status 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import json
import re
import sys
import traceback

import click

from .errors import DetsegError, one_line

_DEBUG = {"on": False}


class _OneLineUsageError(click.ClickException):
    """A command-line mistake (unknown option, bad value, missing argument) as one line, like every other user
    error, instead of click's usage block; exit status 2 as click gives it."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {one_line(self.format_message())}", err=True)


def _usage_error_line(error: click.UsageError) -> _OneLineUsageError:
    where = error.ctx.command_path if error.ctx is not None else "detseg"
    return _OneLineUsageError(f"{error.format_message()} (see: {where} --help)")


class _Group(click.Group):
    """Turns user errors raised anywhere below into one line and exit status 2."""

    def make_context(self, *args, **kwargs) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as err:
            raise _usage_error_line(err) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            raise _usage_error_line(err) from None
        except DetsegError as err:
            if _DEBUG["on"]:
                traceback.print_exc()
            click.echo(f"error: {one_line(str(err))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as err:  # a bug of ours: say so plainly, keep the traceback for --debug
            if _DEBUG["on"]:
                raise
            click.echo(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
                       err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="detseg")
def main(debug: bool) -> None:
    """detseg: every method of CS231n Lecture 11, trainable and measurable."""
    _DEBUG["on"] = debug


@main.command("models")
def models_command() -> None:
    """List every model: name, task, description."""
    from . import registry

    for name in registry.names():
        entry = registry.get(name)
        click.echo(f"{name:<24} {entry.task.name:<16} {entry.description}")


@main.group("data")
def data_group() -> None:
    """Make data sets."""


class _SceneSize(click.ParamType):
    """``128`` (a square side) or ``WxH`` (``640x480``: width x height), each side 32..2048 px."""

    name = "PX|WxH"

    def convert(self, value, param, ctx) -> int | tuple[int, int]:
        if isinstance(value, int):
            sides = [value]
        else:
            match = re.fullmatch(r"\s*([0-9]+)(?:[xX]([0-9]+))?\s*", str(value))
            sides = [int(side) for side in match.groups() if side is not None] if match else []
        if not sides or not all(32 <= side <= 2048 for side in sides):
            self.fail(f"{value!r}: expected a side like 128 or WIDTHxHEIGHT like 640x480, each side 32..2048",
                      param, ctx)
        return sides[0] if len(sides) == 1 else (sides[0], sides[1])


@data_group.command("scenes")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--train", "n_train", default=1000, show_default=True, type=click.IntRange(min=0))
@click.option("--val", "n_val", default=200, show_default=True, type=click.IntRange(min=0))
@click.option("--size", default=128, show_default=True, type=_SceneSize(),
              help="Image side (square) or WIDTHxHEIGHT, e.g. 640x480.")
@click.option("--seed", default=0, show_default=True, type=int)
def data_scenes(out: str, n_train: int, n_val: int, size: int | tuple[int, int], seed: int) -> None:
    """Write the built-in scenes data set as COCO json + PNG images + PNG semantic maps."""
    from .data.export import write_scenes

    summary = write_scenes(out, train=n_train, val=n_val, size=size, seed=seed, progress=True)
    click.echo(json.dumps(summary, indent=2, default=str))


@data_group.command("convert-vg")
@click.argument("regions_json", type=click.Path())
@click.argument("images_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for train.json / val.json.")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Share of the images kept for validation (every n-th image).")
def data_convert_vg(regions_json: str, images_dir: str, out: str, val_fraction: float) -> None:
    """Visual Genome region descriptions (REGIONS.json + IMAGES_DIR/<id>.jpg) as COCO json with a caption per
    region, for cap/densecap."""
    from .data.visual_genome import convert_visual_genome

    click.echo(json.dumps(convert_visual_genome(regions_json, images_dir, out, val_fraction), indent=2))


@data_group.command("check")
@click.argument("path", type=click.Path())
@click.option("--images", default=None, type=click.Path(file_okay=False), help="Image root, if not beside.")
@click.option("--split", default="train", show_default=True, help="VOC: the ImageSets/Main split.")
@click.option("--no-decode", is_flag=True, help="Validate the annotations only, do not open every image.")
@click.option("--lenient", is_flag=True, help="Drop degenerate polygons (< 3 points) and keep their boxes, as "
                                              "strict=false does in a run, instead of failing.")
def data_check(path: str, images: str | None, split: str, no_decode: bool, lenient: bool) -> None:
    """Validate a COCO json or a VOC directory and print a summary (exit 2 on the first problem)."""
    from .data.sources import open_source, summarize

    source = open_source(path, images, split, strict=not lenient)
    click.echo(json.dumps(summarize(source, decode=not no_decode), indent=2))


@main.command("train", context_settings={"ignore_unknown_options": False})
@click.argument("model")
@click.argument("overrides", nargs=-1)
@click.option("--data", default=None, help="scenes (default), a data set name, or a COCO TRAIN.json.")
@click.option("--val", default=None, help="COCO VAL.json for validation.")
@click.option("--epochs", default=None, type=int, help="Passes over the training data.")
@click.option("--time-budget", default=None, type=float, help="Stop after this many training seconds.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Run directory (default runs/...).")
@click.option("--seed", default=None, type=int)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--init", default=None, type=click.Path(),
              help="Fine-tune: start from the weights of this checkpoint or run directory (tensors whose name and "
                   "shape match; the others, e.g. the class layers, start fresh).")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def train_command(model, overrides, data, val, epochs, time_budget, out, seed, resume, init, quiet) -> None:
    """Train MODEL; extra KEY=VALUE arguments override its config (`detseg config MODEL` lists them)."""
    from . import api

    metrics = api.train(model, data=data, val=val, epochs=epochs, time_budget=time_budget, out=out, seed=seed,
                        resume=resume, overrides=list(overrides), progress=not quiet, verbose=not quiet,
                        init=init)
    if metrics:
        click.echo(json.dumps(metrics, indent=2))


@main.command("config")
@click.argument("model")
def config_command(model: str) -> None:
    """Every config key of MODEL with its default and meaning."""
    from . import registry
    from .config import describe_options

    click.echo(describe_options(registry.get(model).all_options()))


@main.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", default=None)
@click.option("--val", default=None)
@click.option("--out", default=None, type=click.Path(file_okay=False))
@click.argument("overrides", nargs=-1)
def eval_command(checkpoint, data, val, out, overrides) -> None:
    """Evaluate CHECKPOINT (a .pt file or a run directory) on its validation data.

    OVERRIDES are test-time knobs as key=value (e.g. rpn_post_nms_test=10 score_thresh=0.3)."""
    from . import api

    click.echo(json.dumps(api.evaluate(checkpoint, data=data, val=val, out=out, overrides=list(overrides)),
                          indent=2))


@main.command("predict")
@click.argument("checkpoint", type=click.Path())
@click.argument("paths", nargs=-1, required=True)
@click.option("--out", default="predictions", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "auto"]))
@click.option("--batch-size", default=8, show_default=True, type=int, help="Images per forward pass.")
@click.option("--workers", default=1, show_default=True, type=int,
              help="Decoding processes beside the model's (0: decode in the model's process).")
@click.option("--conf", default=None, type=float, help="Detectors: drop detections scoring below this "
                                                        "(sets score_thresh).")
@click.option("--max-det", default=None, type=int, help="Detectors: keep at most this many per image "
                                                         "(sets detections_per_image).")
@click.option("--coco", default=None, type=click.Path(dir_okay=False),
              help="Detectors: a COCO json whose image ids (matched by file_name) coco_results.json uses.")
@click.option("--no-draw", is_flag=True, help="Write no drawings (PNGs, output videos): JSON only.")
@click.option("--draw-score", default=None, type=float, help="Drawings show the regions scoring at least this "
                                                               "(default 0.5; detectors, instances, captions).")
@click.option("--quiet", is_flag=True, help="No progress bar, no JSON line per prediction on stdout.")
@click.option("--fuse", is_flag=True, help="Fold batch norms into the convolutions and keep maps channels-last: "
                                           "faster, equal up to float rounding.")
def predict_command(checkpoint, paths, out, device, batch_size, workers, conf, max_det, coco, no_draw,
                    draw_score, quiet, fuse) -> None:
    """Predict on PATHS - image files, directories (not recursive), quoted globs ('**' recurses), videos - and
    write predictions.json, drawings, per video a drawn .mp4 and a .jsonl, for detectors coco_results.json."""
    from . import api

    results = api.predict(checkpoint, paths, out=out, device=device, batch_size=batch_size, workers=workers,
                          conf=conf, max_det=max_det, coco=coco, draw=not no_draw, progress=not quiet,
                          fuse=fuse, draw_score=draw_score)
    if not quiet:
        for result in results:
            shown = {key: value for key, value in result.items() if key != "probabilities"}
            click.echo(json.dumps(shown))
    click.echo(f"{len(results)} predictions: predictions.json{'' if no_draw else ' and drawings'} in {out}",
               err=True)


@main.command("bench")
@click.argument("study")
@click.option("--out", default=None, type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="Smaller settings for a fast look.")
@click.option("--only", default=None, help="Comma-separated parts of the study to run (detectors: row names or "
                                           "'sweeps'; hyperquest: epoch, load, scaling, faults); the other rows of "
                                           "an earlier results.json are kept.")
@click.option("--players", default=None, type=click.IntRange(1, 2000), help="hyperquest: simulated players.")
@click.option("--minutes", default=None, type=click.FloatRange(0.1, 600), help="hyperquest: minutes of play.")
@click.option("--web-processes", default=None, type=click.IntRange(1, 32), help="hyperquest: web processes "
              "(PostgreSQL; default 2).")
@click.option("--worker-processes", default=None, type=click.IntRange(1, 64), help="hyperquest: worker processes "
              "(default 2).")
@click.option("--db", "db_url", default=None, help="hyperquest: a PostgreSQL database to run in (the bench works "
                                                    "in a scratch schema it drops after); default: SQLite.")
def bench_command(study, out, quick, only, players, minutes, web_processes, worker_processes, db_url) -> None:
    """Run a benchmark STUDY and write report.md, plots and results.json."""
    from .bench import run_study

    options = {"players": players, "minutes": minutes, "web_processes": web_processes,
               "worker_processes": worker_processes, "db": db_url}
    run_study(study, out=out, quick=quick, only=only,
              **{name: value for name, value in options.items() if value is not None})


class _ServeByDefault(click.Group):
    """``detseg hyperquest [OPTIONS]`` is ``detseg hyperquest serve [OPTIONS]``: the command alone still runs the
    server, as it did before the queue could live elsewhere."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
            args = ["serve", *args]
        return super().parse_args(ctx, args)


@main.group("hyperquest", cls=_ServeByDefault)
def hyperquest_group() -> None:
    """HyperQuest, the hyperparameter game: the web server (serve, the default) and its training workers (worker).
    Needs the extra: pip install 'detseg[hyperquest]'."""


_ARTIFACTS_HELP = ("Data sets and checkpoints: a directory every web process and worker reaches (a shared "
                   "filesystem across machines). Default: --data-dir.")


@hyperquest_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--db", "db_url", default=None,
              help="Database URL (default: sqlite in --data-dir; postgresql://... puts the queue in PostgreSQL).")
@click.option("--data-dir", default="hyperquest", show_default=True, type=click.Path(file_okay=False),
              help="The cookie secret and admin token (and the SQLite database).")
@click.option("--artifacts", default=None, type=click.Path(file_okay=False), help=_ARTIFACTS_HELP)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="This server's own training processes.")
@click.option("--no-local-workers", is_flag=True,
              help="Train nothing here: `detseg hyperquest worker` processes do (PostgreSQL only). Several such "
                   "web processes may serve one --host/--port.")
@click.option("--epoch-limit", default=20, show_default=True, type=click.IntRange(1, 200))
@click.option("--dataset-pool", default=20, show_default=True, type=click.IntRange(1, 100000),
              help="How many different data sets trials draw from.")
@click.option("--admin-token", default=None, envvar="DETSEG_HYPERQUEST_ADMIN_TOKEN",
              help="Token for /admin/export, sent as 'Authorization: Bearer TOKEN' (default: the one in "
                   "DATA_DIR/admin.token, made on first start; never printed).")
@click.option("--roster", default=None, type=click.Path(dir_okay=False),
              help="CSV of player id, name (header row allowed): only these players may log in.")
def hyperquest_serve_command(host, port, db_url, data_dir, artifacts, workers, no_local_workers, epoch_limit,
                             dataset_pool, admin_token, roster) -> None:
    """Run the HyperQuest web server."""
    from .hyperquest import Settings, require_web_extra
    from .hyperquest.db import is_postgresql

    require_web_extra()
    from .hyperquest.app import serve

    if no_local_workers and not is_postgresql(db_url or ""):
        raise click.UsageError("--no-local-workers needs --db postgresql://...: with SQLite the queue lives in this "
                               "server, so nothing else could train its epochs")
    settings = Settings.create(db_url, data_dir, workers=workers, epoch_limit=epoch_limit, artifacts=artifacts,
                               dataset_pool=dataset_pool, admin_token=admin_token or "", roster=roster,
                               local_workers=not no_local_workers)
    serve(settings, host=host, port=port)


@hyperquest_group.command("worker")
@click.option("--db", "db_url", required=True, help="The game's PostgreSQL database (postgresql://...).")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes, each training one epoch at a time on one thread.")
@click.option("--artifacts", default="hyperquest", show_default=True, type=click.Path(file_okay=False),
              help="The web servers' artifact store (their --artifacts, or --data-dir), as this machine reaches it.")
def hyperquest_worker_command(db_url, processes, artifacts) -> None:
    """Train HyperQuest's epochs, baselines and data sets from the PostgreSQL queue, until SIGTERM / Ctrl+C."""
    from .hyperquest import require_web_extra
    from .hyperquest.db import check_connection, is_postgresql

    require_web_extra("procrastinate")
    if not is_postgresql(db_url):
        raise click.UsageError(f"--db {db_url}: workers share a PostgreSQL queue; an SQLite server trains with its "
                               "own --workers")
    check_connection(db_url)
    from .hyperquest.workers import run_supervisor

    run_supervisor(db_url, artifacts, processes)


@main.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("--format", "fmt", default="onnx", show_default=True, type=click.Choice(["onnx"]))
@click.option("--dynamic", is_flag=True, help="Dynamic batch (and height/width for fully convolutional segmenters).")
@click.option("--size", default=None, help="Input size, S or HxW pixels (default: the checkpoint's).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="ONNX file (default: CHECKPOINT.onnx).")
def export_command(checkpoint, fmt, dynamic, size, out) -> None:
    """Export CHECKPOINT to ONNX, preprocessing included, and check the file in onnxruntime against PyTorch."""
    from . import api

    report = api.export(checkpoint, format=fmt, out=out, dynamic=dynamic, size=size)
    click.echo(json.dumps(report, indent=2))
    differences = ", ".join(f"{name} {value:.2g}" for name, value in report["max_diff"].items())
    click.echo(f"wrote {report['file']}; onnxruntime vs PyTorch, max |difference|: {differences}", err=True)
    if not report["within_tolerance"]:
        click.echo(f"error: {report['file']} does not match PyTorch within 1e-4 (boxes 1e-3 px); "
                   f"{report['mismatches']} mismatched labels or detections", err=True)
        sys.exit(1)


@main.group("convert")
def convert_group() -> None:
    """Checkpoints of other libraries as detseg checkpoints."""


@convert_group.command("torchvision")
@click.argument("name", type=click.Choice(["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn",
                                           "keypointrcnn_resnet50_fpn"]))
@click.argument("state_dict", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="detseg checkpoint to write (.pt).")
@click.option("--bn-eps", default=None, type=float,
              help="Batch-norm epsilon (default: 0 for FrozenBatchNorm2d state dicts, as torchvision loads its "
                   "published weights; 1e-5 for BatchNorm2d ones).")
def convert_torchvision_command(name, state_dict, out, bn_eps) -> None:
    """Convert torchvision's NAME state dict (STATE_DICT.pth) into a detseg checkpoint for predict / eval / export."""
    from . import api

    path = api.convert_torchvision(name, state_dict, out=out, bn_eps=bn_eps)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
