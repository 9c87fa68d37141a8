"""Training data: reading and checking items, rendering prompts (:mod:`~hybrid_ds.data.items`),
tokenising and batching them (:mod:`~hybrid_ds.data.batches`)."""

from hybrid_ds.data.batches import (  # noqa: F401
    IGNORE_INDEX,
    BatchStream,
    Example,
    collate_prompts,
    collate_sft,
    micro_batches,
    rank_slice,
    tokenize_items,
)
from hybrid_ds.data.items import (  # noqa: F401
    DATASETS_BUILDERS,
    PROMPT_HEAD,
    PROMPT_TAIL,
    DataError,
    DataReport,
    item_problem,
    load_items,
    read_items,
    render_prompt,
    render_target,
    unreadable_data_file,
)
