"""Models the package builds and loads: the Megatron-Core GPT MoE builder
(:mod:`.builder`), Megatron dist-checkpoint IO (:mod:`.checkpoint`), Hugging
Face conversions (:mod:`.hf`, ``capaware-convert``) and the bundled reference
models (:mod:`.reference_models`)."""
