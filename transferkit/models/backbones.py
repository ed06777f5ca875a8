"""Backbones: the one place that talks to timm's model factory.

A backbone comes with the preprocessing it was trained with (mean, std, size, interpolation, crop).
That data config is resolved here, by timm, from the model's pretrained config, then overlaid by what
the weights file states (a transferkit checkpoint's metadata, or a sidecar JSON) and finally by the
user's explicit overrides, into one :class:`~transferkit.models.preprocessing.Preprocessing`. Nothing
downstream hard-codes ImageNet statistics.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config

from transferkit.core.fileio import sha256_file
from transferkit.errors import TransferkitError
from transferkit.models import names
from transferkit.models.names import WEIGHTS_DIR_ENV, is_hub_name, weights_file_name  # noqa: F401  (re-exported)
from transferkit.models.preprocessing import Preprocessing
from transferkit.models.saved_model import read_checkpoint_metadata

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_HUB_PROBE = ("huggingface.co", 443)


def load_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    pretrained: bool = True,
    *,
    weights_config: str | os.PathLike | Mapping | None = None,
    data_overrides: Mapping[str, Any] | None = None,
    resize_mode: str | None = None,
    **model_kwargs,
) -> tuple[torch.nn.Module, Preprocessing]:
    """Build ``name`` with pretrained weights and return ``(model, preprocessing)``.

    ``num_classes=None`` keeps the pretrained classifier, ``0`` gives a pooled feature extractor,
    any other value a freshly initialised head. Weight sources, in order: ``weights`` (a file),
    ``$TRANSFERKIT_WEIGHTS_DIR/<name>.safetensors``, timm's hub path. ``weights_config`` (a JSON path
    or dict with ``model_kwargs`` and ``data_config``) states what a bare weights file needs;
    ``data_overrides`` (mean, std, input_size/img_size, interpolation, crop_pct, crop_mode) win over all.
    ``resize_mode`` (crop, squash, letterbox) overrides the crop mode; None keeps the one the weights state
    (a checkpoint's), else the backbone's own.
    """
    if not names.names_file().is_file():
        names.store_names(timm)  # timm is imported now: later usage errors need not wait for it
    if not (timm.is_model(name) or is_hub_name(name)):
        raise names.unknown_backbone(name, timm.list_models())
    source = _resolve_source(name, weights, pretrained)
    stated = _stated_config(source, weights_config)
    if stated.get("backbone") not in (None, name):
        raise TransferkitError(
            f"weights file {source} was written for backbone {stated['backbone']!r}, not {name!r}; "
            f"pass --backbone {stated['backbone']} or another weights file"
        )
    kwargs = {**stated.get("model_kwargs", {}), **model_kwargs}
    if source == "hub":
        model = _create_from_hub(name, num_classes, kwargs)
        identity = f"hub:{model.pretrained_cfg.get('hf_hub_id') or model.pretrained_cfg.get('url') or name}"
    else:
        model = _create(name, num_classes, kwargs)
        if source is not None:
            load_weights_into(model, _read_state_dict(source), source)
            identity = f"sha256:{sha256_file(source)}"
        else:
            identity = "random-init"
    data_config = resolve_data_config(model, {**stated.get("data_config", {}), **dict(data_overrides or {})})
    preprocessing = Preprocessing.resolve(data_config, resize_mode or stated.get("resize_mode"))
    model.pretrained_cfg = {**model.pretrained_cfg, **preprocessing.data_config}
    model.transferkit_info = {"backbone": name, "model_kwargs": kwargs, "weights": identity}
    model.transferkit_weights_source = _describe_source(source, weights, identity)
    return model, preprocessing


def weights_source(model: torch.nn.Module) -> str:
    """Where ``model``'s weights came from, for a person: the file (and whether the weights folder chose it) and
    its sha256, or the hub tag, or random init."""
    return getattr(model, "transferkit_weights_source", None) or backbone_identity(model).get("weights", "unknown")


def _describe_source(source, weights, identity: str) -> str:
    if not isinstance(source, Path):
        return identity.replace("hub:", "hub ") if source == "hub" else "random init (--no-pretrained)"
    sidecars = [p.name for p in (source.with_name(source.name + ".json"), source.with_suffix(".json")) if p.is_file()]
    where = "file" if weights is not None else f"${WEIGHTS_DIR_ENV}"
    return (f"{where} {source} (sha256 {identity.removeprefix('sha256:')[:12]}…"
            + (f", config {sidecars[0]}" if sidecars else "") + ")")


def resolve_data_config(model: torch.nn.Module, overrides: Mapping[str, Any] | None = None) -> dict:
    """timm's data config for ``model`` with ``overrides`` applied (checked by :meth:`Preprocessing.resolve`)."""
    config = dict(resolve_model_data_config(model))
    for key, value in (overrides or {}).items():
        if key == "img_size":
            key, value = "input_size", [3, *_pair(value)]
        if key not in DATA_CONFIG_KEYS:
            raise TransferkitError(f"unknown data config key {key!r}; use one of {', '.join(DATA_CONFIG_KEYS)}")
        config[key] = value
    return {key: config.get(key) for key in DATA_CONFIG_KEYS}


def backbone_identity(model: torch.nn.Module) -> dict:
    """What built ``model``: backbone name, constructor kwargs and weights identity (sha256 or hub tag)."""
    return dict(getattr(model, "transferkit_info", {}))


def list_backbones(pattern: str = "", pretrained: bool = False) -> list[str]:
    if not names.names_file().is_file():
        names.store_names(timm)
    return timm.list_models(pattern or "", pretrained=pretrained)


def backbone_info(name: str, **load_kwargs) -> dict:
    """Parameter count, feature dimension and data config, for `transferkit backbones info`."""
    model, preprocessing = load_backbone(name, num_classes=0, **load_kwargs)
    return {
        "backbone": name,
        "params": sum(p.numel() for p in model.parameters()),
        "feature_dim": int(model.num_features),
        "weights": backbone_identity(model)["weights"],
        "model_kwargs": backbone_identity(model)["model_kwargs"],
        "data_config": preprocessing.data_config,
    }


def classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    classifier = model.pretrained_cfg.get("classifier") or "classifier"
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def load_weights_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source) -> None:
    """Load ``state_dict``, dropping a classifier that does not fit the new head; fail clearly otherwise."""
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    own = model.state_dict()
    heads = classifier_prefixes(model)

    def is_head(key):
        return any(key == h or key.startswith(h + ".") for h in heads)

    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape and not is_head(k)]
    unexpected = [k for k in state_dict if k not in own and not is_head(k)]
    missing = [k for k in own if k not in state_dict and not is_head(k)]
    if mismatched or unexpected or missing:
        details = []
        for label, keys in (("shape mismatch", mismatched), ("unexpected", unexpected), ("missing", missing)):
            if keys:
                details.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise TransferkitError(
            f"weights {source} do not fit backbone {model.pretrained_cfg.get('architecture', '?')}: "
            f"{'; '.join(details)}; check --backbone and the model kwargs (e.g. pad_type) the file needs"
        )
    usable = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)


