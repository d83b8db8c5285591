"""Stages 2-4, labelling: a frozen teacher's region features (``features``), stored per record
shard (``feature_store``), clustered into up to millions of centres on the device mesh (``kmeans``),
and written back as per-region cluster labels (``clustering``, the command that runs all three)."""
