"""The model cache: which models it holds (`manifest`), how a pull fills it from a Hub (`pull`), and CSD's
conversion to the evaluator's layout (`csd`). docs/models.md says which models and why."""
