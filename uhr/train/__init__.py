"""Fine-tuning with Ray Train and DeepSpeed ZeRO-2, pruning in the loop.

`FinetuneConfig` (config.py) is the job's typed config.
"""
