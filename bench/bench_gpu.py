"""GPU fast path: training and feature-extraction images/s for resnet50 and tf_efficientnet_lite0.

Grid: batch 64 / 128 x AMP on/off (bf16 where supported, else fp16 with a grad scaler, as
transferkit.core.runtime picks) x channels_last on/off, on synthetic 224 px tensors already on the GPU (so
the number is the model's, not the input pipeline's). Weights are random (throughput does not depend
on them). Training = forward + cross-entropy + backward + AdamW step; extraction = pooled pre-logits
features under inference_mode. Compare with timm's published benchmark CSVs for the same GPU class
(results-imagenet / benchmark-train-amp-*.csv in the timm repository).

    .venv/bin/python bench/bench_gpu.py            # needs CUDA; says so and exits 0 without it
    .venv/bin/python bench/bench_gpu.py --smoke    # tiny run on CPU: checks the code path only
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time

MODELS = ("resnet50", "tf_efficientnet_lite0")


def bench_one(name: str, batch: int, amp: bool, channels_last: bool, mode: str, device, size: int, steps: int,
              warmup: int) -> float:
    import timm
    import torch

    from transferkit.core.runtime import amp_dtype

    model = timm.create_model(name, pretrained=False, num_classes=1000).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (batch,), device=device)
    dtype = amp_dtype(device) if amp else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model.forward_head(model.forward_features(images), pre_logits=True)

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (batch 2, 64 px, 1 step) to test the code")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    import torch

    if args.smoke:
        device, size, batches, steps, warmup = torch.device("cpu"), 64, [2], 1, 0
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here; nothing measured (use --smoke to test the code path on CPU)")
        return
    else:
        device, size, batches, steps, warmup = torch.device("cuda"), 224, args.batches, args.steps, args.warmup
        torch.backends.cudnn.benchmark = True
        print(f"GPU: {torch.cuda.get_device_name(device)}  torch {torch.__version__}  "
              f"AMP dtype {'bf16' if torch.cuda.is_bf16_supported() else 'fp16'}")
    print("| model | mode | batch | AMP | channels_last | images/s |")
    print("|---|---|---|---|---|---|")
    for name, mode, batch, amp, channels_last in itertools.product(args.models, ("train", "extract"), batches,
                                                                   (False, True), (False, True)):
        rate = bench_one(name, batch, amp, channels_last, mode, device, size, steps, warmup)
        print(f"| {name} | {mode} | {batch} | {'on' if amp else 'off'} | {'on' if channels_last else 'off'} | "
              f"{rate:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
