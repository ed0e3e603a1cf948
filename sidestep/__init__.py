"""sidestep: ACE-Step 1.5 adapter training with data-aware Preprocessing++ targeting."""

__version__ = "0.1.0"
