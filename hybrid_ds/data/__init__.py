"""Training data: reading items, rendering prompts, tokenising, batching."""

from hybrid_ds.data.core import (  # noqa: F401
    PROMPT_HEAD,
    PROMPT_TAIL,
    IGNORE_INDEX,
    DataError,
    render_prompt,
    render_target,
    item_problem,
    read_items,
    DataReport,
    load_items,
    Example,
    tokenize_items,
    collate_sft,
    collate_prompts,
    BatchStream,
    rank_slice,
    micro_batches,
)
