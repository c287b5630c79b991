"""Public-data pipeline: bundled corpus, readers, cleaning, quality filters, dedup, mixture
recipes, tokenization to memmap shards, and the packing loader."""
