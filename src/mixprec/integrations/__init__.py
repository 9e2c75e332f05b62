"""Adapters for the places people already train: Hugging Face ``Trainer`` and Lightning.

Each adapter lives in its own module and imports its framework only when that module is
imported, so ``import mixprec`` never needs ``transformers`` or ``lightning``:

    # pip install mixprec[transformers]
    from mixprec.integrations.transformers import MixprecTrainer
    # pip install mixprec[lightning]
    from mixprec.integrations.lightning import MixprecPrecision
"""

__all__: list[str] = []
