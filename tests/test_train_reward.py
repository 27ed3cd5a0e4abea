import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from keel.cli.main import main
from keel.core.artifact import FORMAT_VERSION, read_manifest
from keel.core.hardware import int8_is_fast
from keel.core.moderation import category_scores
from keel.core.onnx_engine import INT8_RECIPE, OnnxEngine, int8_outdated
from keel.core.reward_model import RewardModel
from keel.training.data import DataSource, load_source
from keel.training.encoder import fit as fit_module
from keel.training.encoder.onnx_export import down_projections, export, onnx_scorer, quantize
from keel.training.encoder.optim import load_tokenizer
from keel.training.encoder.scoring import encode, torch_scorer
from keel.training.reward import train as train_module
from keel.training.reward.objectives import example_inputs
from tests.helpers import hh_pairs, tiny_config, write_jsonl


def test_artifact_is_complete_and_self_describing(tiny_reward_model: Path):
    manifest = read_manifest(tiny_reward_model)
    for name in ("keel.json", "config.json", "model.safetensors", "modeling_keel.py", "README.md", "tokenizer.json",
                 "model.onnx", "model.int8.onnx", "metrics.jsonl", "training_curves.png"):
        assert (tiny_reward_model / name).is_file(), name
    assert manifest["kind"] == "reward-model" and manifest["heads"] == ["harmless", "quality"]
    assert manifest["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert set(manifest["normalization"]) == {"harmless", "quality"}
    assert 0.0 <= manifest["moderation"]["harmless"]["threshold"] <= 1.0
    assert manifest["moderation"]["quality"]["threshold"] is None  # moderate: false
    assert all(len(entry["sha256"]) == 64 for entry in manifest["data"])
    assert manifest["metrics"]["validation"]["harmless"]["pairs"] == 12
    assert "pearson" in manifest["metrics"]["validation"]["quality"]
    assert manifest["onnx"]["fp32_max_abs_diff_vs_torch"] < 1e-3
    assert not list(tiny_reward_model.parent.glob(".model.*")), "no staging directories left behind"
    rows = [json.loads(line) for line in (tiny_reward_model / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))


def test_guard_threshold_flags_at_most_its_share_of_benign_replies(tiny_reward_model: Path):
    manifest = read_manifest(tiny_reward_model)
    guard = manifest["moderation"]["harmless"]["guard"]
    assert guard["examples"] == 24 and "at most 25.0%" in guard["chosen_on"]  # 12 pairs, both replies
    # Re-score the benign replies as the service does: ONNX fp32, z from keel.json, category score sigma(-z).
    tokenizer = load_tokenizer(str(tiny_reward_model), manifest["max_length"], "left")
    scorer = onnx_scorer(tiny_reward_model / "model.onnx", tokenizer, manifest["max_length"])
    pairs = load_source(DataSource(manifest["config"]["heads"][0]["guard"][0]["path"], limit=12))
    stats = manifest["normalization"]["harmless"]
    flagged = category_scores((scorer(example_inputs(pairs))[:, 0] - stats["mean"]) / stats["std"]) >= guard["threshold"]
    assert flagged.mean() == pytest.approx(guard["false_flags"], abs=1 / 24) and flagged.mean() <= 0.25 + 1 / 24
    assert "guard" not in manifest["moderation"]["quality"]


def test_a_detached_head_is_a_probe_that_leaves_the_backbone_alone(tiny_backbone: str, tmp_path: Path):
    from safetensors.torch import load_file

    from keel.training.reward.config import HeadConfig

    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(24))
    manifests = {}
    for sign in (1.0, -1.0):  # the probe's ratings, then the same ratings reversed
        ratings = write_jsonl(tmp_path / f"ratings{sign}.jsonl", [
            {"text": ["great thanks", "terrible bad " * 8][i % 2], "score": sign * [1.0, -1.0][i % 2]} for i in range(24)])
        config = tiny_config(tiny_backbone, pairs, epochs=1, checkpoint_every=0, eval_every=0)
        config.heads.append(HeadConfig("quality", [DataSource(str(ratings))], [DataSource(str(ratings), limit=8)],
                                       moderate=False, detach=True, guard=[DataSource(str(ratings), limit=8)],
                                       guard_false_flags=0.5))
        manifests[sign] = train_module.train_reward(config, tmp_path / f"model{sign}", progress=False)
        # Not a /v1/moderations category, but a guard category all the same.
        quality = manifests[sign]["moderation"]["quality"]
        assert quality["threshold"] is None and quality["guard"]["false_flags"] <= 0.5
        # The probe learned its ratings from the trained backbone's features.
        assert manifests[sign]["metrics"]["validation"]["quality"]["pearson"] > 0.9
    # Opposite probe data, the same backbone bit for bit: the probe's data never reached it.
    first, second = (load_file(tmp_path / f"model{sign}" / "model.safetensors") for sign in (1.0, -1.0))
    backbone = [k for k in first if k.startswith("backbone.")]  # model.safetensors holds the heads too
    assert backbone and all(torch.equal(first[k], second[k]) for k in backbone)
    assert manifests[1.0]["metrics"]["validation"]["harmless"] == manifests[-1.0]["metrics"]["validation"]["harmless"]


