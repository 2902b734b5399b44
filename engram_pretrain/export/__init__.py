"""Hugging Face export (`exporter`) and import (`importer`); `hf_config` and `modeling_engram_moe` ship as
remote code with the torch-only model package."""
