"""Using a trained model: `evaluate`, `predict`, `export`, `explain`, `serve`.

Every command takes ``--model`` as a run folder, model folder, checkpoint file or MLflow model URI;
the model carries its own preprocessing, so there are no preprocessing flags here.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from transferkit import params
from transferkit.cli.group import main
from transferkit.cli.options import tracking_options
from transferkit.errors import TransferkitError
from transferkit.use.precision import DEFAULT_CALIBRATION_IMAGES, DEFAULT_MAX_DROP


def model_option(func):
    return click.option("--model", "model_spec", required=True, metavar="RUN_DIR|MODEL_DIR|runs:/ID/model",
                        help="A run folder, model folder, checkpoint file or MLflow model URI.")(func)


def inference_options(func):
    """--tta / --batch-size / --device / --workers, shared by evaluate and predict."""

    @click.option("--tta", type=params.TTA.click_type(), default="none", show_default=True,
                  help="Test-time augmentation: probabilities averaged over the views.")
    @click.option("--batch-size", default=32, show_default=True, type=params.BATCH_SIZE.click_type())
    @click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
    @click.option("--workers", default=None, type=params.WORKERS.click_type(), help="Image decoding workers (default: CPU count - 1, at most 8).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


@main.command()
@model_option
@click.option("--data", required=True, type=click.Path(exists=True), help="Labelled images: split folders, class folders or a CSV.")
@click.option("--split", default=None,
              help="Split to evaluate (train, val, test). Default: test, or the whole dataset if it has a single split.")
@inference_options
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for metrics.json, predictions.csv, confusion matrices, reliability diagram, error gallery.")
@click.option("--json", "as_json", is_flag=True, help="Print the full metrics as JSON.")
@tracking_options
def evaluate(model_spec, data, split, tta, batch_size, device, workers, out, as_json, track, tracking_uri, experiment):
    """Accuracy, balanced accuracy, macro-F1, top-k, per-class report, confusion matrix, calibration (ECE)
    and the most confident errors of a trained model on labelled data."""
    from transferkit.reports.evaluation_report import per_class_table
    from transferkit.use.evaluate import evaluate as run_evaluate

    result = run_evaluate(model_spec, data, split=split, tta=tta, batch_size=batch_size, out=out, device=device,
                          track=track, tracking_uri=tracking_uri, experiment=experiment, workers=workers)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"split {result['split']} of {result['data']}: {result[result['split'] + '_n']} images, tta {result['tta']}\n")
    click.echo(per_class_table(result).rstrip())
    if result["skipped"]:
        click.echo(f"\nskipped {len(result['skipped'])} unreadable images, e.g. {result['skipped'][0]['error']}", err=True)
    if out:
        click.echo(f"\nreport written to {out}")
    if result.get("mlflow_run_id"):
        owner = "the run that trained the model" if result["mlflow_model_run"] else "a new run"
        click.echo(f"{result['split']}_* metrics logged to MLflow run {result['mlflow_run_id']} ({owner})")


@main.command()
@model_option
@click.argument("inputs", nargs=-1, required=True, metavar="PATH...")
@click.option("--topk", default=3, show_default=True, type=params.TOPK.click_type(), help="Classes (with probabilities) per image.")
@inference_options
@click.option("--out", type=click.Path(), default=None,
              help="Write the rows to .csv, .json or .parquet instead of printing a table; with --dense, the folder "
                   "for the class-map PNGs and class_fractions.json.")
@click.option("--dense", is_flag=True,
              help="Class map of each frame: the classifier applied at every position of its last feature map "
                   "(FC as 1x1 convolution) on a frame larger than the training size. Needs --out FOLDER.")
@click.option("--dense-size", type=params.DENSE_SHORT_SIDE.click_type(), default=None,
              help="--dense: resize frames so their short side is this many pixels (default: twice the input size); "
                   "a resized frame may have at most 2048x2048 pixels.")
def predict(model_spec, inputs, topk, tta, batch_size, device, workers, out, dense, dense_size):
    """Predict the class of images: files, folders (searched recursively) and quoted glob patterns.

    Unreadable files get a row with an error instead of stopping the run."""
    if dense:
        _predict_dense(model_spec, inputs, out, dense_size, tta, device)
        return
    if dense_size is not None:
        raise TransferkitError("--dense-size applies with --dense only")
    from transferkit.use.predict import predict as run_predict

    rows = run_predict(model_spec, inputs, topk=topk, tta=tta, batch_size=batch_size, out=out, device=device,
                       workers=workers)
    failed = sum(1 for row in rows if row["error"])
    if out:
        click.echo(f"wrote {len(rows)} predictions to {out}")
    else:
        _print_predictions(rows)
    if failed:
        click.echo(f"{failed} of {len(rows)} images could not be read (see the error column)", err=True)


def _predict_dense(model_spec, inputs, out, dense_size, tta, device) -> None:
    from transferkit.use.dense import predict_dense

    if out is None:
        raise TransferkitError("--dense writes class-map PNGs; pass --out FOLDER")
    if tta != "none":
        raise TransferkitError("--tta does not apply to --dense class maps")
    for row in predict_dense(model_spec, inputs, out, short_side=dense_size, device=device):
        ranked = sorted(row["fractions"].items(), key=lambda item: -item[1])
        shares = "   ".join(f"{name} {share:.0%}" for name, share in ranked if share > 0)
        click.echo(f"{row['path']}  ({row['map_size'][0]}x{row['map_size'][1]} cells)  {shares}")
    click.echo(f"wrote class maps and class_fractions.json to {out}")


@main.command()
@model_option
@click.option("--format", "fmt", type=params.EXPORT_FORMAT.click_type(), default="onnx", show_default=True)
@click.option("--precision", type=params.EXPORT_PRECISION.click_type(), default="fp32", show_default=True,
              help="ONNX weights/compute: fp32 (logit parity with torch), fp16 (converted) or int8 (static "
                   "quantization); fp16/int8 are checked for accuracy on labelled images.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Output file (default: beside the checkpoint, <name>[.fp16|.int8].onnx / <name>.torchscript.pt).")
@click.option("--dynamic-batch", is_flag=True, help="Accept any batch size (default: batch of 1).")
@click.option("--opset", type=params.ONNX_OPSET.click_type(), default=None,
              help="ONNX opset, written exactly or refused (default: the exporter's; below 18 the TorchScript-based exporter).")
@click.option("--check-data", "check_data", multiple=True, type=click.Path(exists=True),
              help="Images (files/folders) for the parity check against torch; default: generated images. Repeatable. "
                   "With fp16/int8: one labelled folder for the accuracy check (default: the run's validation split).")
@click.option("--calibration", type=click.Path(exists=True, file_okay=False), default=None,
              help="int8: folder of typical images to calibrate activation ranges (default: the run's training split).")
@click.option("--calibration-images", type=params.CALIBRATION_IMAGES.click_type(), default=DEFAULT_CALIBRATION_IMAGES, show_default=True,
              help="int8: how many calibration images (a seeded sample).")
@click.option("--calibration-method", type=params.CALIBRATION_METHOD.click_type(), default="minmax", show_default=True,
              help="int8: how activation ranges are chosen from the calibration images.")
@click.option("--max-drop", type=params.MAX_DROP.click_type(), default=DEFAULT_MAX_DROP, show_default=True,
              help="fp16/int8: refuse to write the file if accuracy drops more than this many points below fp32.")
@click.option("--force", is_flag=True, help="fp16/int8: write the file even when accuracy drops more than --max-drop.")
@click.option("--overwrite", is_flag=True,
              help="Replace a previous export of the same format at --out (recognised by its JSON); any other "
                   "existing file is always refused.")
def export(model_spec, fmt, precision, out, dynamic_batch, opset, check_data, calibration, calibration_images,
           calibration_method, max_drop, force, overwrite):
    """Export a finetuned classifier to ONNX or TorchScript, plus a JSON with class names and preprocessing;
    fails unless the export reproduces torch's logits within 1e-3 (fp32) or keeps its accuracy (fp16/int8)."""
    from transferkit.use.export import PrecisionDropError
    from transferkit.use.export import export as run_export

    try:
        exported = run_export(model_spec, format=fmt, out=out, dynamic_batch=dynamic_batch, opset=opset,
                              check_images=list(check_data) or None, precision=precision, calibration=calibration,
                              calibration_images=calibration_images, calibration_method=calibration_method,
                              max_drop=max_drop, force=force, overwrite=overwrite)
    except PrecisionDropError as exc:
        click.echo("\n".join(exc.report.lines()))
        raise
    info, parity = exported.info, exported.info["parity"]
    runtime = "onnxruntime" if fmt == "onnx" else "torch.jit"
    graph = "" if precision == "fp32" else "fp32 graph, "
    click.echo(f"parity check ({graph}{runtime} vs torch, {parity['images']} {parity['source']}): "
               f"max |logit difference| {parity['max_abs_diff']:.2e} <= {parity['tolerance']:g}  ok")
    if exported.precision_report is not None:
        click.echo("\n".join(exported.precision_report.lines()))
        if info["precision_check"]["forced"]:
            click.echo(f"warning: accuracy dropped more than --max-drop {max_drop:g}; written because of --force", err=True)
    if info["calibration"]:
        click.echo(f"int8 calibrated on {info['calibration']['images']} images from {info['calibration']['source']}")
    click.echo(f"wrote {exported.path} and {exported.sidecar.name} (class names, preprocessing)")


