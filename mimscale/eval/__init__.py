"""Evaluation: kNN, linear probe, fine-tune, diagnostics. Import-light."""
