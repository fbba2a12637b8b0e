"""The ``pmoe-fast`` command (also ``python -m pmoe_fast``).

Each command lives in its own module, which gives ``add_arguments(parser)`` and ``run(args)``;
its docstring's first line is the command's help.
"""

from __future__ import annotations

import argparse
import importlib
import platform

import torch

# command -> module in pmoe_fast
COMMANDS = {"demo": "demo", "train": "train", "eval": "evaluate", "plot-dispatch": "dispatch_plot", "bench": "bench", "plan": "plan"}


def info(args: argparse.Namespace) -> None:
    """Versions, devices, and which kernel paths this install can run."""
    from . import __version__
    from ._ext import extension_status
    from .kernels import has_triton

    ext = extension_status()
    print(f"pmoe_fast {__version__}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"C++ extension: {'loaded' if ext['loaded'] else 'missing (' + str(ext['error']) + ')'}"
          f"{', CUDA part compiled' if ext['cuda'] else ', no CUDA part'}")
    print(f"Triton: {'available' if has_triton() else 'missing'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pmoe-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, module_name in COMMANDS.items():
        module = importlib.import_module(f".{module_name}", __package__)
        summary = module.__doc__.strip().splitlines()[0]
        p = sub.add_parser(command, help=summary, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    sub.add_parser("info", help="versions and available kernel paths").set_defaults(func=info)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
