"""Resume after a crash: a ``fit`` process SIGKILLed mid-epoch and resumed with ``--ckpt_path last`` gives
the uninterrupted run's scores and bit-identical weights."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from deeplab_lit.cli import main

REPO = Path(__file__).parents[2]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
STEPS_PER_EPOCH = 4  # num_train=8, batch_size=2


@pytest.fixture(autouse=True)
def restore_determinism_flag():
    """``Trainer(deterministic=True)`` turns torch's global flag on: give it back to other tests."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


class KillAtStep(Callback):
    """SIGKILL the own process after optimizer step ``step`` (no clean-up, no finally blocks run)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_step == self.step:
            print(f"KillAtStep: SIGKILL after step {trainer.global_step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def fit_args(root: Path, data: Path, epochs: int = 3) -> list[str]:
    """The real quickstart config (its callbacks and plugins included), shrunk to seconds on a CPU."""
    return ["fit", "--config", str(QUICKSTART), "--trainer.accelerator=cpu", f"--trainer.max_epochs={epochs}",
            "--trainer.deterministic=true", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}",
            "--model.init_args.backbone=resnet18", f"--data.init_args.root={data}",
            "--data.init_args.num_train=8", "--data.init_args.num_val=4", "--data.init_args.image_size=32",
            "--data.init_args.crop_size=24",
            "--data.init_args.batch_size=2", "--data.init_args.val_batch_size=2",
            "--data.init_args.num_workers=0"]  # fmt: skip


def run_cli_subprocess(args: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run ``python -m deeplab_lit`` in its own session; return its exit code and output.

    After the main process ends, whatever it forked and left behind (a SIGKILL skips every clean-up, so
    e.g. a CRF process pool survives it) is killed through the session's process group.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}  # fmt: skip
    log = tmp_path / "subprocess.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "deeplab_lit", *args], cwd=tmp_path, env=env, stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip
        try:
            code = process.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return code, log.read_text()


def val_scores(cli) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}


@pytest.mark.parametrize(
    "length",
    [[], ["--trainer.max_epochs=-1", f"--trainer.max_steps={3 * STEPS_PER_EPOCH}"]],
    ids=["max_epochs", "max_steps"],
)
def test_sigkilled_run_resumes_from_last_to_the_uninterrupted_result(length, tmp_path):
    data = tmp_path / "data"
    reference = main([*fit_args(tmp_path / "reference", data), *length])
    assert reference.trainer.global_step == 3 * STEPS_PER_EPOCH

    crashed = tmp_path / "crashed"
    kill_step = 2 * STEPS_PER_EPOCH + 1  # mid-epoch 2; last.ckpt is the end of epoch 1
    code, output = run_cli_subprocess(
        [*fit_args(crashed, data), *length, f"--trainer.callbacks+={__name__}.KillAtStep",
         f"--trainer.callbacks.step={kill_step}"], tmp_path,
    )  # fmt: skip
    assert code == -signal.SIGKILL, output[-3000:]
    last = crashed / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2 * STEPS_PER_EPOCH

    resumed = main([*fit_args(crashed, data), *length, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == reference.trainer.global_step
    expected, got = val_scores(reference), val_scores(resumed)
    assert expected.keys() == got.keys() and "val/mIoU" in got
    assert got == pytest.approx(expected, abs=1e-6)
    resumed_state, reference_state = resumed.model.state_dict(), reference.model.state_dict()
    assert all(torch.equal(resumed_state[k], reference_state[k]) for k in reference_state)  # bit-identical
