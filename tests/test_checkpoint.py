"""Tuned checkpoints (pmoe_fast.checkpoint): contents, atomic writes, expert identity checks."""

import json
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


def test_checkpoints_take_the_mode_open_gives_and_a_folder_is_named(tmp_path):
    """Written through a temporary file, a checkpoint still gets 0666 less the umask (not 0600);
    a folder given for a checkpoint is named as such."""
    umask = os.umask(0o022)
    try:
        ckpt_io.save(tmp_path / "c.safetensors", tiny_model())
    finally:
        os.umask(umask)
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o644
    with pytest.raises(FileNotFoundError, match=r"is a folder; give a checkpoint file in it, such as .*last.safetensors"):
        ckpt_io.load(tmp_path)


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


def test_a_damaged_checkpoint_is_refused(tmp_path):
    """One flipped bit in a tensor, or a changed digit in the metadata, loaded silently as other
    prompts or another run position; a file without a checksum (written before it was added)
    still loads."""
    import struct

    from safetensors.torch import save_file

    path = tmp_path / "c.safetensors"
    ckpt_io.save(path, tiny_model(), state={"epoch": 3})
    data = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    tensor_bit = bytearray(data)
    tensor_bit[-5] ^= 1
    metadata_digit = data.replace(b'\\"epoch\\": 3', b'\\"epoch\\": 4')
    assert metadata_digit != data and metadata_digit.index(b"epoch") < header_end
    for damaged in (bytes(tensor_bit), metadata_digit):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match="is damaged: its contents no longer match the checksum"):
            ckpt_io.load(path)
    path.write_bytes(data)
    saved = ckpt_io.load(path)
    metadata = {"format": ckpt_io.FORMAT, "state": json.dumps(saved.state), "experts": json.dumps(saved.experts)}
    save_file(saved.params, tmp_path / "old.safetensors", metadata=metadata)
    assert ckpt_io.load(tmp_path / "old.safetensors").state == {"epoch": 3}


def adamw_steps(model, groups, steps=2):
    """AdamW over ``groups`` (lists of trainable parameter names, one lr each) after ``steps`` steps."""
    named = dict(ckpt_io.trainable_named_parameters(model))
    opt = torch.optim.AdamW([{"params": [named[n] for n in g], "lr": 1e-3 * (i + 1)} for i, g in enumerate(groups)])
    for _ in range(steps):
        step(model, opt)
    return opt


def step(model, opt):
    opt.zero_grad()
    model(torch.ones(2, 3, 16, 16)).square().sum().backward()
    opt.step()


@pytest.mark.parametrize("layout", ["subset", "all, regrouped"])
def test_optimizer_state_is_saved_by_parameter_identity(tmp_path, layout):
    """An optimizer over some trainable parameters, or over all of them in other groups and order,
    is saved under its parameters' names; an optimizer built in yet another order of groups and
    parameters takes it back bit-exactly and continues as the saved one does."""
    model = tiny_model()
    head = ["head.bias", "head.weight"]
    rest = [n for n, _ in reversed(ckpt_io.trainable_named_parameters(model)) if n not in head]
    groups = [head] if layout == "subset" else [head, rest]
    opt = adamw_steps(model, groups)
    ckpt_io.save(tmp_path / "c.safetensors", model, optimizer=opt)
    saved = ckpt_io.load(tmp_path / "c.safetensors")
    named = dict(ckpt_io.trainable_named_parameters(model))
    assert sorted(saved.optimizer) == sorted(n for g in groups for n in g)
    for n in saved.optimizer:
        assert all(torch.equal(saved.optimizer[n][k], opt.state[named[n]][k]) for k in opt.state[named[n]])

    fresh = tiny_model()
    ckpt_io.load_into(fresh, saved)
    fresh_named = dict(ckpt_io.trainable_named_parameters(fresh))
    regrouped = [list(reversed(g)) for g in reversed(groups)]
    fresh_opt = torch.optim.AdamW([{"params": [fresh_named[n] for n in g], "lr": 5.0} for g in regrouped])
    ckpt_io.load_optimizer_state(fresh_opt, [n for g in regrouped for n in g], saved)
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in reversed(opt.param_groups)]
    for n in saved.optimizer:
        assert all(torch.equal(fresh_opt.state[fresh_named[n]][k], opt.state[named[n]][k]) for k in opt.state[named[n]])
    step(model, opt)
    step(fresh, fresh_opt)
    assert all(torch.equal(fresh_named[n], p) for n, p in named.items())


