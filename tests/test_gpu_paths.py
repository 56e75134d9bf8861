"""The branches of training that only a GPU takes, run here with the CUDA calls replaced by fakes:
torchrun's environment on CUDA (NCCL, one device per local rank), DDP's device_ids, the precision
choice for a CUDA device, and the step's random draws made on the device."""
import pytest
import torch

from mini_autoguide import presets
from mini_autoguide import train as train_mod

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
CUDA1 = torch.device("cuda", 1)


def test_setup_distributed_on_cuda_uses_nccl_and_the_local_rank(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(("init", backend)))
    rank, world, device = train_mod._setup_distributed("cuda")
    assert (rank, world, device) == (3, 4, CUDA1)   # rank 3 of 4, the second GPU of its machine
    assert calls == [("set_device", CUDA1), ("init", "nccl")]


def test_setup_distributed_on_cpu_uses_gloo_and_a_single_process_needs_none(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train_mod._setup_distributed("cuda") == (0, 1, torch.device("cuda")) and calls == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert train_mod._setup_distributed("cpu") == (1, 2, torch.device("cpu")) and calls == ["gloo"]


@pytest.mark.parametrize("device,device_ids", [(CUDA1, [CUDA1]), (torch.device("cpu"), None)])
def test_wrap_gives_ddp_the_device_on_cuda_only(monkeypatch, device, device_ids):
    seen = {}

    def fake_ddp(module, device_ids=None):
        seen.update(module=module, device_ids=device_ids)
        return "ddp"

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", fake_ddp)
    net = torch.nn.Linear(2, 2)
    opts = train_mod.options("tiny", compile=False)
    assert train_mod.wrap(net, opts, 2, device) == "ddp"
    assert seen == dict(module=net, device_ids=device_ids)
    assert train_mod.wrap(net, opts, 1, device) is net   # one process: no DDP


def test_precision_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)   # a CPU without bf16
    opts = train_mod.options("tiny")
    train_mod._check_precision(opts, CUDA1)
    assert opts.precision == "bf16"                 # auto: bf16 on any GPU, whatever the CPU
    opts = train_mod.options("tiny")
    train_mod._check_precision(opts, torch.device("cpu"))
    assert opts.precision == "fp32"                 # and fp32 on that CPU
    opts = train_mod.options("tiny", precision="fp16")
    train_mod._check_precision(opts, CUDA1)         # fp16 with loss scaling is accepted on a GPU
    assert opts.precision == "fp16"
    with pytest.raises(ValueError, match="needs a GPU"):
        train_mod._check_precision(train_mod.options("tiny", precision="fp16"), torch.device("cpu"))


CPU_GENERATOR = torch.Generator


class FakeDeviceGenerator:
    """torch.Generator(device) for a device this machine lacks: a CPU generator that remembers
    its device, so that each draw can be checked to come from the device it is made on."""

    def __init__(self, device="cpu"):
        self.device, self.cpu = torch.device(device), CPU_GENERATOR()

    def manual_seed(self, seed):
        self.cpu.manual_seed(seed)
        return self


def test_step_randomness_draws_on_the_device_with_a_device_generator(monkeypatch):
    draws = []
    real = {name: getattr(torch, name) for name in ("randn", "rand")}

    def drawing(name):
        def draw(*args, generator, device, **kwargs):
            assert isinstance(generator, FakeDeviceGenerator) and torch.device(device) == generator.device == CUDA1
            draws.append(name)
            return real[name](*args, generator=generator.cpu, **kwargs)
        return draw

    opts = train_mod.options("tiny", label_dropout=0.3, xflip=True)
    expected = train_mod._step_randomness(opts, 7, (1, 8, 8), torch.device("cpu"), 2, 4)
    monkeypatch.setattr(torch, "Generator", FakeDeviceGenerator)
    for name in real:
        monkeypatch.setattr(torch, name, drawing(name))
    got = train_mod._step_randomness(opts, 7, (1, 8, 8), CUDA1, 2, 4)
    assert draws == ["randn", "randn", "rand", "rand"]   # sigma, noise, label dropout, flips
    for a, b in zip(got, expected):   # the same seed gives the CPU's numbers through the fake
        assert torch.equal(a, b)


def test_make_trainer_gives_fp16_a_scaler_for_the_device(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: seen.append(device) or "scaler")
    opts = train_mod.options("tiny", precision="fp16", channels_last=False)
    assert train_mod.make_trainer(opts, presets.net_config("tiny"), torch.device("cpu"))[3] == "scaler"
    assert seen == ["cpu"]
    opts = train_mod.options("tiny", precision="bf16", channels_last=False)
    assert train_mod.make_trainer(opts, presets.net_config("tiny"), torch.device("cpu"))[3] is None
