"""Downstream backdoor evaluation (method.md section 3): fine-tune on a clean task, then ACC and ASR.

`metrics` holds the pure arithmetic, `triggers` the deterministic trigger insertion and
`finetune` the `recipe-dist evaluate` run itself (config, fine-tuning, prediction, reports).
"""
