"""Training: loss goes down, exact resume (after a SIGKILL too), 2-process DDP = 1 process with Adam and SGD,
divergence stops cleanly, CLI errors."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from mini_autoguide import cli, edm, presets
from mini_autoguide import train as train_mod
from mini_autoguide.checkpoint import load_state

from image_helpers import REORDERED_F32_ULPS, assert_close_up_to_reordering, tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

FAST = dict(precision="fp32", channels_last=False, progress=False, log=lambda *a: None, batch=8,
            lr_ref=0.02, lr_tref=1000, rampup_kimg=0)


def eval_loss(net, ds, seed=123):
    """Plain EDM-weighted denoising loss on fixed noise (no learned variance)."""
    g = torch.Generator().manual_seed(seed)
    y = ds.batch(range(len(ds)))[0].float() / 127.5 - 1
    labels = torch.as_tensor(ds.labels)
    sigma = edm.sample_sigma(len(y), -1.2, 1.2, generator=g)
    x = y + edm.expand(sigma, y) * torch.randn(y.shape, generator=g)
    with torch.no_grad():
        return edm.denoising_loss(net(x, sigma, labels), y, sigma).item()


def test_loss_decreases_on_a_tiny_dataset(tmp_path):
    ds = tiny_dataset()
    result = train_mod.train(ds, str(tmp_path / "run"), "tiny", kimg=0.48, ema=[0.1], **FAST)
    # At init the network outputs F = 0 whatever its weights (gain 0), i.e. D = c_skip x: the baseline.
    untrained = train_mod.Denoiser(result["net"].config).eval()
    before, after = eval_loss(untrained, ds), eval_loss(result["ema"].nets[0], ds)
    assert after < 0.6 * before, (before, after)


def test_bf16_training_runs_and_learns(tmp_path):
    ds = tiny_dataset()
    result = train_mod.train(ds, str(tmp_path / "run"), "tiny", kimg=0.24, ema=[0.1],
                             **{**FAST, "precision": "bf16", "channels_last": True})
    untrained = train_mod.Denoiser(result["net"].config).eval()
    assert eval_loss(result["ema"].nets[0], ds) < 0.85 * eval_loss(untrained, ds)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    ds = tiny_dataset()
    opts = dict(FAST, kimg=0.096, ema=[0.05, 0.1], label_dropout=0.2, xflip=True)  # 12 steps
    full = train_mod.train(ds, str(tmp_path / "a"), "tiny", **opts)
    part = train_mod.train(ds, str(tmp_path / "b"), "tiny", max_steps=5, **opts)
    assert part["steps"] == 5 and load_state(tmp_path / "b" / "state.pt")["step"] == 5
    rest = train_mod.train(ds, str(tmp_path / "b"), "tiny", **opts)  # a fresh call, as after a crash
    assert rest["start_step"] == 5 and rest["steps"] == 12
    for a, b in zip(full["net"].state_dict().values(), rest["net"].state_dict().values()):
        assert torch.equal(a, b)
    for ea, eb in zip(full["ema"].nets, rest["ema"].nets):
        for a, b in zip(ea.parameters(), eb.parameters()):
            assert torch.equal(a, b)
    # snapshots were written for the same images, with the same weights
    snaps = sorted(f for f in os.listdir(tmp_path / "a") if f.startswith("network-0"))
    assert snaps == sorted(f for f in os.listdir(tmp_path / "b") if f.startswith("network-0"))


KILLABLE_RUN = """
import sys
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from image_helpers import tiny_dataset
from mini_autoguide import train
train.train(tiny_dataset(), {out!r}, "tiny", kimg=0.4, checkpoint_kimg=0.08, snapshot_kimg=0.16, ema=[0.05, 0.1],
            label_dropout=0.2, xflip=True, precision="fp32", channels_last=False, progress=False, batch=8,
            lr_ref=0.02, lr_tref=1000, rampup_kimg=0)
