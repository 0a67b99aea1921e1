"""fastpo.engine.data: files → records → tokenized examples → batches.

    assets.py         the default job's model, tokenizer and demo pairs (built once, cached)
    files.py          reading JSON / JSONL / Parquet / Arrow / HF dataset folders
    formats.py        the record formats (pairs, sharegpt, unpaired) → one normalized record
    dataset.py        tokenization: TokenizedPair / TokenizedExample / TokenizedDataset
    preference_batch.py  PreferenceBatch (the tensors of one micro-batch) and id checks
    batch.py          collating items into batches, planning micro-batches
    shared_prompt.py  ``[prompt | chosen | rejected]`` rows and their attention mask
    segments.py       SegmentPlan: the pieces of packed and shared-prompt rows
    sampler.py        length-grouped order, batch shuffling

Of the other engine modules it imports ``fastpo.engine.errors`` only: never the models or the
job.
"""
