"""Data pipeline: corpus -> tokenizer -> indexed binaries -> GPT samples -> blends -> batches.

Modules (none imports torch except `loader`; none knows about training):
    jsonl            JSON-lines input parsing shared by the tools
    corpus           corpus inputs: files/globs/directories of jsonl, text, parquet, compressed
    tokenizer        load_tokenizer: SentencePiece .model or HF tokenizer.json, one interface
    tokenizer_train  `tools/train_tokenizer.py` (SentencePiece BPE, byte fallback)
    indexed          Megatron MMIDIDX .bin/.idx reader and builder (format documented there)
    preprocess       `tools/preprocess_data.py` (parallel, streaming,
                     order-preserving) and `tools/merge_datasets.py`
    gpt_dataset      GPTDataset: document/sample/shuffle indices, splits, on-disk cache
    blend            parse_data_path, BlendedDataset (exact ratios, blend-changing resume)
    build            build_train_valid_datasets for the trainer
    loader           build_loader: torch DataLoader split over data-parallel ranks
"""
