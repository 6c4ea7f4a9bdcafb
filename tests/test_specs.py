"""Teachers from the checkpoints training scripts write, spec files that import their neighbours, and the device each
rank computes on under torchrun."""

import argparse
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from logitcache import distributed, specs
from logitcache.errors import LogitcacheError


class Net(nn.Module):
    """A small classifier with parameters and buffers (BatchNorm's running statistics and batch counter)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class Settings:
    """A class of the training script's own, stored beside the weights (Lightning's hyper-parameters)."""

    def __init__(self):
        self.depth = 3


def _touch(path):
    pathlib.Path(path).touch()


class Payload:
    """Unpickled by pickle itself, it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Sneaky:
    """Unpickled by pickle itself, it calls a function of the script's own."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)


def trained(seed: int = 0, num_classes: int = 5) -> Net:
    torch.manual_seed(seed)
    net = Net(num_classes)
    net.bn.running_mean.uniform_()
    net.bn.num_batches_tracked.fill_(seed + 7)
    return net


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def optimizer_state(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 1, 6, 6)).sum().backward()
    opt.step()
    return opt.state_dict()


# Checkpoint layouts ----------------------------------------------------------------------------------------------


def test_torchvision_script_checkpoint_with_args_ema_and_numpy(tmp_path, capsys):
    net, ema = trained(0), trained(1)
    ema_state = {"n_averaged": torch.tensor(12), **prefixed(ema.state_dict(), "module.")}  # torchvision's EMA
    args = argparse.Namespace(lr=0.1, output_dir=pathlib.Path(tmp_path), model="net", weight_decay=1e-4)
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {"model": net.state_dict(), "optimizer": optimizer_state(trained(2)), "args": args, "epoch": 3,
         "model_ema": ema_state, "best_acc1": np.float64(0.75), "history": np.arange(3.0)},
        path,
    )  # fmt: skip

    assert same_weights(specs.load_weights(Net(), path), net)
    assert "'model'" in capsys.readouterr().err  # the note names the key used and the other one
    assert same_weights(specs.load_weights(Net(), path, key="model_ema"), ema)


def test_timm_script_checkpoint_prefers_the_trained_weights(tmp_path):
    net, ema = trained(0), trained(1)
    path = tmp_path / "last.pth.tar"
    torch.save(
        {"epoch": 9, "arch": "net", "state_dict": net.state_dict(), "optimizer": optimizer_state(trained(2)),
         "version": 2, "args": argparse.Namespace(epochs=10, model="net"), "state_dict_ema": ema.state_dict(),
         "metric": 71.5},
        path,
    )  # fmt: skip
    assert same_weights(specs.load_weights(Net(), path), net)
    assert same_weights(specs.load_weights(Net(), path, key="state_dict_ema"), ema)


def test_ddp_and_compiled_prefixes_are_removed(tmp_path):
    net = trained(3)
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        path = tmp_path / "ddp.pt"
        torch.save(prefixed(net.state_dict(), prefix), path)
        assert same_weights(specs.load_weights(Net(), path), net), prefix


def test_lightning_checkpoint(tmp_path):
    net = trained(4)
    state = {**prefixed(net.state_dict(), "model."), "loss_fn.weight": torch.ones(5)}  # self.model, self.loss_fn
    path = tmp_path / "epoch=3-step=400.ckpt"
    torch.save(
        {"epoch": 3, "global_step": 400, "pytorch-lightning_version": "2.4.0", "state_dict": state,
         "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
         "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.3),
                                                                  "best_model_path": str(path)}},
         "optimizer_states": [optimizer_state(trained(5))], "lr_schedulers": [{"last_epoch": 3}],
         "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1, "settings": Settings()}},
        path,
    )  # fmt: skip
    assert same_weights(specs.load_weights(Net(), path), net)


def test_a_module_pickled_whole(tmp_path):
    net = trained(5)
    torch.save(net, tmp_path / "whole.pt")
    torch.save({"model": net, "epoch": 1}, tmp_path / "wrapped.pt")
    assert same_weights(specs.load_weights(Net(), tmp_path / "whole.pt"), net)
    assert same_weights(specs.load_weights(Net(), tmp_path / "wrapped.pt"), net)


def test_safetensors_keep_working(tmp_path):
    from safetensors.torch import save_file

    net = trained(6)
    save_file(prefixed(net.state_dict(), "module."), str(tmp_path / "w.safetensors"))
    assert same_weights(specs.load_weights(Net(), tmp_path / "w.safetensors"), net)
    with pytest.raises(LogitcacheError, match="flat state dict"):
        specs.load_weights(Net(), tmp_path / "w.safetensors", key="model")


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(LogitcacheError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_an_unknown_layout_names_the_keys_found(tmp_path):
    net = trained(7)
    path = tmp_path / "odd.pt"
    torch.save({"weights": net.state_dict(), "epoch": 2, "args": argparse.Namespace(lr=0.1)}, path)

    message = one_line_error(specs.load_weights, Net(), path)
    assert "no weights found" in message
    assert "its top-level keys: weights (state dict of 9 tensors), epoch (int), args (Namespace)" in message
    message = one_line_error(specs.load_weights, Net(), path, key="model")
    assert "no key 'model'" in message and "weights (state dict" in message
    assert "'epoch' holds an int, not a state dict" in one_line_error(specs.load_weights, Net(), path, key="epoch")
    assert same_weights(specs.load_weights(Net(), path, key="weights"), net)


def test_weights_that_do_not_fit_name_the_parameters(tmp_path):
    path = tmp_path / "ten.pt"
    torch.save({"model": trained(0, num_classes=10).state_dict()}, path)
    message = one_line_error(specs.load_weights, Net(5), path)
    assert "fc.weight is [10, 4] in the file, [5, 4] in the model" in message

    torch.save({"model": {"backbone.conv.weight": torch.zeros(4, 1, 3, 3)}}, path)
    message = one_line_error(specs.load_weights, Net(5), path)
    assert "missing conv.weight" in message and "unexpected backbone.conv.weight" in message


def test_code_in_a_checkpoint_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": trained(0).state_dict(), "args": Payload(marker)}, path)
    message = one_line_error(specs.load_weights, Net(), path)
    assert "refused" in message and ("os.system" in message or "posix.system" in message)
    assert not marker.exists()

    # A function of the script's own is not known to run code: it becomes an inert stand-in and is never called.
    torch.save({"model": trained(0).state_dict(), "args": Sneaky(marker)}, path)
    assert same_weights(specs.load_weights(Net(), path), trained(0))
    assert not marker.exists()
    stand_in = specs.read_checkpoint(path)["args"]
    assert stand_in.name.endswith("_touch") and stand_in.args == (str(marker),)


# Teachers by name with a number of classes --------------------------------------------------------------------


def test_a_torchvision_teacher_with_its_number_of_classes_and_a_checkpoint(tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    source = tvm.get_model("resnet18", weights=None, num_classes=7)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": prefixed(source.state_dict(), "module."), "args": argparse.Namespace(lr=0.1)}, path)

    teacher = specs.resolve_teacher("resnet18", path, num_classes=7)
    assert teacher.fc.out_features == 7 and not teacher.training and same_weights(teacher, source)
    assert specs.resolve_teacher("resnet18").fc.out_features == 1000
    assert "fc.weight is [7, 512]" in one_line_error(specs.resolve_teacher, "resnet18", path)


def test_a_timm_teacher_with_its_number_of_classes():
    pytest.importorskip("timm")
    assert specs.resolve_teacher("timm:test_resnet", num_classes=7).get_classifier().out_features == 7


def test_a_callable_teacher_gets_the_number_of_classes(tmp_path):
    (tmp_path / "teachers.py").write_text(
        "import torch\n\ndef make(num_classes=1000):\n    return torch.nn.Linear(3, num_classes)\n"
    )
    assert specs.resolve_teacher(f"{tmp_path}/teachers.py:make", num_classes=7).out_features == 7
    assert specs.resolve_teacher(f"{tmp_path}/teachers.py:make").out_features == 1000


def test_a_torchvision_student_needs_three_channel_images():
    pytest.importorskip("torchvision")
    assert specs.build_model("resnet18", 10, in_channels=3).fc.out_features == 10
    assert "3-channel images" in one_line_error(specs.build_model, "resnet18", 10, in_channels=1)


# Spec files import their neighbours ---------------------------------------------------------------------------

SPECS = """
import torch
import presets_{tag}

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(presets_{tag}.SCALE * i)), i % 2