@main.command()
@model_option
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the overlay PNGs.")
@click.option("--method", type=params.CAM_METHOD.click_type(), default="gradcam", show_default=True)
@click.option("--target-layer", default=None, help="Dotted module name (e.g. layer4.1); default: chosen per model family.")
@click.option("--class", "class_name", default=None, help="Explain this class instead of each image's prediction.")
@click.option("--device", default="auto", show_default=True)
def explain(model_spec, images, out, method, target_layer, class_name, device):
    """Class-activation overlays: where in each image the model finds evidence for its prediction."""
    from transferkit.use.explain import explain as run_explain

    written = run_explain(model_spec, images, out, method=method, target_layer=target_layer, class_name=class_name,
                          device=device)
    click.echo(f"wrote {len(written)} overlays to {Path(out)}")


@main.command()
@model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback exposes the model to the network (a warning says so).")
@click.option("--port", default=8000, show_default=True, type=params.PORT.click_type(), help="Port (0: any free port).")
@click.option("--topk", default=5, show_default=True, type=params.TOPK.click_type(), help="Classes shown per image.")
@click.option("--max-upload-mb", default=10.0, show_default=True, type=params.MAX_UPLOAD_MB.click_type(), help="Largest accepted upload.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host is NAME (the server's address, and localhost on loopback, always "
                   "are); any other Host is refused, as a DNS-rebinding page would send. Repeatable.")
@click.option("--device", default="auto", show_default=True)
def serve(model_spec, host, port, topk, max_upload_mb, allowed_hosts, device):
    """A web page to try a model: drop an image, see its top classes and a Grad-CAM overlay (JSON API at
    /api/predict: raw image bytes or a multipart form upload). For one person on their own machine: no
    authentication."""
    from transferkit.use.serve import serve as run_serve

    run_serve(model_spec, host=host, port=port, topk=topk, max_upload_mb=max_upload_mb, device=device,
              allowed_hosts=allowed_hosts, announce=lambda line: click.echo(line, err=line.startswith("warning")))


def _print_predictions(rows) -> None:
    width = min(max(len(row["path"]) for row in rows), 60)
    for row in rows:
        path = row["path"] if len(row["path"]) <= width else "..." + row["path"][-(width - 3):]
        if row["error"]:
            click.echo(f"{path:<{width}}  error: {row['error']}")
            continue
        ranked = []
        rank = 1
        while f"top{rank}_class" in row:
            ranked.append(f"{row[f'top{rank}_class']} {row[f'top{rank}_prob']:.3f}")
            rank += 1
        click.echo(f"{path:<{width}}  {'   '.join(ranked)}")
