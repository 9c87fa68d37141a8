"""Training data: reading and checking items, rendering prompts (:mod:`~hybrid_ds.data.items`), their
formats (:mod:`~hybrid_ds.data.formats`), conversations and chat templates (:mod:`~hybrid_ds.data.chat`),
tokenising and batching them (:mod:`~hybrid_ds.data.batches`), preference pairs (:mod:`~hybrid_ds.data.pairs`)."""

from hybrid_ds.data.batches import (  # noqa: F401
    IGNORE_INDEX,
    BatchStream,
    Example,
    collate_prompts,
    collate_sft,
    micro_batches,
    rank_slice,
    to_sample,
    tokenize_items,
)
from hybrid_ds.data.chat import (  # noqa: F401
    chat_template_problem,
    end_of_turn_id,
    stop_token_ids,
    tokenize_conversation,
    use_chat_template,
)
from hybrid_ds.data.formats import (  # noqa: F401
    FORMATS,
    Sample,
    detect_format,
    format_problem,
    pair_problem,
    prompt_template_problem,
    render_template,
    template_fields,
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
from hybrid_ds.data.pairs import Pair, collate_pairs, load_pairs, tokenize_pairs  # noqa: F401
