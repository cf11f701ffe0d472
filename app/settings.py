"""Every setting of the job, its default and its bounds: the one place they live.

Names are OpenWeights' `TrainingConfig` fields, read from `FT_<NAME>` environment variables (upper case) or
from an OpenWeights `validated_params` JSON named by `FT_CONFIG_FILE`; environment variables override the
file. Defaults are OpenWeights' except `merge_before_push` (false: adapter only) and the job-only settings.

    settings, ignored = load_settings()          # raises SettingsError listing every problem at once
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import operator
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from app.errors import SettingsError, clip, shown

ENV_PREFIX = "FT_"
DEFAULT_OUTPUT_DIR = Path("/output")  # the volume's mount point in the image


def facts(job_id: bool | str, *, unit: str | None = None, env_only: bool = False) -> dict[str, Any]:
    """What the job needs to know about a setting besides its type, kept on its Field (json_schema_extra):

    job_id    True: it changes what is trained (the weights) or what is measured (which data evaluates the model,
              what is sampled), so it enters the job id; "content": the file's content hash enters the job id,
              not its path; False: where and how the job runs, and how often it logs, checkpoints, evaluates
              and measures (logging_steps, save_steps, eval_batch_size, test_file_eval_strategy/steps,
              eval_every_n_steps). These change neither the weights (evaluation runs off the training RNG:
              app/cadence.py) nor the final result beyond the evaluation's batching (eval_loss is a mean of
              per-batch means), so a rerun that changes only them resumes the same job from its checkpoint.
              sampling_callbacks stay in: sampling at a temperature draws from the training RNG.
    unit      what a number counts (tokens, optimizer steps, ...), shown in env/example.env
    env_only  only from the environment (never from an OpenWeights config file)
    """
    return {"job_id": job_id, "env_only": env_only, **({"unit": unit} if unit else {})}


TRAINS = facts(True)  # the common case: part of what is trained

# The seven projections of a Llama/Qwen/Mistral/Gemma decoder layer: OpenWeights' and unsloth's default.
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

Optimizer = Literal[
    "adamw_8bit",  # OpenWeights' default; bitsandbytes, so CUDA only: replaced by adamw_torch on a CPU
    "paged_adamw_8bit",
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "sgd",
    "adamw",  # OpenWeights' alias of adamw_torch
    "adam",  # OpenWeights' alias of adamw_torch
]
Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]


class SamplingCallback(BaseModel):
    """OpenWeights' `SamplingCallbackModel`: sample the prompts of `dataset` every `eval_steps` steps."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    dataset: str
    eval_steps: Literal["log"] | Annotated[int, Field(gt=0)] = 10
    batch_size: Annotated[int, Field(gt=0)] = 8
    tag: str = "samples"
    temperature: Annotated[float, Field(ge=0)] = 0.0
    max_tokens: Annotated[int, Field(gt=0)] = 600

    @field_validator("eval_steps", "batch_size", "max_tokens")
    @classmethod
    def _int_in_range(cls, value: Any) -> Any:
        if isinstance(value, int) and value > MAX_INT:
            raise ValueError(f"must be at most {MAX_INT:,}")
        return value


# Bounds of the values that settings hold and result.json repeats.
MAX_JSON_DEPTH = 32  # nesting of FT_META and the other JSON settings
MAX_META_BYTES = 64 * 2**10  # FT_META serialised: free-form notes, not data
MAX_INT = 2**31 - 1  # every integer setting (counts of steps, tokens, examples): C ints in the libraries
MAX_SEED = 2**32 - 1  # numpy's seed range (transformers' set_seed seeds numpy)


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (a value can be thousands of levels deep)."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            depth = max(depth, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return depth


