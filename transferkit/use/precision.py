"""Reduced-precision ONNX models (fp16, int8) and the accuracy check that decides whether they ship.

int8 uses onnxruntime's static quantization (QDQ format, per-channel weights): activation ranges are
calibrated on images from the model's own training split (recorded in its checkpoint metadata) or a
user folder, pushed through the model's own eval transform. fp16 uses onnxruntime's float16 converter
with float32 inputs/outputs kept, so the sidecar JSON and the caller's preprocessing stay the same.

Reduced-precision logits cannot match fp32 to 1e-3, so they are judged by what users lose: accuracy on
labelled images, top-1 agreement with fp32, size on disk and images/s, measured by :func:`compare_on_labelled`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from transferkit import params
from transferkit.errors import TransferkitError

DEFAULT_CALIBRATION_IMAGES = 128
DEFAULT_MAX_DROP = 1.0  # accuracy points


@dataclass(frozen=True)
class LabelledImages:
    paths: list[Path]
    labels: np.ndarray  # indices into the model's class names
    source: str


@dataclass
class PrecisionReport:
    """fp32 vs reduced precision on the same preprocessed labelled images (accuracy in percent)."""

    precision: str
    images: int
    source: str
    fp32_accuracy: float
    accuracy: float
    top1_agreement: float
    fp32_bytes: int
    bytes: int
    fp32_images_per_s: float
    images_per_s: float
    max_drop: float

    @property
    def drop(self) -> float:
        return self.fp32_accuracy - self.accuracy

    def as_dict(self) -> dict:
        return {**asdict(self), "drop": self.drop}

    def lines(self) -> list[str]:
        return [
            f"accuracy on {self.images} labelled images ({self.source}): fp32 {self.fp32_accuracy:.2f}%  "
            f"{self.precision} {self.accuracy:.2f}%  (drop {self.drop:+.2f} points, allowed {self.max_drop:g})",
            f"top-1 agreement with fp32: {self.top1_agreement:.2f}%",
            f"size on disk: fp32 {self.fp32_bytes / 1e6:.2f} MB  {self.precision} {self.bytes / 1e6:.2f} MB  "
            f"({self.bytes / self.fp32_bytes:.2f}x)",
            f"onnxruntime CPU on this machine: fp32 {self.fp32_images_per_s:.1f} images/s  {self.precision} "
            f"{self.images_per_s:.1f} images/s  ({self.images_per_s / self.fp32_images_per_s:.2f}x)",
        ]


def convert_fp16(fp32_path: Path, out: Path) -> None:
    """Weights and compute in float16; the graph still takes and returns float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out))


