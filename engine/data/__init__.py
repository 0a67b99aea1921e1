"""fastpo.engine.data: files → records → tokenized examples → batches.

    assets.py         the default job's model, tokenizer and demo pairs (built once, cached)
    files.py          reading JSON / JSONL / Parquet / CSV / Arrow / HF dataset folders
    columns.py        a column mapping: the user's column names → fastpo's fields
    sources.py        file lists, weighted mixtures (seeded picks over the sources)
    token_cache.py    tokenized data sets on disk (safetensors + JSON), keyed by content
    formats.py        the record formats (pairs, sharegpt, unpaired) → one normalized record
    dataset.py        tokenization: TokenizedPair / TokenizedExample / TokenizedDataset
    encoding.py       text → token ids: chat-template cuts, batched encoding naming bad rows
    preference_batch.py  PreferenceBatch (the tensors of one micro-batch, built whole), row layout
    batch.py          collating items into batches, planning micro-batches
    shared_prompt.py  ``[prompt | chosen | rejected]`` rows and their attention mask
    segments.py       SegmentPlan: the pieces of packed and shared-prompt rows
    attention_cost.py the cost of attention calls and of batch layouts (one model for both)
    sampler.py        length-grouped order, batch shuffling

Of the other engine modules it imports ``fastpo.engine.errors`` only: never the models or the
job.
"""
