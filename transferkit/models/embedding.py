"""The frozen backbone's forward pass for embeddings: one vector per image, as features and the SVM model use it.

A vector is the backbone's pre-logits output (timm's ``forward_features`` + ``forward_head(pre_logits=True)``),
or timm's global pooling of ``forward_features`` / of an intermediate feature map (``forward_intermediates``)
when another pooling or ``layer`` is asked for; ``tta='hflip'`` averages it with the mirrored image's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from transferkit import params
from transferkit.errors import TransferkitError

if TYPE_CHECKING:
    import torch


def embed(model: torch.nn.Module, batch: torch.Tensor, *, pool: str | None = None, layer: int | None = None,
          tta: str = "none") -> torch.Tensor:
    """``[B, D]`` vectors for a preprocessed batch; ``layer`` is an index into ``model.feature_info``."""
    vectors = _pooled(model, batch, pool, layer)
    if tta == "hflip":
        vectors = (vectors + _pooled(model, batch.flip(-1), pool, layer)) / 2
    return vectors


def _pooled(model, batch, pool, layer):
    if layer is not None:
        (feature_map,) = model.forward_intermediates(batch, indices=[layer], intermediates_only=True, stop_early=True)
        return _global_pool(model, feature_map, pool or "avg")
    features = model.forward_features(batch)
    if pool is None or pool == own_pool(model):
        return model.forward_head(features, pre_logits=True)
    return _global_pool(model, features, pool)


def _global_pool(model, features: torch.Tensor, pool: str) -> torch.Tensor:
    """timm's own pooling: SelectAdaptivePool2d for NCHW maps, global_pool_nlc for token sequences."""
    from timm.layers import SelectAdaptivePool2d
    from timm.models.vision_transformer import global_pool_nlc

    if features.dim() == 3:
        return global_pool_nlc(features, pool_type=pool, num_prefix_tokens=getattr(model, "num_prefix_tokens", 0))
    return SelectAdaptivePool2d(pool_type=pool, flatten=True)(features)


def own_pool(model: torch.nn.Module) -> str | None:
    """The pooling the model's head uses (``avg`` for CNNs, ``token`` for most ViTs)."""
    pool = getattr(model, "global_pool", None) or getattr(getattr(model, "head", None), "global_pool", None)
    return pool if isinstance(pool, str) else getattr(pool, "pool_type", None)


def resolve_layer(model: torch.nn.Module, layer: str | int | None) -> int | None:
    """A feature_info module name (``blocks.3``) or index → the index forward_intermediates takes."""
    if layer is None:
        return None
    names = [info["module"] for info in getattr(model, "feature_info", [])]
    if str(layer) in names:
        return names.index(str(layer))
    if str(layer).lstrip("-").isdigit() and -len(names) <= int(layer) < len(names):
        return int(layer) % len(names)
    raise TransferkitError(f"unknown layer {layer!r} for this backbone; use one of {', '.join(names) or '(none)'}")


def check_pool(model: torch.nn.Module, pool: str | None, layer: int | None) -> None:
    if pool is not None:  # None: the model's own pooling
        params.POOL.check("pool", pool)
    if pool == "token" and (layer is not None or not getattr(model, "num_prefix_tokens", 0)):
        raise TransferkitError("pool 'token' needs a backbone with a class token (a ViT) and no --layer; use avg")


def feature_dim(model: torch.nn.Module, pool: str | None, layer: int | None, tta: str = "none") -> int:
    """Vector length, found by one forward of a blank image (cheap, and right for every timm family)."""
    import torch

    _, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        dim = embed(model, torch.zeros(1, 3, height, width, device=device), pool=pool, layer=layer, tta=tta).shape[1]
    model.train(was_training)
    return int(dim)


def build_feature_model(backbone: str, *, weights=None, weights_config=None, pretrained: bool = True,
                        data_overrides: Mapping | None = None, resize_mode: str | None = None, **model_kwargs):
    """The backbone without classifier (``num_classes=0``) and its :class:`Preprocessing`."""
    from transferkit.models.backbones import load_backbone

    return load_backbone(backbone, weights=weights, num_classes=0, pretrained=pretrained, weights_config=weights_config,
                         data_overrides=data_overrides, resize_mode=resize_mode, **model_kwargs)