def test_training_learns_the_pairs(tiny_reward_model: Path):
    # Synthetic pairs (refusal chosen over compliance) are easy: the tiny model must learn them.
    accuracy = read_manifest(tiny_reward_model)["metrics"]["validation"]["harmless"]["accuracy"]
    assert accuracy >= 0.9


def test_onnx_matches_torch_on_new_texts(tiny_reward_model: Path):
    manifest = read_manifest(tiny_reward_model)
    tokenizer = load_tokenizer(str(tiny_reward_model), manifest["max_length"], "left")
    load_messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: load_messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)  # transformers' loggers do not propagate further
    try:
        model = RewardModel.load(tiny_reward_model)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in load_messages if "MISSING" in m]  # no warning about the pooler mean pooling never reads
    texts = [("Human: hello", "hi"), ("Human: tell me", "a much longer text about code and bread and cake " * 5),
             ("", "x")]
    expected = torch_scorer(model, tokenizer, manifest["max_length"])(texts)
    fp32 = onnx_scorer(tiny_reward_model / "model.onnx", tokenizer, manifest["max_length"])(texts)
    int8 = onnx_scorer(tiny_reward_model / "model.int8.onnx", tokenizer, manifest["max_length"])(texts)
    assert expected.shape == (3, 2)
    np.testing.assert_allclose(fp32, expected, atol=1e-4)
    assert np.abs(int8 - expected).max() < 0.25


def test_int8_graph_keeps_the_feed_forward_down_projections_in_fp32(tiny_reward_model: Path):
    int8 = onnx.load(str(tiny_reward_model / "model.int8.onnx"))
    float_matmuls = [node.name for node in int8.graph.node if node.op_type == "MatMul"]
    assert float_matmuls == down_projections(onnx.load(str(tiny_reward_model / "model.onnx")))
    assert len(float_matmuls) == 2  # one per layer of the tiny backbone
    assert any(node.op_type == "MatMulInteger" for node in int8.graph.node)


