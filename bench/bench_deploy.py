"""Deploying a finetuned classifier on CPU: torch fp32 vs ONNX fp32 / fp16 / int8 (onnxruntime).

A ``tf_efficientnet_lite0`` (real ImageNet weights from ../shared/weights) finetuned on ../shared/data/signdigits
with the quick-cpu recipe is cached under bench/out/signdigits-lite0 (trained on first use, see --epochs). It is
exported with ``transferkit.use.export.export`` at each precision (int8 calibrated on its own training split,
checked on its validation split), then all four runtimes score the same preprocessed validation tensors:
accuracy, top-1 agreement with torch, file size and images/s (batch --batch-size, best of --rounds).

    .venv/bin/python bench/bench_deploy.py
    .venv/bin/python bench/bench_deploy.py --rounds 3 --variants   # also int8 calibration variants
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import BACKBONE, REPO, SHARED, WEIGHTS, best_time

SIGNDIGITS = SHARED / "data" / "signdigits"
RUN = REPO / "bench" / "out" / "signdigits-lite0"


def finetuned_model(epochs: int) -> Path:
    """The cached finetuned run, trained with the quick-cpu recipe when absent."""
    if not (RUN / "best.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "transferkit", "finetune", "--recipe", "quick-cpu",
                        "--data", str(SIGNDIGITS), "--weights", str(WEIGHTS), "--epochs", str(epochs), "--cache", "memory",
                        "--out", str(RUN.parent), "--name", RUN.name, "--no-track"], check=True)
    return RUN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="Finetune epochs when the cached model is absent.")
    parser.add_argument("--variants", action="store_true", help="Also int8 with other calibration settings.")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime
    import torch

    from transferkit.models.predictors import load_predictor
    from transferkit.use import precision as precision_lib
    from transferkit.use.export import export

    run = finetuned_model(args.epochs)
    predictor = load_predictor(run, "cpu")
    images = precision_lib.recorded_split(predictor.metadata, "val", predictor.class_names)
    tensors = precision_lib.preprocess(images.paths, predictor.preprocessing.eval_transform())
    metrics = json.loads((run / "best.json").read_text()).get("metrics", {})
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}")
    print(f"model: {BACKBONE} finetuned on signdigits ({run.name}, epoch {metrics.get('epoch', '?')}, "
          f"val_acc {metrics.get('val_acc', float('nan')):.3f}), input {list(predictor.preprocessing.input_size)}")
    print(f"data: {len(tensors)} images of {images.source}; batch {args.batch_size}, best of {args.rounds}\n")

    def timed(run_batch) -> tuple[np.ndarray, float]:
        """Logits of the last round and images/s of the best one (after one warm-up batch)."""
        chunks = [tensors[i:i + args.batch_size] for i in range(0, len(tensors), args.batch_size)]
        run_batch(chunks[0])
        outputs = []
        seconds = best_time(lambda: outputs.append(np.concatenate([run_batch(c) for c in chunks])), args.rounds)
        return outputs[-1], len(tensors) / seconds

    model = predictor.model.float().eval()

    def torch_batch(batch):
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    def onnx_runner(path: Path):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda batch: session.run(["logits"], {"input": batch})[0]

    rows = {"torch fp32": (*timed(torch_batch), sum(f.stat().st_size for f in [run / "best.safetensors"]))}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {}
        for precision in ("fp32", "fp16", "int8"):
            exported = export(run, "onnx", out=tmp / f"model.{precision}.onnx", dynamic_batch=True, precision=precision,
                              force=True, check_images=None if precision != "fp32" else [images.paths[0].parent.parent])
            out, check = exported.path, exported.info
            files[precision] = out
            rows[f"onnx {precision}"] = (*timed(onnx_runner(out)), out.stat().st_size)
            if check["calibration"]:
                print(f"int8 calibration: {check['calibration']}")
        _table(rows, images.labels)

        if args.variants:
            print("\nint8 variants (quantize_int8 on the same fp32 ONNX, same validation tensors)")
            calibration = precision_lib.calibration_images(predictor.metadata, predictor.class_names, None, 512)
            calib_tensors = precision_lib.preprocess(calibration.paths, predictor.preprocessing.eval_transform())
            variants = {}
            for name, kwargs, count in (("minmax, per-tensor", {"per_channel": False}, 128),
                                        ("minmax, first conv + classifier in fp32", {"float_ends": True}, 128),
                                        ("entropy, per-channel", {"method": "entropy"}, 128),
                                        ("percentile, per-channel", {"method": "percentile"}, 128),
                                        ("minmax, per-channel, 512 images", {}, 512)):
                out = tmp / f"variant{len(variants)}.onnx"
                precision_lib.quantize_int8(files["fp32"], out, iter(calib_tensors[:count][:, None]), "input", **kwargs)
                variants[f"int8 {name}"] = (*timed(onnx_runner(out)), out.stat().st_size)
            _table({"onnx fp32": rows["onnx fp32"], **variants}, images.labels)


def _table(rows: dict, labels) -> None:
    reference = rows.get("torch fp32") or rows["onnx fp32"]
    base = rows["onnx fp32"]
    ref_name = "torch" if "torch fp32" in rows else "onnx fp32"
    print(f"{'runtime':<36} {'accuracy':>9} {'agree/' + ref_name:>13} {'size MB':>8} {'x fp32':>7} {'img/s':>7} {'x fp32':>7}")
    for name, (logits, speed, size) in rows.items():
        accuracy = 100 * (logits.argmax(1) == labels).mean()
        agreement = 100 * (logits.argmax(1) == reference[0].argmax(1)).mean()
        print(f"{name:<36} {accuracy:8.2f}% {agreement:12.2f}% {size / 1e6:8.2f} {size / base[2]:7.2f} "
              f"{speed:7.1f} {speed / base[1]:7.2f}")


if __name__ == "__main__":
    main()
