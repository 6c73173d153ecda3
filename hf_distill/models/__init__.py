"""Model types hf_distill adds to transformers (only genuinely new ones), registered with the Auto classes."""