def test_optimizer_over_other_parameters_is_refused(tmp_path):
    model = tiny_model()
    frozen = model.experts[0].blocks[0].attn.qkv.weight
    with pytest.raises(ValueError, match=r"group 0 holds, at position 1, the model's parameter 'experts\.0\.blocks\.0\."
                                         r"attn\.qkv\.weight', which is not one of the model's trainable parameters"):
        ckpt_io.save(tmp_path / "c.safetensors", model, optimizer=torch.optim.AdamW([model.head.weight, frozen]))
    with pytest.raises(ValueError, match=r"group 0 holds, at position 0, a tensor of shape \(3,\) that is not the model's"):
        ckpt_io.save(tmp_path / "c.safetensors", model, optimizer=torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("saved_dtype, loaded_dtype",
                         [(None, torch.bfloat16), (torch.bfloat16, None), (None, torch.float64)])
def test_the_same_experts_in_another_dtype_match(tmp_path, saved_dtype, loaded_dtype):
    """A checkpoint loads into a model of the same expert weights converted to another dtype
    (PMoE's expert_dtype, or .double()); other weights in that dtype still differ."""
    def model_in(dtype, seeds=(1, 2)):
        if dtype == torch.float64:
            return tiny_model(seeds).double()
        return tiny_model(seeds, expert_dtype=dtype)

    model = model_in(saved_dtype)
    with torch.no_grad():
        model.prompts.add_(1.0)
    ckpt_io.save(tmp_path / "c.safetensors", model)
    saved = ckpt_io.load(tmp_path / "c.safetensors")
    converted = model_in(loaded_dtype)
    ckpt_io.load_into(converted, saved)
    assert torch.equal(converted.prompts.float(), model.prompts.float())
    with pytest.raises(ckpt_io.ExpertMismatchError, match="expert 1: the frozen weights differ, sha256_bf16") as e:
        ckpt_io.load_into(model_in(loaded_dtype, seeds=(1, 3)), saved)
    assert "expert 0" not in str(e.value)


def test_recorded_identities_follow_the_weights_the_experts_hold(tmp_path):
    """A builder's record (name, weight file, fingerprints) names the experts until their weights
    change: moved or converted it stays, loaded with other weights it gets their fingerprints and
    loses the file. A stale record once named the old weights, so the model that really held them
    was refused and one with the old weights accepted."""
    model = tiny_model()
    specs = [{"name": "vit_tiny_patch16_224", "weights": f"expert{k}.pt", "kwargs": {}} for k in range(2)]
    ckpt_io.record_expert_identities(model, ckpt_io.expert_identities(list(model.experts), specs))
    model.double()
    assert [r["weights"] for r in ckpt_io.model_expert_identities(model)] == ["expert0.pt", "expert1.pt"]
    other = tiny_model(seeds=(3, 4)).double()
    model.experts[1].load_state_dict(other.experts[1].state_dict())
    ckpt_io.save(tmp_path / "c.safetensors", model)
    saved = ckpt_io.load(tmp_path / "c.safetensors")
    assert [r["weights"] for r in saved.experts] == ["expert0.pt", None]
    assert saved.experts[1]["name"] == "vit_tiny_patch16_224"
    ckpt_io.load_into(tiny_model(seeds=(1, 4)), saved)
    with pytest.raises(ckpt_io.ExpertMismatchError, match="expert 1: the frozen weights differ"):
        ckpt_io.load_into(tiny_model(), saved)


def test_recorded_identities_follow_new_data():
    """``vector_to_parameters`` gives the parameters new data (``.data = ...``): same tensors, same
    version counters. The record kept naming the old weights' file."""
    model = tiny_model()
    specs = [{"name": "vit_tiny_patch16_224", "weights": f"expert{k}.pt", "kwargs": {}} for k in range(2)]
    ckpt_io.record_expert_identities(model, ckpt_io.expert_identities(list(model.experts), specs))
    other = tiny_model(seeds=(3, 4))
    params = list(model.experts[1].parameters())
    torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(other.experts[1].parameters()), params)
    identities = ckpt_io.model_expert_identities(model)
    assert [r["weights"] for r in identities] == ["expert0.pt", None]
    assert identities[1] == ckpt_io.expert_identities([other.experts[1]], [{"name": "vit_tiny_patch16_224"}])[0]


