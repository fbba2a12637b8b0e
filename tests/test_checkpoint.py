"""Tuned checkpoints (pmoe_fast.checkpoint): contents, atomic writes, expert identity checks."""

import os
import random

import numpy as np
import pytest
import torch

from pmoe_fast import checkpoint as ckpt_io
from pmoe_fast.model import PMoE
from pmoe_fast.vit import create_model


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_expert(seed: int, **kwargs):
    torch.manual_seed(seed)
    args = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=0)
    return create_model("vit_tiny_patch16_224", **{**args, **kwargs})


def tiny_model(seeds=(1, 2), **kwargs):
    return PMoE([tiny_expert(s) for s in seeds], num_classes=3, num_prompts=2, **kwargs)


def trained_optimizer(model):
    named = ckpt_io.trainable_named_parameters(model)
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-3)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    return opt, [n for n, _ in named]


def test_holds_only_trainable_parameters_and_the_run(tmp_path):
    model = tiny_model()
    opt, names = trained_optimizer(model)
    path = tmp_path / "c.safetensors"
    ckpt_io.save(path, model, optimizer=opt, config={"prompts": 2}, state={"epoch": 3}, rng=True)
    saved = ckpt_io.load(path)
    assert sorted(saved.params) == sorted(names)
    assert not any(n.startswith("experts.") for n in saved.params)
    assert "prompts" in saved.params and "head.weight" in saved.params
    for n, p in model.named_parameters():
        if n in saved.params:
            assert torch.equal(saved.params[n], p.detach())
    assert sorted(saved.optimizer["prompts"]) == ["exp_avg", "exp_avg_sq", "step"]
    assert saved.config == {"prompts": 2} and saved.state["epoch"] == 3
    assert [e["sha256"] for e in saved.experts] == [ckpt_io.fingerprint(m) for m in model.experts]

    fresh = tiny_model(seeds=(1, 2))
    fresh_opt = torch.optim.AdamW([p for _, p in ckpt_io.trainable_named_parameters(fresh)], lr=5.0)
    ckpt_io.load_into(fresh, saved)
    ckpt_io.load_optimizer_state(fresh_opt, names, saved)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(fresh(x), model(x))
    for a, b in zip(fresh_opt.state.values(), opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert fresh_opt.param_groups[0]["lr"] == 1e-3


def test_rng_states_round_trip(tmp_path):
    model = tiny_model()
    torch.manual_seed(5), np.random.seed(6), random.seed(7)
    ckpt_io.save(tmp_path / "c.safetensors", model, rng=True)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt_io.restore_rng(ckpt_io.load(tmp_path / "c.safetensors").rng)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_crash_mid_write_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    model = tiny_model()
    path = tmp_path / "last.safetensors"
    ckpt_io.save(path, model, state={"epoch": 1})
    before = path.read_bytes()
    with torch.no_grad():
        model.prompts.add_(1.0)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save(path, model, state={"epoch": 2})
    assert path.read_bytes() == before
    assert ckpt_io.load(path).state["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.safetensors"]  # no temporary file left behind


def test_other_experts_are_named_with_what_differs(tmp_path):
    model = tiny_model(seeds=(1, 2))
    ckpt_io.save(tmp_path / "c.safetensors", model)
    saved = ckpt_io.load(tmp_path / "c.safetensors")

    other_weights = tiny_model(seeds=(1, 3))
    with pytest.raises(ckpt_io.ExpertMismatchError, match=r"expert 1: the frozen weights differ") as e:
        ckpt_io.load_into(other_weights, saved)
    assert "expert 0" not in str(e.value)

    finer = PMoE([tiny_expert(1), tiny_expert(2, patch_size=4)], num_classes=3, num_prompts=2)
    with pytest.raises(ckpt_io.ExpertMismatchError, match=r"expert 1: shape differs .*patch_size 8 vs 4"):
        ckpt_io.load_into(finer, saved)

    fewer = PMoE([tiny_expert(1)], num_classes=3, num_prompts=2)
    with pytest.raises(ckpt_io.ExpertMismatchError, match="the checkpoint has 2 experts, the model 1"):
        ckpt_io.load_into(fewer, saved)


def test_parameters_that_do_not_fit_are_listed(tmp_path):
    model = tiny_model()
    ckpt_io.save(tmp_path / "c.safetensors", model)
    saved = ckpt_io.load(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"prompts: \(2, 2, 2, 24\) in the checkpoint, \(2, 2, 3, 24\) here"):
        ckpt_io.load_into(PMoE([tiny_expert(1), tiny_expert(2)], num_classes=3, num_prompts=3), saved)
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        ckpt_io.load_into(tiny_model(dispatcher="moe"), saved)


def test_other_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(tiny_expert(1).state_dict(), tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="not a pmoe_fast tuned checkpoint"):
        ckpt_io.load(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ckpt_io.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        ckpt_io.load(tmp_path / "absent.safetensors")
