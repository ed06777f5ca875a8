"""transferkit: transfer learning for image folders on timm backbones."""

from transferkit.version import __version__

__all__ = ["FeatureExtractor", "__version__"]


def __getattr__(name):
    """Lazy public names, so `import transferkit` (and the CLI) stays light."""
    if name == "FeatureExtractor":
        from transferkit.features.sklearn_api import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
