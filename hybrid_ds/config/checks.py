"""Validating a built Config on its own: bounds, required keys, combinations of keys, batch
arithmetic for a given world, and the files it names (data, model weights, OUTPUT_DIR, DS_CONFIG,
reward models). Checks that need other layers (optimizers, reward specs, placement, resume) are
composed with these by :mod:`hybrid_ds.run.preflight`."""

from __future__ import annotations

import difflib
import json
import os
import re
import tempfile
from typing import Any, Optional

from hybrid_ds.assets import BUILTIN_MODELS
from hybrid_ds.config.batch_plan import BatchPlan
from hybrid_ds.config.heads import heads_problems
from hybrid_ds.config.load import ds_config_names, resolve_ds_config
from hybrid_ds.config.refs import ref_model_keys, refs_problems
from hybrid_ds.config.schema import REWARD_KEY, TRACKER_PACKAGES, Config, key_table
def _check_bounds(key: str, value, meta) -> Optional[str]:
    if value is None:
        return None
    if meta.get("choices") and value not in meta["choices"]:
        near = difflib.get_close_matches(str(value), meta["choices"], n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        return f"{key}: {value!r} is not one of {', '.join(map(str, meta['choices']))}.{hint}"
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
            return f"{key}: {value} is out of range; it must be {'>' if meta.get('lo_open') else '>='} {lo}."
        if hi is not None and value > hi:
            return f"{key}: {value} is out of range; it must be <= {hi}."
    return None


def validate(cfg: Config) -> list[str]:
    """The problems of a built Config on its own: bounds, required keys, combinations of keys."""
    problems = []
    for key, (sec, f) in key_table().items():
        value = getattr(getattr(cfg, sec), f.name) if sec else getattr(cfg, f.name)
        if f.metadata.get("required") and not value:
            problems.append(f"{key}: required; {f.metadata['doc']}")
            continue
        p = _check_bounds(key, value, f.metadata)
        if p:
            problems.append(p)
    if cfg.run.bf16 and cfg.run.fp16:
        problems.append("BF16 and FP16: choose one mixed-precision mode, not both.")
    if cfg.gen.old_logprobs == "rollout" and cfg.gen.sampler == "hf":
        problems.append('OLD_LOGPROBS="rollout" needs the lean sampler (SAMPLER "lean" or "lean_exact"): '
                        'transformers generate returns no values; use "auto" or "recompute".')
    if not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in cfg.sched.milestones):
        problems.append(f"MILESTONES: expected a list of positive integers, got {cfg.sched.milestones!r}.")
    if cfg.run.mode == "hybrid" and cfg.hybrid.cycle_sft_steps + cfg.hybrid.cycle_ppo_updates == 0:
        problems.append("CYCLE_SFT_STEPS and CYCLE_PPO_UPDATES are both 0: a hybrid cycle would do nothing.")
    if cfg.hybrid.curriculum != "none" and cfg.run.mode != "hybrid":
        problems.append(f"CURRICULUM ({cfg.hybrid.curriculum}) applies to MODE=hybrid only.")
    if cfg.hybrid.curriculum != "none" and cfg.hybrid.curriculum_sft_steps_end + cfg.hybrid.curriculum_ppo_updates_end == 0:
        problems.append("CURRICULUM_SFT_STEPS_END and CURRICULUM_PPO_UPDATES_END are both 0: the last cycles would do "
                        "nothing.")
    if cfg.hybrid.sft_warmup_steps and cfg.run.mode != "hybrid":
        problems.append(f"SFT_WARMUP_STEPS ({cfg.hybrid.sft_warmup_steps}) applies to MODE=hybrid only; "
                        f"for {cfg.run.mode} start from an SFT run's output instead.")
    if cfg.hybrid.ref_init == "after_warmup" and not (cfg.run.mode == "hybrid" and cfg.hybrid.sft_warmup_steps):
        problems.append("REF_INIT=after_warmup needs MODE=hybrid and SFT_WARMUP_STEPS > 0.")
    if cfg.gen.min_new_tokens > cfg.gen.max_new_tokens:
        problems.append(f"MIN_NEW_TOKENS ({cfg.gen.min_new_tokens}) exceeds MAX_NEW_TOKENS "
                        f"({cfg.gen.max_new_tokens}).")
    generates = cfg.run.mode == "ppo" or (cfg.run.mode == "hybrid" and cfg.pref.hybrid_rl == "ppo")
    if generates and cfg.gen.max_new_tokens >= cfg.data.maxseq:  # MODE=dpo and rm generate nothing
        problems.append(f"MAX_NEW_TOKENS ({cfg.gen.max_new_tokens}) must be below MAXSEQ ({cfg.data.maxseq}): MAXSEQ "
                        f"bounds prompt + response, so PPO prompts keep their last MAXSEQ - MAX_NEW_TOKENS tokens.")
    if cfg.run.ref_placement == "separate" and cfg.run.mode == "sft":
        problems.append("REF_PLACEMENT=separate with MODE=sft: SFT uses no reference model; use colocated.")
    if cfg.ppo.advantage in ("grpo", "rloo") and cfg.ppo.num_generations < 2 and cfg.run.mode != "sft":
        problems.append(f"ADVANTAGE={cfg.ppo.advantage} compares the responses of one prompt: set NUM_GENERATIONS "
                        f">= 2 (got {cfg.ppo.num_generations}; 4 to 16 is usual).")
    if cfg.ppo.adaptive_kl and cfg.ppo.kl_controller == "pi" and cfg.ppo.init_kl_coef <= 0:
        problems.append("KL_CONTROLLER=pi scales INIT_KL_COEF, which is 0: set INIT_KL_COEF > 0 (e.g. 0.05).")
    if cfg.hybrid.ref_sync_every and cfg.run.mode != "hybrid":
        problems.append(f"REF_SYNC_EVERY ({cfg.hybrid.ref_sync_every}) counts hybrid cycles: it applies to "
                        f"MODE=hybrid only.")
    if cfg.run.ref_placement == "separate" and cfg.hybrid.ref_init != "start":
        problems.append("REF_INIT=after_warmup needs the reference on the policy ranks (REF_PLACEMENT=colocated).")
    problems += lora_problems(cfg)
    problems += eval_problems(cfg)
    problems += multiturn_problems(cfg)
    problems += log_problems(cfg)
    problems += heads_problems(cfg.heads.heads)
    problems += refs_problems(cfg)
    if cfg.heads.heads and cfg.run.mode == "ppo":
        problems.append("HEADS: task heads train with the SFT loss and MODE=ppo has no SFT step; use MODE=sft or "
                        "hybrid.")
    return problems


