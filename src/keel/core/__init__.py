"""Keel's core: what training and serving both need, and nothing of either.

A model directory's manifest (artifact), the conversation format (text), tokenisation (tokenizer), the ONNX
and torch engines (onnx_engine, reward_model, runtime), the moderation rule (moderation), policy loading
(policy) and hardware detection (hardware). `service` and `training` import this package and never each other
(docs/architecture.md; tests/test_architecture.py checks it). torch is imported only by the torch engine and
policy modules, so a serving install without torch can use the rest.
"""
