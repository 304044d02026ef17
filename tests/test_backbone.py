"""The offline backbone is really pretrained, and a pretrained request never yields random weights."""

import cv2
import pytest
import skimage.data
import torch

from texad.backbones import FeatureExtractor, build_classifier, concat_layers
from texad.errors import TexadError


def test_offline_efficientnet_lite0_weights_classify_chelsea_as_a_cat():
    model = build_classifier("efficientnet_lite0", pretrained=True, weights="package")
    image = cv2.resize(skimage.data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)[None]
    with torch.no_grad():
        top = model(x).argmax(1).item()
    assert 281 <= top <= 285, f"top-1 class {top} is not one of ImageNet's cats"


@pytest.mark.slow
def test_feature_extractor_is_frozen_and_returns_layers_1_to_3():
    fe = FeatureExtractor("efficientnet_lite0", layers=(1, 2, 3), weights="package")
    fe.train()
    assert not fe.model.training
    assert all(not p.requires_grad for p in fe.parameters())
    feats = fe(torch.randn(2, 3, 64, 96))
    assert [f.shape[1] for f in feats] == fe.channels == [24, 40, 112]
    assert [f.shape[-2:] for f in feats] == [(16, 24), (8, 12), (4, 6)]
    cat, grid = concat_layers(feats, fe.grids((64, 96), feats), pool=3)
    assert cat.shape == (2, 176, 16, 24)  # non-square inputs work
    assert grid == fe.grids((64, 96), feats)[0]


def test_pretrained_backbone_without_reachable_weights_is_an_error(monkeypatch):
    import timm

    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        if pretrained:
            raise RuntimeError("no network")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    with pytest.raises(TexadError, match="backbone.checkpoint"):
        FeatureExtractor("resnet18.tv_in1k", weights="timm", pretrained=True)


def test_local_checkpoint_is_loaded(tmp_path):
    source = build_classifier("resnet18", pretrained=False, weights="timm")
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    fe = FeatureExtractor("resnet18", weights="timm", checkpoint=str(tmp_path / "r18.pth"))
    ref = source.state_dict()["layer1.0.conv1.weight"]
    assert torch.equal(fe.model.state_dict()["layer1.0.conv1.weight"], ref)
    with pytest.raises(TexadError, match="does not exist"):
        FeatureExtractor("resnet18", weights="timm", checkpoint=str(tmp_path / "missing.pth"))
