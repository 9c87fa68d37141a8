"""Regenerate the embedded demo assets (deterministic, offline):

  hybrid_ds/assets/demo_tasks.json    prompt->response items of small checkable tasks
  hybrid_ds/assets/tiny-gpt2/         byte-level BPE tokenizer files for the builtin models

Run from the repo root: python scripts/make_assets.py
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hybrid_ds.data import render_prompt  # noqa: E402  the one prompt template

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hybrid_ds", "assets")
N_ITEMS, VOCAB, SEED = 400, 2048, 0
EOS, PAD = "<|endoftext|>", "<|pad|>"
WORDS = """
apple bread chair cloud dance eagle field flame grape green heart horse house juice knife lemon light
money mouse music night ocean onion paper party peach pearl piano plant plate queen quiet radio river
robot salad sheep shirt smile snake sound space spoon stone storm sugar table tiger toast tower train
truck water whale wheel world zebra bridge candle castle circle copper corner desert dragon engine
forest garden guitar hammer island jacket ladder market mirror monkey orange pencil pepper pillow planet
rabbit rocket silver spider summer tomato turtle valley violet window winter yellow book bird boat cake
coat door fish frog gold hill king lake lamp leaf lion milk moon rain rose ship snow star tree wind wolf
""".split()

TASKS = {
    "reverse": lambda ws: " ".join(reversed(ws)),
    "sort": lambda ws: " ".join(sorted(ws)),
    "uppercase": lambda ws: " ".join(ws).upper(),
    "copy": lambda ws: " ".join(ws),
    "first": lambda ws: ws[0],
    "last": lambda ws: ws[-1],
}


def make_items(rng):
    items = []
    for i in range(N_ITEMS):
        if i % 7 == 6:  # arithmetic: small sums with an exact answer
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            items.append({"task": "add", "input": f"{a} + {b}", "output": str(a + b)})
            continue
        task = list(TASKS)[i % len(TASKS)]
        ws = rng.sample(WORDS, rng.randint(2, 5))
        items.append({"task": task, "input": " ".join(ws), "output": TASKS[task](ws)})
    rng.shuffle(items)
    return items


def make_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=1, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main():
    from transformers import GPT2TokenizerFast

    items = make_items(random.Random(SEED))
    with open(os.path.join(ASSETS, "demo_tasks.json"), "w") as f:
        json.dump(items, f, indent=0)
    # Train on the prompt template, every item, and every word in all casings, so the demo
    # vocabulary covers what the tasks ask the model to produce.
    texts = [render_prompt(it, "output") + it["output"] for it in items]
    texts += [" ".join(WORDS), " ".join(WORDS).upper(), " ".join(str(n) for n in range(200))] * 20
    tok = GPT2TokenizerFast(tokenizer_object=make_tokenizer(texts), bos_token=EOS, eos_token=EOS,
                            unk_token=EOS, pad_token=PAD)
    out = os.path.join(ASSETS, "tiny-gpt2")
    tok.save_pretrained(out)
    print(json.dumps({"items": len(items), "vocab": len(tok), "pad": tok.pad_token_id, "eos": tok.eos_token_id}))


if __name__ == "__main__":
    main()
