"""A toy environment for multi-turn PPO (ENV=envs.recall:respond, examples/multiturn.json).

The user names a word in the first turn (as its first word, so that it is the same token as the
answer); after the policy's first answer the environment asks "Which word?", the same question for
every item. The reward (exact_match against the item's last assistant turn, the word) reads the
policy's last turn, so it can only rise above always answering the most frequent word (0.17) if the
policy's second turn uses what the user said in the first: the second turn's own prompt holds no
trace of the word.

``python -m envs.recall > envs/recall.jsonl`` writes the data (conversations that demonstrate
the task, so SFT warm-up on the same file can start the policy off).
"""

import json
import random

WORDS = ["forest", "train", "river", "king", "bird", "pencil", "knife", "frog"]
QUESTION = "Which word?"


def respond(messages: list, item: dict):
    """The next user turn: the question after the policy's first turn, then the end (None)."""
    policy_turns = sum(m["role"] == "assistant" for m in messages)
    return QUESTION if policy_turns == 1 else None


def items(n: int = 64, seed: int = 0) -> list:
    """``n`` conversations: remember a word, acknowledge, recall it."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = rng.choice(WORDS)
        out.append({"messages": [
            {"role": "user", "content": f"{word} - remember it."},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": word}]})
    return out


if __name__ == "__main__":
    print("\n".join(json.dumps(it) for it in items()))
