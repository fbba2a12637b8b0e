"""Dispatch statistics and their figure (pmoe_fast.dispatch_plot)."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from pmoe_fast import dispatch_plot
from pmoe_fast.model import PMoE
from pmoe_fast.vit import create_model


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(K=3, **kwargs):
    experts = [create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=24, depth=3, num_heads=2,
                            num_classes=0) for _ in range(K)]
    model = PMoE(experts, num_classes=3, num_prompts=2, prompt_layers=2, **kwargs)
    with torch.no_grad():  # sharper dispatch weights than the initialisation's
        for p in model.dispatchers.parameters():
            p.mul_(20.0)
    return model


def data(n=7):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 0, 1, 0, 0])[:n])


def test_overall_means_match_the_weights_of_one_forward():
    model, ds = tiny_model(), data()
    stats = dispatch_plot.collect(model, ds, batch_size=3, device="cpu")
    with torch.no_grad():
        model.eval()(ds.tensors[0])
    expected = torch.stack([w.mean(dim=(0, 1, 2)) for w in model.last_dispatch_weights]).numpy()
    assert stats.weights.shape == (2, 3) and not stats.per_class
    np.testing.assert_allclose(stats.weights, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.weights.sum(-1), 1.0, rtol=1e-6)
    assert stats.counts.tolist() == [7]
    assert stats.path().tolist() == expected.argmax(-1).tolist()


def test_per_class_means_and_a_class_without_images():
    model, ds = tiny_model(), data()
    overall = dispatch_plot.collect(model, ds, batch_size=4, device="cpu")
    per_class = dispatch_plot.collect(model, ds, batch_size=4, per_class=True, device="cpu")
    assert per_class.weights.shape == (3, 2, 3) and per_class.counts.tolist() == [4, 2, 1]
    weighted = (per_class.weights * per_class.counts[:, None, None]).sum(0) / 7
    np.testing.assert_allclose(weighted, overall.weights, rtol=1e-6)
    with torch.no_grad():
        model(ds.tensors[0][[2]])
    only_class_2 = torch.stack([w.mean(dim=(0, 1, 2)) for w in model.last_dispatch_weights]).numpy()
    np.testing.assert_allclose(per_class.weights[2], only_class_2, rtol=1e-5)

    absent = dispatch_plot.collect(model, data(2), per_class=True, device="cpu")  # no image of class 2
    assert np.isnan(absent.weights[2]).all() and absent.path()[2].tolist() == [-1, -1]


@pytest.mark.parametrize("per_class", [False, True], ids=["overall", "per-class"])
def test_save_png(tmp_path, per_class):
    from PIL import Image

    stats = dispatch_plot.collect(tiny_model(), data(), per_class=per_class)
    path = tmp_path / "d.png"
    dispatch_plot.save_png(stats, str(path), title="t", expert_names=["a", "b", "c"], class_names=["x", "y", "z"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300
    with pytest.raises(ValueError, match="2 expert names for 3 experts"):
        dispatch_plot.save_png(stats, str(path), expert_names=["a", "b"])


def test_a_model_without_dispatch_weights_is_refused():
    plain = create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match="exposes no dispatch weights"):
        dispatch_plot.collect(plain, data())