def loads(text: str) -> Any:
    """json.loads for settings: a value nested deeper than MAX_JSON_DEPTH is a ValueError (pydantic reports it),
    not a RecursionError from the decoder, nor a value that breaks serialisation later."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested too deeply (over {MAX_JSON_DEPTH} levels)") from None
    if (depth := json_depth(value)) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested {depth} levels deep, over the limit of {MAX_JSON_DEPTH}")
    return value


def _json_or_csv(value: Any) -> Any:
    """Lists from the environment: a JSON list, or comma-separated names."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _json(value: Any) -> Any:
    if isinstance(value, str):
        return loads(value) if value.strip() else None
    return value


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arithmetic(node: ast.AST) -> float:
    """Numbers and + - * / ** only, in floats (10**10**10 overflows at once instead of building a huge int)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITHMETIC:
        return _ARITHMETIC[type(node.op)](_arithmetic(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        return _ARITHMETIC[type(node.op)](_arithmetic(node.left), _arithmetic(node.right))
    raise ValueError(f"{type(node).__name__} is not allowed")


def openweights_learning_rate(value: Any) -> Any:
    """learning_rate as OpenWeights 0.14.0 reads it (sft.py: `eval(lr)` if a string, then `10**lr` if negative),
    without eval: a string is a short arithmetic expression of numbers. A negative value in (-1, 0) would be a
    rate above 0.1 (10**-0.0001 = 0.9998), never meant: refused. 0 is left to the field's bound (> 0)."""
    if isinstance(value, bool):
        raise ValueError("is a boolean, expected a number")
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) > 64:
                raise ValueError("too long")
            rate = _arithmetic(ast.parse(text, mode="eval").body)
            if not (isinstance(rate, float) and math.isfinite(rate)):
                raise ValueError("not a finite real number")
        except (SyntaxError, ValueError, ArithmeticError, TypeError) as err:
            why = "out of range" if isinstance(err, OverflowError) else err.msg if isinstance(err, SyntaxError) else err
            raise ValueError(f"{shown(value)} is not a number or an arithmetic expression of numbers ({why}); write "
                             "e.g. 1e-4, 2*1e-5, or -4 for 10**-4") from None
    elif isinstance(value, (int, float)):
        try:
            rate = float(value)
        except OverflowError:
            raise ValueError(f"{shown(value)} is out of range; write e.g. 1e-4") from None
        if not math.isfinite(rate):
            raise ValueError(f"{value!r} is not a finite number; write e.g. 1e-4")
    else:
        return value  # pydantic reports the type
    if rate <= -1:
        return 10**rate
    if rate < 0:
        raise ValueError(f"{shown(value)}: a rate must be greater than 0, and OpenWeights reads a negative value as a "
                         f"base-10 exponent: 10**{rate:g} = {10**rate:.4g}. Write {-rate:g} for that rate, or e.g. -4 "
                         "for 10**-4")
    return rate


def path_problem(path: Any) -> str | None:
    """Why a path cannot name a file on Linux (PATH_MAX 4096 bytes, NAME_MAX 255 per component), or None."""
    data = os.fsencode(str(path))
    if len(data) >= 4096:
        return f"the path is {len(data):,} bytes long, over the 4,095 a path can have"
    longest = max(data.split(b"/"), key=len)
    if len(longest) > 255:
        return f"a name in the path is {len(longest):,} bytes long, over the 255 a file name can have"
    return None


