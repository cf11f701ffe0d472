"""One loaded base model, reused by the runs of one process (`python -m app sweep`): each run gets it exactly as
it was loaded, without LoRA and without anything an earlier run left on it. The tokenized rows of a run are kept
too, for later runs that train the same rows (`rows`: lines that differ in seed or hyperparameters only).

    shared = SharedBase()
    model = shared.load(backend, settings, model_path, hardware, plan)   # pipeline.setup, instead of load_model
    ...  set_seed, add_lora, train, save                                   # as in a standalone run
    shared.release(model_with_lora)                                       # pipeline.run, when the run ends

A run changes more on the base than its LoRA layers, and a standalone run never sees those changes: PEFT's
get_peft_model freezes every parameter (and with lora_bias=all trains the base's own biases in place); k-bit
preparation casts parameters to float32, hooks the input embeddings and turns on gradient checkpointing; the
trainer turns on gradient checkpointing (and its input-grad hook) and writes pad/eos ids into model.config and
generation_config; unsloth sets attributes on every module and replaces attention and MLP forwards.

`release` takes the LoRA layers off through the backend (`remove_lora`: PEFT's unload), then puts back what was
recorded right after loading (`BaseSnapshot`): every module's own attributes (the training flag, gradient
checkpointing flags, instance forwards, ...) and hooks; each parameter's requires_grad, dtype and, for vectors
(biases, norms: a few MB on a 7B model), its values; the config and generation config, in place. `load` hands the
base out again only when its modules are the loaded ones and its parameters match the snapshot: names, shapes,
dtypes, devices and a float64 sum of each. Anything else (a run that failed half-way through add_lora, a weight
changed in place) makes it load a fresh base: a run never trains on a base that another run changed.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import math
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# nn.Module's own containers: parameters, buffers and submodules are compared or restored one by one, hooks by key.
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
CONTAINERS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", *HOOK_DICTS}
SMALL_NDIM = 1  # parameters of at most this many dimensions (biases, norm weights) are copied whole
_MISSING = object()


@dataclass(frozen=True)
class ParamState:
    requires_grad: bool
    dtype: Any
    device: Any
    shape: tuple[int, ...]
    checksum: float  # float64 sum: cheap (one pass over the weights), and any in-place change shows
    copy: Any = None  # the values themselves, for SMALL_NDIM parameters


CHUNK = 2**24  # elements summed at a time: float64 copies of at most 128 MiB, never of a whole embedding


def _checksums(params: list[Any]) -> list[float]:
    import torch

    with torch.no_grad():
        sums = [sum(chunk.sum(dtype=torch.float64) for chunk in p.detach().reshape(-1).split(CHUNK)) for p in params]
    return [float(s) for s in sums]


def _same_number(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _is_config(value: Any) -> bool:
    from transformers import GenerationConfig, PretrainedConfig

    return isinstance(value, (PretrainedConfig, GenerationConfig))


def _restore_object(obj: Any, saved: dict[str, Any]) -> None:
    """Put `obj.__dict__` back to `saved` in place (nested configs too: modules hold references to them)."""
    current = obj.__dict__
    for key in [k for k in current if k not in saved]:
        del current[key]
    for key, value in saved.items():
        now = current.get(key, _MISSING)
        if _is_config(now) and type(now) is type(value):
            _restore_object(now, value.__dict__)
        else:
            current[key] = copy.deepcopy(value)


@dataclass
class BaseSnapshot:
    """What a loaded base model is, recorded right after loading: see the module's docstring."""

    modules: dict[str, tuple[Any, dict[str, Any], dict[str, frozenset]]]  # name -> (module, attributes, hook keys)
    params: dict[str, ParamState]
    configs: list[tuple[Any, dict[str, Any]]]  # (config object, a deep copy of its __dict__)

    @classmethod
    def capture(cls, model) -> BaseSnapshot:
        import torch

        modules = {}
        for name, module in model.named_modules():
            attributes = {k: v for k, v in module.__dict__.items() if k not in CONTAINERS}
            hooks = {h: frozenset(getattr(module, h, {})) for h in HOOK_DICTS}
            modules[name] = (module, attributes, hooks)
        named = list(model.named_parameters())
        sums = _checksums([p for _, p in named])
        params = {}
        with torch.no_grad():
            for (name, p), checksum in zip(named, sums, strict=True):
                params[name] = ParamState(p.requires_grad, p.dtype, p.device, tuple(p.shape), checksum,
                                          p.detach().clone() if p.ndim <= SMALL_NDIM else None)
        owned = (getattr(model, "config", None), getattr(model, "generation_config", None))
        configs = [(c, copy.deepcopy(c.__dict__)) for c in owned if c is not None]
        return cls(modules, params, configs)

    def restore(self, model) -> None:
        """Undo what a run changed on the base (after its LoRA layers are out): attributes, hooks, parameter flags,
        dtypes and small values, configs. Large weights are only checked (`difference`), never copied."""
        import torch

        for name, module in model.named_modules():
            if name not in self.modules or self.modules[name][0] is not module:
                continue  # a structural change: `difference` reports it and the base is loaded again
            _, attributes, hooks = self.modules[name]
            current = module.__dict__
            for key in [k for k in current if k not in CONTAINERS and k not in attributes]:
                del current[key]
            for key, value in attributes.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
            for hook_dict, keys in hooks.items():
                registered = getattr(module, hook_dict, None)
                for key in [k for k in (registered or {}) if k not in keys]:
                    del registered[key]
        with torch.no_grad():
            for name, p in model.named_parameters():
                state = self.params.get(name)
                if state is None:
                    continue
                p.grad = None
                if state.copy is not None:
                    p.data = state.copy.clone()
                elif p.dtype != state.dtype:  # a frozen weight upcast for training (k-bit preparation): exact back
                    p.data = p.data.to(state.dtype)
                p.requires_grad_(state.requires_grad)
        for config, saved in self.configs:
            _restore_object(config, saved)

    def difference(self, model) -> str | None:
        """None when `model` is the base as loaded; else the first difference found."""
        names = [name for name, _ in model.named_modules()]
        if names != list(self.modules):
            extra = sorted(set(names) - set(self.modules)) or sorted(set(self.modules) - set(names))
            return f"its modules differ (e.g. {extra[:3]})"
        for name, module in model.named_modules():
            if self.modules[name][0] is not module:
                return f"module {name} was replaced"
        named = list(model.named_parameters())
        if [n for n, _ in named] != list(self.params):
            return "its parameters differ"
        for (name, p), checksum in zip(named, _checksums([p for _, p in named]), strict=True):
            state = self.params[name]
            now = (p.requires_grad, p.dtype, p.device, tuple(p.shape))
            if now != (state.requires_grad, state.dtype, state.device, state.shape):
                return f"{name} is {now}, was {(state.requires_grad, state.dtype, state.device, state.shape)}"
            if not _same_number(checksum, state.checksum):
                return f"the values of {name} changed"
        return None


