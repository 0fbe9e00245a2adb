"""Checkpoints: safetensors + JSON only (no pickle, nothing executed on load), written atomically.

Layout under a run's out_dir:

    checkpoints/
      latest                    text file naming the newest complete checkpoint ("step_00000500")
      step_00000500/
        model.safetensors       weights of each saved module ({name}.safetensors), shared tensors once
        config.json             the model's config (when the model has config.to_dict()), for from_pretrained
        optimizer.safetensors   every optimizer-state tensor, keyed "{optimizer}/{path}"
        rng.safetensors         torch RNG states per process (uint8 tensors)
        trainer_state.json      step, data position, schedule, loop state, optimizer structure and scalars,
                                numpy/python RNG states, and the sha256 of every other file (checked on load)

A checkpoint is written into a hidden temporary folder, fsync'ed, renamed into place, and only then is
`latest` replaced (os.replace, atomic on POSIX). A crash at any moment leaves the previous `latest` whole.

Sharded checkpoints (save_sharded_checkpoint: FSDP training, every process writes its own shards) keep the
same layout and protocol; the model and optimizer state go through torch.distributed.checkpoint instead of
model/optimizer.safetensors:

      step_00000500/
        dcp/                    .metadata and one __{rank}_0.distcp file per process, keyed by parameter
                                name ("model.transformer.h.0.attn.c_attn.weight", "optimizer.state. ...")
        config.json, rng.safetensors, tokenizer.json, trainer_state.json   as above

Any number of processes can load them (the reader reshards), and `fastllm export` turns one into a plain
safetensors model folder. The processes must share the file system the checkpoint is written to.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
LATEST = "latest"
SHARDED_DIR = "dcp"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model/optimizer it is loaded into."""


# ---------------------------------------------------------------------------------------------------------
# Nested state (optimizer state_dicts, RNG states) <-> JSON + a flat dict of tensors.

def _encode(obj, key: str, tensors: dict):
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        # safetensors has no uint32, numpy's RNG key is uint32: store as int64, restore the dtype.
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64))
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)):
                raise TypeError(f"cannot checkpoint a dict key of type {type(k).__name__} at {key!r}")
        return {"__dict__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {key!r}")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return _tensor(tensors, obj["__tensor__"])
    if "__ndarray__" in obj:
        return _tensor(tensors, obj["__ndarray__"]).numpy().astype(obj["dtype"])
    if "__dict__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _tensor(tensors, key):
    if key not in tensors:
        raise CheckpointError(f"tensor {key!r} named in {STATE_FILE} is missing from its safetensors file")
    return tensors[key]


# ---------------------------------------------------------------------------------------------------------
# RNG states