def log_problems(cfg: Config) -> list[str]:
    """REPORT_TO names known trackers (TRACKER_PACKAGES), or none on its own."""
    r = cfg.log.report_to
    names = [r] if isinstance(r, str) else r
    known = ", ".join(TRACKER_PACKAGES)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return [f"REPORT_TO: expected a tracker name ({known}), a list of them, or none; got {r!r}."]
    problems = []
    for n in names:
        if n != "none" and n not in TRACKER_PACKAGES:
            near = difflib.get_close_matches(n, list(TRACKER_PACKAGES) + ["none"], n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            problems.append(f"REPORT_TO: {n!r} is not a tracker hybrid_ds logs to ({known}, or none).{hint}")
    if "none" in names and len(names) > 1:
        problems.append(f"REPORT_TO: none cannot be combined with trackers, got {r!r}.")
    if len(set(names)) != len(names):
        problems.append(f"REPORT_TO: a tracker is named twice in {r!r}.")
    return problems


def tracker_package_problems(cfg: Config) -> list[str]:
    """Each tracker of REPORT_TO is installed (its package is found, not imported). Accelerate would
    otherwise drop a missing one silently and the run would log nowhere."""
    import importlib.util

    if log_problems(cfg):
        return []
    return [f"REPORT_TO: {n} is not installed; pip install {TRACKER_PACKAGES[n]} (or leave {n} out of REPORT_TO)."
            for n in cfg.log.trackers if importlib.util.find_spec(n) is None]


def multiturn_problems(cfg: Config) -> list[str]:
    """ENV and MAX_TURNS combinations (the callable itself is imported and checked by
    hybrid_ds/rollout/multiturn.py, from the preflight)."""
    problems = []
    if cfg.ppo.max_turns > 1 and not cfg.ppo.env:
        problems.append(f"MAX_TURNS ({cfg.ppo.max_turns}) counts the policy's turns of a dialogue with an "
                        f"environment: set ENV (package.module:function), or MAX_TURNS 1.")
    if cfg.ppo.env and cfg.gen.sampler == "hf":
        problems.append("ENV: multi-turn rollouts sample each turn with the lean sampler; set SAMPLER lean or "
                        "lean_exact.")
    return problems


def eval_problems(cfg: Config) -> list[str]:
    """The evaluation keys on their own (hybrid_ds/algorithms/evaluate.py)."""
    d = cfg.data
    if d.eval_file:
        return []
    return [f"{key} ({value}) applies to evaluation: set EVAL_FILE to held-out data."
            for key, value in (("EVAL_EVERY", d.eval_every), ("EVAL_SPLIT", d.eval_split),
                               ("EVAL_NUM_SAMPLES", d.eval_num_samples)) if value]


def lora_problems(cfg: Config) -> list[str]:
    """The LoRA/QLoRA keys on their own (hybrid_ds/models/lora.py); whether LORA_TARGET_MODULES
    matches the model's modules is checked at preflight, which reads the model's config."""
    lo, problems = cfg.lora, []
    t = lo.target_modules
    if not (isinstance(t, str) and t.strip()
            or isinstance(t, list) and t and all(isinstance(m, str) and m.strip() for m in t)):
        problems.append(f'LORA_TARGET_MODULES: expected "all-linear" or a non-empty list of module names, got {t!r}.')
    if lo.load_in_4bit and lo.load_in_8bit:
        problems.append("LOAD_IN_4BIT and LOAD_IN_8BIT: choose one quantisation of the base, not both.")
    quant = "LOAD_IN_4BIT" if lo.load_in_4bit else "LOAD_IN_8BIT" if lo.load_in_8bit else ""
    if quant and lo.r == 0:
        problems.append(f"{quant}: a quantised base cannot be trained itself; set LORA_R > 0 to train adapters on it.")
    if lo.r and cfg.hybrid.ref_init == "after_warmup":
        problems.append("REF_INIT=after_warmup with LORA_R > 0: the reference is the policy's base with its "
                        "adapters disabled, which stays the starting model; use REF_INIT=start, or warm up in "
                        "an SFT run and start the LoRA run from its inference_lm/.")
    if lo.r and cfg.hybrid.ref_sync_every:
        problems.append("REF_SYNC_EVERY with LORA_R > 0: the reference is the policy's base with its adapters "
                        "disabled, so it cannot follow the policy; set REF_SYNC_EVERY=0.")
    return problems


def batch_problems(cfg: Config, world: int) -> list[str]:
    """Batch sizes must split exactly into processes x accumulation x micro-batch."""
    out = []
    uses_sft = cfg.run.mode in ("sft", "hybrid") or cfg.ppo.ptx_coef > 0
    uses_ppo = cfg.run.mode in ("ppo", "hybrid")
    if uses_sft:
        out += BatchPlan.problems("SFT_BATCH", cfg.sft.batch, world, cfg.sft.grad_accum, "GRAD_ACCUM")
    if uses_ppo:
        if cfg.ppo.mini and cfg.ppo.batch % cfg.ppo.mini:
            out.append(f"PPO_MINI ({cfg.ppo.mini}) must divide PPO_BATCH ({cfg.ppo.batch}).")
        elif cfg.ppo.batch % world:
            out.append(f"PPO_BATCH ({cfg.ppo.batch}) must be divisible by the {world} processes.")
        else:
            out += BatchPlan.problems("PPO_MINI" if cfg.ppo.mini else "PPO_BATCH", cfg.ppo_mini, world,
                                      cfg.ppo.grad_accum, "PPO_GRAD_ACCUM")
    return out


def uses_pairs(cfg: Config) -> bool:
    """Whether the run trains on preference pairs (MODE=dpo, MODE=rm, or hybrid with HYBRID_RL=dpo)."""
    return cfg.run.mode in ("dpo", "rm") or (cfg.run.mode == "hybrid" and cfg.pref.hybrid_rl == "dpo")


def pref_problems(cfg: Config, world: int, check_files: bool = True) -> list[str]:
    """The preference keys (the ``pref`` section) against MODE: where the pairs come from, their batch
    arithmetic for ``world`` processes, and the reference placements DPO supports (docs/preference.md)."""
    out, mode, p = [], cfg.run.mode, cfg.pref
    dpo_hybrid = mode == "hybrid" and p.hybrid_rl == "dpo"
    if p.hybrid_rl != "ppo" and mode != "hybrid":
        out.append(f"HYBRID_RL ({p.hybrid_rl}) applies to MODE=hybrid only; MODE={mode} runs its own phase.")
    if p.pref_file and not dpo_hybrid:
        where = "TRAIN_FILE holds its pairs" if mode in ("dpo", "rm") else "it trains on no pairs"
        out.append(f"PREF_FILE applies to MODE=hybrid with HYBRID_RL=dpo; MODE={mode}: {where}. Remove PREF_FILE.")
    if dpo_hybrid and not p.pref_file:
        out.append("PREF_FILE: required with MODE=hybrid and HYBRID_RL=dpo (the preference pairs; TRAIN_FILE holds "
                   "the SFT data).")
    if check_files and p.pref_file:
        out += [q for q in [data_path_problem("PREF_FILE", p.pref_file)] if q]
    if not uses_pairs(cfg):
        return out
    out += BatchPlan.problems("PREF_BATCH", p.batch, world, p.grad_accum, "PREF_GRAD_ACCUM")
    dpo = mode == "dpo" or dpo_hybrid
    if p.dpo_label_smoothing and p.dpo_loss != "sigmoid" and dpo:
        out.append(f"DPO_LABEL_SMOOTHING applies to DPO_LOSS=sigmoid; DPO_LOSS={p.dpo_loss} has none. Remove it.")
    if cfg.run.ref_placement == "separate" and not dpo:
        out.append("REF_PLACEMENT=separate with MODE=rm: a reward model uses no reference; use colocated.")
    if mode in ("dpo", "rm") and cfg.ppo.ptx_coef > 0:
        out.append(f"PTX_COEF mixes SFT into PPO updates; MODE={mode} runs none. Remove PTX_COEF.")
    return out


_BUILTIN_DATA = ("builtin:demo-tasks", "builtin:demo-pairs")


def file_problems(cfg: Config) -> list[str]:
    """The files the config names: data, model and tokenizer, OUTPUT_DIR, DS_CONFIG, reward models."""
    out = [p for key, path in (("TRAIN_FILE", cfg.run.train_file), ("EVAL_FILE", cfg.data.eval_file))
           for p in [data_path_problem(key, path)] if p]
    data = [p for p in (cfg.run.train_file, cfg.data.eval_file) if p]
    if cfg.data.dataset_config and not any(takes_dataset_config(p) for p in data):
        out.append(f"DATASET_CONFIG ({cfg.data.dataset_config!r}) selects a configuration of a dataset directory or "
                   f"hub dataset id, and neither TRAIN_FILE nor EVAL_FILE is one (a single file or a save_to_disk "
                   f"directory has none); remove DATASET_CONFIG.")
    for key, name in (("MODEL", cfg.run.model), ("TOKENIZER", cfg.run.tokenizer)):
        if name:
            p = model_problem(key, name, BUILTIN_MODELS)
            if p:
                out.append(p)
    out += refs_file_problems(cfg)
    out_dir = cfg.run.output_dir
    problem = output_dir_problem(out_dir) if out_dir else None
    if problem:
        out.append(problem)
    launcher_ds = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if cfg.run.ds_config:
        out += ds_config_problems(cfg.run.ds_config)
    elif launcher_ds not in ("", "none"):  # deepspeed_config_file of an accelerate launch yaml
        out += ds_config_problems(launcher_ds, "deepspeed_config_file (accelerate config)")
    out += reward_path_problems(cfg.reward) if cfg.run.mode != "sft" else []
    return out


def refs_file_problems(cfg: Config) -> list[str]:
    """Each REFS model is loadable as MODEL is: a builtin, a hub name, or a local directory with its config
    and intact weight files (config/refs.py)."""
    out = []
    for key, name in ref_model_keys(cfg):
        p = model_problem(key, name, BUILTIN_MODELS)
        local = os.path.expanduser(name)
        if not p and os.path.isdir(local):
            weights = weight_file_problems(local)
            p = f"{key}: " + "; ".join(weights) + "." if weights else None
        out += [p] if p else []
    return out


# A data file's extensions (hybrid_ds/data/items.py reads them); a missing path with one is a missing file.
_DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet", ".arrow")


def hub_dataset_id(path: str) -> bool:
    """Whether TRAIN_FILE/EVAL_FILE ``path`` names a hub dataset (``org/name`` or ``name``): no local
    path of that name, and not shaped like a path or a data file name."""
    return (not os.path.exists(path) and not path.startswith((".", "/", "~", "builtin:"))
            and not path.lower().endswith(_DATA_EXTENSIONS) and path.count("/") <= 1
            and bool(_HUB_NAME.match(path)))


def takes_dataset_config(path: str) -> bool:
    """Whether DATASET_CONFIG applies to ``path``: a hub dataset id or a directory ``load_dataset`` reads
    (not a save_to_disk one, whose configuration was chosen when it was saved)."""
    if hub_dataset_id(path):
        return True
    return os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f))
                                           for f in ("dataset_info.json", "dataset_dict.json"))