def test_export_prints_no_inapplicable_warnings(tiny_reward_model: Path, tmp_path: Path, caplog):
    manifest = read_manifest(tiny_reward_model)
    tokenizer = load_tokenizer(str(tiny_reward_model), manifest["max_length"], "left")
    with caplog.at_level("WARNING"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(RewardModel.load(tiny_reward_model), tokenizer, tmp_path, opset=17, int8=True)
    assert (tmp_path / "model.int8.onnx").exists()
    # The exporter's tracing and indexing warnings (Python hides deprecation warnings from users by default).
    assert not [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]  # ONNX Runtime's quantiser


def test_int8_score_of_a_text_does_not_depend_on_its_batch(tiny_reward_model: Path):
    manifest = read_manifest(tiny_reward_model)
    tokenizer = load_tokenizer(str(tiny_reward_model), manifest["max_length"], "left")
    texts = [("Human: hello", "hi"), ("Human: tell me", "a much longer text about code and bread and cake " * 5),
             ("", "x"), ("Human: why?", "because " * 30)]
    items = encode(tokenizer, texts, manifest["max_length"])
    int8 = OnnxEngine(tiny_reward_model / "model.int8.onnx", tokenizer.pad_token_id)
    assert int8.one_at_a_time and not OnnxEngine(tiny_reward_model / "model.onnx", tokenizer.pad_token_id).one_at_a_time
    alone = np.concatenate([int8.run([item]) for item in items])
    np.testing.assert_array_equal(int8.run(items), alone)
    np.testing.assert_array_equal(int8.run(items[::-1]), alone[::-1])


def older_export(model: Path, tmp_path: Path) -> Path:
    """A copy of a model directory as an older Keel left it: every weight int8 and no int8_recipe in keel.json."""
    copy = tmp_path / "older"
    shutil.copytree(model, copy)
    quantize(copy / "model.onnx", copy / "model.int8.onnx", keep_fp32=[])
    manifest = read_manifest(copy)
    del manifest["onnx"]["int8_recipe"]
    (copy / "keel.json").write_text(json.dumps(manifest))
    return copy


def test_int8_counts_as_fast_only_with_exact_fast_int8_dot_products():
    avx2 = "processor\t: 0\nflags\t\t: fpu sse4_1 avx avx2 fma\nprocessor\t: 1\nflags\t\t: fpu sse4_1 avx avx2 fma\n"
    assert not int8_is_fast(avx2)
    assert not int8_is_fast(avx2.replace("avx2", "avx2 avx512f avx512bw"))  # AVX-512 without VNNI: u8 x u8 too
    assert int8_is_fast(avx2.replace("avx2", "avx2 avx512f avx512_vnni"))
    assert int8_is_fast(avx2.replace("avx2", "avx2 avx_vnni"))
    assert int8_is_fast("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n")  # Arm dot product
    assert not int8_is_fast("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n")


def test_keel_export_remakes_an_older_int8_graph_and_keeps_the_rest(tiny_reward_model: Path, tmp_path: Path,
                                                                   capsys):
    model = older_export(tiny_reward_model, tmp_path)
    before = read_manifest(model)
    assert int8_outdated(before["onnx"])
    assert main(["export", "reward", "--model", str(model)]) == 0
    assert "re-exported" in capsys.readouterr().out
    after = read_manifest(model)
    assert not int8_outdated(after["onnx"]) and after["onnx"]["int8_recipe"] == INT8_RECIPE
    float_matmuls = [n.name for n in onnx.load(str(model / "model.int8.onnx")).graph.node if n.op_type == "MatMul"]
    assert float_matmuls == down_projections(onnx.load(str(model / "model.onnx")))
    assert after["onnx"]["fp32_max_abs_diff_vs_torch"] < 1e-3
    assert after["onnx"]["accuracy"]["harmless"]["split"] == "validation"  # the tiny config has no test split
    for kept in ("metrics", "normalization", "moderation", "created_at"):
        assert after[kept] == before[kept]
    for name in ("model.safetensors", "modeling_keel.py", "metrics.jsonl"):
        assert (model / name).read_bytes() == (tiny_reward_model / name).read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging directory left behind"

    assert main(["export", "reward", "--model", str(model), "--no-int8"]) == 0
    assert read_manifest(model)["onnx"]["int8"] is None and not (model / "model.int8.onnx").exists()


def format_1_copy(model: Path, tmp_path: Path) -> Path:
    """A copy of a model directory as Keel wrote it before format 2: a bare backbone (config.json without labels
    or auto_map, no heads in model.safetensors) plus reward_heads.safetensors."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "format-1"
    shutil.copytree(model, copy)
    weights = load_file(copy / "model.safetensors")
    save_file({k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")},
              copy / "model.safetensors", metadata={"format": "pt"})
    save_file({k.removeprefix("heads."): v for k, v in weights.items() if k.startswith("heads.")},
              copy / "reward_heads.safetensors")
    config = json.loads((copy / "config.json").read_text())["backbone_config"]
    for key in ("auto_map", "id2label", "label2id", "problem_type"):
        config.pop(key, None)
    config["architectures"] = ["BertModel"]
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "modeling_keel.py").unlink()
    manifest = read_manifest(copy)
    manifest["format_version"] = 1
    (copy / "keel.json").write_text(json.dumps(manifest))
    return copy


def test_a_format_1_directory_is_served_as_it_was_and_export_makes_it_a_hugging_face_model(
        tiny_reward_model: Path, tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    from keel.core.runtime import RewardRuntime

    old = format_1_copy(tiny_reward_model, tmp_path)
    texts = [("Human: hi", "hello there"), ("", "a bare reply")]
    expected = RewardRuntime(tiny_reward_model, backend="torch").score(texts)
    np.testing.assert_allclose(RewardRuntime(old, backend="torch").score(texts), expected, atol=1e-6)
    assert main(["export", "reward", "--model", str(old)]) == 0
    assert read_manifest(old)["format_version"] == FORMAT_VERSION and not (old / "reward_heads.safetensors").exists()
    hf = AutoModelForSequenceClassification.from_pretrained(old, trust_remote_code=True)
    assert list(hf.config.id2label.values()) == read_manifest(old)["heads"]
    np.testing.assert_allclose(RewardRuntime(old, backend="torch").score(texts), expected, atol=1e-6)


def test_a_format_2_directory_is_served_as_it_was_and_export_gives_it_keels_own_model_type(
        tiny_reward_model: Path, tmp_path: Path):
    """Format 2's config.json was the encoder's own (model_type "bert") with labels and auto_map: it loaded as
    BertForSequenceClassification with random weights unless trust_remote_code was given."""
    from keel.core.runtime import RewardRuntime

    old = tmp_path / "format-2"
    shutil.copytree(tiny_reward_model, old)
    config = json.loads((old / "config.json").read_text())
    encoder = {**config.pop("backbone_config"), **{k: config[k] for k in ("id2label", "label2id", "problem_type")}}
    encoder.update(architectures=["RewardModel"],
                   auto_map={"AutoModelForSequenceClassification": "modeling_keel.RewardModel"})
    (old / "config.json").write_text(json.dumps(encoder))
    texts = [("Human: hi", "hello there"), ("", "a bare reply")]
    expected = RewardRuntime(tiny_reward_model, backend="torch").score(texts)
    np.testing.assert_allclose(RewardRuntime(old, backend="torch").score(texts), expected, atol=1e-6)
    assert main(["export", "reward", "--model", str(old)]) == 0
    assert json.loads((old / "config.json").read_text())["model_type"] == "keel"
    np.testing.assert_allclose(RewardRuntime(old, backend="torch").score(texts), expected, atol=1e-6)


def data_gone(model: Path, data_dir: Path, tmp_path: Path) -> Path:
    """Make model's keel.json name its data files under a directory that does not exist, as after a move."""
    gone = tmp_path / "gone"
    (model / "keel.json").write_text((model / "keel.json").read_text().replace(str(data_dir), str(gone)))
    return gone


def test_keel_export_finds_moved_data_by_name_and_contents(tiny_reward_model: Path, tmp_path: Path, capsys):
    model = older_export(tiny_reward_model, tmp_path)
    recorded = {entry["path"] for entry in read_manifest(model)["data"]}
    gone = data_gone(model, tiny_reward_model.parent, tmp_path)
    moved = tmp_path / "moved" / "nested"
    moved.mkdir(parents=True)
    for path in recorded:
        shutil.copy(path, moved / Path(path).name)
    decoy = tmp_path / "moved" / "a" / "pairs.jsonl"  # found first; same name, other contents: must not be picked
    decoy.parent.mkdir()
    decoy.write_text("{}\n")

    assert main(["export", "reward", "--model", str(model)]) == 2
    assert "--data DIR" in capsys.readouterr().err
    assert main(["export", "reward", "--model", str(model), "--data", str(tmp_path / "moved")]) == 0
    manifest = read_manifest(model)
    assert {Path(entry["path"]).parent for entry in manifest["data"]} == {moved.resolve()}
    assert str(gone) not in json.dumps(manifest["config"]) and not int8_outdated(manifest["onnx"])


def test_serve_re_exports_an_older_default_model_and_warns_about_other_models(tiny_reward_model: Path,
                                                                             tmp_path: Path, caplog):
    from keel.core.runtime import RewardRuntime
    from keel.training.default_models import ensure_default_model

    model = older_export(tiny_reward_model, tmp_path)
    with caplog.at_level("WARNING", logger="keel.core.runtime"):
        RewardRuntime(model, backend="onnx-int8")
    assert "keel export reward --model" in caplog.text
    assert ensure_default_model(model) == model
    assert not int8_outdated(read_manifest(model)["onnx"])

    unreadable = older_export(tiny_reward_model, tmp_path / "unreadable")
    data_gone(unreadable, tiny_reward_model.parent, tmp_path)
    with caplog.at_level("WARNING", logger="keel.training.default_models"):
        assert ensure_default_model(unreadable) == unreadable  # serves its old graphs rather than not starting
    assert "kept the default model's graphs" in caplog.text and int8_outdated(read_manifest(unreadable)["onnx"])


def test_crash_leaves_no_model_and_resume_continues(tiny_backbone: str, tmp_path: Path, monkeypatch):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(40))
    config = tiny_config(tiny_backbone, pairs, epochs=1, checkpoint_every=2)
    output = tmp_path / "model"

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(train_module, "publish_reward_model", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        train_module.train_reward(config, output, progress=False)
    assert not output.exists()
    checkpoints = sorted(p.name for p in (tmp_path / "model.work" / "checkpoints").iterdir())
    assert checkpoints == ["step-2", "step-4"]  # the last two of steps 2 and 4 (5 steps in all)
    monkeypatch.undo()

    seen_start = []
    original = fit_module.make_batches
    monkeypatch.setattr(fit_module, "make_batches", lambda *a: seen_start.append(1) or original(*a))
    manifest = train_module.train_reward(config, output, resume=True, progress=False)
    assert manifest["metrics"]["steps"] == 5
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # rows of the crashed run up to step 4 are kept
    assert not (tmp_path / "model.work").exists()


def test_resume_reproduces_an_uninterrupted_run(tiny_backbone: str, tmp_path: Path, monkeypatch):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(40))
    config = tiny_config(tiny_backbone, pairs, epochs=1, checkpoint_every=2)
    straight = train_module.train_reward(config, tmp_path / "straight", progress=False)

    monkeypatch.setattr(train_module, "publish_reward_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train_module.train_reward(config, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    resumed = train_module.train_reward(config, tmp_path / "resumed", resume=True, progress=False)
    a = straight["metrics"]["validation"]["harmless"]["mean_margin"]
    b = resumed["metrics"]["validation"]["harmless"]["mean_margin"]
    assert a == pytest.approx(b, rel=1e-4)


def test_existing_output_needs_overwrite(tiny_reward_model: Path, tiny_backbone: str, tmp_path: Path):
    config = tiny_config(tiny_backbone, write_jsonl(tmp_path / "p.jsonl", hh_pairs(8)))
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_module.train_reward(config, tiny_reward_model, progress=False)


def test_make_batches_groups_lengths_and_is_seeded():
    lengths = [[5, 50, 6, 49, 7, 48, 8, 47], [1, 2, 3]]
    batches = fit_module.make_batches(lengths, batch_size=2, seed=3)
    assert batches == fit_module.make_batches(lengths, batch_size=2, seed=3)
    assert sorted(i for head, idx in batches if head == 0 for i in idx) == list(range(8))
    for head, idx in batches:
        if head == 0 and len(idx) == 2:  # neighbours in length order: a short pair or a long pair
            assert abs(lengths[0][idx[0]] - lengths[0][idx[1]]) <= 2


def test_keep_best_publishes_the_best_validation_weights(tiny_backbone: str, tmp_path: Path, monkeypatch):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(40))
    config = tiny_config(tiny_backbone, pairs, epochs=1, eval_every=1, checkpoint_every=0)
    accuracies = iter([0.5, 0.9, 0.6, 0.7, 0.8])  # steps 1-4 during training, then the final weights
    monkeypatch.setattr(train_module, "validation_accuracy",
                        lambda *a: {"val_harmless_accuracy": next(accuracies)})
    manifest = train_module.train_reward(config, tmp_path / "model", progress=False)
    assert manifest["metrics"]["kept_step"] == 2
    config.training.keep_best = False
    accuracies = iter([0.5, 0.9, 0.6, 0.7, 0.8])
    manifest = train_module.train_reward(config, tmp_path / "model2", progress=False)
    assert manifest["metrics"]["kept_step"] == 5