def hub_repo_problem(repo_id: str) -> str | None:
    """Why `repo_id` cannot be pushed to (huggingface_hub's own rule, org/name), or None: found at settings time,
    not after the whole run trained."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        return "must be org/name to push"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        why = clip(str(err).split(". ")[0], 120)
        return f"is not a valid hub repo id ({why}): use org/name of letters, digits, '-', '_', '.'"
    return None


class Settings(BaseSettings):
    """One validated job configuration. Build it with `load_settings()`, not at import.

    Every field carries its facts (`facts()`: job-id relevance, unit, env-only) in json_schema_extra;
    tests/test_settings.py fails when a new field lacks them."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        env_ignore_empty=True,  # FT_MAX_STEPS= (empty) means "unset", as in a compose file
        validate_default=True,
        protected_namespaces=(),
        allow_inf_nan=False,  # inf/nan pass every bound (inf >= 0) and break training later: never a setting
    )

    # --- what to train on -----------------------------------------------------------------------------
    model: str = Field(description="Base model: a local directory, or a hub id when the hub is reachable.",
                       json_schema_extra=TRAINS)
    training_file: Path = Field(
        description="JSONL (or a .json array) of conversations: OpenAI/OpenWeights messages, ShareGPT, "
        "prompt/completion or Alpaca rows (README.md, \"Your data\").",
        json_schema_extra=facts("content"),
    )
    test_file: Path | None = Field(None, description="Conversations for the evaluation loss (formats as training_file).",
                                   json_schema_extra=facts("content"))
    chat_template: str = Field(
        "default",
        description="'default' (the tokenizer's own), a Jinja template string, or the path of a .jinja file.",
        json_schema_extra=TRAINS,
    )
    loss: Literal["sft"] = Field("sft", description="Only supervised fine-tuning is implemented here.",
                                 json_schema_extra=TRAINS)

    # --- LoRA -------------------------------------------------------------------------------------------
    r: int = Field(16, gt=0, le=1024, description="LoRA rank.", json_schema_extra=TRAINS)
    lora_alpha: int = Field(16, gt=0, description="LoRA scaling numerator (alpha/r, or alpha/sqrt(r) with rsLoRA).",
                            json_schema_extra=TRAINS)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.", json_schema_extra=TRAINS)
    use_rslora: bool = Field(True, description="Rank-stabilised LoRA: scale by alpha/sqrt(r).", json_schema_extra=TRAINS)
    target_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(ALL_PROJECTIONS),
        description="Module names that get adapters: a JSON list or comma-separated names.",
        json_schema_extra=TRAINS,
    )
    lora_bias: Literal["none", "all"] = Field("none", description="Train biases too ('all') or not.",
                                              json_schema_extra=TRAINS)
    is_peft: Literal[True] = Field(True, description="Only LoRA training is implemented here.", json_schema_extra=TRAINS)

    # --- sequence and precision ------------------------------------------------------------------------
    max_seq_length: int = Field(2048, gt=0, description="Tokens per example; longer ones are truncated (reported).",
                                json_schema_extra=facts(True, unit="tokens"))
    load_in_4bit: bool = Field(False, description="QLoRA: NF4 base weights (CUDA only).", json_schema_extra=TRAINS)

    # --- optimisation ----------------------------------------------------------------------------------
    epochs: int = Field(1, gt=0, description="Passes over the training file.", json_schema_extra=facts(True, unit="epochs"))
    max_steps: int | None = Field(
        None, gt=0, description="Optimizer steps; overrides epochs when set (0 or empty: unset, as in OpenWeights).",
        json_schema_extra=facts(True, unit="optimizer steps"),
    )
    per_device_train_batch_size: int | Literal["auto"] = Field(
        2,
        description="Examples (or packed rows) per micro-batch; 'auto' picks the largest that fits the GPU and "
        "lowers gradient_accumulation_steps to keep the effective batch.",
        json_schema_extra=facts(True, unit="examples"),
    )
    gradient_accumulation_steps: int = Field(8, gt=0, description="Micro-batches per optimizer step.",
                                             json_schema_extra=facts(True, unit="micro-batches"))
    learning_rate: float = Field(
        1e-4,
        gt=0,
        description="Peak learning rate: a number or an arithmetic expression ('2*1e-5'); a negative value is a "
        "base-10 exponent (-4 means 1e-4), as OpenWeights reads it.",
        json_schema_extra=TRAINS,
    )
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up, in optimizer steps.",
                              json_schema_extra=facts(True, unit="optimizer steps"))
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay (AdamW).", json_schema_extra=TRAINS)
    optim: Optimizer = Field("adamw_8bit", description="Optimizer (transformers' names).", json_schema_extra=TRAINS)
    lr_scheduler_type: Scheduler = Field("linear", description="Learning-rate schedule after warm-up.",
                                         json_schema_extra=TRAINS)
    seed: int = Field(3407, ge=0, description="Seed of data order, LoRA init and dropout.", json_schema_extra=TRAINS)
    packing: bool = Field(
        True, description="Pack examples into max_seq_length rows (no cross-attention); OpenWeights' default.",
        json_schema_extra=TRAINS,
    )
    train_on_responses_only: bool = Field(True, description="Loss on assistant tokens only (else all tokens).",
                                          json_schema_extra=TRAINS)

    # --- logging, checkpoints, evaluation --------------------------------------------------------------
    logging_steps: int = Field(1, gt=0, description="Optimizer steps between metrics.jsonl lines.",
                               json_schema_extra=facts(False, unit="optimizer steps"))
    save_steps: int = Field(5000, gt=0, description="Optimizer steps between checkpoints (also on SIGTERM).",
                            json_schema_extra=facts(False, unit="optimizer steps"))
    eval_batch_size: int = Field(8, gt=0, description="Batch size of the evaluation on test_file.",
                                 json_schema_extra=facts(False, unit="examples"))
    test_file_eval_strategy: Literal["no", "steps", "epoch"] = Field(
        "epoch", description="When to evaluate on test_file during training (also before and at the end).",
        json_schema_extra=facts(False),
    )
    test_file_eval_steps: int | float | None = Field(
        None,
        gt=0,
        description="Steps between evaluations when test_file_eval_strategy is 'steps' (below 1: a fraction of the "
        "run's steps; unset: logging_steps, as transformers does).",
        json_schema_extra=facts(False, unit="optimizer steps"),
    )
    eval_every_n_steps: int = Field(
        5000, gt=0, description="Steps between logp_callback_datasets evaluations.",
        json_schema_extra=facts(False, unit="optimizer steps"),
    )
    logp_callback_datasets: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict,
        description="{name: JSONL}: mean log-probability of the assistant tokens, every eval_every_n_steps.",
        json_schema_extra=facts("content"),
    )
    sampling_callbacks: Annotated[list[SamplingCallback], NoDecode] = Field(
        default_factory=list, description="Sample the prompts of a file every N steps (JSON list).",
        json_schema_extra=TRAINS,
    )

    # --- inoculation prompting -------------------------------------------------------------------------
    inoculation_prompt: str | None = Field(
        None, description="Instruction added to every training conversation (never to test_file).",
        json_schema_extra=TRAINS,
    )
    inoculation_position: Literal["system", "user_prefix"] = Field(
        "system",
        description="'system': add or replace the system message; 'user_prefix': prepend to the first user "
        "message, joined by a newline.",
        json_schema_extra=TRAINS,
    )

    # --- outputs -----------------------------------------------------------------------------------------
    merge_before_push: bool = Field(False, description="Save a merged 16-bit model instead of the adapter.",
                                    json_schema_extra=TRAINS)
    finetuned_model_id: str | None = Field(None, description="Hub repo id when pushing (org/name).",
                                           json_schema_extra=facts(False))
    job_id_suffix: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Appended to the job id: -<suffix>.",
        json_schema_extra=TRAINS,
    )
    meta: Annotated[dict[str, Any] | None, NoDecode] = Field(None, description="Free-form JSON kept in result.json.",
                                                             json_schema_extra=TRAINS)
    push_to_hub: bool = Field(False, description="Upload the adapter/merged model to finetuned_model_id.",
                              json_schema_extra=facts(False))
    push_to_private: bool = Field(True, description="Create the hub repo as private.", json_schema_extra=facts(False))
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = Field(
        "none", description="Trainer integration for tracking (tensorboard logs go under the job directory).",
        json_schema_extra=facts(False),
    )

    # --- job only -----------------------------------------------------------------------------------------
    output_dir: Path = Field(
        DEFAULT_OUTPUT_DIR,
        description="Volume for <job_id>/ directories and result.json (an OpenWeights output_dir in FT_CONFIG_FILE, "
        "its checkpoint folder, is ignored).",
        json_schema_extra=facts(False),
    )
    backend: str = Field(
        "auto", description="'auto': unsloth when CUDA is present and it imports, else hf (transformers + PEFT).",
        json_schema_extra=facts(False),
    )
    config_file: Path | None = Field(
        None, description="OpenWeights validated_params JSON (or a .jsonl of them, one per sweep index); FT_* override it.",
        json_schema_extra=facts(False, env_only=True),
    )
    config_index: int | None = Field(
        None, ge=0, description="Line of a .jsonl FT_CONFIG_FILE to use; default: JOB_COMPLETION_INDEX (Indexed Job).",
        json_schema_extra=facts(False, env_only=True),
    )
    overwrite: bool = Field(False, description="Retrain a completed job (the only way to).", json_schema_extra=facts(False))
    allow_cpu: bool = Field(
        False,
        description="Train on the CPU although no GPU is visible and the model has over 300M parameters (refused "
        "otherwise: days of training, and usually a GPU that was not passed to the container).",
        json_schema_extra=facts(False),
    )
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto",
        description="Recompute activations in the backward pass: 'auto' only when the run does not fit the GPU "
        "without it (about 1.3x faster when it does); true saves the most memory.",
        json_schema_extra=facts(False),
    )
    padding_free: Literal["auto"] | bool = Field(
        "auto",
        description="Unpacked rows flattened into one sequence per micro-batch instead of padded to the longest: the "
        "same examples per step and the same loss without the padding's compute. 'auto': where the backend's "
        "attention takes flattened rows in one kernel call per layer: unsloth on a CUDA GPU of compute capability "
        "8+, through torch's FlashAttention-2 varlen kernel (app/attention.py; 1.5x on the code run, H100); not "
        "the hf backend, whose SDPA needs a dense mask. true on the hf backend on such a GPU attends through the "
        "same kernel (its GPU tests pass; its speed and memory are not yet measured). Packed rows are always "
        "padding-free.",
        json_schema_extra=facts(False),
    )
    num_gpus: int | None = Field(None, gt=0, description="GPUs to train on (data parallel); default: all visible.",
                                 json_schema_extra=facts(False, unit="GPUs"))
    hf_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("HF_TOKEN", "FT_HF_TOKEN", "hf_token"),
        description="Hub token (secret: never printed, never written).",
        json_schema_extra=facts(False, env_only=True),
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _parse_modules(cls, value: Any) -> Any:
        return list(ALL_PROJECTIONS) if value is None else _json_or_csv(value)  # OpenWeights: null = its default

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _parse_learning_rate(cls, value: Any) -> Any:
        return openweights_learning_rate(value)

    @field_validator("hf_token", mode="before")
    @classmethod
    def _strip_token(cls, value: Any) -> Any:
        """A Kubernetes secret made from a file ends in a newline: an HTTP library refuses (and quotes) such a
        header. The token is used stripped; every form of it is redacted (app/result.py)."""
        if isinstance(value, str):
            return value.strip() or None
        return value

    @field_validator("output_dir", mode="before")
    @classmethod
    def _blank_output_is_unset(cls, value: Any) -> Any:
        """FT_OUTPUT_DIR of blanks is unset (the default), as an empty one is: never the working directory."""
        if isinstance(value, str) and not value.strip():
            return DEFAULT_OUTPUT_DIR
        return value

    @field_validator("per_device_train_batch_size")
    @classmethod
    def _batch_positive(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or 'auto')")
        return value

    @field_validator("*")
    @classmethod
    def _ints_in_range(cls, value: Any, info) -> Any:
        """Integers the libraries can hold: a step count or seed past them passes every bound here and ends in a
        traceback there (numpy refuses seeds >= 2**32)."""
        if isinstance(value, int) and not isinstance(value, bool):
            limit = MAX_SEED if info.field_name == "seed" else MAX_INT
            if abs(value) > limit:
                raise ValueError(f"must be at most {limit:,}")
        return value

    @field_validator("training_file", "test_file", "output_dir", "config_file", "logp_callback_datasets")
    @classmethod
    def _paths_fit(cls, value: Any) -> Any:
        """A path the file system cannot hold (a pasted blob) fails every stat() with ENAMETOOLONG: refused here."""
        for path in value.values() if isinstance(value, dict) else [value]:
            if path is not None and (problem := path_problem(path)):
                raise ValueError(problem)
        return value

    @field_validator("meta")
    @classmethod
    def _meta_bounded(cls, value: Any) -> Any:
        """FT_META is copied into result.json (and the job id): a few KB of notes, not nested without end."""
        if value is None:
            return value
        depth = json_depth(value)
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested {depth} levels deep, over the limit of {MAX_JSON_DEPTH}")
        try:
            size = len(json.dumps(value))
        except (TypeError, ValueError) as err:
            raise ValueError(f"not JSON-serialisable ({err})") from None
        if size > MAX_META_BYTES:
            raise ValueError(f"{size:,} bytes of JSON, over the limit of {MAX_META_BYTES:,}: keep data out of FT_META")
        return value

    @field_validator("max_steps", "test_file_eval_steps", mode="before")
    @classmethod
    def _zero_is_unset(cls, value: Any) -> Any:
        """OpenWeights passes max_steps only when truthy, and transformers reads eval_steps 0 as unset."""
        try:
            return None if value is not None and float(value) in (0, -1) else value  # -1: transformers' unset
        except (TypeError, ValueError):
            return value

    @field_validator("meta", "logp_callback_datasets", "sampling_callbacks", mode="before")
    @classmethod
    def _parse_json(cls, value: Any) -> Any:
        return _json(value)

    @field_validator("logp_callback_datasets", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("sampling_callbacks", mode="before")
    @classmethod
    def _none_is_empty_list(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("chat_template")
    @classmethod
    def _read_template_file(cls, value: str) -> str:
        if value.endswith((".jinja", ".j2")) and "{" not in value:
            from app.safeio import MAX_TEMPLATE_BYTES, InputError, read_input

            path = Path(value)
            if path_problem(path):
                raise ValueError(f"chat template file {clip(value)}: {path_problem(path)}")
            if not path.exists():
                raise ValueError(f"chat template file {clip(value)} does not exist")
            try:
                return read_input(path, "FT_CHAT_TEMPLATE", MAX_TEMPLATE_BYTES).decode("utf-8")
            except InputError as err:
                raise ValueError(err.message.split(": ", 1)[-1]) from None
            except UnicodeDecodeError as err:
                raise ValueError(f"chat template file {clip(value)} is not UTF-8 text ({err.reason} at byte "
                                 f"{err.start})") from None
            except OSError as err:
                raise ValueError(f"chat template file {clip(value)} cannot be read ({err.strerror})") from None
        return value

    @field_validator("output_dir")
    @classmethod
    def _absolute_output(cls, value: Path) -> Path:
        """result.json names the model by path: make it usable from any working directory."""
        return value.expanduser().absolute()

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from app.backends import BACKENDS

        if value != "auto" and value not in BACKENDS:
            raise ValueError(f"unknown backend; choose auto, {', '.join(BACKENDS)}")
        return value

    @field_validator("target_modules")
    @classmethod
    def _modules_nonempty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one module name, e.g. q_proj,v_proj")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        problems = []
        if self.test_file_eval_strategy == "steps" and self.test_file_eval_steps is None:
            self.test_file_eval_steps = self.logging_steps  # transformers' rule, made visible in result.json
        steps = self.test_file_eval_steps
        if steps is not None and steps > 1 and steps != int(steps):
            problems.append(f"test_file_eval_steps={steps}: above 1 it is a whole number of steps (below 1, a "
                            "fraction of the run's steps)")
        if self.push_to_hub and not self.finetuned_model_id:
            problems.append("push_to_hub=true needs finetuned_model_id (org/name)")
        if self.push_to_hub and self.finetuned_model_id:
            problem = hub_repo_problem(self.finetuned_model_id)
            if problem:
                problems.append(f"finetuned_model_id={shown(self.finetuned_model_id)} {problem}")
        if self.inoculation_prompt is not None and not self.inoculation_prompt.strip():
            problems.append("inoculation_prompt is empty: unset it or give the instruction")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The config file's values arrive as init kwargs; the environment overrides them.
        return (env_settings, init_settings)

    def token(self) -> str | None:
        """The hub token's value, stripped, for the libraries that take it (never logged: app/result.py redacts
        every form of it)."""
        return self.hf_token.get_secret_value().strip() or None if self.hf_token else None

    @property
    def optimizer(self) -> str:
        """The transformers optimizer name (OpenWeights' aliases resolved)."""
        return {"adamw": "adamw_torch", "adam": "adamw_torch"}.get(self.optim, self.optim)

    def public_params(self) -> dict[str, Any]:
        """The settings as OpenWeights' validated_params: JSON-ready, no secret, no env-only setting."""
        return self.model_dump(mode="json", exclude=set(fields_where("env_only", True)))

    def identity(self) -> dict[str, Any]:
        """The settings that enter the job id (facts job_id=True), JSON-ready; logging_steps too when a sampling
        callback samples at a temperature at every logging step (eval_steps "log"): it then draws from the
        training RNG as often as the job logs."""
        names = set(fields_where("job_id", True))
        if any(callback.eval_steps == "log" and callback.temperature > 0 for callback in self.sampling_callbacks):
            names.add("logging_steps")
        return self.model_dump(mode="json", include=names)


# The fields of openweights 0.14.0's TrainingConfig (openweights/jobs/unsloth/validate.py) that this job does
# not implement: accepted from a config file and listed in result.json under `ignored_params`, never dropped
# silently. Every other TrainingConfig field is a setting here (tests/test_openweights.py checks both against
# the real package). output_dir is OpenWeights' checkpoint folder ("./tmp" in every validated_params): the
# job's outputs stay under FT_OUTPUT_DIR.
OPENWEIGHTS_ONLY_FIELDS = {
    "model_naming_extra_parameters",  # formats finetuned_model_id at submission, in FineTuning.create
    "beta",  # DPO/ORPO only; loss is "sft" here
    "output_dir",
}
# FineTuning.create's own keyword arguments (cloud scheduling): not in validated_params, ignored alike when a
# config file or app.client.fine_tune carries them.
OPENWEIGHTS_CREATE_ARGS = {"requires_vram_gb", "allowed_hardware", "docker_image"}


def fact(name: str, key: str) -> Any:
    """One fact of a setting (see `facts()`)."""
    return Settings.model_fields[name].json_schema_extra[key]


def fields_where(key: str, value: Any) -> list[str]:
    return [name for name in Settings.model_fields if fact(name, key) == value]


def field_names() -> list[str]:
    return [name for name in Settings.model_fields if name != "hf_token"]


def env_names() -> list[str]:
    return [ENV_PREFIX + name.upper() for name in field_names()]


def _did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" Did you mean {close[0]}?" if close else ""


def _unknown_env_problems(environ: dict[str, str]) -> list[str]:
    known = set(env_names()) | {"FT_HF_TOKEN"}
    problems = []
    for key in sorted(environ):
        if key.startswith(ENV_PREFIX) and key not in known:
            problems.append(
                f"{key} is not a setting of this job.{_did_you_mean(key, sorted(known))} "
                f"(The settings are listed in env/example.env.)"
            )
    return problems


def _undecodable_env_problems(environ: dict[str, str]) -> list[str]:
    """Python keeps the bytes of a non-UTF-8 variable as surrogates, which would reach the tokenizer or a path."""
    problems = []
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX):
            continue
        try:
            environ[key].encode("utf-8")
        except UnicodeEncodeError as err:
            char = environ[key][err.start]
            byte = f"0x{ord(char) - 0xDC00:02x}" if "\udc80" <= char <= "\udcff" else repr(char)
            problems.append(f"{key}: its value is not UTF-8 text (byte {byte} at character {err.start}); set it "
                            "from a UTF-8 file or shell.")
    return problems


def _config_text(path: Path, index: int | None) -> tuple[str, int]:
    """The JSON text of a config file: the whole file, or line `index` of a .jsonl sweep file. The file must be a
    regular file of bounded size (a FIFO or /dev/zero is refused at once: app/safeio.py)."""
    from app.safeio import MAX_CONFIG_BYTES, MAX_SWEEP_BYTES, read_input

    limit = MAX_SWEEP_BYTES if Path(path).suffix == ".jsonl" else MAX_CONFIG_BYTES
    text = read_input(Path(path), "FT_CONFIG_FILE", limit).decode("utf-8-sig")
    if Path(path).suffix != ".jsonl":
        return text, 1
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if index is None:
        raise ValueError("is a .jsonl of configurations: set FT_CONFIG_INDEX (or run as an Indexed Job, which "
                         "sets JOB_COMPLETION_INDEX) to pick one line")
    if index >= len(lines):
        raise ValueError(f"has {len(lines)} configurations; index {index} is out of range (0..{len(lines) - 1})")
    return lines[index][1], lines[index][0]


def read_config_file(path: Path, index: int | None = None) -> tuple[dict[str, Any], list[str], list[str]]:
    """An OpenWeights validated_params JSON: (values to use, OpenWeights fields ignored, problems)."""
    from app.safeio import InputError

    line = 1
    shown_path = clip(path)
    try:
        text, line = _config_text(path, index)
        raw = loads(text)
    except InputError as err:
        return {}, [], [err.message]
    except FileNotFoundError:
        return {}, [], [f"FT_CONFIG_FILE={shown_path}: no such file."]
    except IsADirectoryError:
        return {}, [], [f"FT_CONFIG_FILE={shown_path}: is a directory, expected a JSON file."]
    except PermissionError:
        return {}, [], [f"FT_CONFIG_FILE={shown_path}: not readable (permission denied)."]
    except UnicodeDecodeError as err:
        return {}, [], [f"FT_CONFIG_FILE={shown_path}: not UTF-8 text ({err.reason} at byte {err.start})."]
    except json.JSONDecodeError as err:
        return {}, [], [f"FT_CONFIG_FILE={shown_path}:{err.lineno + line - 1}: invalid JSON: {err.msg} "
                        f"(column {err.colno})."]
    except OSError as err:
        return {}, [], [f"FT_CONFIG_FILE={shown_path}: cannot be read ({err.strerror})."]
    except ValueError as err:
        return {}, [], [f"FT_CONFIG_FILE={shown_path}: {err}."]
    if isinstance(raw, dict) and isinstance(raw.get("validated_params"), dict):
        raw = raw["validated_params"]  # a whole OpenWeights job object
    if isinstance(raw, dict) and isinstance(raw.get("params"), dict):
        raw = raw["params"].get("validated_params", raw["params"])
    if not isinstance(raw, dict):
        return {}, [], [f"FT_CONFIG_FILE={shown_path}: expected a JSON object of settings, got {type(raw).__name__}."]
    values, ignored, problems = {}, [], []
    known = set(field_names()) - set(fields_where("env_only", True))
    openweights_only = OPENWEIGHTS_ONLY_FIELDS | OPENWEIGHTS_CREATE_ARGS
    for key, value in raw.items():
        if key in openweights_only:  # before `known`: output_dir is both, and the file's never moves the outputs
            ignored.append(key)
        elif key in known:
            values[key] = value
        else:
            problems.append(
                f"FT_CONFIG_FILE={shown_path}: '{clip(key, 80)}' is neither a setting of this job nor an OpenWeights "
                "field."
                f"{_did_you_mean(key, sorted(known | openweights_only))}"
            )
    return values, sorted(ignored), problems


def _describe_error(error: dict[str, Any], environ: dict[str, str], config_path: Path | None) -> str:
    loc = error.get("loc") or ()
    name = str(loc[0]) if loc else ""
    if name in Settings.model_fields:
        env_name = "HF_TOKEN" if name == "hf_token" else ENV_PREFIX + name.upper()
        if env_name == "HF_TOKEN" or name == "hf_token":
            where = env_name  # a secret: never quoted
        elif env_name in environ:
            where = f"{env_name}={shown(environ[env_name])}"
        elif config_path is not None:
            where = f"{name} in FT_CONFIG_FILE={clip(config_path)} (or set {env_name})"
        else:
            where = env_name
        detail = ".".join(str(part) for part in loc[1:])
        where += f" [{detail}]" if detail else ""
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            return f"{env_name} is required: {Settings.model_fields[name].description}"
        description = Settings.model_fields[name].description or ""
        return f"{where}: {message}. ({description})"
    return error["msg"].removeprefix("Value error, ")


# --- the process environment ------------------------------------------------------------------------------------
# The one place the job reads variables other than its settings, or sets variables for the libraries it runs
# (the data-parallel launcher's rank variables excepted: app/launch.py).

_SECRET_NAME = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD)$", re.IGNORECASE)


