"""The ImageNet adapter: class-spread subsets and the paper's model zoo names."""

from __future__ import annotations

import numpy as np
import pytest

from rdoq.adapters.timm_imagenet import class_spread_files


def make_class_tree(root, classes: int, per_class: int):
    """An ImageFolder-like tree of empty image files (only the names are read)."""
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"img_{i:03d}.JPEG").touch()
    return root


def picked_classes(files) -> list[int]:
    return [int(f.parent.name[1:]) for f in files]


def test_class_spread_covers_the_whole_class_range(tmp_path):
    split = make_class_tree(tmp_path / "train", classes=1000, per_class=2)
    files = class_spread_files(split, 64)
    idx = picked_classes(files)
    assert len(set(idx)) == 64  # one image per class before a second of any
    assert min(idx) <= 20 and max(idx) >= 900
    gaps = np.diff(sorted(idx))
    assert gaps.min() >= 15 and gaps.max() <= 16  # 1000 / 64 = 15.6: evenly spaced
    assert class_spread_files(split, 64) == files  # deterministic


def test_class_spread_takes_every_class_before_a_second_image(tmp_path):
    split = make_class_tree(tmp_path / "train", classes=100, per_class=3)
    files = class_spread_files(split, 130)
    first = picked_classes(files[:100])
    assert sorted(first) == list(range(100))
    assert all(f.name == "img_000.JPEG" for f in files[:100])
    second = picked_classes(files[100:])
    assert len(set(second)) == 30 and all(f.name == "img_001.JPEG" for f in files[100:])
    assert max(second) >= 90  # the second round is spread too
    assert len(set(files)) == 130


def test_class_spread_skips_exhausted_classes(tmp_path):
    split = make_class_tree(tmp_path / "train", classes=3, per_class=1)
    (split / "n00000001" / "img_001.JPEG").touch()
    files = class_spread_files(split, 4)
    assert len(set(files)) == 4
    assert files[-1].name == "img_001.JPEG"
    with pytest.raises(ValueError, match="exceeds the 4 images"):
        class_spread_files(split, 5)


# The paper's zoo (digest §8.5) -> (library, builder, weights): torchvision's networks and weights,
# through timm's ports (tag tv_in1k) where timm has them.
PAPER_ZOO = {
    "alexnetpy": ("torchvision", "alexnet", "AlexNet_Weights.IMAGENET1K_V1"),
    "vgg16py": ("timm", "vgg16_bn", "tv_in1k"),
    "resnet18py": ("timm", "resnet18", "tv_in1k"),
    "resnet34py": ("timm", "resnet34", "tv_in1k"),
    "resnet50py": ("timm", "resnet50", "tv_in1k"),
    "resnet101py": ("timm", "resnet101", "tv_in1k"),
    "densenet121py": ("timm", "densenet121", "tv_in1k"),
    "mobilenetv2py": ("torchvision", "mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1"),
    "deit_b_224": ("timm", "deit_base_patch16_224", "fb_in1k"),
    "mae_finetuned_vit_base": ("timm", "vit_base_patch16_224", "file:mae_finetuned_vit_base.pth"),
    "mae_finetuned_vit_large": (
        "timm",
        "vit_large_patch16_224",
        "file:mae_finetuned_vit_large.pth",
    ),
    "mae_finetuned_vit_huge": ("timm", "vit_huge_patch14_224", "file:mae_finetuned_vit_huge.pth"),
}
# The torchvision weights each torchvision-derived alias holds (its eval transform must be theirs).
TV_WEIGHTS = {
    "alexnetpy": "AlexNet_Weights.IMAGENET1K_V1",
    "vgg16py": "VGG16_BN_Weights.IMAGENET1K_V1",
    "resnet18py": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34py": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50py": "ResNet50_Weights.IMAGENET1K_V1",
    "resnet101py": "ResNet101_Weights.IMAGENET1K_V1",
    "densenet121py": "DenseNet121_Weights.IMAGENET1K_V1",
    "mobilenetv2py": "MobileNet_V2_Weights.IMAGENET1K_V1",
}