def test_frozen_lower_layers_keep_their_weights(tiny_backbone: str, tmp_path: Path):
    from safetensors.torch import load_file

    from keel.training.config import ConfigError

    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(24))
    config = tiny_config(tiny_backbone, pairs, onnx=False, epochs=1, checkpoint_every=0, eval_every=0,
                         freeze_layers=1)
    train_module.train_reward(config, tmp_path / "model", progress=False)
    base = load_file(Path(tiny_backbone) / "model.safetensors")
    trained = {k.removeprefix("backbone."): v for k, v in load_file(tmp_path / "model" / "model.safetensors").items()}
    fixed = [k for k in trained if k.startswith(("embeddings.", "encoder.layer.0."))]
    assert fixed and all(torch.equal(trained[k], base[k]) for k in fixed)
    assert not torch.equal(trained["encoder.layer.1.output.dense.weight"], base["encoder.layer.1.output.dense.weight"])
    config.training.freeze_layers = 2  # the tiny backbone has 2 layers: nothing would be left to train
    config.heads[0].train[0].path = str(tmp_path / "absent.jsonl")  # said before the data is read
    with pytest.raises(ConfigError, match="has 2 layers; freeze fewer"):
        train_module.train_reward(config, tmp_path / "model2", progress=False)


def test_init_from_fine_tunes_a_trained_model_and_refuses_other_heads(tiny_reward_model: Path, tiny_backbone: str,
                                                                        tmp_path: Path):
    from safetensors.torch import load_file

    from keel.training.config import ConfigError

    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(16))
    ratings = write_jsonl(tmp_path / "ratings.jsonl", [
        {"text": ["great thanks", "terrible bad"][i % 2], "score": [1.0, -1.0][i % 2]} for i in range(8)])
    # One step at a negligible rate: what is published is the trained model, not fresh heads on the backbone.
    config = tiny_config(tiny_backbone, pairs, ratings, onnx=False, epochs=1, max_steps=1, learning_rate=1e-9,
                         head_learning_rate=1e-9, checkpoint_every=0, eval_every=0)
    config.init_from = str(tiny_reward_model)
    manifest = train_module.train_reward(config, tmp_path / "tuned", progress=False)
    start, tuned = (load_file(path / "model.safetensors") for path in (tiny_reward_model, tmp_path / "tuned"))
    assert start.keys() == tuned.keys() and all(torch.allclose(start[k], tuned[k], atol=1e-6) for k in start)
    assert manifest["metrics"]["validation"]["harmless"]["accuracy"] >= 0.9

    config.heads.pop()  # harmless only: the model to fine-tune also has `quality`
    with pytest.raises(ConfigError, match=r"has heads \['harmless', 'quality'\], the config \['harmless'\]"):
        train_module.train_reward(config, tmp_path / "other-heads", progress=False)
    config.init_from = str(tmp_path)
    with pytest.raises(ConfigError, match="not a Keel reward model directory"):
        train_module.train_reward(config, tmp_path / "no-model", progress=False)


