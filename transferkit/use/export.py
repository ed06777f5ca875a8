"""Export a finetuned classifier to ONNX or TorchScript, checked against torch on real images.

The exported graph takes the normalized ``[N, 3, H, W]`` float tensor and returns logits; everything
needed to produce that tensor (timm data config, resize mode, the eval steps) and to read the logits (class names) goes into
a JSON beside the model (``<out>.json``). The file is only put in place when the exported model
reproduces torch's logits within :data:`PARITY_TOLERANCE` on the check images.

ONNX can also be written in fp16 or int8 (:mod:`transferkit.use.precision`): the fp32 graph is exported and
parity-checked first, then converted, and the converted file is only put in place when its accuracy on
labelled images is within ``max_drop`` points of fp32 (or ``force`` is set).

ONNX uses torch's ``torch.export``-based exporter (``dynamo=True``, the default since torch 2.9), which writes
opset 18 or later; an older ``opset`` comes from torch's TorchScript-based exporter, as the dynamo path would
silently write 18 instead. The file's opset is checked against the one asked for before it is put in place.

Export never replaces a file it did not write: an existing ``out`` (or its JSON) is refused, unless
``overwrite`` is set and it is a previous export of the same format (its JSON says so and its hash matches).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferkit import params
from transferkit.core.fileio import atomic_path, sha256_file, write_json
from transferkit.errors import TransferkitError, require_extra
from transferkit.use import precision as precision_lib

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
PARITY_TOLERANCE = 1e-3
GENERATED_CHECK_IMAGES = 4
INPUT_NAME, OUTPUT_NAME = "input", "logits"
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's oldest opset (torch.onnx's TORCHLIB_OPSET); older: TorchScript-based


@dataclass
class ExportedModel:
    """The exported file and what its JSON sidecar records (parity, precision check, calibration...)."""

    path: Path
    info: dict
    precision_report: precision_lib.PrecisionReport | None = None  # fp16/int8: the accuracy check against fp32

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)


def export(model_spec, format: str = "onnx", out: str | os.PathLike | None = None, dynamic_batch: bool = False,
           opset: int | None = None, check_images: Sequence[str | os.PathLike] | None = None,
           precision: str = "fp32", calibration: str | os.PathLike | None = None,
           calibration_images: int = precision_lib.DEFAULT_CALIBRATION_IMAGES, calibration_method: str = "minmax",
           max_drop: float = precision_lib.DEFAULT_MAX_DROP, force: bool = False,
           overwrite: bool = False) -> ExportedModel:
    """Write the model to ``out`` (default: beside the checkpoint) plus ``<out>.json``; return both.

    ``check_images`` (files, folders or globs) are the parity images; without them a few generated
    images are used. Parity (max |logit difference|) is recorded in the JSON under ``parity``.

    ``precision`` fp16/int8 (ONNX only) is checked for accuracy on ``check_images`` (one labelled folder),
    by default the run's own validation split; the result is recorded under ``precision_check``. int8 is
    calibrated on ``calibration_images`` images of ``calibration`` (a folder), by default of the run's
    training split. ``overwrite`` lets a previous export of the same format at ``out`` be replaced (nothing else).
    """
    from transferkit.models.predictors import load_predictor
    from transferkit.models.saved_model import find_checkpoint, read_checkpoint_metadata

    _check_options(format, opset, precision, calibration, calibration_method, calibration_images, max_drop)
    checkpoint = find_checkpoint(model_spec)
    kind = read_checkpoint_metadata(checkpoint).get("kind")
    if kind != "classifier":
        why = ("its members each have their own graph and preprocessing; export each member"
               if kind == "ensemble" else "its head is a scikit-learn model with no ONNX/TorchScript form here "
               "(exporting the backbone alone is out of scope)")
        raise TransferkitError(f"only finetuned classifiers can be exported; {checkpoint} is kind {kind!r}: {why}; "
                               "use `transferkit predict` for it")
    out = Path(out) if out is not None else _default_out(model_spec, checkpoint, format, precision)
    check_out(out, format, overwrite)
    predictor = load_predictor(checkpoint, "cpu")
    labelled = None if precision == "fp32" else _accuracy_check_images(predictor, check_images)
    calibration_set = None if precision != "int8" else precision_lib.calibration_images(
        predictor.metadata, predictor.class_names, calibration, calibration_images)
    model = predictor.model.float().eval()
    batch = check_batch(predictor, check_images)
    with torch.inference_mode():
        expected = model(batch).numpy()
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory() as scratch:
        precision_check = calibration_info = report = None
        if format == "onnx":
            fp32_path = tmp if precision == "fp32" else Path(scratch) / "fp32.onnx"
            exporter = _export_onnx(model, batch[:1], fp32_path, dynamic_batch, opset)
            actual = _run_onnx(fp32_path, batch, dynamic_batch)
        else:
            exporter = _export_torchscript(model, batch[:1], tmp)
            actual = _run_torchscript(tmp, batch, dynamic_batch)
        parity = _check_parity(format, expected, actual, "check images" if check_images else "generated images")
        if precision != "fp32":
            calibration_info = _convert(predictor, fp32_path, tmp, precision, calibration_set, calibration_method,
                                        dynamic_batch)
            report = precision_lib.compare_on_labelled(
                fp32_path, tmp, precision, labelled, predictor.preprocessing.eval_transform(), INPUT_NAME, OUTPUT_NAME,
                dynamic_batch, max_drop)
            precision_check = {**report.as_dict(), "forced": bool(force and report.drop > max_drop)}
            if report.drop > max_drop and not force:
                raise PrecisionDropError(report)
        if opset is not None and _onnx_opset(tmp) != opset:  # the dynamo path silently writes 18 for older ones
            raise TransferkitError(f"the exporter wrote opset {_onnx_opset(tmp)}, not the requested --opset {opset}; "
                                   "nothing written")
        info = _describe(predictor, checkpoint, tmp, out, format=format, exporter=exporter, dynamic_batch=dynamic_batch,
                         precision=precision, parity=parity, precision_check=precision_check,
                         calibration=calibration_info)
        # the JSON first, the model last: a model file present always has its JSON beside it
        write_json(sidecar_path(out), info)
    return ExportedModel(out, info, report)


def _check_options(format, opset, precision, calibration, calibration_method, calibration_images, max_drop) -> None:
    """Refuse combinations that mean nothing before any work starts."""
    params.EXPORT_FORMAT.check("export format", format)
    if format == "onnx":
        require_extra("onnx", "onnxscript", "onnxruntime")
    if opset is not None:
        if format != "onnx":
            raise TransferkitError("--opset applies to --format onnx only")
        import onnx.defs

        params.ONNX_OPSET.check("opset", opset)
        if opset > onnx.defs.onnx_opset_version():
            raise TransferkitError(f"--opset {opset} is newer than the installed onnx {onnx.__version__} knows; "
                                   f"use {params.ONNX_OPSET.low} to {onnx.defs.onnx_opset_version()}")
    params.EXPORT_PRECISION.check("precision", precision)
    if precision != "fp32" and format != "onnx":
        raise TransferkitError(f"--precision {precision} applies to --format onnx only")
    if calibration is not None and precision != "int8":
        raise TransferkitError("--calibration applies to --precision int8 only")
    params.CALIBRATION_METHOD.check("calibration method", calibration_method)
    params.CALIBRATION_IMAGES.check("calibration_images", calibration_images)
    params.MAX_DROP.check("max_drop", max_drop)


def _check_parity(format: str, expected: np.ndarray, actual: np.ndarray, source: str) -> dict:
    """The exported graph must give torch's logits; a mismatch writes nothing."""
    parity = {"images": len(expected), "source": source,
              "max_abs_diff": float(np.abs(expected - actual).max()), "tolerance": PARITY_TOLERANCE}
    if not parity["max_abs_diff"] <= PARITY_TOLERANCE:
        raise TransferkitError(
            f"{format} export does not match torch: max |logit difference| {parity['max_abs_diff']:.2e} "
            f"> {PARITY_TOLERANCE:g} on {len(expected)} images; nothing written"
        )
    return parity


