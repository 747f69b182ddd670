"""Gist tokens, the gist attention mask, the collator and the LoRA wrapper."""