def test_repeat_oversamples_a_training_source_only(tiny_backbone: str, tmp_path: Path):
    from keel.training.reward.data import load_head_data

    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(10))
    config = tiny_config(tiny_backbone, pairs)
    config.heads[0].train[0].repeat = config.heads[0].validation[0].repeat = 3
    head = load_head_data(config, skip_bad_rows=False)[0]
    assert len(head.train) == 30 and len(head.validation) == 10
    assert [e.chosen_input for e in head.train[10:20]] == [e.chosen_input for e in head.train[:10]]


def test_seed_ensemble_averages_the_models_margins():
    from bench.seed_ensemble_bench import summarise

    # Margins r_chosen - r_rejected of two models on four pairs: each is right on two pairs, they agree on two.
    first, second = np.array([1.0, -1.0, 2.0, -0.5]), np.array([1.0, 3.0, -1.0, -0.5])
    row = summarise([first, second])
    assert row["models"] == [0.5, 0.5]
    assert row["ensemble"] == 0.75  # averaged margins 1, 1, 0.5, -0.5
    assert row["all_agree"] == 0.5
    assert row["mean_margin_correlation"] == pytest.approx(np.corrcoef(first, second)[0, 1], abs=1e-3)


def test_fresh_heads_are_drawn_once_with_keels_scale(tiny_backbone: str):
    from keel.core.reward_model import RewardModel

    torch.manual_seed(0)
    model = RewardModel.from_base(tiny_backbone, ["a", "b"])
    expected_std = model.config.hidden_size ** -0.5  # not transformers' initializer_range (0.02)
    assert 0.7 * expected_std < float(model.heads.weight.detach().std()) < 1.3 * expected_std
    assert torch.equal(model.heads.bias, torch.zeros(2))
    torch.manual_seed(0)
    assert torch.equal(RewardModel.from_base(tiny_backbone, ["a", "b"]).heads.weight, model.heads.weight)