def make(train=True):
    return Data()
"""


@pytest.fixture
def spec_file(tmp_path, monkeypatch, request):
    """``folder/my_specs.py:make`` whose file imports ``presets_<tag>`` beside it; sys.path and the imported modules
    are restored afterwards."""
    tag = request.node.name.replace("[", "_").replace("]", "_").replace("-", "_")
    folder = tmp_path / "specs_folder"
    folder.mkdir()
    (folder / f"presets_{tag}.py").write_text("SCALE = 3\n")
    (folder / "my_specs.py").write_text(SPECS.format(tag=tag))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield f"{folder}/my_specs.py:make"
    for name in [n for n in sys.modules if n == f"presets_{tag}" or n.startswith(specs._USER_MODULE)]:
        if name == f"presets_{tag}" or str(folder) in bytes.fromhex(name[len(specs._USER_MODULE) :]).decode():
            sys.modules.pop(name)


def test_a_spec_file_imports_its_neighbours(spec_file):
    ds = specs.resolve_dataset(spec_file)
    assert ds[2][0][0, 0, 0].item() == 6.0


def test_a_spawned_dataloader_worker_imports_the_spec_and_its_neighbours(spec_file):
    ds = specs.resolve_dataset(spec_file, limit=4)  # a logitcache wrapper, as every loader of ours holds
    loader = DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    (images, labels) = next(iter(loader))
    assert images[:, 0, 0, 0].tolist() == [0.0, 3.0, 6.0, 9.0]


def test_a_fresh_process_imports_the_spec_by_name_with_its_neighbours(spec_file, tmp_path):
    """A process whose sys.path lacks the spec's folder (a forkserver started earlier, or any other) unpickles the
    dataset: importing the spec file by its module name makes its folder importable there too."""
    payload = pickle.dumps(specs.resolve_dataset(spec_file)).hex()
    code = textwrap.dedent(
        """
        import pickle, sys
        import logitcache.specs
        ds = pickle.loads(bytes.fromhex(sys.argv[1]))
        print(ds[3][0][0, 0, 0].item())
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, payload], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "9.0"