def test_settings_without_parameters_must_match(tmp_path):
    """top_k and the dispatch pool own no parameter: a checkpoint's names and shapes fit a model
    built with others, which computes another function. Refused, listing what differs."""
    ckpt_io.save(tmp_path / "c.safetensors", tiny_model(dispatcher="moe", num_dispatch_experts=3))
    saved = ckpt_io.load(tmp_path / "c.safetensors")
    assert saved.settings == {"dispatch_pool": "all", "top_k": 1}
    ckpt_io.load_into(tiny_model(dispatcher="moe", num_dispatch_experts=3), saved)
    other = tiny_model(dispatcher="moe", num_dispatch_experts=3, top_k=2, dispatch_pool="patches")
    with pytest.raises(ValueError, match=r"other settings, which own no parameter: dispatch_pool 'all' in the "
                                         r"checkpoint, 'patches' here; top_k 1 in the checkpoint, 2 here"):
        ckpt_io.load_into(other, saved)


def test_records_with_only_the_exact_fingerprint_compare_it(tmp_path):
    """A checkpoint whose expert records hold only ``sha256`` (the weights as held) loads into the
    same experts in the same dtype; in another dtype the error says how to proceed."""
    model = tiny_model()
    exact_only = [{k: v for k, v in e.items() if k != "sha256_bf16"} for e in ckpt_io.model_expert_identities(model)]
    ckpt_io.save(tmp_path / "c.safetensors", model, experts=exact_only)
    saved = ckpt_io.load(tmp_path / "c.safetensors")
    ckpt_io.load_into(tiny_model(), saved)
    with pytest.raises(ckpt_io.ExpertMismatchError, match=r"expert 0: the frozen weights differ, sha256 .* load the "
                                                          r"checkpoint into the experts in the dtype it was saved from"):
        ckpt_io.load_into(tiny_model(expert_dtype=torch.bfloat16), saved)


def fingerprinted_module():
    """A small module with fixed float32 weights and buffers: an int64 vector, a bool vector and
    a 0-dim float32 scalar."""
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.copy_(torch.arange(6.0).view(2, 3) / 7 - 0.3)
        m.bias.copy_(torch.tensor([1e-3, -2.5e4]))
    m.register_buffer("steps", torch.tensor([3, -1, 7]))
    m.register_buffer("mask", torch.tensor([True, False]))
    m.register_buffer("scale", torch.tensor(1 / 3))
    return m


def test_fingerprints_keep_the_recorded_digests_in_one_pass(monkeypatch):
    """Both digests come from one walk over the state_dict and equal what checkpoints recorded
    before: ``fingerprint(m)`` and ``fingerprint(m, torch.bfloat16)``, written out here (computed by
    the two-pass code), so that old checkpoints still match."""
    m = fingerprinted_module()
    walks = []
    state_dict = m.state_dict
    monkeypatch.setattr(m, "state_dict", lambda *a, **k: walks.append(1) or state_dict(*a, **k))
    exact, bf16 = ckpt_io.fingerprints(m)
    assert len(walks) == 1
    assert exact == "b513ee3ee5e28924145eb8eabec20de2c0cbe4753bacb4ec9ddebef30ca72e50"
    assert bf16 == "d2e19e607add16bf58376a718069aaf17479435165c5ed15db3ab944ec8247f4"
    assert (exact, bf16) == (ckpt_io.fingerprint(m), ckpt_io.fingerprint(m, torch.bfloat16))
    doubled = fingerprinted_module().double()
    assert ckpt_io.fingerprints(doubled) == (ckpt_io.fingerprint(doubled), bf16)