def base_key(backend, settings, model_path, hardware, plan) -> tuple:
    """What a loaded base depends on: the same key, the same base."""
    return backend.name, str(model_path), str(hardware.dtype), backend.load_key(settings, plan)


def free_memory() -> None:
    """Give what the last run left (its trainer, optimizer, LoRA) back to the allocator and the GPU's to the driver;
    the next run's peak_gpu_memory_gb counts from here (the base it reuses is in it, as in a standalone run's)."""
    gc.collect()
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        except torch.AcceleratorError as err:  # a CUDA fault made the GPU unusable: the sweep ends this process
            log.warning("GPU memory not given back (%s)", str(err).splitlines()[0])


def freeze_heap() -> None:
    """Collect, then move every object alive now (the imported libraries, the loaded base model) to the collector's
    permanent generation (`gc.freeze`): the collections that follow scan only what was made after, and a base of
    a 7B model plus torch, transformers, TRL and unsloth is millions of objects that would be walked again at
    every full collection (unsloth's get_peft_model alone collects nine times per run, a sweep releases every
    line). `thaw_heap()` when that base goes, so that its own cycles can be collected."""
    gc.collect()
    gc.freeze()


def thaw_heap() -> None:
    gc.unfreeze()


class SharedBase:
    """The base model of the line being trained, kept for the next line when that one asks for the same base.
    One at a time: a line with another base (model, 4-bit, max_seq_length, ...) frees this one first."""

    ROWS_KEPT = 4  # tokenized row sets kept for later lines (a grid's lines usually come grouped by their data)

    def __init__(self):
        self.key: tuple | None = None
        self.model: Any = None
        self.backend: Any = None
        self.snapshot: BaseSnapshot | None = None
        self.loads = 0  # bases loaded so far (a sweep of one base model: 1)
        self.tokenized: dict[str, Any] = {}  # app.dataset.rows_key -> TrainingData, the most recent last
        self.device_lost = False  # a line's CUDA fault made this process's GPU unusable (app.sweep.serve stops)
        self.on_job = None  # called with the job id once a line's job folder is locked (a worker tells the sweep)

    def opened(self, job_id: str) -> None:
        """pipeline.setup: this line's job folder is locked (a worker that dies later still names its job)."""
        if self.on_job is not None:
            self.on_job(job_id)

    def rows(self, key: str, tokenize):
        """The tokenized rows of an earlier line with the same `key` (app.dataset.rows_key), else `tokenize()`'s.
        Datasets are immutable (the trainer maps them into new ones), so lines can share them."""
        if key in self.tokenized:
            log.info("training rows as tokenized for an earlier line of this sweep (the same data and settings)")
            self.tokenized[key] = self.tokenized.pop(key)
            return self.tokenized[key]
        data = tokenize()
        self.tokenized[key] = data
        while len(self.tokenized) > self.ROWS_KEPT:
            self.tokenized.pop(next(iter(self.tokenized)))
        return data

    def load(self, backend, settings, model_path, hardware, plan):
        """The base for this run: the one held, when it is the same and unchanged, else a freshly loaded one."""
        key = base_key(backend, settings, model_path, hardware, plan)
        if self.model is not None and key == self.key:
            why = self.snapshot.difference(self.model)
            if why is None:
                log.info("reusing the loaded base model (%s)", settings.model)
                return self.model
            log.warning("the loaded base model is not as it was loaded (%s): loading it again", why)
        self.drop()
        model = backend.load_model(settings, model_path, hardware, plan)
        self.key, self.model, self.backend, self.snapshot = key, model, backend, BaseSnapshot.capture(model)
        self.loads += 1
        freeze_heap()
        return model

    def release(self, model) -> None:
        """The run is over: take its LoRA off and undo what it changed on the base. Never raises (it runs while a
        run's own error is on its way out); a base that cannot be put back is dropped and the next run loads one."""
        if model is None or self.model is None:
            free_memory()
            return
        try:
            base = self.backend.remove_lora(model)
            if base is not self.model:
                raise RuntimeError(f"remove_lora returned a {type(base).__name__}, not the loaded base model")
            self.snapshot.restore(base)
        except Exception:
            log.exception("could not take this run's LoRA off the base model: the next run loads it again")
            self.drop()
        del model
        free_memory()

    def holds(self) -> bool:
        """Whether a base model is loaded (the next line with the same key reuses it without reading its files)."""
        return self.model is not None

    def held_gb(self) -> float:
        """GiB of GPU memory this process holds (the base and the allocator's cache): free for the next line when
        it reuses the base. The preflight reads the GPU's free memory through NVML, which counts them as used."""
        import sys

        torch = sys.modules.get("torch")
        if self.model is None or torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return 0.0
        return torch.cuda.memory_reserved() / 2**30

    def count_as_free(self, hardware):
        """`hardware` as a process that holds nothing would see it (the plan of a sweep line = a standalone run's)."""
        held = self.held_gb()
        if not held or hardware.gpu is None:
            return hardware
        gpu = dataclasses.replace(hardware.gpu, memory_free_gb=round(hardware.gpu.memory_free_gb + held, 2))
        return dataclasses.replace(hardware, gpu=gpu)

    def drop(self) -> None:
        self.key = self.model = self.backend = self.snapshot = None
        thaw_heap()
        free_memory()