# Ranks and devices under torchrun ---------------------------------------------------------------------------------


@pytest.fixture
def torchrun_rank_1(monkeypatch):
    """Rank 1 of 2 under torchrun on a machine where CUDA is available; records set_device and the backend."""
    calls: dict = {"set_device": [], "backend": []}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(device))
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, **kw: calls["backend"].append(backend))
    return calls


def test_a_cpu_run_under_torchrun_never_touches_cuda(torchrun_rank_1, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.init_from_env("cpu")
    assert torchrun_rank_1 == {"set_device": [], "backend": ["gloo"]}
    assert specs.resolve_device("cpu") == torch.device("cpu")


def test_a_bare_cuda_is_the_local_ranks_device(torchrun_rank_1, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert specs.resolve_device("cuda") == torch.device("cuda", 1)
    assert specs.resolve_device("auto") == torch.device("cuda", 1)
    assert specs.resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert distributed.init_from_env("cuda")
    assert torchrun_rank_1 == {"set_device": [torch.device("cuda", 1)], "backend": ["cpu:gloo,cuda:nccl"]}


def test_a_rank_without_a_gpu_of_its_own_is_one_line(torchrun_rank_1, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    message = one_line_error(distributed.init_from_env, "cuda")
    assert "LOCAL_RANK 1" in message and "--device cpu" in message
    assert torchrun_rank_1 == {"set_device": [], "backend": []}


def test_outside_torchrun_a_bare_cuda_is_the_current_device(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert specs.resolve_device("cuda") == torch.device("cuda", 3)
