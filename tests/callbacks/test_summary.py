"""RunSummary: the end-of-fit summary names the best figures, the files and the next commands."""

from __future__ import annotations

import shlex

import pytest

from deeplab_lit.callbacks import PredictionGallery, RunSummary
from deeplab_lit.cli import main
from tests.integration.test_cli import EXPERIMENTS, small_overrides


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The quickstart config, two tiny epochs with validation, CRF and gallery; the printed summary."""
    tmp_path = tmp_path_factory.mktemp("summary")
    config = EXPERIMENTS / "quickstart.yaml"
    args = [a for a in small_overrides(config, tmp_path) if not a.startswith("--trainer.fast_dev_run")]
    args += ["--trainer.max_epochs=2", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
             "--trainer.check_val_every_n_epoch=1", "--trainer.logger=false"]  # fmt: skip
    capture = pytest.MonkeyPatch()
    printed: list[str] = []
    capture.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    try:
        cli = main(["fit", "--config", str(config), *args])
    finally:
        capture.undo()
    return cli, "\n".join(printed)


def test_the_summary_reports_the_saved_best_score_and_the_crf_figures(fitted):
    cli, text = fitted
    checkpoint = cli.trainer.checkpoint_callback
    assert f"best val/mIoU: {float(checkpoint.best_model_score):.4f}" in text
    crf = float(cli.trainer.callback_metrics["val/mIoU_crf"])  # the CRF ran at the last epoch only
    baseline = float(cli.trainer.callback_metrics["val/mIoU_crf_baseline"])
    assert f"best with the dense CRF: {crf:.4f} (epoch 1; {baseline:.4f} without it" in text


def test_the_summary_names_the_files_and_a_command_that_runs_on_them(fitted):
    cli, text = fitted
    best = cli.trainer.checkpoint_callback.best_model_path
    assert f"best checkpoint: {best}" in text
    gallery = next(c for c in cli.trainer.callbacks if isinstance(c, PredictionGallery))
    assert f"PredictionGallery pictures: {gallery.output_folder}" in text
    assert any(gallery.output_folder.glob("epoch_*.png"))
    assert f"predict --ckpt_path {shlex.quote(best)} --data.init_args.predict_path photos/" in text


def test_a_resumed_run_keeps_the_best_figures_of_the_run_before():
    before = RunSummary()
    before.best = {"val/mIoU": (0.5, 3)}
    after = RunSummary()
    after.load_state_dict(before.state_dict())
    assert after.best == {"val/mIoU": (0.5, 3)}


def test_the_summary_reports_the_trained_crf_with_the_network_alone_at_its_best_epoch():
    from types import SimpleNamespace

    import torch

    summary = RunSummary()
    trainer = SimpleNamespace(sanity_checking=False, checkpoint_callbacks=[], callbacks=[], loggers=[])
    for epoch, (network, trained) in enumerate([(0.40, 0.45), (0.50, 0.48), (0.52, 0.47)]):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {
            "val/mIoU": torch.tensor(network),
            "val/mIoU_crf_rnn": torch.tensor(trained),
        }
        summary.on_validation_end(trainer, None)
    text = summary.render(trainer)
    assert "best val/mIoU: 0.5200 (epoch 2)" in text
    assert "best with the trained CRF (crf_rnn): 0.4800 (epoch 1; the network alone 0.5000)" in text
