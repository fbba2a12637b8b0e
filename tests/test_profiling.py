"""pmoe_fast.profiling on the CPU: operators are grouped by their outermost named caller, so the
C++ dispatcher's own matrix products count as the dispatcher's time."""

import pytest
import torch

from pmoe_fast.dispatcher import Dispatcher
from pmoe_fast.profiling import CPU_TIME_SOURCE, group_of, profile_runs


def test_names_pick_the_first_matching_group():
    assert group_of("_dispatch_fwd_kernel") == "dispatcher"
    assert group_of("void pmoe_fast::(anonymous namespace)::dispatch_mlp_fwd_kernel<float>") == "dispatcher"
    assert group_of("nvjet_sm90_tst_64x72_64x12_4x1_v_badd_TNT") == "matmul"
    assert group_of("aten::native_layer_norm") == "layer norm"
    assert group_of("aten::gelu") == "other"


def test_the_cpp_dispatchers_matrix_products_are_its_own_time():
    torch.manual_seed(0)
    K, B, Np, T, D, H = 3, 2, 4, 40, 64, 16
    disp = Dispatcher(D, K, hidden=H, backend="cpp")
    prompts = torch.randn(K, Np, D, requires_grad=True)
    tokens = torch.randn(K, B, T, D, requires_grad=True)
    prompt_out = torch.randn(K, B, Np, D, requires_grad=True)
    grad = torch.randn(K, B, Np, D)
    w = torch.randn(256, 256)

    def dispatch_only():
        ipt, _ = disp(prompts, tokens, prompt_out, 0)
        ipt.backward(grad)

    def dispatch_and_matmul():
        dispatch_only()
        torch.mm(w, w)

    prof = profile_runs(dispatch_only, runs=2, device=torch.device("cpu"), warmup=1)
    groups = prof.groups()
    assert prof.source == CPU_TIME_SOURCE and prof.wall_s > 0
    # Inside pmoe_fast::dispatch_mlp(_backward) the op calls aten::mm; those are the dispatcher's.
    assert any(e.group == "dispatcher" and e.name == "aten::mm" for e in prof.events)
    assert "matmul" not in groups, groups
    assert groups["dispatcher"] > 0.5 * prof.total_us, groups
    assert prof.group_us("dispatcher") == groups["dispatcher"]

    mixed = profile_runs(dispatch_and_matmul, runs=1, device=torch.device("cpu"), warmup=0)
    assert [e.calls for e in mixed.events if e.group == "matmul" and e.name == "aten::mm"] == [1]


def test_runs_must_be_positive():
    with pytest.raises(ValueError, match="runs must be at least 1, got 0"):
        profile_runs(lambda: None, runs=0, device=torch.device("cpu"))
