"""Arrow schemas of the tables that flow between the stages (all stored as Parquet)."""

import pyarrow as pa

# One row per image the teacher labeled. Soft labels are kept as the top-k classes and their
# probabilities (float16): at 1,000 classes and k=5 a whole row is ~41 bytes in Parquet (zstd), the soft label
# ~15 of them, where the full float32 softmax alone would be 4,000 (README, "Data formats").
PREDICTIONS = pa.schema(
    [
        ("image_id", pa.int64()),
        ("uri", pa.string()),
        ("label", pa.int32()),  # argmax class index
        ("confidence", pa.float32()),  # top-1 probability
        ("topk_classes", pa.list_(pa.int32())),
        ("topk_probs", pa.list_(pa.float16())),
        ("teacher", pa.string()),  # id of the model that labeled it
    ]
)

# One row per image that could not be read or decoded.
REJECTS = pa.schema(
    [
        ("image_id", pa.int64()),
        ("uri", pa.string()),
        ("reason", pa.string()),  # one of curation.imaging.REJECT_REASONS
        ("detail", pa.string()),
    ]
)

# The curated training set: predictions kept by curation, each with how many times it is to be used.
MANIFEST = PREDICTIONS.append(pa.field("copies", pa.int32()))
