"""Training: loss goes down, exact resume, 2-process DDP = 1 process, divergence stops cleanly, CLI errors."""
import os
import socket

import pytest
import torch

from mini_autoguide import cli, edm, presets
from mini_autoguide import train as train_mod
from mini_autoguide.checkpoint import load_state

from image_helpers import tiny_dataset

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


def test_resume_refuses_different_run_defining_options(tmp_path):
    ds = tiny_dataset()
    train_mod.train(ds, str(tmp_path / "a"), "tiny", kimg=0.016, **FAST)
    with pytest.raises(ValueError, match="batch"):
        train_mod.train(ds, str(tmp_path / "a"), "tiny", kimg=0.032, **{**FAST, "batch": 4})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train_mod.train(tiny_dataset(), out, "tiny", kimg=0.064, **FAST)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_ddp_matches_one_process_with_the_whole_batch(tmp_path):
    # Each of 2 processes takes half of the global batch of 8; DDP averages their gradients, which
    # is the gradient of the mean loss over all 8. The per-step noise is drawn for the global batch,
    # so both runs see identical inputs. Equal up to float summation order.
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2)
    single = train_mod.train(tiny_dataset(), str(tmp_path / "one"), "tiny", kimg=0.064, **FAST)
    ddp = load_state(tmp_path / "ddp" / "state.pt")
    assert ddp["step"] == 8
    for name, p in single["net"].state_dict().items():
        assert torch.allclose(ddp["net"][name], p, rtol=1e-4, atol=1e-5), name


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
    assert all(torch.isfinite(v).all() for v in state["net"].values())


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
            "--precision", "fp32", "--no-progress"]
    code, err = run_cli(args, capsys)
    assert code == 2 and "--force" in err and (out / "precious.txt").read_text() == "keep me"
    code, err = run_cli(args + ["--force"], capsys)
    assert code == 0 and os.path.exists(out / "network-latest-ema0.05.safetensors")


def test_auto_precision_picks_bf16_only_where_it_is_fast():
    opts = train_mod.options("tiny")
    assert opts["precision"] == "auto"
    train_mod._check_precision(opts, torch.device("cpu"))
    assert opts["precision"] == ("bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")
    with pytest.raises(ValueError, match="fp16 with loss scaling needs a GPU"):
        train_mod._check_precision(dict(opts, precision="fp16"), torch.device("cpu"))