"""   # 50 steps, a checkpoint every 10, snapshots every 20


def _killable(out):
    code = KILLABLE_RUN.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(out))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _checkpoints_written(out):
    path = out / "log.jsonl"   # one line a checkpoint, appended after the checkpoint is in place
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow   # three training processes: about 30 s on 2 cores
def test_resume_after_sigkill_between_checkpoints_is_bit_identical(tmp_path):
    full = _killable(tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()
    # The same run, killed once its second checkpoint is written: at a moment that depends on the
    # machine's timing, between checkpoints, and with 30 of its 50 steps still to run.
    run = _killable(tmp_path / "killed")
    while _checkpoints_written(tmp_path / "killed") < 2:
        assert run.poll() is None, run.stderr.read()
        time.sleep(0.002)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    step = load_state(tmp_path / "killed" / "state.pt")["step"]
    assert step % 10 == 0 and 20 <= step < 50, step
    # Resumed by a fresh process: it ends where the uninterrupted run ended, bit for bit.
    rest = _killable(tmp_path / "killed")
    assert rest.wait(timeout=600) == 0, rest.stderr.read()
    a, b = load_state(tmp_path / "full" / "state.pt"), load_state(tmp_path / "killed" / "state.pt")
    assert a["step"] == b["step"] == 50
    for part in ("net", "ema", "optimizer"):
        assert _flat(a[part]) and _flat(a[part]).keys() == _flat(b[part]).keys()
        for key, value in _flat(a[part]).items():
            other = _flat(b[part])[key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (part, key)
    snapshots = sorted(f for f in os.listdir(tmp_path / "full") if f.startswith("network-"))
    assert len(snapshots) == 2 * 3 + 2   # at steps 20, 40 and the last, two EMA profiles, and "latest"
    assert snapshots == sorted(f for f in os.listdir(tmp_path / "killed") if f.startswith("network-"))
    for name in snapshots:   # the same header and tensors (not bytes: the header's key order is arbitrary)
        with safe_open(tmp_path / "full" / name, "pt") as a, safe_open(tmp_path / "killed" / name, "pt") as b:
            assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys()), name
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys()), name


def _flat(tree, prefix=""):
    """A nested state dict as {"a.b.c": leaf}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def test_resume_refuses_different_run_defining_options(tmp_path):
    ds = tiny_dataset()
    train_mod.train(ds, str(tmp_path / "a"), "tiny", kimg=0.016, **FAST)
    with pytest.raises(ValueError, match="batch"):
        train_mod.train(ds, str(tmp_path / "a"), "tiny", kimg=0.032, **{**FAST, "batch": 4})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sgd_instead_of_adam(params, lr=0.0, **adam_options):
    """Plain SGD where train() builds Adam: Adam divides each gradient by its own running scale, so
    it cannot tell a sum of the ranks' gradients from their mean; SGD steps grow with the gradient."""
    return torch.optim.SGD(params, lr=lr)


def _ddp_worker(rank, world, port, out, optimizer):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if optimizer == "sgd":
        torch.optim.Adam = _sgd_instead_of_adam   # this spawned process only
    try:
        result = train_mod.train(tiny_dataset(), out, "tiny", kimg=0.064, **FAST)
        torch.save(result["net"].state_dict(), os.path.join(out, f"rank{rank}.pt"))  # every rank's own weights
    finally:
        torch.distributed.destroy_process_group()