def check_out(out: Path, format: str, overwrite: bool) -> None:
    """Refuse an ``out`` (or ``<out>.json``) that exists, unless ``overwrite`` and it is a previous ``format``
    export: its JSON names it, with its format and hash. A checkpoint, its metadata or a user's file never is."""
    sidecar = sidecar_path(out)
    if out.is_dir():
        raise TransferkitError(f"--out {out} is a folder; name the file to write")
    taken = [path for path in (out, sidecar) if path.exists() or path.is_symlink()]
    if not taken:
        return
    if not overwrite:
        what = taken[0] if taken[0] == out else f"{sidecar} (the JSON written beside --out {out.name})"
        raise TransferkitError(f"{what} already exists; export never replaces a file it did not write: choose "
                               f"another --out (--overwrite replaces a previous {format} export only)")
    if not _is_previous_export(out, format):
        raise TransferkitError(f"{out} is not a previous {format} export (no {sidecar.name} of one, with its hash, "
                               "beside it); --overwrite replaces only those: choose another --out")


def _is_previous_export(out: Path, format: str) -> bool:
    import json

    try:
        info = json.loads(sidecar_path(out).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("format") != format or info.get("file") != out.name:
        return False
    return not out.exists() or (out.is_file() and info.get("sha256") == sha256_file(out))


def _describe(predictor, checkpoint: Path, written: Path, out: Path, *, format: str, exporter: str, dynamic_batch: bool,
              precision: str, parity: dict, precision_check: dict | None, calibration: dict | None) -> dict:
    """The sidecar JSON: everything a runtime needs to feed the model and read its output."""
    return {
        "format": format,
        "file": out.name,
        "sha256": sha256_file(written),
        "input": {"name": INPUT_NAME, "shape": ["batch" if dynamic_batch else 1, *predictor.preprocessing.input_size],
                  "dtype": "float32", "layout": "NCHW, RGB, normalized with data_config mean/std"},
        "output": {"name": OUTPUT_NAME, "meaning": predictor.task.output_meaning,
                   "temperature": predictor.metadata.get("temperature", 1.0)},
        "class_names": predictor.class_names,
        "data_config": predictor.preprocessing.data_config,
        "resize_mode": predictor.preprocessing.resize_mode,
        "preprocessing": predictor.preprocessing.export_steps(),
        "backbone": predictor.metadata.get("backbone"),
        "source_checkpoint_sha256": sha256_file(checkpoint),
        "exporter": f"torch {torch.__version__} {exporter}",
        "opset": _onnx_opset(written) if format == "onnx" else None,
        "dynamic_batch": dynamic_batch,
        "precision": precision,
        "parity": parity if precision == "fp32" else {**parity, "checked": "the fp32 graph before conversion"},
        "precision_check": precision_check,
        "calibration": calibration,
    }


class PrecisionDropError(TransferkitError):
    """A reduced-precision export lost more accuracy than allowed; carries the measurements for the CLI."""

    def __init__(self, report: precision_lib.PrecisionReport):
        self.report = report
        super().__init__(
            f"{report.precision} accuracy {report.accuracy:.2f}% is {report.drop:.2f} points below fp32 "
            f"({report.fp32_accuracy:.2f}%), more than --max-drop {report.max_drop:g}; nothing written "
            "(pass --force to write it anyway)"
        )


def _accuracy_check_images(predictor, check_images) -> precision_lib.LabelledImages:
    """One labelled folder given as check data, else the run's validation split."""
    if check_images:
        if len(check_images) != 1 or not Path(check_images[0]).is_dir():
            raise TransferkitError("reduced precision is checked on labelled images: pass one folder of class folders "
                                   "as --check-data")
        return precision_lib.labelled_folder(check_images[0], predictor.class_names)
    recorded = precision_lib.recorded_split(predictor.metadata, "val", predictor.class_names)
    if recorded is None:
        raise TransferkitError("reduced precision is checked on labelled images and the model records no readable "
                               "validation split; pass --check-data FOLDER (class folders)")
    return recorded


def _convert(predictor, fp32_path: Path, out: Path, precision: str, images: precision_lib.LabelledImages | None,
             calibration_method: str, dynamic_batch: bool) -> dict | None:
    """fp32 ONNX → fp16/int8 ONNX at ``out``; returns what int8 was calibrated on (``images``)."""
    if precision == "fp16":
        precision_lib.convert_fp16(fp32_path, out)
        return None
    tensors = precision_lib.preprocess(images.paths, predictor.preprocessing.eval_transform(),
                                       "int8 calibration: decode")
    precision_lib.quantize_int8(fp32_path, out, iter(precision_lib.onnx_batches(tensors, dynamic_batch)), INPUT_NAME,
                                method=calibration_method)
    return {"images": len(images.paths), "source": images.source, "method": calibration_method,
            "format": "QDQ, per-channel int8 weights, uint8 activations"}


def sidecar_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


def check_batch(predictor, check_images: Sequence | None) -> torch.Tensor:
    """The model's eval transform applied to the check images, or to generated ones (noise, gradients)."""
    from transferkit.data import load_image
    from transferkit.use.predict import expand_inputs

    transform = predictor.preprocessing.eval_transform()
    if check_images:
        images = [load_image(p) for p in expand_inputs(check_images)[:16]]
    else:
        rng = np.random.default_rng(0)
        ramp = np.linspace(0, 255, 320, dtype=np.float32)
        images = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),
                  np.stack([np.tile(ramp, (240, 1))] * 3, axis=-1).astype(np.uint8)]
        images += [rng.integers(0, 256, (200 + 40 * i, 180, 3), dtype=np.uint8) for i in range(GENERATED_CHECK_IMAGES - 2)]
    return torch.stack([transform(image) for image in images]).float()


