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

from deeplab_lit.callbacks import NonFiniteLossGuard
from deeplab_lit.callbacks.guards import NonFiniteLossError
from deeplab_lit.cli import main
from deeplab_lit.weights.formats import UnsafeCheckpointError

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


def config_without_safeguards(tmp_path: Path) -> Path:
    """The quickstart config without its NaN guard and checkpoint plugin (as a user's own config may be)."""
    lines = QUICKSTART.read_text().splitlines()
    kept = [line for line in lines if "NonFiniteLossGuard" not in line and "AtomicCheckpointIO" not in line]
    text = "\n".join(kept).replace("  plugins:\n", "")
    config = tmp_path / "own.yaml"
    config.write_text(text)
    return config


def own_config_args(root: Path, data: Path, tmp_path: Path) -> list[str]:
    """:func:`fit_args` with :func:`config_without_safeguards` instead of the quickstart config."""
    return ["fit", "--config", str(config_without_safeguards(tmp_path)), *fit_args(root, data)[3:]]


class PoisonWeights(Callback):
    """Fill every weight with NaN after optimizer step ``step``, as a diverging run does."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
        if trainer.global_step == self.step:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.fill_(float("nan"))


def test_the_cli_adds_the_nan_guard_to_a_config_without_it_and_never_twice(tmp_path):
    """Issue 20 case 4: a NaN loss stops the run and no checkpoint holds it, even when the config lacks the
    guard; a config that has one keeps exactly one."""
    data, root = tmp_path / "data", tmp_path / "run"
    args = own_config_args(root, data, tmp_path)
    with pytest.raises(NonFiniteLossError):
        main(
            [
                *args,
                f"--trainer.callbacks+={__name__}.PoisonWeights",
                f"--trainer.callbacks.step={STEPS_PER_EPOCH + 1}",
            ]
        )
    for saved in (root / "checkpoints").glob("*.ckpt"):
        state = torch.load(saved, weights_only=True)["state_dict"]
        assert all(t.isfinite().all() for t in state.values() if t.is_floating_point()), saved
    quickstart = main(fit_args(tmp_path / "q", data)[1:], run=False)  # no subcommand without run
    assert sum(isinstance(c, NonFiniteLossGuard) for c in quickstart.trainer.callbacks) == 1


def test_hpc_checkpoints_are_read_safely_whatever_the_environment(tmp_path, monkeypatch):
    """Issue 20 case 9: ``--ckpt_path hpc`` reads hpc_ckpt_<n>.ckpt through the project's safe reader even
    with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 and a config without the checkpoint plugin."""
    data, root, ran = tmp_path / "data", tmp_path / "run", tmp_path / "the pickle ran"
    root.mkdir()
    torch.save({"state_dict": {}, "payload": RunsOnUnpickling(str(ran))}, root / "hpc_ckpt_1.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    args = own_config_args(root, data, tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="hpc_ckpt_1.ckpt"):
        main([*args, "--ckpt_path", "hpc"])
    assert not ran.exists()


class RunsOnUnpickling:
    """A crafted checkpoint entry: unpickling it creates the folder ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_longer_run_replans_the_poly_schedule_and_a_new_lr_applies(tmp_path, caplog):
    """Issue 20 cases 2 and 3: resuming a finished run with a larger max_steps trains on (the poly schedule
    is re-planned over the new total, not left at learning rate 0), and a learning rate given on resume
    reaches the optimiser and the schedule, not only the saved hyper-parameters; each says so in one line."""
    data, root = tmp_path / "data", tmp_path / "run"
    steps = ["--trainer.max_epochs=-1", f"--trainer.max_steps={STEPS_PER_EPOCH}"]
    first = main([*fit_args(root, data), *steps])
    finished = {k: v.clone() for k, v in first.model.state_dict().items()}
    copy = tmp_path / "finished.ckpt"
    copy.write_bytes((root / "checkpoints" / "last.ckpt").read_bytes())

    longer = main(
        [*fit_args(root, data), *steps, f"--trainer.max_steps={2 * STEPS_PER_EPOCH}", "--ckpt_path", "last"]
    )
    assert longer.trainer.global_step == 2 * STEPS_PER_EPOCH
    assert f"poly schedule over {2 * STEPS_PER_EPOCH} steps (was {STEPS_PER_EPOCH}" in caplog.text
    state = longer.model.state_dict()
    assert any(not torch.equal(state[k], finished[k]) for k in finished)  # it trained: lr was not 0

    caplog.clear()
    other = tmp_path / "other"
    new_lr = main([*fit_args(other, data), *steps, f"--trainer.max_steps={2 * STEPS_PER_EPOCH}",
                   "--model.init_args.lr=0.5", "--ckpt_path", str(copy)])  # fmt: skip
    assert "base learning rate 0.05 -> 0.5" in caplog.text  # quickstart: lr 0.05, head_lr_mult 1
    saved = torch.load(other / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["lr"] == 0.5
    assert saved["lr_schedulers"][0]["base_lrs"] == [0.5, 0.5]
    assert [g["initial_lr"] for g in new_lr.trainer.optimizers[0].param_groups] == [0.5, 0.5]