# SGD in the default run: its steps grow with the gradient, so it sees a sum where a mean belongs;
# Adam, scale-invariant, cannot (slow).
@pytest.mark.parametrize("optimizer", [pytest.param("adam", marks=pytest.mark.slow), "sgd"])
def test_two_process_gloo_ddp_matches_one_process_with_the_whole_batch(tmp_path, monkeypatch, optimizer):
    # Each of 2 processes takes half of the global batch of 8; DDP averages their gradients, which
    # is the gradient of the mean loss over all 8. The per-step noise is drawn for the global batch,
    # so both runs see identical inputs. Equal up to float32 summation order.
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), optimizer), nprocs=2)
    if optimizer == "sgd":
        monkeypatch.setattr(torch.optim, "Adam", _sgd_instead_of_adam)
    torch.manual_seed(0)
    initial = train_mod.Denoiser(presets.net_config("tiny")).state_dict()
    single = train_mod.train(tiny_dataset(), str(tmp_path / "one"), "tiny", kimg=0.064, **FAST)
    assert load_state(tmp_path / "ddp" / "state.pt")["step"] == 8
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    moved = 0
    for name, p in single["net"].state_dict().items():
        for rank in ranks:
            assert_close_up_to_reordering(rank[name], p)
        # a mistake in the gradient's averaging (a sum: twice the step) would move far more than that
        moved = max(moved, float((p - initial[name]).abs().max() / p.abs().max().clamp(min=1e-30)))
    assert moved > 100 * REORDERED_F32_ULPS * torch.finfo(torch.float32).eps


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path, monkeypatch):
    ds = tiny_dataset()
    out = tmp_path / "run"
    calls = {"n": 0}
    real = edm.denoising_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(train_mod.edm, "denoising_loss", poisoned)
    with pytest.raises(train_mod.TrainingDiverged, match="step 3"):
        train_mod.train(ds, str(out), "tiny", kimg=0.08, checkpoint_kimg=0.016, **FAST)  # checkpoint every 2
    state = load_state(out / "state.pt")
    assert state["step"] == 2
    monkeypatch.undo()   # the checkpoint holds the weights of a clean run's step 2, untouched by the NaN
    clean = train_mod.train(ds, str(tmp_path / "clean"), "tiny", kimg=0.08, checkpoint_kimg=0.016, max_steps=2, **FAST)
    for name, value in clean["net"].state_dict().items():
        assert torch.equal(state["net"][name], value), name


def run_cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    code, err = run_cli(["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--preset", "tiny"], capsys)
    assert code == 2 and err.startswith("error: dataset not found") and err.count("\n") == 1
    code, err = run_cli(["train", str(tmp_path), "--out", str(tmp_path / "o"), "--batch", "0"], capsys)
    assert code == 2 and "--batch must be positive" in err
    with pytest.raises(SystemExit) as e:  # argparse: unknown preset
        cli.main(["train", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "huge"])
    assert e.value.code == 2


def test_cli_train_refuses_a_foreign_folder_without_force(tmp_path, capsys):
    ds_dir = tmp_path / "ds"
    from test_data import write_idx
    import numpy as np
    os.makedirs(ds_dir)
    write_idx(ds_dir / "train-images-idx3-ubyte", np.zeros((8, 28, 28), np.uint8), False)
    write_idx(ds_dir / "train-labels-idx1-ubyte", np.arange(8, dtype=np.uint8) % 2, False)
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "precious.txt").write_text("keep me")
    args = ["train", str(ds_dir), "--out", str(out), "--preset", "tiny", "--kimg", "0.008", "--batch", "8",
            "--precision", "fp32", "--quiet"]
    code, err = run_cli(args, capsys)
    assert code == 2 and "--force" in err and (out / "precious.txt").read_text() == "keep me"
    code, err = run_cli(args + ["--force"], capsys)
    assert code == 0 and os.path.exists(out / "network-latest-ema0.05.safetensors")


def test_auto_precision_picks_bf16_only_where_it_is_fast():
    opts = train_mod.options("tiny")
    assert opts.precision == "auto"
    train_mod._check_precision(opts, torch.device("cpu"))
    assert opts.precision == ("bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")
    with pytest.raises(ValueError, match="fp16 with loss scaling needs a GPU"):
        train_mod._check_precision(replace(opts, precision="fp16"), torch.device("cpu"))


def test_options_are_the_presets_then_the_overrides():
    opts = train_mod.options("fmnist-guide", batch=32, seed=None)
    assert isinstance(opts, presets.TrainOptions)
    assert (opts.batch, opts.seed, opts.kimg, opts.lr_tref) == (32, 0, 48, 500)    # None keeps the default
    assert opts.checkpoint_kimg == opts.snapshot_kimg                               # resume state as often as snapshots
    assert train_mod.options("tiny", checkpoint_kimg=0.5).checkpoint_kimg == 0.5
    with pytest.raises(ValueError, match="unknown training option"):
        train_mod.options("tiny", lerning_rate=1.0)
