"""``python -m hybrid_ds.checkpoint export CKPT_DIR OUT_DIR``: a checkpoint as plain HF weights + tokenizer."""

from __future__ import annotations

import os
import sys

from hybrid_ds.run.checkpoint_dir import (
    CHECKPOINTS,
    COMPLETE,
    ENGINE_TAG,
    CheckpointError,
    find_latest,
    is_complete,
)
from hybrid_ds.engine.train_engine import saved_weights
from hybrid_ds.run.checkpoint_dir import read_point


def export(ckpt: str, out_dir: str, with_value_head: bool = False) -> str:
    """Write checkpoint ``ckpt`` (or a run directory's latest) as plain HF weights + tokenizer in ``out_dir``.

    DeepSpeed checkpoints are consolidated with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
    (fp32 master weights, whatever the training precision). A LoRA checkpoint holds only the adapters and
    the value head: they are merged into the run's MODEL, which must still be where the run found it, and
    the peft adapter goes to ``out_dir/adapter``."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )

    if os.path.isdir(os.path.join(ckpt, CHECKPOINTS)):
        ckpt = find_latest(ckpt) or ckpt
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker).")
    point = read_point(ckpt)
    state = saved_weights(ckpt, ENGINE_TAG, deepspeed=point.state["engine"] == "deepspeed")
    hf = os.path.join(ckpt, "hf")
    if point.config.get("LORA_R"):  # only the adapters and the value head were saved: merge into MODEL
        from hybrid_ds.config.load import build_config
        from hybrid_ds.run.outputs import save_lora_outputs

        cfg, _ = build_config(point.config)
        save_lora_outputs(cfg, AutoTokenizer.from_pretrained(hf), point.seed, state, out_dir,
                          dirs={".": with_value_head})
        return out_dir
    with torch.device("meta"):  # a skeleton for save_pretrained's naming and tied-weight handling
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf))
    model.generation_config = GenerationConfig.from_pretrained(hf)
    lm_state = {k[len("lm."):]: v.float().contiguous() for k, v in state.items() if k.startswith("lm.")}
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=lm_state, safe_serialization=True)
    AutoTokenizer.from_pretrained(hf).save_pretrained(out_dir)
    if with_value_head:
        from hybrid_ds.models.policy_value import VALUE_HEAD_FILE

        vh = {k[len("v_head."):]: v.float().clone() for k, v in state.items() if k.startswith("v_head.")}
        if vh:  # a critic-free run (ADVANTAGE) has none
            torch.save(vh, os.path.join(out_dir, VALUE_HEAD_FILE))
    return out_dir


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m hybrid_ds.checkpoint",
                                description="Work with hybrid_ds checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a checkpoint as plain Hugging Face weights + tokenizer")
    e.add_argument("ckpt", help="a checkpoint directory (OUTPUT_DIR/checkpoints/step-XXXXXXX) or a run's OUTPUT_DIR")
    e.add_argument("out", help="output directory")
    e.add_argument("--with-value-head", action="store_true", help="also write value_head.pt (as ppo_full/)")
    args = p.parse_args(argv)
    try:
        out = export(args.ckpt, args.out, args.with_value_head)
    except (CheckpointError, OSError) as err:
        print(f"hybrid_ds: {err}", file=sys.stderr)
        return 2
    print(f"[hybrid_ds] exported {args.ckpt} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