def _hub_offline() -> bool:
    return any(os.environ.get(v, "0").strip().lower() not in ("0", "", "false", "no", "off")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_dataset_cached(name: str) -> bool:
    """Whether the hub dataset ``name`` has files in the local caches (the hub's download cache, or the
    datasets library's prepared cache), which ``load_dataset`` reads in offline mode."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
    return (os.path.isdir(os.path.join(constants.HF_HUB_CACHE, "datasets--" + name.replace("/", "--")))
            or os.path.isdir(os.path.join(datasets_cache, name.replace("/", "___"))))


def data_path_problem(key: str, path: str) -> Optional[str]:
    """Why data ``path`` (TRAIN_FILE or EVAL_FILE) cannot be read, or None; nothing is opened. A hub
    dataset id is accepted online (``load_dataset`` fetches it at preflight) and, offline, when cached."""
    if not path or path in _BUILTIN_DATA:
        return None
    if path.startswith("builtin:"):
        return f"{key}: unknown builtin dataset {path!r}; available: {', '.join(_BUILTIN_DATA)}."
    if hub_dataset_id(path):
        if not _hub_offline() or _hub_dataset_cached(path):
            return None
        return (f"{key}: {path!r} is not a local file or directory, so it would be loaded from the Hugging Face hub "
                f"as a dataset id, but the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and the dataset "
                f"is not in the local cache. Where the hub is reachable, save it with "
                f"datasets.load_dataset({path!r}).save_to_disk(DIR) (or download its files) and set {key} to that "
                f"directory; or give a local JSON/JSONL/parquet file or dataset directory.")
    if not os.path.exists(path):
        return f"{key}: {path!r} does not exist (working directory {os.getcwd()})."
    if not (os.path.isfile(path) or os.path.isdir(path)):
        return (f"{key}: {path!r} is not a regular file (a FIFO, socket or device); give a JSON/JSONL file, a "
                f"datasets file or directory, or a save_to_disk directory.")
    if os.path.isfile(path) and not os.access(path, os.R_OK):
        return f"{key}: {path!r} is not readable."
    return None


def output_dir_problem(path: str) -> Optional[str]:
    """Why OUTPUT_DIR cannot be created or written, or None. Probes with a temporary file in the
    directory (or its nearest existing ancestor), removed at once: nothing is left behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"OUTPUT_DIR: {path!r} exists and is not a directory."
    target = os.path.abspath(path)
    while not os.path.exists(target):
        target = os.path.dirname(target)
    if not os.path.isdir(target):
        return f"OUTPUT_DIR: {path!r} cannot be created: {target!r} is not a directory (a regular file)."
    try:
        fd, probe = tempfile.mkstemp(dir=target, prefix=".hybrid_ds-write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        what = "written" if target == os.path.abspath(path) else f"created (in {target})"
        return f"OUTPUT_DIR: {path!r} cannot be {what}: {e.strerror or e}."
    return None


def ds_config_problems(path: str, key: str = "DS_CONFIG") -> list[str]:
    """Why the DeepSpeed config ``path`` cannot be used: missing (see resolve_ds_config), not JSON."""
    found = resolve_ds_config(path)
    if found is None:
        return [f"{key}: {path!r} does not exist (working directory {os.getcwd()}); give a path or one of the "
                f"shipped names: {', '.join(ds_config_names())}."]
    try:
        with open(found, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, OSError) as e:
        return [f"{key}: {found} is not a readable JSON file ({e})."]
    if not isinstance(data, dict):
        return [f"{key}: {found} must hold a JSON object (a DeepSpeed config)."]
    return []


def reward_path_problems(spec: Any, path: str = REWARD_KEY) -> list[str]:
    """A reward leaf's model given as a local path (``./x``, ``/x``, ``~/x``) that does not exist."""
    if not isinstance(spec, dict):
        return []
    out = []
    for i, comp in enumerate(spec.get("components") or []):
        out += reward_path_problems(comp, f"{path}.components[{i}]")
    if isinstance(spec.get("judge"), dict):  # a self_play node's judge
        out += reward_path_problems(spec["judge"], f"{path}.judge")
    for k in ("model", "model_type", "checkpoint", "huggingface_config_path"):
        v = spec.get(k)
        if not (isinstance(v, str) and v.startswith((".", "/", "~"))):
            continue
        local = os.path.expanduser(v)
        if not os.path.exists(local):
            out.append(f"{path}.{k}: {v!r} does not exist (working directory {os.getcwd()}).")
        elif k in ("model", "model_type") and os.path.isdir(local) and not os.path.isfile(
                os.path.join(local, "config.json")):
            out.append(f"{path}.{k}: {v!r} is a directory without config.json; point it at a saved model.")
    return out


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def safetensors_problem(path: str) -> Optional[str]:
    """Why the safetensors file ``path`` is unusable (unreadable header, shorter than its header says),
    or None. Reads the header only: 8 bytes of header length, the JSON header, no tensor data."""
    import struct

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes, no safetensors header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size})"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"{path} cannot be read ({e.strerror or e})"
    except ValueError:
        return f"{path} is not a safetensors file (its header is not JSON)"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}"
    return None


