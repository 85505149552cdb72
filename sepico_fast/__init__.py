"""sepico_fast: fast, faithful SePiCo (semantic-guided pixel contrast) for domain-adaptive segmentation."""

__version__ = "0.1.0"
