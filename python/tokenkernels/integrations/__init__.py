"""Framework integrations (HF transformers, ...) live here."""