def quantize_int8(fp32_path: Path, out: Path, calibration: Iterator[np.ndarray], input_name: str,
                  method: str = "minmax", per_channel: bool = True, float_ends: bool = False) -> None:
    """Static int8 quantization (QDQ): int8 weights (per output channel), uint8 activations calibrated on
    ``calibration`` batches. The graph is first shape-inferred and optimised (batch norms folded into convs),
    as onnxruntime recommends before quantizing. ``float_ends`` keeps the first convolution and the classifier
    in float (the layers most sensitive to quantization, and cheap)."""
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def get_next(self):
            batch = next(calibration, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        excluded = _end_layers(prepared) if float_ends else []
        quantize_static(
            str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[method],
            extra_options={"CalibTensorRangeSymmetric": False}, nodes_to_exclude=excluded,
        )


def _end_layers(path: Path) -> list[str]:
    """Names of the first Conv and the last Gemm/MatMul node of an ONNX graph."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    first = next((n.name for n in nodes if n.op_type == "Conv"), None)
    last = next((n.name for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
    return [name for name in (first, last) if name]


def recorded_split(metadata: Mapping, split: str, class_names: Sequence[str]) -> LabelledImages | None:
    """The ``split`` images a finetune run recorded in its checkpoint (paths relative to its data folder),
    or None when the metadata has no split or the data folder is gone."""
    records = [r for r in metadata.get("split") or [] if r.get("split") == split]
    root = Path(str((metadata.get("recipe") or {}).get("data") or ""))
    if not records or not str(root) or not root.is_dir():
        return None
    paths = [root / r["path"] for r in records]
    if not all(p.is_file() for p in paths[:16]):
        return None
    labels = np.array([list(class_names).index(r["label"]) for r in records])
    return LabelledImages(paths, labels, f"the run's {split} split in {root}")


def labelled_folder(folder: str | os.PathLike, class_names: Sequence[str]) -> LabelledImages:
    """A folder of class folders (or split folders: test, else val, else all) whose classes the model knows."""
    from transferkit.data import discover

    index = discover(folder, val_ratio=0)
    split = next((name for name in ("test", "val") if index.split(name)), None)
    samples = index.split(split) if split else index.samples
    unknown = sorted(set(index.classes[s.label] for s in samples) - set(class_names))
    if unknown:
        raise TransferkitError(f"{folder} has classes the model does not know ({', '.join(unknown[:5])}); "
                               f"the model's classes are {', '.join(class_names)}")
    labels = np.array([list(class_names).index(index.classes[s.label]) for s in samples])
    return LabelledImages([s.path for s in samples], labels, str(folder) + (f" ({split} split)" if split else ""))


def calibration_images(metadata: Mapping, class_names: Sequence[str], folder: str | os.PathLike | None,
                       count: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0) -> LabelledImages:
    """``count`` images (seeded sample) from ``folder``, else from the model's own training split."""
    if folder is not None:
        from transferkit.use.predict import expand_inputs

        paths = expand_inputs([folder])
        images = LabelledImages(paths, np.zeros(len(paths), dtype=int), str(folder))
    else:
        images = recorded_split(metadata, "train", class_names)
        if images is None:
            raise TransferkitError("int8 needs calibration images and the model records no readable training split; "
                                   "pass --calibration FOLDER (a few hundred typical images)")
    params.CALIBRATION_IMAGES.check("calibration_images", count)
    if len(images.paths) > count:
        keep = np.sort(np.random.default_rng(seed).choice(len(images.paths), count, replace=False))
        images = LabelledImages([images.paths[i] for i in keep], images.labels[keep], images.source)
    return images


def preprocess(paths: Sequence[Path], transform, desc: str = "export check: decode") -> np.ndarray:
    """``[N, 3, H, W]`` float32 through the model's eval transform (the same tensors torch sees)."""
    from transferkit.data import load_image

    return np.stack([transform(load_image(p)).numpy() for p in _bar(paths, desc, "img")]).astype(np.float32)


def _bar(items, desc: str, unit: str):
    """A progress bar on a terminal only (tqdm's ``disable=None``): quiet when piped."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, disable=None, leave=False)


def onnx_batches(batch: np.ndarray, dynamic_batch: bool, size: int = 32) -> list[np.ndarray]:
    """Chunks an exported graph accepts: any size with a dynamic batch axis, else one image at a time."""
    step = size if dynamic_batch else 1
    return [batch[i:i + step] for i in range(0, len(batch), step)]


def compare_on_labelled(fp32_path: Path, reduced_path: Path, precision: str, images: LabelledImages, transform,
                        input_name: str, output_name: str, dynamic_batch: bool, max_drop: float) -> PrecisionReport:
    """Accuracy, top-1 agreement, file size and images/s of both ONNX files on the same tensors."""
    tensors = preprocess(images.paths, transform)
    fp32_logits, fp32_speed = _run_timed(fp32_path, tensors, input_name, output_name, dynamic_batch)
    logits, speed = _run_timed(reduced_path, tensors, input_name, output_name, dynamic_batch)
    fp32_pred, pred = fp32_logits.argmax(1), logits.argmax(1)
    return PrecisionReport(
        precision=precision, images=len(tensors), source=images.source,
        fp32_accuracy=100.0 * float((fp32_pred == images.labels).mean()),
        accuracy=100.0 * float((pred == images.labels).mean()),
        top1_agreement=100.0 * float((pred == fp32_pred).mean()),
        fp32_bytes=fp32_path.stat().st_size, bytes=reduced_path.stat().st_size,
        fp32_images_per_s=fp32_speed, images_per_s=speed, max_drop=max_drop,
    )


def _run_timed(path: Path, tensors: np.ndarray, input_name: str, output_name: str,
               dynamic_batch: bool) -> tuple[np.ndarray, float]:
    """Logits and images/s (after one warm-up batch, session creation excluded)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    chunks = onnx_batches(tensors, dynamic_batch)
    session.run([output_name], {input_name: chunks[0]})
    start = time.perf_counter()
    logits = np.concatenate([session.run([output_name], {input_name: c})[0]
                             for c in _bar(chunks, f"export check: {path.name}", "batch")])
    return logits.astype(np.float32), len(tensors) / max(time.perf_counter() - start, 1e-9)