def capture_rng_state() -> dict:
    """This process's torch (CPU and every CUDA device), numpy and python `random` states."""
    state = {"torch_cpu": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    np.random.set_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------------------
# Save

def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root, step: int, *, models: dict[str, nn.Module], optimizers: dict | None = None,
                    state: dict | None = None, rng_states: list[dict] | None = None,
                    extra_files: dict[str, str] | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` (a run's checkpoints/ folder) atomically, point `latest` at it,
    and delete all but the newest `keep` step folders. Returns the checkpoint's folder.

    models: {"model": module, ...} -> {name}.safetensors (the main model must be called "model").
    optimizers: {"optimizer": opt, ...}; state: JSON-able loop state (step, data position, config ...).
    rng_states: one capture_rng_state() per process, indexed by rank. extra_files: {name in checkpoint: source
    path} copied in (a tokenizer.json, say)."""
    root, name = Path(root), step_dir_name(step)
    tmp = _begin(root, name)
    try:
        meta = {"format": FORMAT_VERSION, "step": step, "state": state or {}, "models": sorted(models),
                "optimizers": {}, "rng": None}
        for model_name, module in models.items():
            save_model(module, str(tmp / f"{model_name}.safetensors"))
        tensors = {}
        for opt_name, opt in (optimizers or {}).items():
            meta["optimizers"][opt_name] = _encode(opt.state_dict(), opt_name, tensors)
        if tensors:
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        return _finish(root, tmp, name, meta, models.get("model"), rng_states, extra_files, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_sharded_checkpoint(root, step: int, *, dist, models: dict[str, nn.Module], optimizers: dict | None = None,
                            owners: dict[str, str | nn.Module] | None = None, state: dict | None = None,
                            rng_states: list[dict] | None = None, extra_files: dict[str, str] | None = None,
                            keep: int = 2) -> Path:
    """save_checkpoint for models whose state is spread over the processes (FSDP): every process calls it
    (dist: the DistContext); each writes its shards of the models and optimizers with
    torch.distributed.checkpoint into the same temporary folder, then rank 0 writes the rest, renames and
    points `latest` at it. Also works on one process with plain models (the format stays resumable by any
    number of processes).

    models, optimizers: as in save_checkpoint. owners: {optimizer name: name of the model it updates, or a
    module holding everything it updates (e.g. an nn.ModuleDict of the policy and a value head)}: its state is
    keyed by that module's parameter names; by default every optimizer updates "model"."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root, name = Path(root), step_dir_name(step)
    optimizers, owners = optimizers or {}, owners or {}
    tmp = _begin(root, name) if dist.is_main else None
    tmp = dist.gather_objects(tmp)[0]  # every rank writes into rank 0's folder (and waits until it exists)
    try:
        sharded = {key: get_model_state_dict(module) for key, module in models.items()}
        for key, opt in optimizers.items():
            owner = owners.get(key, "model")
            sharded[key] = get_optimizer_state_dict(models[owner] if isinstance(owner, str) else owner, opt)
        _dcp(dcp.save, sharded, tmp / SHARDED_DIR)
        final = None
        if dist.is_main:
            meta = {"format": FORMAT_VERSION, "step": step, "state": state or {}, "models": sorted(models),
                    "optimizers": {key: "sharded" for key in optimizers}, "sharded": True, "rng": None}
            final = _finish(root, tmp, name, meta, models.get("model"), rng_states, extra_files, keep)
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()  # no process moves on (or reads it) before the checkpoint is complete
    return root / name if final is None else final


def _dcp(fn, state: dict, path: Path):
    """torch.distributed.checkpoint's save or load of `state` at `path`; without a process group (one
    process) as a single process, without its warning that it assumes so."""
    single = not torch.distributed.is_initialized()
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(state, checkpoint_id=str(path), no_dist=single)


def _begin(root: Path, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a save that crashed half-way
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _finish(root: Path, tmp: Path, name: str, meta: dict, model, rng_states, extra_files, keep: int) -> Path:
    """Write the common files into tmp, record every file's hash, fsync, rename tmp to name, point `latest`."""
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "to_dict"):
        (tmp / "config.json").write_text(json.dumps(model_config.to_dict(), indent=2))
    if rng_states is not None:
        rng_tensors = {}
        meta["rng"] = [_encode(s, f"rank{r}", rng_tensors) for r, s in enumerate(rng_states)]
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
    for dest, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / dest)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    meta["files"] = {p.relative_to(tmp).as_posix(): _sha256(p) for p in files}
    _write_fsync(tmp / STATE_FILE, json.dumps(meta, indent=1).encode())
    for p in files:
        _fsync(p)
    for folder in {p.parent for p in files}:
        _fsync_dir(folder)
    final = root / name
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a resume): swap it out
        trash = root / f".tmp-old-{name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    pointer_tmp = root / f".tmp-{LATEST}-{os.getpid()}"
    _write_fsync(pointer_tmp, name.encode())
    os.replace(pointer_tmp, root / LATEST)
    _fsync_dir(root)
    _prune(root, keep, current=name)
    return final


def _prune(root: Path, keep: int, current: str):
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    for _, p in steps[:-keep] if keep > 0 else []:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_fsync(path: Path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# Load

def find_checkpoint(path) -> Path | None:
    """The checkpoint folder `path` designates, or None when there is none yet: a checkpoint folder itself,
    a checkpoints/ folder with a `latest` file, or a run's out_dir containing checkpoints/."""
    p = Path(path)
    if (p / STATE_FILE).is_file() or (p / "model.safetensors").is_file():
        return p
    for root in (p, p / "checkpoints"):
        pointer = root / LATEST
        if pointer.is_file():
            target = root / pointer.read_text().strip()
            if not target.is_dir():
                raise CheckpointError(f"{pointer} names {target.name!r}, but {target} does not exist")
            return target
    return None


def resolve_checkpoint(path) -> Path:
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no checkpoint in {path}: expected a folder with {STATE_FILE} or model.safetensors, "
                              f"or a '{LATEST}' file in it or in its checkpoints/ folder")
    return found


class Checkpoint:
    """A checkpoint read from disk; `load_checkpoint(path)` builds it after checking every file's hash."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def state(self) -> dict:
        return self.meta["state"]

    @property
    def sharded(self) -> bool:
        """Written by save_sharded_checkpoint (torch.distributed.checkpoint shards, not safetensors)."""
        return bool(self.meta.get("sharded"))

    def load_model(self, module: nn.Module, name: str = "model", strict: bool = True, prefix: str = "") -> None:
        """Load the weights saved as `name` into `module` (a plain module, or under a sharded checkpoint one of
        several processes' FSDP shards: every process calls it). prefix: the saved keys carry this prefix in
        front of the module's own (e.g. "gpt." for the GPT inside a training wrapper)."""
        if self.sharded:
            if not strict:
                raise CheckpointError(f"{self.path} is sharded: its models load strictly")
            return self._load_sharded(name, module, prefix=prefix)
        file = self.path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        try:
            if prefix:
                tensors = {k[len(prefix):]: v for k, v in _load_tensors(file).items() if k.startswith(prefix)}
                missing, unexpected = module.load_state_dict(tensors, strict=False)
            else:
                missing, unexpected = load_model(module, str(file), strict=False)
        except (SafetensorError, RuntimeError) as e:
            raise CheckpointError(f"cannot load {file} into {type(module).__name__}: {e}") from e
        if strict and (missing or unexpected):
            raise CheckpointError(f"{file} does not fit {type(module).__name__}: missing keys {missing}, "
                                  f"unexpected keys {unexpected}")

    def load_optimizer(self, optimizer: torch.optim.Optimizer, name: str = "optimizer",
                       model: nn.Module | None = None) -> None:
        """Load the optimizer state saved as `name`; a sharded checkpoint needs the model the optimizer
        updates (its state is keyed by that model's parameter names), and every process calls it."""
        if name not in self.meta["optimizers"]:
            raise CheckpointError(f"{self.path} has no optimizer {name!r} (it has {sorted(self.meta['optimizers'])})")
        if self.sharded:
            if model is None:
                raise CheckpointError(f"{self.path} is sharded: load_optimizer needs model= (the model it updates)")
            return self._load_sharded(name, model, optimizer)
        tensors = _load_tensors(self.path / "optimizer.safetensors")
        try:
            optimizer.load_state_dict(_decode(self.meta["optimizers"][name], tensors))
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"optimizer state in {self.path} does not fit this optimizer: {e}") from e

    def load_into_sharded(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Load an unsharded checkpoint (safetensors, from one process or DDP) into an FSDP-sharded model and
        its optimizer: every process reads the full state and keeps its shards. The optimizer must be built
        as the saved one was (the same parameter groups, in the same order)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True, strict=True)
        try:
            set_model_state_dict(model, _load_tensors(self.path / "model.safetensors"), options=full)
            saved = _decode(self.meta["optimizers"]["optimizer"], _load_tensors(self.path / "optimizer.safetensors"))
            names = {id(p): n for n, p in model.named_parameters()}
            order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
            by_name = {"state": {order[i]: v for i, v in saved["state"].items()},
                       "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
            set_optimizer_state_dict(model, optimizer, by_name, options=full)
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            raise CheckpointError(f"{self.path} does not fit the sharded {type(model).__name__} and its optimizer: "
                                  f"{e}") from e

    def sharded_keys(self) -> list[str]:
        """The keys the sharded checkpoint holds ("model.<parameter name>", "optimizer.state.<...>")."""
        from torch.distributed.checkpoint import FileSystemReader

        return sorted(FileSystemReader(str(self.path / SHARDED_DIR)).read_metadata().state_dict_metadata)

    def _load_sharded(self, key: str, model: nn.Module, optimizer=None, prefix: str = "") -> None:
        """torch.distributed.checkpoint.load of the saved `key` into the model's (or, given, the optimizer's)
        current state dict, sharded or not: the reader reshards to however many processes load it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        if optimizer is None:
            target = {prefix + k: v for k, v in get_model_state_dict(model).items()}
        else:
            target = get_optimizer_state_dict(model, optimizer)
        try:
            _dcp(dcp.load, {key: target}, self.path / SHARDED_DIR)
        except (RuntimeError, ValueError, KeyError, CheckpointException) as e:
            what = type(model).__name__ if optimizer is None else f"the optimizer of {type(model).__name__}"
            raise CheckpointError(f"{key!r} in the sharded checkpoint {self.path} does not fit {what}: {e}") from e
        if optimizer is None:
            set_model_state_dict(model, {k[len(prefix):]: v for k, v in target.items()},
                                 options=StateDictOptions(strict=True))
        else:
            set_optimizer_state_dict(model, optimizer, target)

    def rng_state(self, rank: int) -> dict | None:
        """Process `rank`'s saved RNG states, or None when it was not saved (e.g. more processes now)."""
        if not self.meta.get("rng") or rank >= len(self.meta["rng"]):
            return None
        return _decode(self.meta["rng"][rank], _load_tensors(self.path / "rng.safetensors"))


def load_checkpoint(path, *, verify: bool = True) -> Checkpoint:
    """Read the checkpoint `path` designates (see find_checkpoint). verify: check each file's sha256."""
    ckpt = resolve_checkpoint(path)
    state_file = ckpt / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{ckpt} is not a training checkpoint: {STATE_FILE} is missing")
    try:
        meta = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_file} is corrupt: {e}") from e
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT_VERSION:
        raise CheckpointError(f"{state_file}: unknown checkpoint format {found!r} (this fastllm reads format "
                              f"{FORMAT_VERSION})")
    for fname, digest in meta.get("files", {}).items():
        file = ckpt / fname
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if verify and _sha256(file) != digest:
            raise CheckpointError(f"checkpoint file {file} is corrupt (sha256 differs from the one recorded at save)")
    return Checkpoint(ckpt, meta)


def _load_tensors(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint file {file} is corrupt: {e}") from e
