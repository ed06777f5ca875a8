"""transferkit: transfer learning for image folders on timm backbones."""

__version__ = "0.1.0"


def __getattr__(name):
    """Lazy public names, so `import transferkit` (and the CLI) stays light."""
    if name == "FeatureExtractor":
        from transferkit.features.sklearn_api import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
