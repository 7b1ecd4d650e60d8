"""A user's error on the command line is one short message and a non-zero exit, without a traceback.

Each case runs ``python -m deeplab_lit`` as a user does (a subprocess: the report is made by the console
front door, :func:`deeplab_lit.command.main`); the configs are shrunk so each stops within seconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.test_resume import REPO

QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")
V3PLUS = str(REPO / "experiments" / "v3plus.yaml")
SMALL = ["--trainer.logger=false", "--model.init_args.backbone=resnet18",
         "--model.init_args.pretrained_backbone=false"]  # fmt: skip


def run(args: list[str], cwd: Path, debug: bool = False) -> tuple[int, str]:
    """Run ``python -m deeplab_lit`` in ``cwd``; return its exit status and stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("DEEPLAB_LIT_DEBUG", None)
    if debug:
        env["DEEPLAB_LIT_DEBUG"] = "1"
    done = subprocess.run([sys.executable, "-m", "deeplab_lit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    return done.returncode, done.stderr


def other_version_checkpoint(path: Path) -> Path:
    """A DeepLab v1 run's checkpoint as a run writes it (state dict, hyper-parameters, class path)."""
    from deeplab_lit import DeepLabV1

    module = DeepLabV1(num_classes=6, backbone="resnet18", pretrained_backbone=False)
    hparams = {**dict(module.hparams), "_class_path": "deeplab_lit.DeepLabV1"}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": "2.6.0"}, path)  # fmt: skip
    return path


CASES = {
    "architecture": (["fit", "--config", QUICKSTART, *SMALL, "--model.init_args.output_stride=12"],
                     r"model \(deeplab_lit\..*DeepLabV3Plus\): output_stride=12 is not supported"),
    "training": (["fit", "--config", QUICKSTART, *SMALL, "--model.init_args.lr=-1"], r"lr must be positive"),
    "crf_rnn": (["fit", "--config", QUICKSTART, *SMALL, "--model.init_args.crf_rnn={iterations: 0}"],
                r"iterations must be a positive int, got 0"),
    "data": (["fit", "--config", QUICKSTART, *SMALL, "--data.init_args.batch_size=0"],
             r"data \(deeplab_lit\.data\..*SyntheticDataModule\): batch_size and val_batch_size must be"),
    "data root": (["validate", "--config", V3PLUS, *SMALL, "--data.init_args.root=nowhere"],
                  r"PASCAL VOC 2012 not found under nowhere"),
    "missing ckpt_path": (["validate", "--ckpt_path", "missing.ckpt"],
                          r"'missing.ckpt' \(--ckpt_path\) does not exist"),
    "truncated ckpt_path": (["predict", "--ckpt_path", "truncated.ckpt"],
                            r"--ckpt_path: Checkpoint 'truncated.ckpt' could not be read"),
    "other version as weights": (["fit", "--config", QUICKSTART, *SMALL, "--model.init_args.weights=v1.ckpt"],
                                 r"DeepLabV1"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_users_error_is_one_message_without_traceback(case, tmp_path):
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04 not a whole zip")
    other_version_checkpoint(tmp_path / "v1.ckpt")
    args, message = CASES[case]
    code, stderr = run(args, tmp_path)
    assert code != 0
    assert "Traceback" not in stderr and "Given value" not in stderr, stderr
    assert "arguments are required" not in stderr, stderr  # the checkpoint's own error, not jsonargparse's
    lines = [line for line in stderr.splitlines() if line.strip()]
    error = [line for line in lines if "error:" in line]
    assert len(error) == 1 and re.search(message, error[0]), stderr
    assert not any(line.lstrip().startswith('File "') for line in lines), stderr  # no stack frames
    assert lines[-1] == "(DEEPLAB_LIT_DEBUG=1 shows the full traceback)", stderr
    assert len(lines) - lines.index(error[0]) <= 12, stderr  # the message and the hint


def test_debug_variable_shows_the_traceback(tmp_path):
    args, message = CASES["architecture"]
    code, stderr = run(args, tmp_path, debug=True)
    assert code != 0 and "Traceback" in stderr and "output_stride=12 is not supported" in stderr


def test_a_mistyped_option_gets_the_closest_names(tmp_path):
    code, stderr = run(["fit", "--config", QUICKSTART, "--model.init_args.output_strid=12"], tmp_path)
    assert code == 2
    assert "usage: deeplab-lit" in stderr and "Given value" not in stderr, stderr
    assert "Option 'output_strid' is not accepted (closest valid: output_stride" in stderr, stderr


def test_a_checkpoint_naming_a_foreign_class_imports_nothing(tmp_path):
    """A checkpoint is data: a class path it records outside deeplab_lit is refused, never imported."""
    marker = tmp_path / "ran.txt"
    (tmp_path / "evilmod.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom deeplab_lit import DeepLabV1 as Evil\n"
    )
    checkpoint = {"state_dict": {}, "pytorch-lightning_version": "2.6.0",
                  "hyper_parameters": {"_class_path": "evilmod.Evil", "num_classes": 6}}  # fmt: skip
    torch.save(checkpoint, tmp_path / "best.ckpt")
    for subcommand in ("predict", "export"):
        code, stderr = run([subcommand, "--ckpt_path", "best.ckpt"], tmp_path)
        assert code != 0 and not marker.exists(), stderr
        assert "names the class 'evilmod.Evil' for its model" in stderr, stderr
        assert "--model evilmod.Evil" in stderr, stderr  # how to name it, if it is trusted
