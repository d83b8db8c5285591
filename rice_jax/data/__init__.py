"""Region data: records, synthetic data, importers, tokenizer and the Grain pipeline."""
