"""Benchmarks of the model and the VQA job (`python -m jobs.bench_model`, `python -m jobs.bench_vqa`).

* `inputs`: the tiny model with CLIP's real tile geometry, cached synthetic scenes, their questions;
* `counters`: what a strategy asks of the model (tiles, projected tokens, LM passes), by hooks;
* `flops`: that work priced at real sizes (CLIP ViT-L/14-336 + Qwen2-7B), FLOPs and GPU seconds;
* `model`: issue #4, every strategy on one scene, measured and priced;
* `baseline`: the naive script the VQA job is compared with;
* `rss`: peak memory of a local Ray's worker processes;
* `vqa`: issue #5, the VQA job against a local S3 server.

Benchmarks print figures; they are not tests (`tests/bench/` runs them on small settings).
"""