@pytest.mark.parametrize("alias", sorted(PAPER_ZOO))
def test_paper_alias_resolves_to_the_papers_network_and_weights(alias):
    import timm

    from rdoq.adapters.timm_imagenet import resolve_arch

    spec = resolve_arch(alias)
    assert (spec.library, spec.builder, spec.weights) == PAPER_ZOO[alias]
    if spec.library == "timm" and spec.tag is not None:
        assert f"{spec.builder}.{spec.tag}" in timm.list_pretrained(spec.builder + "*")


@pytest.mark.parametrize("alias", sorted(PAPER_ZOO))
def test_paper_alias_builds_offline_with_random_init(alias):
    """Every alias builds without network (on the meta device: no memory, no init cost), with
    the eval preprocessing of its weights."""
    import torch
    from timm.data import resolve_data_config
    from torchvision.models import get_weight

    from rdoq.adapters.timm_imagenet import build_model

    with torch.device("meta"):
        model, info = build_model(alias, random_init=True)
    assert info.weights_source == "random-init:seed=0"
    cfg = resolve_data_config({}, model=model)
    if alias in TV_WEIGHTS:
        tv = get_weight(TV_WEIGHTS[alias]).transforms()
        assert cfg["input_size"] == (3, tv.crop_size[0], tv.crop_size[0])
        assert cfg["crop_pct"] == pytest.approx(tv.crop_size[0] / tv.resize_size[0])
        assert cfg["interpolation"] == tv.interpolation.value
        assert tuple(cfg["mean"]) == tuple(tv.mean) and tuple(cfg["std"]) == tuple(tv.std)
    if alias.startswith("mae_"):
        # MAE's fine-tuning eval: ImageNet mean/std, bicubic resize 256, centre crop 224
        assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
        assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406)


def test_mae_alias_without_checkpoint_names_the_file(monkeypatch, tmp_path):
    from rdoq.adapters.base import InputError
    from rdoq.adapters.timm_imagenet import build_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="--checkpoint mae_finetuned_vit_base.pth"):
        build_model("mae_finetuned_vit_base")


@pytest.mark.parametrize("alias", ["mobilenetv2py", "alexnetpy"])
def test_torchvision_alias_runs_and_its_layers_are_found(alias):
    import torch

    from rdoq.adapters.timm_imagenet import build_model, eval_transform, synthetic_calib
    from rdoq.curves import CurveJob, plan_layers

    model, info = build_model(alias, random_init=True)
    assert info.arch == f"torchvision.{PAPER_ZOO[alias][1]}"
    x = synthetic_calib(2, model).x  # (2, 3, 224, 224)
    assert x.shape == (2, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
    convs = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    weights = plan_layers(
        model, x[:1], CurveJob("weight", 64, nr=4, ndz=1, max_steps=4, step_grid=1)
    )
    acts = plan_layers(
        model, x[:1], CurveJob("act", 64, nr=4, ndz=1, max_steps=4, step_grid=4, act_mode="out")
    )
    assert [p.name for p in weights] == convs and [p.name for p in acts] == convs
    assert eval_transform(model) is not None


def test_checkpoint_of_another_shape_is_an_input_error(tmp_path):
    import torch

    from rdoq.adapters.base import InputError
    from rdoq.adapters.timm_imagenet import build_model

    model, _ = build_model("resnet10t", random_init=True, num_classes=5)
    path = tmp_path / "five_classes.pt"
    torch.save(model.state_dict(), path)
    # Same keys, another classifier width: a mismatch the user must be told about by name.
    with pytest.raises(InputError, match=r"--checkpoint .*five_classes.pt does not fit resnet10t"):
        build_model("resnet10t", checkpoint=path, num_classes=7)
    loaded, info = build_model("resnet10t", checkpoint=path, num_classes=5)
    assert info.weights_source == "checkpoint:five_classes.pt"
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
