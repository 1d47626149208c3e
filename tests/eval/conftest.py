"""Fixtures of the eval tests: the synthetic VOC-layout dataset (the one the reference's loader was run on to
record tests/data/eval/), and the `fssam eval` parser without the top-level CLI's wiring."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data" / "eval"


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory) -> Path:
    """fssam_deploy.eval.synthetic.make_voc_dataset(seed=0, n_images=48): read-only for the tests."""
    from fssam_deploy.eval.synthetic import make_voc_dataset

    return make_voc_dataset(tmp_path_factory.mktemp("voc") / "VOC2012", n_images=48, seed=0)


@pytest.fixture(scope="session")
def reference_runs() -> dict:
    return json.loads((DATA / "reference_episodes.json").read_text())["runs"]


def eval_parser() -> argparse.ArgumentParser:
    """`fssam eval` as the top-level CLI wires it (add_eval_parser with its model flags)."""
    from fssam_deploy.cli import add_model_flags, config_from_args
    from fssam_deploy.eval.cli import add_eval_parser

    p = argparse.ArgumentParser(prog="fssam")
    add_eval_parser(p.add_subparsers(dest="command", required=True), add_model_flags, config_from_args)
    return p


def eval_main(argv: list[str]) -> int:
    """What `fssam eval ...` returns (typed errors become `error: ...` and 1, as in fssam_deploy.cli.main)."""
    import sys

    from fssam_deploy.errors import FSSAMError

    args = eval_parser().parse_args(["eval", *argv])
    try:
        return args.func(args)
    except FSSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
