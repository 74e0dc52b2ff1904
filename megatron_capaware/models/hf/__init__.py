"""Hugging Face MoE checkpoints to Megatron-Core: :mod:`.convert` (``capaware-convert``)
and the extra layers some families need (:mod:`.layers`)."""