def weight_file_problems(model_dir: str) -> list[str]:
    """Problems of the weight files of a local model directory, found without loading them."""
    present = [f for f in _WEIGHT_FILES if os.path.isfile(os.path.join(model_dir, f))]
    if not present:
        return [f"{model_dir} has config.json but no weights ({' or '.join(_WEIGHT_FILES[::2])}); "
                f"copy the whole saved model"]
    out = []
    for index in (f for f in present if f.endswith(".index.json")):
        try:
            with open(os.path.join(model_dir, index), encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            out.append(f"{os.path.join(model_dir, index)} is not a weight index ({type(e).__name__}: {e})")
            continue
        missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            out.append(f"{model_dir}: shard(s) {', '.join(missing)} listed in {index} are missing")
        out += [p for s in shards if s.endswith(".safetensors") and s not in missing
                for p in [safetensors_problem(os.path.join(model_dir, s))] if p]
        return out
    if "model.safetensors" in present:
        p = safetensors_problem(os.path.join(model_dir, "model.safetensors"))
        out += [p] if p else []
    elif os.path.getsize(os.path.join(model_dir, "pytorch_model.bin")) == 0:
        out.append(f"{os.path.join(model_dir, 'pytorch_model.bin')} is empty")
    return out


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def model_problem(key: str, name: str, builtins) -> Optional[str]:
    """None if ``name`` can be loaded: a builtin, a local model dir, or a hub name (cached when offline)."""
    if name.startswith("builtin:"):
        if name not in builtins:
            return f"{key}: unknown builtin model {name!r}; available: {', '.join(builtins)}."
        return None
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            return f"{key}: {name!r} is a directory without config.json; point it at a saved Hugging Face model."
        if key == "MODEL":
            weights = weight_file_problems(expanded)
            return f"{key}: " + "; ".join(weights) + "." if weights else None
        return None
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not _HUB_NAME.match(name):
        return f"{key}: {name!r} does not exist (not a local directory, not a hub model name)."
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        try:
            from huggingface_hub import try_to_load_from_cache
            if isinstance(try_to_load_from_cache(name, "config.json"), str):
                return None
        except Exception:
            pass
        return (f"{key}: {name!r} is not a local directory and is not in the Hugging Face cache, and the hub "
                f"is offline (HF_HUB_OFFLINE=1). Point {key} at a local model directory or builtin:tiny-gpt2.")
    return None
