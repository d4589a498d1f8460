"""EMA weights (configs/callbacks/ema.yaml): validation and checkpoints use the average, and a
killed run resumed from last.ckpt ends with the uninterrupted run's average."""

from __future__ import annotations

import signal

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from tests.conftest import CONFIGS, run_cli
from tests.test_resume import RUN, STEPS, callback, fit_subprocess

EMA = ["--config", str(CONFIGS / "callbacks" / "ema.yaml"),
       "--trainer.callbacks.init_args.decay=0.9"]  # fmt: skip


def _average(cli) -> tuple[dict[str, torch.Tensor], int]:
    ema = next(c for c in cli.trainer.callbacks if isinstance(c, EMAWeightAveraging))
    model = ema._average_model
    return {k: v.clone() for k, v in model.module.state_dict().items()}, int(model.n_averaged)


def test_killed_run_resumes_the_average_exactly(in_tmp):
    reference = run_cli("fit", *RUN, *EMA, "--trainer.logger.init_args.save_dir=ref")
    want, want_n = _average(reference)
    assert want_n == STEPS  # one update per optimizer step
    raw = reference.model.state_dict()
    # At the end the model holds the average (what the last checkpoint and test use) ...
    assert all(torch.equal(raw[k], want[k]) for k in want)
    saved = torch.load(next((in_tmp / "ref").rglob("last.ckpt")), weights_only=True)
    assert all(torch.equal(saved["state_dict"][k], want[k]) for k in want)
    # ... and during training the average differs from the raw weights it follows.
    assert any(not torch.equal(saved["current_model_state"][k], want[k]) for k in want)

    killed = fit_subprocess(*RUN, *EMA, callback("KillAt", step=7), cwd=in_tmp)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_cli("fit", *RUN, *EMA, "--ckpt_path=last")
    got, got_n = _average(resumed)
    assert resumed.trainer.global_step == STEPS and got_n == want_n
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
