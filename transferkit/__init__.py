"""transferkit: transfer learning for image folders on timm backbones."""

__version__ = "0.1.0"