def _create(name: str, num_classes: int | None, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise TransferkitError(f"backbone {name} does not accept model kwargs {dict(kwargs)}: {exc}") from exc
    except Exception as exc:  # an hf-hub: name whose config.json is neither cached nor reachable
        if not is_hub_name(name):
            raise
        raise TransferkitError(f"cannot read the config of {name} from the Hugging Face hub ({type(exc).__name__}); "
                               "connect once so it is cached, or use a timm model name") from exc


def _create_from_hub(name: str, num_classes: int | None, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # hub/network errors come in many types; all mean "no weights"
        raise _no_weights_error(name, f"hub download failed ({type(exc).__name__})") from exc


def _resolve_source(name: str, weights, pretrained: bool):
    """A weights file path, ``"hub"``, or None (random init)."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise TransferkitError(f"weights file {path} does not exist; pass an existing .safetensors/.pth file")
        return path
    if not pretrained:
        return None
    weights_dir = os.environ.get(WEIGHTS_DIR_ENV)
    if weights_dir:
        candidate = Path(weights_dir).expanduser() / weights_file_name(name)
        if candidate.is_file():
            return candidate
    if not is_hub_name(name) and not timm.list_models(name, pretrained=True):
        raise _no_weights_error(name, "timm has no pretrained tag for it")
    if not _hub_reachable(name):
        raise _no_weights_error(name, "the model hub is not reachable and nothing is cached")
    return "hub"


def _hub_reachable(name: str) -> bool:
    """Answer fast (well under 10 s) instead of letting the hub client sit in retries when offline."""
    cfg = None if is_hub_name(name) else timm.models.get_pretrained_cfg(name)
    hub_id = name.removeprefix("hf-hub:") if is_hub_name(name) else getattr(cfg, "hf_hub_id", None) if cfg else None
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            cached = try_to_load_from_cache(hub_id, filename)
            if isinstance(cached, str):
                return True
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(_HUB_PROBE, timeout=3).close()
    except OSError:
        return False
    return True


def _no_weights_error(name: str, why: str) -> TransferkitError:
    return TransferkitError(
        f"no pretrained weights for {name}: {why}. Supply them with --weights FILE, "
        f"or ${WEIGHTS_DIR_ENV}/{weights_file_name(name)}, or a network for timm's hub; or pass --no-pretrained"
    )


def _stated_config(source, weights_config) -> dict:
    """What a weights file says about itself: checkpoint metadata, sidecar JSON, explicit config."""
    stated: dict = {}
    if isinstance(source, Path):
        metadata = read_checkpoint_metadata(source)
        stated.update(metadata)
        if metadata:
            preprocessing = Preprocessing.from_metadata(metadata)
            stated.update(data_config=preprocessing.data_config, resize_mode=preprocessing.resize_mode)
        for sidecar in (source.with_name(source.name + ".json"), source.with_suffix(".json")):
            if sidecar.is_file():
                stated.update(_read_json(sidecar))
                break
    if isinstance(weights_config, Mapping):
        stated.update(weights_config)
    elif weights_config is not None:
        stated.update(_read_json(Path(weights_config)))
    return {key: stated[key] for key in ("backbone", "model_kwargs", "data_config", "resize_mode") if key in stated}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TransferkitError(f"cannot read weights config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TransferkitError(f"weights config {path} must be a JSON object with model_kwargs / data_config")
    return data


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TransferkitError(
            f"{path} is not a plain state dict loadable with weights_only=True ({type(exc).__name__}); "
            "convert it to .safetensors"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TransferkitError(f"{path} does not hold a state dict of tensors; convert it to .safetensors")
    return obj


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[-2]), int(value[-1])
    return int(value), int(value)
