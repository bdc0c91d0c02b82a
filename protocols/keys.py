"""Record and metric key names: the one place both sides agree on spelling.

Flower messages carry ``RecordDict``s; a typo in a key is a silent protocol break, so every
key used on the wire is a constant here (kebab-case, as Flower's own ``"num-examples"``).
"""

from typing import Final

# RecordDict entries
ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"
# The coordinator's last step of the global adapter (trainable tensors, packed like ARRAYS),
# sent with a train instruction when edge.subspace = 'trajectory'
LAST_STEP: Final = "last-step"
# The round's aggregated step (trainable tensors, packed like ARRAYS) that the round's edge
# devices score at several multiples before it is applied (edge.line_search)
STEP: Final = "step"

# The message type of that scoring (a query: it trains nothing) and its reply's one metric,
# the device's mean loss at each multiple, in the order asked
LINE_SEARCH_MESSAGE: Final = "query.line_search"
LINE_SEARCH_LOSSES: Final = "line-search-losses"
# The query that asks a device its kind before the coordinator samples a round by kind
# (edge.role = 'judge', edge.judges); the reply is one metric, EDGE_CLIENT (1 or 0)
KIND_MESSAGE: Final = "query.kind"

# ConfigRecord keys sent by the coordinator with a train/evaluate instruction
SERVER_ROUND: Final = "server-round"
LOCAL_STEPS: Final = "local-steps"
BATCH_SIZE: Final = "batch-size"
LEARNING_RATE: Final = "learning-rate"
SEQ_LEN: Final = "seq-len"
SEED: Final = "seed"
CODEC: Final = "codec"
# Set (true) when the round is under client-level DP: the device then reports no number of its
# own in the clear (no loss, example count or timing; DP covers only the update).
CLIENT_DP: Final = "client-dp"
# ... and for edge (forward-only) clients, when the federation has some
EDGE_LEARNING_RATE: Final = "edge-learning-rate"
EDGE_LOCAL_STEPS: Final = "edge-local-steps"
EDGE_EPSILON: Final = "edge-epsilon"
EDGE_CODEC: Final = "edge-codec"
EDGE_SUBSPACE: Final = "edge-subspace"
# ... and with a line-search query: the multiples of the step to score, on how many blocks
LINE_SEARCH: Final = "line-search"
LINE_SEARCH_BLOCKS: Final = "line-search-blocks"
# multiples of the last applied step tried with each multiple of the round's step
# (edge.line_search_momentum; the last step travels as LAST_STEP)
LINE_SEARCH_MOMENTUM: Final = "line-search-momentum"

# ArrayRecord keys of a seed/scalar (MeZO) update, protocols/seed_updates.py
SEEDS: Final = "mezo-seeds"
SCALARS: Final = "mezo-scalars"
SEED_HEADER: Final = "mezo-header"

# MetricRecord keys sent back by a client
NUM_EXAMPLES: Final = "num-examples"
TRAIN_LOSS: Final = "train-loss"
EVAL_LOSS: Final = "eval-loss"
EVAL_TOKENS: Final = "eval-tokens"
TRAIN_SECONDS: Final = "train-seconds"
LOAD_SECONDS: Final = "load-seconds"
UPLOAD_BYTES: Final = "upload-bytes"
DPSGD_EPSILON: Final = "dpsgd-epsilon"
DPSGD_DELTA: Final = "dpsgd-delta"
EDGE_CLIENT: Final = "edge-client"  # 1.0 from an edge (forward-only) client, for the report
STEP_SECONDS: Final = "step-seconds"  # mean wall seconds of one local training step
BASE_WEIGHT_BYTES: Final = "base-weight-bytes"  # frozen base in memory (quantized or not)
PEAK_MEMORY_BYTES: Final = "peak-memory-bytes"  # peak CUDA allocation, or the process's RSS
LORA_RANK: Final = "lora-rank"  # the rank the device trained (heterogeneous ranks)

# MetricRecord keys of the coordinator's own central evaluation (server/central_eval.py),
# with EVAL_LOSS and EVAL_TOKENS above. Never sent by a client: not in CLIENT_METRIC_KEYS.
PERPLEXITY: Final = "perplexity"

#: The only metric keys a client may send. Anything else is refused: metrics are free-form
#: in Flower, which makes them a side channel for raw data unless they are closed.
CLIENT_METRIC_KEYS: Final = frozenset(
    {
        NUM_EXAMPLES,
        TRAIN_LOSS,
        EVAL_LOSS,
        EVAL_TOKENS,
        TRAIN_SECONDS,
        LOAD_SECONDS,
        UPLOAD_BYTES,
        DPSGD_EPSILON,
        DPSGD_DELTA,
        EDGE_CLIENT,
        STEP_SECONDS,
        BASE_WEIGHT_BYTES,
        PEAK_MEMORY_BYTES,
        LORA_RANK,
    }
)
