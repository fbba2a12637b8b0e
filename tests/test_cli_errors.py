"""A user's mistakes with pmoe-fast train, eval and plot-dispatch end in one line naming the option."""

import json
import os
import re

import pytest
import torch

from pmoe_fast.cli import main

EXPERT_ARGS = dict(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def train_args(output, *extra):
    """A tiny run on the demo digits: two random vit_tiny experts of one block."""
    return ["train", "--data", "demo", "--expert", "vit_tiny_patch16_224", "--expert", "vit_tiny_patch16_224",
            "--expert-args", json.dumps(EXPERT_ARGS), "--prompts", "2", "--epochs", "1", "--no-progress",
            "--output", str(output), *extra]


def assert_one_line_error(argv, match):
    with pytest.raises(SystemExit, match=match) as e:
        main(argv)
    message = str(e.value)
    assert message.startswith(f"pmoe-fast {argv[0]}: ") and "\n" not in message


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    main(train_args(output))
    return output / "best.safetensors"


def with_config(source, path, **changes):
    """A copy of checkpoint ``source`` at ``path`` whose recorded configuration has ``changes``,
    without a checksum (as files written before checkpoints carried one): an edited checkpoint
    with its old checksum is refused as damaged."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(source, framework="pt") as f:
        metadata = f.metadata()
    del metadata["sha256"]
    config = {**json.loads(metadata["config"]), **changes}
    save_file(load_file(source), path, metadata={**metadata, "config": json.dumps(config)})
    return path


def command_args(command, checkpoint, tmp_path, *extra):
    output = ["--output", str(tmp_path / "dispatch.png")] if command == "plot-dispatch" else []
    return [command, "--checkpoint", str(checkpoint), *output, *extra]


DEVICES = [
    pytest.param("gpu", r"--device gpu is not a torch device; use --device cpu, cuda or cuda:N", id="not a device"),
    pytest.param("cuda", r"--device cuda: no CUDA device is visible here \(torch\.cuda\.is_available\(\) is False\); "
                         r"use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device"),
                 id="cuda without a GPU"),
    pytest.param("cuda:99", r"--device cuda:99: (no CUDA device is visible here|this machine shows \d+ CUDA device)",
                 id="a GPU past the last"),
    pytest.param("meta", r"--device meta holds shapes, not values", id="meta"),
]


@pytest.mark.parametrize("device, message", DEVICES)
@pytest.mark.parametrize("command", ["train", "eval", "plot-dispatch"])
def test_a_device_torch_cannot_use(tmp_path, checkpoint, command, device, message):
    if command == "train":
        argv = train_args(tmp_path / "out", "--device", device)
    else:
        argv = command_args(command, checkpoint, tmp_path, "--device", device)
    assert_one_line_error(argv, message)


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "-3"], "--batch-size must be >= 1, got -3"),
    (["--expert", "vit:", "--expert", "vit_tiny_patch16_224"], r"--expert: expert 'vit:' must be NAME or NAME:PATH"),
], ids=["zero batch", "negative batch", "bad expert"])
@pytest.mark.parametrize("command", ["eval", "plot-dispatch"])
def test_eval_and_plot_option_mistakes(tmp_path, checkpoint, command, extra, message):
    assert_one_line_error(command_args(command, checkpoint, tmp_path, *extra), message)


@pytest.mark.parametrize("expert_args, message", [
    ({**EXPERT_ARGS, "img_sise": 16}, "unexpected keyword argument 'img_sise'"),
    ({**EXPERT_ARGS, "depth": "two"}, "received an invalid combination of arguments"),
], ids=["unknown key", "wrong type"])
@pytest.mark.parametrize("command", ["eval", "plot-dispatch"])
def test_a_checkpoint_whose_experts_cannot_be_built(tmp_path, checkpoint, command, expert_args, message):
    broken = with_config(checkpoint, tmp_path / "broken.safetensors", expert_args=expert_args)
    assert_one_line_error(command_args(command, broken, tmp_path),
                          f"{broken} records arguments that its experts' or pmoe_fast.PMoE's constructor refuses.*"
                          + message)


@pytest.mark.parametrize("output, message", [
    ("absent/dispatch.png", r"--output .*absent/dispatch\.png: the folder .*absent does not exist"),
    ("dispatch.pngg", r"--output .*dispatch\.pngg: name a file ending in \.png \(or another format matplotlib "
                      r"writes: .*svg"),
    ("dispatch", r"--output .*dispatch: name a file ending in \.png"),
], ids=["missing folder", "unknown format", "no extension"])
def test_plot_dispatch_output_mistakes(tmp_path, checkpoint, output, message):
    assert_one_line_error(["plot-dispatch", "--checkpoint", str(checkpoint), "--output", str(tmp_path / output)],
                          message)


@pytest.mark.parametrize("pmoe_args, message", [
    ({"gate_layers": "x"}, "gate_layers must be an int, got 'x'"),
    ({"gate_layers": -1}, r"gate_layers must be in \[0, depth-1=0\], got -1"),
    ({"gate_init": "five"}, "gate_init must be a finite number, got 'five'"),
    ({"dispatch_pool": 3}, "unknown dispatch pool 3"),
    ({"separate_mlps": "no"}, "separate_mlps must be True or False, got 'no'"),
], ids=["wrong type", "negative", "not a number", "unknown value", "string flag"])
def test_train_pmoe_args_the_constructor_refuses(tmp_path, pmoe_args, message):
    given = json.dumps(pmoe_args)
    assert_one_line_error(train_args(tmp_path / "out", "--base", "gapt", "--pmoe-args", given),
                          rf"pmoe_fast\.PMoE refuses its arguments \(--pmoe-args gives {re.escape(given)}; "
                          rf"help\(pmoe_fast\.PMoE\) documents them\): {message}")


@pytest.mark.parametrize("output, extra, message", [
    ("out", ["--expert", "vit:"], r"--expert: expert 'vit:' must be NAME or NAME:PATH"),
    ("a_file/run", [], r"--output: cannot write into .*a_file/run: Not a directory"),
], ids=["bad expert", "output under a file"])
def test_train_expert_and_output_mistakes(tmp_path, output, extra, message):
    (tmp_path / "a_file").write_text("")
    assert_one_line_error(train_args(tmp_path / output, *extra), message)


@pytest.mark.parametrize("command", ["train", "plot-dispatch", "bench", "demo"])
def test_an_output_folder_that_cannot_be_written_is_named_before_the_work(tmp_path, checkpoint, command, monkeypatch):
    """A read-only --output was found when the first file was written: after training, the
    benchmarks or the demo's pre-training. (The tests may run as root, whom file modes do not
    stop: the probe's open is refused instead.)"""
    real_open = os.open

    def refuse_probes(path, *args, **kwargs):
        if ".pmoe_fast_probe." in os.fspath(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_probes)
    out = tmp_path / "out"
    argv = {
        "train": train_args(out),
        "plot-dispatch": ["plot-dispatch", "--checkpoint", str(checkpoint), "--output", str(out / "d.png")],
        "bench": ["bench", "--output", str(out)],
        "demo": ["demo", "--output", str(out)],
    }[command]
    if command == "plot-dispatch":
        out.mkdir()
    assert_one_line_error(argv, rf"--output.*: cannot write into {re.escape(str(out))}: Permission denied$")


@pytest.mark.parametrize("extra, message", [
    (["--memory-budget", "lots"], r"--memory-budget: "),
    (["--memory-budget", "8GiB", "--pmoe-args", '{"dispatch_pool": 3}'],
     r"pmoe_fast\.PMoE refuses its arguments \(--pmoe-args gives \{\"dispatch_pool\": 3\}; .*unknown dispatch pool 3"),
], ids=["unreadable budget", "pmoe-args the planner's model refuses"])
def test_train_memory_budget_names_the_option_at_fault(tmp_path, extra, message):
    """The memory planner builds the model to size it: a constructor's refusal names --pmoe-args,
    not --memory-budget, which only an unreadable budget is blamed for."""
    assert_one_line_error(train_args(tmp_path / "out", *extra), message)


@pytest.mark.parametrize("text, message", [
    ("prompts: ten", r"prompts must be an integer, got 'ten'"),
    ("lr: fast\npretrained: 'no'", r"lr must be a number, got 'fast'; pretrained must be true or false, got 'no'"),
    ("epochs: 2.5", r"epochs must be an integer, got 2\.5"),
    ("batch_size: true", r"batch_size must be an integer, got True"),
], ids=["string count", "string rate and flag", "float count", "bool count"])
def test_train_config_file_values_of_the_wrong_type(tmp_path, text, message):
    """A --config file's value must have its option's type; the line names the file and the key."""
    config = tmp_path / "run.yaml"
    config.write_text(text + "\n")
    assert_one_line_error(train_args(tmp_path / "out", "--config", str(config)), rf"{re.escape(str(config))}: {message}")


def test_train_config_file_reads_an_exponent_without_a_dot_as_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads ``lr: 1e-3`` as the string '1e-3'; JSON and YAML 1.2 read a number,
    and so does the config file, for options that take one. Elsewhere the string stays a string."""
    from pmoe_fast.train import read_config_file

    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-3\nweight_decay: 5E+0\n")
    assert read_config_file(str(config)) == {"lr": 1e-3, "weight_decay": 5.0}
    config.write_text("prompts: 1e1\n")
    assert_one_line_error(train_args(tmp_path / "out", "--config", str(config)), r"prompts must be an integer, got '1e1'")
