"""Nothing loaded executes code: files that would run code when unpickled are refused, with exit 2,
wherever the CLI reads a model or a training state, and their code never runs."""
import os
import pickle

import numpy as np
import pytest
import torch

from mini_autoguide import cli
from mini_autoguide.checkpoint import save_model
from mini_autoguide.unet import KIND
from toy2d.model import ToyMLP
from toy2d.train import ToyConfig, save_toy

from image_helpers import tiny_net
from test_data import write_idx


class Plant:
    """Unpickling this calls open(marker, "w"): the marker file appears if the code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path, marker, fmt):
    """A file at path that runs code when unpickled: torch.save's zip format, or a bare pickle."""
    payload = {"net": Plant(marker), "step": 3}
    if fmt == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    return path


def refused(capsys, argv):
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_the_planted_file_does_run_code_when_unpickled(tmp_path, fmt):
    # The premise of the tests below: an unsafe loader would have created the marker.
    marker = tmp_path / "marker"
    path = plant(tmp_path / "evil.pt", marker, fmt)
    if fmt == "torch":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_toy_sample_refuses_a_pickle_as_main_or_guide(tmp_path, capsys, fmt):
    marker = tmp_path / "marker"
    evil = plant(tmp_path / "evil.safetensors", marker, fmt)
    cfg = ToyConfig(width=8)
    save_toy(tmp_path / "good.safetensors", ToyMLP(8), cfg)
    out = tmp_path / "x.npz"
    common = ["-n", "8", "--steps", "2", "--out", out, "--quiet"]
    refused(capsys, ["toy", "sample", evil, *common])
    refused(capsys, ["toy", "sample", tmp_path / "good.safetensors", "--guide", evil,
                     "--method", "autoguidance", *common])
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_image_sample_refuses_a_pickle_as_main_or_guide(tmp_path, capsys, fmt):
    marker = tmp_path / "marker"
    evil = plant(tmp_path / "evil.safetensors", marker, fmt)
    net = tiny_net()
    save_model(tmp_path / "good.safetensors", net, KIND, dict(net=net.config, preset="tiny"), dict(nimg=0))
    out = tmp_path / "s"
    common = ["--seeds", "0-1", "--steps", "2", "--out", out]
    refused(capsys, ["sample", evil, *common])
    refused(capsys, ["sample", tmp_path / "good.safetensors", "--guide", evil, "--method", "autoguidance", *common])
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_resumed_training_refuses_a_pickled_state(tmp_path, capsys, fmt):
    data = tmp_path / "data"
    data.mkdir()
    write_idx(data / "train-images-idx3-ubyte", np.zeros((8, 28, 28), np.uint8), False)
    write_idx(data / "train-labels-idx1-ubyte", np.arange(8, dtype=np.uint8) % 2, False)
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "marker"
    plant(run / "state.pt", marker, fmt)
    before = (run / "state.pt").read_bytes()
    err = refused(capsys, ["train", data, "--out", run, "--preset", "tiny", "--kimg", "0.008", "--batch", "8",
                           "--precision", "fp32", "--quiet"])
    assert "state.pt" in err
    assert not marker.exists()
    assert (run / "state.pt").read_bytes() == before and sorted(os.listdir(run)) == ["state.pt"]
