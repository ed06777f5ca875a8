"""Every allowed value of every setting, in one place: :mod:`transferkit.params` makes them the constraints that
the CLI's flags, the config and the Python API all check, so a new strategy or pool is added once. Pure data (no
torch, no cv2) so the CLI imports it for free.
"""

from __future__ import annotations

from transferkit.tasks import monitor_names

# finetune (keys of transferkit.train.config.TrainConfig)
STRATEGIES = ("linear-probe", "full", "freeze-unfreeze", "discriminative", "partial:N")  # N = last stages to train
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "plateau", "none")
BALANCE = ("none", "weights", "sampler")
MONITORS = monitor_names()  # each task declares its metrics and their directions (transferkit.tasks)
AUG_PRESETS = ("none", "light", "medium", "heavy")  # or an albumentations YAML file
# BatchNorm running statistics while the body trains: auto = frozen for freeze-unfreeze (its fitted head keeps
# seeing the features it was fitted on), updated from each batch for the other strategies
BN_STATS = ("auto", "frozen", "update")
BAD_IMAGES = ("error", "skip")  # an unreadable train/val image: stop before training, or leave it out and say so

# preprocessing and input pipeline
RESIZE_MODES = ("crop", "squash", "letterbox")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "area")  # timm / torchvision names
CACHE_MODES = ("none", "memory", "disk")
TTA_MODES = ("none", "hflip", "five-crop", "ten-crop")  # evaluate / predict
TTA_VIEWS = {"none": 1, "hflip": 2, "five-crop": 5, "ten-crop": 10}

# frozen features and classical heads
POOLS = ("avg", "max", "avgmax", "token")
FEATURE_TTA_MODES = ("none", "hflip")  # a feature vector per image: no crops to average
FEATURE_DTYPES = ("float32", "float16")
FEATURE_SPLITS = ("all", "train", "val", "test")
HEAD_MODELS = ("linear-svm", "rbf-svm", "logistic")

# using a model
EXPORT_FORMATS = ("onnx", "torchscript")
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")  # fp16/int8: ONNX only
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # int8 activation ranges
CAM_METHODS = ("gradcam", "gradcam++", "scorecam")

# combining models
ENSEMBLE_SELECTIONS = ("uniform", "greedy")  # greedy: Caruana's forward selection with replacement on val
SOUP_RECIPES = ("greedy", "uniform")  # greedy: Wortsman's, a member joins only if val accuracy does not drop