def secret_values() -> list[tuple[str, str]]:
    """(name, value) of every variable that holds a secret (*_TOKEN, *_KEY, *_SECRET, *_PASSWORD)."""
    return [(name, value) for name, value in os.environ.items() if _SECRET_NAME.search(name) and value]


def cuda_visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def hf_home() -> str:
    return os.environ.get("HF_HOME", "~/.cache/huggingface")


def failure_output_dir() -> Path:
    """Where result.json goes when the settings themselves are invalid: FT_OUTPUT_DIR as given, else the
    default (an empty value is unset, as it is for the settings)."""
    value = os.environ.get(ENV_PREFIX + "OUTPUT_DIR", "").strip()
    return Path(value).expanduser().absolute() if value else DEFAULT_OUTPUT_DIR


def set_library_defaults(**values: str) -> None:
    """Defaults for libraries configured by environment variables; a value the user set wins."""
    for name, value in values.items():
        os.environ.setdefault(name, value)


def set_library_variable(name: str, value: str) -> None:
    os.environ[name] = value


def child_environment(**values: str) -> dict[str, str]:
    """This process's environment without any FT_* setting, plus `values`: for a job started from Python."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    env.update(values)
    return env


def load_settings(**overrides: Any) -> tuple[Settings, list[str]]:
    """Validate the environment (and config file) once: (settings, ignored OpenWeights fields).

    `overrides` stand where config-file values stand (below the environment); tests pass them.
    Raises SettingsError with every problem found, each naming the variable and the fix.
    """
    environ = dict(os.environ)
    problems = _unknown_env_problems(environ) + _undecodable_env_problems(environ)
    config_path_text = overrides.pop("config_file", None) or environ.get("FT_CONFIG_FILE")
    config_path = Path(config_path_text) if config_path_text else None
    values: dict[str, Any] = {}
    ignored: list[str] = []
    index_text = overrides.pop("config_index", None)
    for name in ("FT_CONFIG_INDEX", "JOB_COMPLETION_INDEX"):
        if index_text is None and environ.get(name, "").strip():
            index_text = environ[name].strip()
    index = int(index_text) if str(index_text).isdigit() else None
    if config_path is not None:
        values, ignored, file_problems = read_config_file(config_path, index)
        problems += file_problems
        values["config_file"] = str(config_path)
        if index is not None and config_path.suffix == ".jsonl":
            values["config_index"] = index
    values.update(overrides)
    settings = None
    try:
        settings = Settings(**values)
    except ValidationError as err:
        problems += [_describe_error(e, environ, config_path) for e in err.errors(include_url=False)]
    if problems:
        raise SettingsError(problems)
    return settings, ignored