def test_a_new_head_type_is_one_class_and_one_registry_entry(tiny_backbone: str, tmp_path: Path, monkeypatch):
    """A third objective, defined here: texts labelled 0/1 and a logistic loss. Registering it is all it takes for
    its rows to be read, a head to train on them, its headline metric to pick the kept weights, moderation to be
    calibrated on it and the model card to show it."""
    from dataclasses import dataclass

    import torch.nn.functional as F

    from keel.training.reward import objectives
    from keel.training.reward.config import HeadConfig

    @dataclass(frozen=True)
    class Labelled:
        input: tuple[str, str]
        label: float
        split_key: str

    class Logistic:
        columns = 1
        headline = objectives.Headline("log_loss", higher_is_better=False)

        def parse(self, row):
            return Labelled(("", row["text"]), float(row["label"]), row["text"]) if "label" in row else None

        def texts(self, examples):
            return [e.input for e in examples]

        def loss(self, scores, examples, margin):
            target = torch.tensor([e.label for e in examples], dtype=scores.dtype, device=scores.device)
            return F.binary_cross_entropy_with_logits(scores, target)  # L = BCE(sigma(r(x)), y)

        def accuracy(self, scores):
            return None

        def metrics(self, scores, examples):
            labels = torch.tensor([e.label for e in examples])
            return {"labelled": len(examples), "log_loss": float(F.binary_cross_entropy_with_logits(
                torch.from_numpy(scores).float(), labels))}

        def flag_labels(self, examples):
            return self.texts(examples), [1.0 - e.label for e in examples]  # label 1 = acceptable

        moderation_labels = flag_labels

        def card_row(self, head, metrics):
            return f"| {head} | {metrics['labelled']} texts | log loss | {metrics['log_loss']:.3f} |" \
                if "log_loss" in metrics else None

    monkeypatch.setitem(objectives.OBJECTIVES, Labelled, Logistic())
    rows = [{"text": f"{'kind' if i % 2 else 'rude'} reply number {i}", "label": i % 2} for i in range(40)]
    labelled = write_jsonl(tmp_path / "labelled.jsonl", rows)
    config = tiny_config(tiny_backbone, write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(24)), onnx=False,
                         epochs=2, eval_every=2, checkpoint_every=0)
    config.heads.insert(0, HeadConfig("polite", [DataSource(str(labelled))], [DataSource(str(labelled), limit=10)],
                                      test=[DataSource(str(labelled), limit=10)]))
    config.primary_head = "polite"
    manifest = train_module.train_reward(config, tmp_path / "model", progress=False)

    assert manifest["metrics"]["test"]["polite"]["labelled"] == 10
    assert manifest["moderation"]["polite"]["threshold"] is not None
    rows = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_polite_log_loss" in row for row in rows)
    assert "| polite | 10 texts | log loss |" in (tmp_path / "model" / "README.md").read_text()
