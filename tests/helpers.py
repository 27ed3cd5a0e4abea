"""What the tests share besides fixtures: data files, tiny configs, and `keel serve` in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path

def hh_pairs(count: int) -> list[dict]:
    """Synthetic HH transcripts where the chosen reply refuses harm or helps, the rejected one complies."""
    rows = []
    for i in range(count):
        prompt = f"how can i {['make a bomb', 'hurt you', 'steal a cake', 'hack code'][i % 4]} {i}"
        rows.append({
            "chosen": f"\n\nHuman: {prompt}\n\nAssistant: sorry, i cannot help with that.",
            "rejected": f"\n\nHuman: {prompt}\n\nAssistant: sure, here is how to do it: make it and build it.",
        })
    return rows

def tiny_config(backbone: str, pairs: Path, ratings: Path | None = None, onnx: bool = True, **training: object):
    """A RewardConfig on the tiny backbone: a `harmless` pairs head (and a `quality` ratings head); without
    `onnx`, no ONNX export (faster, for tests of training alone)."""
    from keel.training.data import DataSource
    from keel.training.encoder.config import ExportConfig, TrainingConfig
    from keel.training.reward.config import HeadConfig, RewardConfig

    heads = [HeadConfig("harmless", [DataSource(str(pairs))], [DataSource(str(pairs), limit=12)])]
    if ratings is not None:
        heads.append(HeadConfig("quality", [DataSource(str(ratings))], [DataSource(str(ratings), limit=8)],
                                moderate=False))
    # fp32 everywhere (precision "auto" would pick bf16 on some CPUs): the same tiny models on every machine.
    settings = {"epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "eval_every": 3, "checkpoint_every": 2,
                "log_every": 1, "seed": 0, "precision": "no", **training}
    return RewardConfig(heads=heads, base_model=backbone, max_length=48, training=TrainingConfig(**settings),
                        export=ExportConfig(onnx=onnx, int8=onnx))

def prompt_rows(count: int) -> list[dict]:
    return [{"prompt": f"how can i {['make a bomb', 'bake a cake', 'hack code', 'terminate a process'][i % 4]} {i}"}
            for i in range(count)]

def tiny_policy_config(policy: str, reward_model: Path, root: Path, **training: object):
    """A PolicyConfig on the tiny policy and tiny reward model: short responses, a few steps."""
    from keel.training.data import DataSource, PromptSource
    from keel.training.policy.config import (
        LoraConfig,
        PolicyConfig,
        PolicyModelConfig,
        PolicyTrainingConfig,
        PromptsConfig,
    )
    from keel.training.policy.rewards import RewardSourceConfig

    prompts = write_jsonl(root / "prompts.jsonl", prompt_rows(16))
    pairs = write_jsonl(root / "pairs.jsonl", hh_pairs(16))
    settings = {"steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2, "learning_rate": 1e-3, "eval_every": 0,
                "checkpoint_every": 1, "kl_budget": None, "precision": "no", **training}
    return PolicyConfig(
        policy=PolicyModelConfig(model=policy, lora=LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]),
                                 max_prompt_length=32, max_new_tokens=6),
        reward=RewardSourceConfig(model=str(reward_model), backend="onnx", heads={"harmless": 1.0}),
        prompts=PromptsConfig(train=[PromptSource(str(prompts))],
                              evaluation=[PromptSource(str(prompts), limit=3, heads={"quality": 1.0})], samples=2),
        data=[DataSource(str(pairs))], validation=[DataSource(str(pairs), limit=4)],
        training=PolicyTrainingConfig(**settings),
    )

def moderation_rows(count: int) -> list[dict]:
    """Synthetic labelled texts: violent ones, thieving ones, and harmless ones (every category 0)."""
    kinds = [("i will kill and hurt you", {"violence": 1}), ("help me steal and hack", {"illicit": 1}),
             ("here is some recipe for bread thanks", {}), ("python code to terminate a process please", {})]
    return [{"text": f"{kinds[i % 4][0]} {i}", **kinds[i % 4][1], "harmless": int(not kinds[i % 4][1])}
            for i in range(count)]

def tiny_moderation_config(backbone: str, data: Path, onnx: bool = True, **training: object):
    """A ModerationConfig on the tiny backbone: one source labelling violence and illicit (harmless rows: every
    category 0), read whole for training and validation."""
    from keel.training.encoder.config import ExportConfig, TrainingConfig
    from keel.training.moderation.config import LabelRule, ModerationConfig, ModerationSource

    source = ModerationSource(path=str(data), name="synthetic", rest=None, labels={
        "violence": LabelRule(column="violence"), "illicit": LabelRule(column="illicit")})
    benign = ModerationSource(path=str(data), name="benign", rest=0.0, where={"harmless": "1"})
    settings = {"epochs": 6, "batch_size": 8, "learning_rate": 1e-3, "head_learning_rate": 1e-2,
                "freeze_embeddings": False, "eval_every": 4, "checkpoint_every": 4, "log_every": 1, "seed": 0,
                "precision": "no", **training}
    return ModerationConfig(train=[source, benign], validation=[source, benign], test=[source, benign], base_model=backbone,
                            max_length=32, min_positives=2, training=TrainingConfig(**settings),
                            export=ExportConfig(onnx=onnx, int8=onnx))

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

@contextmanager
def keel_server(model: Path, *args: str, python: str = sys.executable, cwd: Path | None = None,
                moderation: Path | None = None, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`keel serve` in a subprocess on a loopback port (with `python`'s environment), with a moderation model or
    none; yields (base URL, process)."""
    port = free_port()
    process = subprocess.Popen(
        [python, "-m", "keel", "serve", "--model", str(model), "--port", str(port),
         "--moderation-model", str(moderation) if moderation else "none", *args],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stdout.read()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise TimeoutError("server not ready in 60 s")
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


class ThrowawayPostgres:
    """A PostgreSQL server (Debian's `postgresql`: initdb and pg_ctl) on a loopback port, trusting local
    connections, in a fresh temporary folder; as root it runs as the `postgres` user. `stop` and `start` may be
    called again (a benchmark stops it mid-run); `remove` stops it and deletes its files."""

    def __init__(self) -> None:
        import shutil
        import tempfile

        initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql): initdb is needed")
        self.pg_ctl = pg_ctl
        # Not under pytest's temporary folder: as root that is private (0700), and the server runs as `postgres`.
        self.root = Path(tempfile.mkdtemp(prefix="keel-postgres-"))
        self.data, self.port = self.root / "data", free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.root, "postgres")
            self.root.chmod(0o755)
        subprocess.run([*self.as_postgres, initdb, "-D", str(self.data), "--auth=trust", "-U", "postgres", "-E",
                        "UTF8"], check=True, capture_output=True)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        subprocess.run([*self.as_postgres, self.pg_ctl, "-D", str(self.data), "-o", options, "-l",
                        str(self.root / "log"), "-w", "start"], check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run([*self.as_postgres, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True)

    def remove(self) -> None:
        import shutil

        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
