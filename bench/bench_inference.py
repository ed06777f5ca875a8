"""Using a trained model on CPU: predict throughput (with TTA), exported runtimes, CAM cost.

A tf_efficientnet_lite0 classifier (real ImageNet backbone from ../shared/weights, fresh 2-class head,
as after finetuning on ../shared/data/roads) is saved as a transferkit checkpoint, then:

1. ``predict_paths`` images/s over the roads frames (decode + eval transform + forward, DataLoader
   workers) for --tta none / hflip / ten-crop, against the bare model forward on pre-transformed tensors;
2. the same model exported to ONNX (torch.export-based exporter) and TorchScript: export time, parity on
   real roads frames (max |logit difference|), and latency at batch 1 and batch 32 for torch eager,
   onnxruntime and TorchScript;
3. seconds per image of ``explain`` (Grad-CAM and Grad-CAM++, overlay PNG included).

The machine is shared: every timing is the best of --rounds repeats (the least disturbed one).

    .venv/bin/python bench/bench_inference.py
    .venv/bin/python bench/bench_inference.py --rounds 3 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import BACKBONE, ROADS, WEIGHTS, best_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="Predict over the roads frames this many times.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    import onnxruntime
    import torch

    from transferkit.data import discover, load_image
    from transferkit.models.backbones import load_backbone
    from transferkit.models.predictors import load_predictor
    from transferkit.models.saved_model import checkpoint_metadata, save_checkpoint
    from transferkit.use.explain import explain
    from transferkit.use.export import check_batch, export
    from transferkit.use.predict import predict_paths

    torch.manual_seed(0)
    index = discover(ROADS, val_ratio=0)
    paths = [s.path for s in index.samples] * args.repeat
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"onnxruntime {onnxruntime.__version__}")
    print(f"data: {len(index.samples)} roads frames x {args.repeat} = {len(paths)} images; "
          f"batch {args.batch_size}, {args.workers} decode workers; best of {args.rounds}\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, preprocessing = load_backbone(BACKBONE, weights=WEIGHTS, num_classes=len(index.classes))
        save_checkpoint(tmp / "model" / "model", model, checkpoint_metadata(
            model, kind="classifier", class_names=index.classes, preprocessing=preprocessing))
        predictor = load_predictor(tmp / "model", "cpu")

        print("1. predict (decode + transform + forward), images/s")
        transform = predictor.preprocessing.eval_transform()
        tensors = torch.stack([transform(load_image(p, predictor.preprocessing.decode_short_side)) for p in paths])

        def bare_forward():
            for start in range(0, len(tensors), args.batch_size):
                predictor.predict_proba_tensor(tensors[start:start + args.batch_size])

        bare = best_time(bare_forward, args.rounds)
        print(f"   bare forward on ready tensors   {len(paths) / bare:7.1f} img/s")
        for tta, views in (("none", 1), ("hflip", 2), ("ten-crop", 10)):
            seconds = best_time(lambda tta=tta: predict_paths(predictor, paths, tta=tta, batch_size=args.batch_size,
                                                              workers=args.workers), args.rounds)
            print(f"   predict --tta {tta:<9} ({views:>2} views) {len(paths) / seconds:7.1f} img/s"
                  f"   ({seconds / bare:.2f}x the bare forward time)")

        print("\n2. export and runtimes (lite0, 224 px)")
        frames = [str(p) for p in sorted(ROADS.rglob("*.jpg"))[:16]]
        batch32 = check_batch(predictor, frames * 2)
        runners = {"torch eager": lambda x: predictor.model(x)}
        for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
            start = time.perf_counter()
            exported = export(tmp / "model", fmt, out=tmp / name, dynamic_batch=True, check_images=frames)
            out = exported.path
            took = time.perf_counter() - start
            parity = exported.info["parity"]
            print(f"   {fmt:<12} export + check {took:5.1f} s, parity on {parity['images']} roads frames: "
                  f"max |logit diff| {parity['max_abs_diff']:.1e}, {out.stat().st_size / 1e6:.1f} MB")
            if fmt == "onnx":
                session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                runners["onnxruntime"] = lambda x, s=session: s.run(["logits"], {"input": x.numpy()})
            else:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    scripted = torch.jit.load(str(out))
                runners["torchscript"] = scripted
        for size in (1, 32):
            x = batch32[:size].contiguous()
            calls = 32 // size  # the same 32 images per timing for every batch size
            line = []
            for name, run in runners.items():
                with torch.inference_mode():
                    run(x)  # warm-up
                    seconds = best_time(lambda run=run, x=x, calls=calls: [run(x) for _ in range(calls)], args.rounds)
                line.append(f"{name} {seconds / calls * 1000:6.1f} ms")
            print(f"   batch {size:>2} latency: " + " | ".join(line))

        print("\n3. explain (model load + CAM + overlay PNG, 4 frames), s/image")
        images = frames[:4]
        for method in ("gradcam", "gradcam++"):
            seconds = best_time(lambda m=method: explain(tmp / "model", images, tmp / "cams", method=m, device="cpu"),
                                args.rounds)
            print(f"   {method:<10} {seconds / len(images):.2f} s/image")


if __name__ == "__main__":
    main()
