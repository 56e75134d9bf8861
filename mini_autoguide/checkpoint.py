"""Files: atomic writes, and models as safetensors with their JSON config.

Nothing read here can execute code: weights are safetensors, configs JSON,
training state goes through torch.load(weights_only=True).
"""
import json
import os
import re
import tempfile

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT = "mini_autoguide"


class CheckpointError(Exception):
    """A checkpoint is missing, truncated or not one of ours."""


def refuse_existing(path, force, what="output"):
    """Raise FileExistsError (the CLI's exit code 2) if path exists and force is not set."""
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{what} {path} exists: pass --force to overwrite")


# ---- the EMA snapshots of a training run: network-<images>-ema<sigma_rel>.safetensors ----
_SNAPSHOT = re.compile(r"network-(\d+|latest)-ema(\d*\.?\d+(?:e-?\d+)?)\.safetensors")


def snapshot_name(nimg, sigma_rel):
    """The file name of the EMA of length sigma_rel after nimg training images; nimg="latest" names
    the newest snapshot of a training call."""
    images = nimg if nimg == "latest" else f"{nimg:09d}"
    return f"network-{images}-ema{sigma_rel:g}.safetensors"


def parse_snapshot_name(name):
    """(nimg or "latest", sigma_rel) of a snapshot_name, or None for any other file name."""
    m = _SNAPSHOT.fullmatch(os.path.basename(name))
    if m is None:
        return None
    return (m.group(1) if m.group(1) == "latest" else int(m.group(1))), float(m.group(2))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path to path (never a half file)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def write_npz(path, compressed=False, **arrays):
    """Write numpy arrays as an .npz file, atomically (plain arrays: np.load needs no pickle)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)
    atomic_write(path, write)


def save_model(path, net, kind, config, extra=None):
    """Save net's state as safetensors; kind and config (JSON-able) go in its header."""
    save_tensors(path, net.state_dict(), kind, config, extra)


def save_tensors(path, state, kind, config, extra=None):
    """save_model for a state dict {name: tensor}."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "kind": kind, "config": json.dumps(config), "extra": json.dumps(extra or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_header(path, kind=None):
    """(config, extra) of a file written by save_model, without reading its tensors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad files
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or foreign): {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a {FORMAT} model")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} model, expected {kind!r}")
    try:
        return json.loads(meta["config"]), json.loads(meta.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has a damaged config header") from None


def read_model(path, kind=None):
    """Return (state_dict, config, extra) of a file written by save_model."""
    config, extra = read_header(path, kind)
    try:
        state = load_file(os.fspath(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or foreign): {e}") from None
    return state, config, extra


def save_state(path, state):
    """Training state (tensors, numbers, strings, lists, dicts) for exact resume."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: torch.save rejects paths of hidden files (".tmp-...")
            torch.save(state, f)
    atomic_write(path, write)


def load_state(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"training state not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable training state: {e}") from None