def _export_onnx(model, example: torch.Tensor, path: Path, dynamic_batch: bool, opset: int | None) -> str:
    """Write the ONNX graph at ``opset`` (None: the exporter's default); returns the exporter used."""
    legacy = opset is not None and opset < DYNAMO_MIN_OPSET
    try:
        if legacy:
            _export_onnx_torchscript(model, example, path, dynamic_batch, opset)
        else:
            _export_onnx_dynamo(model, example, path, dynamic_batch, opset)
    except Exception as exc:  # exporter failures come in many types; all mean "this model does not export"
        hint = f"; try a newer --opset ({DYNAMO_MIN_OPSET}+ uses the current exporter)" if legacy else ""
        raise TransferkitError(f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}){hint}") from exc
    return f"torch.onnx.export(dynamo={not legacy})"


def _export_onnx_dynamo(model, example: torch.Tensor, path: Path, dynamic_batch: bool, opset: int | None) -> None:
    kwargs = {"opset_version": opset} if opset is not None else {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
        example = example.expand(2, *example.shape[1:])  # a batch of 1 would be specialised to a constant
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress steps
        program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamo=True, external_data=False, verbose=False, **kwargs)
    program.save(str(path))


def _export_onnx_torchscript(model, example: torch.Tensor, path: Path, dynamic_batch: bool, opset: int) -> None:
    """Opsets before 18: the dynamo exporter would write 18 (its version converter fails on these graphs)."""
    import warnings

    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecated in favour of dynamo=True, which has no opset below 18
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamo=False, opset_version=opset, dynamic_axes=axes)


def _run_onnx(path: Path, batch: torch.Tensor, dynamic_batch: bool) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    chunks = [batch] if dynamic_batch else list(batch.split(1))
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: c.numpy()})[0] for c in chunks])


def _export_torchscript(model, example: torch.Tensor, path: Path) -> str:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; tracing still works
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
    return "torch.jit.trace"


def _run_torchscript(path: Path, batch: torch.Tensor, dynamic_batch: bool) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    chunks = [batch] if dynamic_batch else list(batch.split(1))
    with torch.inference_mode():
        return np.concatenate([loaded(c).numpy() for c in chunks])


def _onnx_opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _default_out(model_spec, checkpoint: Path, format: str, precision: str = "fp32") -> Path:
    """Beside a local checkpoint; in the working folder for an MLflow URI (its download folder is a cache)."""
    folder = Path.cwd() if "://" in str(model_spec) or str(model_spec).startswith(("runs:/", "models:/")) else checkpoint.parent
    return folder / (checkpoint.stem + ("" if precision == "fp32" else f".{precision}") + SUFFIXES[format])

